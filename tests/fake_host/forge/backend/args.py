"""Fake `backend.args`."""

dynamic_args = {"online_lora": False}
