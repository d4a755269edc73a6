"""Fake `backend.patcher.unet.UnetPatcher`."""

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    pass
