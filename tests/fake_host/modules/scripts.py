"""Fake `modules.scripts`: the Script base, AlwaysVisible, basedir() and a loader that mimics load_scripts()."""

import importlib.util
import os
import sys

AlwaysVisible = object()
current_basedir = None
loaded_modules: list = []


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return None

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


class _ScriptRunner:
    def __init__(self):
        self.infotext_fields = []
        self.alwayson_scripts = []

    def after_extra_networks_activate(self, p, **kwargs):
        for s in self.alwayson_scripts:
            s.after_extra_networks_activate(p, **kwargs)


scripts_txt2img = _ScriptRunner()
scripts_img2img = _ScriptRunner()


def basedir():
    return current_basedir


def load_script_file(path: str, extension_root: str):
    """Execute one scripts/*.py the host's way: spec_from_file_location(basename), root on sys.path meanwhile."""
    global current_basedir
    name = os.path.basename(path)
    old_path = list(sys.path)
    sys.path.insert(0, extension_root)
    current_basedir = extension_root
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = old_path
        current_basedir = None
    loaded_modules.append(module)
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Script) and obj is not Script:
            inst = obj()
            if inst.show(False) is AlwaysVisible:
                scripts_txt2img.alwayson_scripts.append(inst)
    return module
