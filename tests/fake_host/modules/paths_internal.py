"""Fake `modules.paths_internal`: where the WebUI keeps things (a temporary tree in tests)."""

import os
import tempfile

data_path = os.environ.get("FAKE_WEBUI_DATA", tempfile.mkdtemp(prefix="fake-webui-"))
script_path = data_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(data_path, "extensions-builtin")


def normalized_filepath(filepath):
    return os.path.abspath(os.path.expanduser(filepath))
