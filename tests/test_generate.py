"""`python -m lib_adapters generate`: the embedded demo, pixels against diffusers' own LoRA loading, grids, errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from lib_adapters.cli import main  # noqa: E402
from lib_adapters.demo import DEMO_ADAPTERS, build_demo_pipeline, write_demo_adapters  # noqa: E402
from lib_adapters.errors import AdapterError  # noqa: E402
from lib_adapters.generate import grid_cells, parse_adapter_arg, parse_grid_axis  # noqa: E402


FAST = ["--steps", "2", "--width", "64", "--height", "64", "--quiet", "--seed", "7"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    write_demo_adapters(folder)
    return folder


def run(tmp_path, name, *args, demo_dir=None):
    out = tmp_path / f"{name}.png"
    extra = ["--demo-dir", str(demo_dir)] if demo_dir else []
    assert main(["generate", *args, *FAST, *extra, "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def reference(prompt, lora=None, scale=1.0):
    """The demo pipeline driven by diffusers alone, the LoRA loaded and fused by diffusers itself."""
    pipe = build_demo_pipeline()
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="ref")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["ref"])
    out = pipe(prompt, negative_prompt=None, num_inference_steps=2, width=64, height=64, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(7)).images[0]
    return np.asarray(out.convert("RGB"))


def test_plain_command_runs_the_embedded_demo_into_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--steps", "2", "--width", "64", "--height", "64", "--quiet"]) == 0
    printed = capsys.readouterr().out
    pngs = list((tmp_path / "outputs" / "generate").glob("*.png"))
    assert len(pngs) == 1 and str(pngs[0].relative_to(tmp_path)) in printed
    assert Image.open(pngs[0]).size == (64, 64)
    assert sorted(p.stem for p in (tmp_path / "outputs" / "demo-adapters").glob("*.safetensors")) == sorted(DEMO_ADAPTERS)
    assert "demo_lokr" in Image.open(pngs[0]).text["adapters"]


def test_image_with_a_lora_equals_diffusers_load_and_fuse_pixel_for_pixel(tmp_path, demo_dir):
    ours = run(tmp_path, "lora", "a red fox <lora:demo_lora:1>", demo_dir=demo_dir)
    theirs = reference("a red fox", demo_dir / "demo_lora.safetensors", 1.0)
    plain = reference("a red fox")
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, plain)


def test_strength_zero_equals_no_adapter(tmp_path, demo_dir):
    zero = run(tmp_path, "zero", "a red fox <lora:demo_lora:0> <lora:demo_oft:0>", demo_dir=demo_dir)
    none = run(tmp_path, "none", "a red fox", demo_dir=demo_dir)
    assert np.array_equal(zero, none)


def test_grid_cells_are_the_single_images(tmp_path, demo_dir):
    grid = run(tmp_path, "grid", "a red fox <lora:demo_lora:1>", "--grid", "unet=0,1", "te=0,1", demo_dir=demo_dir)
    single = run(tmp_path, "single", "a red fox <lora:demo_lora:1:0>", demo_dir=demo_dir)
    plain = run(tmp_path, "plain", "a red fox", demo_dir=demo_dir)
    h, w, _ = single.shape
    top, left = grid.shape[0] - 2 * h, grid.shape[1] - 2 * w
    assert top > 0 and left > 0  # room for the labels
    cell = lambda c, r: grid[top + r * h: top + (r + 1) * h, left + c * w: left + (c + 1) * w]  # noqa: E731
    assert np.array_equal(cell(1, 0), single)  # unet=1, te=0
    assert np.array_equal(cell(0, 0), plain)  # both 0
    assert not np.array_equal(cell(1, 1), single)


def test_unknown_adapter_exits_non_zero_with_one_line_and_writes_nothing(tmp_path, demo_dir):
    out = tmp_path / "never.png"
    proc = subprocess.run([sys.executable, "-m", "lib_adapters", "generate", "a fox <lora:missing_one:1>", *FAST,
                           "--demo-dir", str(demo_dir), "--out", str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "missing_one" in lines[0] and "no adapter file" in lines[0]
    assert not out.exists()


def test_bad_adapter_file_is_refused_before_anything_is_written(tmp_path, demo_dir):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 20)
    out = tmp_path / "never.png"
    with pytest.raises(AdapterError, match="broken.safetensors"):
        main_raw(["generate", "a fox", "--adapter", f"{bad}:0.5", *FAST, "--demo-dir", str(demo_dir), "--out", str(out)])
    assert not out.exists()


def main_raw(argv):
    from lib_adapters.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.run(args)


def test_grid_and_adapter_arguments_parse():
    axis = parse_grid_axis("demo_lora.te=0,0.5,1")
    assert (axis.part, axis.adapter, axis.values) == ("te", "demo_lora", [0.0, 0.5, 1.0])
    assert len(grid_cells([parse_grid_axis("unet=0,1,2"), parse_grid_axis("te=0,1")])) == 6
    for bad in ("unet", "clip=0,1", "unet=a,b"):
        with pytest.raises(AdapterError, match="--grid"):
            parse_grid_axis(bad)
    assert parse_adapter_arg("C:/loras/x.safetensors:0.5:0.25") == ("C:/loras/x.safetensors", 0.5, 0.25)
    assert parse_adapter_arg("x.safetensors:0.5") == ("x.safetensors", 0.5, 0.5)
    assert parse_adapter_arg("x.safetensors") == ("x.safetensors", 1.0, 1.0)


def test_checkpoint_with_a_lora_equals_diffusers_load_and_fuse_pixel_for_pixel(tmp_path):
    """--checkpoint (WebUI single file) + --config folder + --lora-dir, against the same model fused by diffusers."""
    from test_convert import rich_kohya
    from test_diffusers_host import tiny_config_dir

    from lib_adapters.files import save_tensors
    from lib_adapters.hosts.diffusers import load_checkpoint_pipeline
    from lib_adapters.models import build_tiny, to_checkpoint

    ckpt = tmp_path / "tiny_sd1.safetensors"
    save_tensors(ckpt, to_checkpoint(build_tiny("sd1", seed=2), "sd1"))
    config = tiny_config_dir("sd1", tmp_path / "cfg")
    (tmp_path / "loras").mkdir()
    pipe, _ = load_checkpoint_pipeline(ckpt, config_dir=config)
    lora = rich_kohya(pipe, tmp_path / "loras" / "style.safetensors", dtype=torch.float32, uniform=True)
    ours = run(tmp_path, "ckpt", "a red fox <lora:style:1>", "--checkpoint", str(ckpt), "--config", str(config),
               "--lora-dir", str(tmp_path / "loras"))
    pipe.load_lora_weights(str(lora), adapter_name="ref")
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["ref"])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red fox", num_inference_steps=2, width=64, height=64, guidance_scale=7.0,
                  generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(ours, np.asarray(theirs.convert("RGB")))


def test_block_weights_in_the_tag_and_schedules_refused(tmp_path, demo_dir, capsys):
    ones = ",".join(["1"] * 26)  # every block of the 26-block list at 1: the adapter as it is
    all_blocks = run(tmp_path, "all", f"a red fox <lora:demo_lora:1:lbw={ones}>", demo_dir=demo_dir)
    none = run(tmp_path, "none", "a red fox <lora:demo_lora:1:lbw=NONE>", demo_dir=demo_dir)
    plain = run(tmp_path, "plain", "a red fox", demo_dir=demo_dir)
    full = run(tmp_path, "full", "a red fox <lora:demo_lora:1>", demo_dir=demo_dir)
    assert np.array_equal(none, plain) and np.array_equal(all_blocks, full) and not np.array_equal(full, plain)
    code = main(["generate", "a fox <lora:demo_lora:0@0,1@1>", *FAST, "--demo-dir", str(demo_dir),
                 "--out", str(tmp_path / "never.png")])
    assert code == 2 and "one strength per image" in capsys.readouterr().err and not (tmp_path / "never.png").exists()
