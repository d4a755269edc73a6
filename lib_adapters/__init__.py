"""lib_adapters: load LoRA/LyCORIS/PEFT adapter files and merge them exactly into Stable Diffusion weights.

Top-down: files (read) → keys (group by module) → algorithms (one patch per layer) → naming (which weight)
→ patching (apply/restore on any weight store). Host glue lives in `hosts/` and imports nothing back here.
"""

from .adapter import Adapter
from .errors import AdapterError

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterError", "__version__"]
