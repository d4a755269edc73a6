"""diffusers UNet module paths ↔ ldm/sgm `model.diffusion_model.*` module paths (formats.md §5.2).

Both directions work on module paths (no `.weight`) and need the block layout, which they read from the names
of the model at hand: `layers_per_block` from the first downsampler, and which up blocks carry attentions.
"""

from __future__ import annotations

import re

RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
              "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
RESNET_DIFFUSERS = {v: k for k, v in RESNET_LDM.items()}
TOP_LDM = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
           "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
           "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
TOP_DIFFUSERS = {v: k for k, v in TOP_LDM.items()}


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    """Rename the first one or two components of a resnet-internal path by `table`."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def layers_per_block_ldm(modules) -> int:
    """L from the first downsampler `input_blocks.(L+1).0.op`; 2 when there is none."""
    found = [int(m.group(1)) for p in modules if (m := re.match(r"input_blocks\.(\d+)\.0\.op(\.|$)", p))]
    return min(found) - 1 if found else 2


def layers_per_block_diffusers(modules) -> int:
    found = [int(m.group(1)) for p in modules if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)(\.|$)", p))]
    return max(found) + 1 if found else 2


def ldm_to_diffusers(path: str, layers: int = 2) -> str | None:
    """The diffusers path of an ldm module path (relative to `diffusion_model.`), or None if it has none."""
    for old, new in TOP_LDM.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    step = layers + 1
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path):
        i, k, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        b, j = divmod(i - 1, step)
        if j == layers and k == 0 and (rest == "op" or rest.startswith("op.")):
            return f"down_blocks.{b}.downsamplers.0.conv" + rest[2:]
        if k == 0:
            return _join(f"down_blocks.{b}.resnets.{j}", _rename_inner(rest, RESNET_LDM))
        if k == 1:
            return _join(f"down_blocks.{b}.attentions.{j}", rest)
        return None
    if m := re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path):
        k, rest = int(m.group(1)), m.group(2) or ""
        if k == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{k // 2}", _rename_inner(rest, RESNET_LDM))
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path):
        o, k, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        b, j = divmod(o, step)
        if k > 0 and (rest == "conv" or rest.startswith("conv.")):
            return f"up_blocks.{b}.upsamplers.0.conv" + rest[4:]
        if k == 0:
            return _join(f"up_blocks.{b}.resnets.{j}", _rename_inner(rest, RESNET_LDM))
        if k == 1:
            return _join(f"up_blocks.{b}.attentions.{j}", rest)
    return None


def diffusers_to_ldm(path: str, layers: int = 2, up_with_attention: frozenset[int] = frozenset()) -> str | None:
    """The ldm path (relative to `diffusion_model.`) of a diffusers UNet module path, or None."""
    for old, new in TOP_DIFFUSERS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    step = layers + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", path):
        b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or ""
        if kind == "downsamplers":
            if not (rest == "conv" or rest.startswith("conv.")):
                return None
            return _join(f"input_blocks.{1 + step * b + layers}.0", "op" + rest[4:])
        if kind == "resnets":
            return _join(f"input_blocks.{1 + step * b + j}.0", _rename_inner(rest, RESNET_DIFFUSERS))
        return _join(f"input_blocks.{1 + step * b + j}.1", rest)
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if kind == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * j}", _rename_inner(rest, RESNET_DIFFUSERS))
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", path):
        b, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4) or ""
        if kind == "upsamplers":
            slot = 2 if b in up_with_attention else 1
            return _join(f"output_blocks.{step * b + layers}.{slot}", rest)
        if kind == "resnets":
            return _join(f"output_blocks.{step * b + j}.0", _rename_inner(rest, RESNET_DIFFUSERS))
        return _join(f"output_blocks.{step * b + j}.1", rest)
    return None


def up_blocks_with_attention(diffusers_paths) -> frozenset[int]:
    return frozenset(int(m.group(1)) for p in diffusers_paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p)))


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head
