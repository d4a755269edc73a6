"""Fake of the WebUI's `modules` package (A1111 1.10 / Forge), one file per host module; see host-contract §11."""
