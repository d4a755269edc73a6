"""Fake of Forge's `backend` package (host-contract §6, §11.3): patchers, LoraLoader, weight calculators."""
