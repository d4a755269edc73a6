import pytest

from lib_adapters.errors import AdapterError
from lib_adapters.library import AdapterIndex


@pytest.fixture
def lora_dir(tmp_path):
    for rel in ["Style.safetensors", "sub/detail.safetensors", "a/dup.safetensors", "b/dup.safetensors",
                "old.pt", "readme.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return tmp_path


def test_finds_by_stem_in_subfolders_case_insensitively(lora_dir):
    index = AdapterIndex(lora_dir)
    assert index.find("detail").endswith("sub/detail.safetensors")
    assert index.find("style").endswith("Style.safetensors")
    assert index.find("sub/detail").endswith("sub/detail.safetensors")


def test_ambiguous_stem_asks_for_the_subfolder(lora_dir):
    index = AdapterIndex(lora_dir)
    with pytest.raises(AdapterError, match="ambiguous"):
        index.find("dup")
    assert index.find("b/dup").endswith("b/dup.safetensors")


def test_unknown_name_names_the_folder(lora_dir):
    with pytest.raises(AdapterError) as e:
        AdapterIndex(lora_dir).find("nothing")
    assert "nothing" in str(e.value) and str(lora_dir) in str(e.value)


def test_pickles_are_indexed_so_loading_can_refuse_them(lora_dir):
    assert AdapterIndex(lora_dir).find("old").endswith("old.pt")


def test_alias_resolves_when_no_file_has_that_name(lora_dir):
    index = AdapterIndex(lora_dir)
    index.add_alias("my-style-v2", lora_dir / "Style.safetensors")
    assert index.find("My-Style-V2").endswith("Style.safetensors")


def test_refresh_sees_new_files(lora_dir):
    index = AdapterIndex(lora_dir)
    (lora_dir / "new.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError):
        index.find("new")
    index.refresh()
    assert index.find("new").endswith("new.safetensors")
