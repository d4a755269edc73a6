"""`python -m lib_adapters inspect`: the JSON summary of a mixed file, and one-line errors for bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_adapters import cli
from reference_adapters import build_ia3, build_lycoris, build_peft

ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(linear_dim=8, linear_alpha=4, conv_dim=4, conv_alpha=2)

# (source case, create_lycoris kwargs, layers taken from it, kind each layer must be reported as)
SOURCES = [
    ("lora", dict(algo="lora", train_norm=True, **DIMS), {"lin": "lora", "conv3": "locon", "ln": "norm", "gn": "norm"}),
    ("loha", dict(algo="loha", **DIMS), {"lin": "loha", "conv3": "loha"}),
    ("lokr", dict(algo="lokr", factor=4, **DIMS), {"lin": "lokr"}),
    ("oft", dict(algo="diag-oft", linear_dim=16, conv_dim=16), {"lin": "oft"}),
    ("boft", dict(algo="boft", linear_dim=8, conv_dim=8), {"conv1": "boft"}),
    ("glora", dict(algo="glora", **DIMS), {"lin": "glora"}),
    ("full", dict(algo="full"), {"conv1": "full"}),
    ("dora", dict(algo="lora", dora_wd=True, **DIMS), {"conv1": "lora"}),
]
METADATA = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_dim": "8",
    "ss_network_alpha": "4",
    "ss_base_model_version": "sd_v1",
    "ss_network_args": json.dumps({"algo": "lokr", "factor": "4", "dora_wd": "True"}),
    "ss_tag_frequency": json.dumps({"10_cat": {"cat": 10, "sofa": 2}}),
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "Toy mix",
    "modelspec.thumbnail": "data:image/png;base64," + "A" * 500,
    "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8}),
    "unrelated_key": "not shown",
}


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """A file mixing every algorithm (each layer renamed `lora_unet_<source>_<layer>`), plus a stray key."""
    tensors, kinds = {}, {}
    for source, kwargs, layers in SOURCES:
        built = build_lycoris(source, **kwargs)
        for layer, kind in layers.items():
            prefix = f"lora_unet_{layer}."
            for key, value in built.state_dict.items():
                if key.startswith(prefix):
                    tensors[f"lora_unet_{source}_{layer}.{key[len(prefix):]}"] = value
            kinds[f"lora_unet_{source}_{layer}"] = kind
    ia3 = build_ia3(on_input=False)
    for key, value in ia3.state_dict.items():
        if key.startswith("lora_unet_lin."):
            tensors[key.replace("lora_unet_lin.", "lora_unet_ia3_lin.")] = value
    kinds["lora_unet_ia3_lin"] = "ia3"
    # a cross-attention key layer of SD1 width (768)
    attn2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors[f"{attn2}.lora_down.weight"] = torch.randn(2, 768)
    tensors[f"{attn2}.lora_up.weight"] = torch.randn(320, 2)
    tensors[f"{attn2}.alpha"] = torch.tensor(1.0)
    kinds[attn2] = "lora"
    tensors["lora_unet_stray.something_else"] = torch.randn(3)
    path = tmp_path_factory.mktemp("inspect") / "mixed.safetensors"
    save_file(tensors, str(path), metadata=METADATA)
    return path, tensors, kinds


def run_cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lib_adapters", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120, **kw)


def test_inspect_json_summary(mixed):
    path, tensors, kinds = mixed
    proc = run_cli("inspect", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    expected_counts = {}
    for kind in kinds.values():
        expected_counts[kind] = expected_counts.get(kind, 0) + 1
    assert summary["algorithms"] == expected_counts
    assert list(summary["algorithms"]) == [n for n in ("lora", "locon", "loha", "lokr", "oft", "boft", "ia3", "glora",
                                                         "full", "norm") if n in expected_counts]
    assert summary["dora"] is True
    assert summary["layers"] == len(kinds)
    assert summary["family"] == "sd1"
    assert summary["key_format"] == "lycoris"
    assert summary["unmatched"] == ["lora_unet_stray.something_else"]
    # rank: LoRA-like layers' ranks from their factors
    ranks = {}
    for module in kinds:
        for param, axis in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("a2.weight", 0)):
            if f"{module}.{param}" in tensors:
                r = tensors[f"{module}.{param}"].shape[axis]
                ranks[str(r)] = ranks.get(str(r), 0) + 1
    assert summary["rank"] == {"min": min(map(int, ranks)), "max": max(map(int, ranks)), "counts": ranks}
    alphas = {}
    for module, kind in kinds.items():
        if kind not in ("oft", "boft") and f"{module}.alpha" in tensors:
            a = f"{float(tensors[f'{module}.alpha']):g}"
            alphas[a] = alphas.get(a, 0) + 1
    assert summary["alpha"] == alphas
    meta = summary["metadata"]
    assert meta["ss_network_args"] == {"algo": "lokr", "factor": "4", "dora_wd": "True"}
    assert meta["ss_tag_frequency"] == {"10_cat": {"cat": 10, "sofa": 2}}
    assert meta["ss_network_dim"] == "8" and meta["modelspec.title"] == "Toy mix"
    assert meta["lora_adapter_metadata"] == {"unet.r": 4, "unet.lora_alpha": 8}
    assert "AAAA" not in meta["modelspec.thumbnail"]
    assert "unrelated_key" not in meta


def test_inspect_table_mentions_every_algorithm(mixed, capsys):
    path, _, kinds = mixed
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for kind in set(kinds.values()):
        assert kind in out
    assert "(+DoRA)" in out and "sd1" in out


def test_inspect_peft_json(tmp_path, capsys):
    built = build_peft("lora", r=4, lora_alpha=8, use_dora=True)
    path = tmp_path / "peft.safetensors"
    save_file(built.state_dict, str(path), metadata=built.metadata)
    assert cli.main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["key_format"] == "peft" and summary["dora"] is True
    assert summary["algorithms"] == {"lora": 2, "locon": 1}
    assert summary["rank"]["counts"] == {"4": 3} and summary["alpha"] == {"8": 3}
    assert summary["metadata"]["lora_adapter_metadata"]["lora_alpha"] == 8


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00.", b"\x10\0\0\0\0\0\0\0{bad header....."])
def test_inspect_bad_file_prints_one_line(tmp_path, content, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_inspect_bad_file_subprocess_exits_nonzero_without_traceback(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, str(path))
    proc = run_cli("inspect", str(path))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "pickle" in lines[0].split(str(path))[1]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
