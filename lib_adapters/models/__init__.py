"""Model configs, seeded builders and diffusers → single-file (ldm/sgm) conversion, for tests and benchmarks."""

from .build import build, build_tiny
from .configs import FAMILIES, configs
from .convert import to_checkpoint, unet_to_ldm, vae_to_ldm

__all__ = ["FAMILIES", "build", "build_tiny", "configs", "to_checkpoint", "unet_to_ldm", "vae_to_ldm"]
