"""Bad adapter files are refused with an AdapterError naming the file and the reason; pickles are never unpickled."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.files import read_header


def lora_tensors(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_lin.lora_down.weight": torch.randn(rank, 64, generator=g),
        "lora_unet_lin.lora_up.weight": torch.randn(96, rank, generator=g),
        "lora_unet_lin.alpha": torch.tensor(2.0),
    }


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(lora_tensors(), str(path), metadata={"ss_network_dim": "4"})
    return path


def refused(path, *reason_words):
    """Load `path`, expect an AdapterError naming it and containing every reason word."""
    with pytest.raises(AdapterError) as info:
        Adapter.load(path)
    message = str(info.value)
    assert str(path) in message and info.value.path == str(path)
    for word in reason_words:  # in the reason itself, not in the path (pytest's tmp paths contain test names)
        assert word.lower() in info.value.reason.lower(), message
    return message


def test_good_file_loads(good_file):
    adapter = Adapter.load(good_file)
    assert list(adapter.layers) == ["lora_unet_lin"] and adapter.metadata == {"ss_network_dim": "4"}


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    refused(cut, "truncated")


@pytest.mark.parametrize("size", [0, 5])
def test_file_shorter_than_the_length_field(tmp_path, size):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01" * size)
    refused(path, "truncated")


def test_garbage_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 32)
    refused(path, "not valid JSON")


def test_header_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")
    refused(path, "not a JSON object")


def test_header_size_beyond_the_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}" + b" " * 30)
    refused(path, "exceeds the file size")


def test_tensor_offsets_beyond_the_data(tmp_path):
    header = json.dumps({"a.lora_up.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "short-data.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    refused(path, "truncated", "a.lora_up.weight")


def test_checkpoint_is_not_an_adapter(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
    }, str(path))
    refused(path, "not an adapter", "3 tensors")


def test_empty_safetensors_is_not_an_adapter(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    refused(path, "not an adapter", "no tensors")


@pytest.mark.parametrize("bad", ["rank", "loha", "lokr", "oft-rescale", "glora"])
def test_inconsistent_shapes_inside_one_layer(tmp_path, bad):
    t = torch.randn
    layers = {
        "rank": {"lora_up.weight": t(96, 8), "lora_down.weight": t(4, 64)},
        "loha": {"hada_w1_a": t(96, 4), "hada_w1_b": t(4, 64), "hada_w2_a": t(96, 4), "hada_w2_b": t(4, 32)},
        "lokr": {"lokr_w1": t(8, 8), "lokr_w2_a": t(12, 4), "lokr_w2_b": t(2, 8)},
        "oft-rescale": {"oft_blocks": t(16, 6, 6), "rescale": t(48, 1)},
        "glora": {"a1.weight": t(64, 8), "a2.weight": t(4, 64), "b1.weight": t(96, 8), "b2.weight": t(8, 64)},
    }[bad]
    path = tmp_path / f"{bad}.safetensors"
    save_file({f"lora_unet_lin.{k}": v for k, v in layers.items()}, str(path))
    message = refused(path, "lora_unet_lin")
    assert any(w in message for w in ("disagree", "inconsistent", "does not match")), message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf(tmp_path, value):
    tensors = lora_tensors()
    tensors["lora_unet_lin.lora_up.weight"][3, 1] = value
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    refused(path, "NaN or Inf", "lora_unet_lin.lora_up.weight")


def test_missing_file(tmp_path):
    refused(tmp_path / "nowhere.safetensors", "cannot be read")


class Trap:
    """Unpickling this writes a file: the proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save .pt", "torch.save named .safetensors", "raw pickle named .safetensors",
                                 "raw pickle .ckpt"])
def test_pickles_are_refused_never_unpickled(tmp_path, how):
    marker = tmp_path / "unpickled.marker"
    payload = {"lora_unet_lin.lora_up.weight": torch.zeros(2, 2), "trap": Trap(str(marker))}
    suffix = ".pt" if ".pt" in how else ".ckpt" if ".ckpt" in how else ".safetensors"
    path = tmp_path / f"model{suffix}"
    if how.startswith("torch.save"):
        torch.save(payload, str(path))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    refused(path, "pickle")
    assert not marker.exists()
    # the control: the file really would run code when unpickled
    if how.startswith("raw"):
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_header_length_with_a_0x80_low_byte_is_still_safetensors(tmp_path):
    """A pickle starts with 0x80; so can a safetensors header length (n = 128 + 256k)."""
    path = tmp_path / "x80.safetensors"
    for pad in range(0, 300):
        save_file(lora_tensors(), str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert list(Adapter.load(path).layers) == ["lora_unet_lin"]


def test_header_is_read_without_tensor_data(good_file):
    header = read_header(good_file)
    assert set(header.entries) == set(lora_tensors())
    assert header.entries["lora_unet_lin.lora_up.weight"].shape == (96, 4)
    assert header.file_size == good_file.stat().st_size and header.metadata == {"ss_network_dim": "4"}


@pytest.mark.parametrize("bad", ["alpha-vector", "ia3-empty-on-input", "sparse-residual-out-of-range"])
def test_malformed_companion_tensors(tmp_path, bad):
    tensors = lora_tensors()
    if bad == "alpha-vector":
        tensors["lora_unet_lin.alpha"] = torch.tensor([1.0, 2.0])
    elif bad == "ia3-empty-on-input":
        tensors = {"lora_unet_lin.weight": torch.randn(96), "lora_unet_lin.on_input": torch.zeros(0, dtype=torch.int64)}
    else:
        tensors["lora_unet_lin.bias_indices"] = torch.tensor([[0, 500], [1, 2]], dtype=torch.int16)
        tensors["lora_unet_lin.bias_values"] = torch.ones(2, dtype=torch.float16)
        tensors["lora_unet_lin.bias_size"] = torch.tensor([96, 64], dtype=torch.int16)
    path = tmp_path / f"{bad}.safetensors"
    save_file(tensors, str(path))
    refused(path, "lora_unet_lin")
