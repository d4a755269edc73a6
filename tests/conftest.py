import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The embedded demo pipeline and the adapters it ships, fresh for each test module."""
    from lib_adapters.demo import build_demo_pipeline, write_demo_adapters

    pipe = build_demo_pipeline()
    folder = tmp_path_factory.mktemp("demo_adapters")
    return pipe, write_demo_adapters(folder, pipe), folder
