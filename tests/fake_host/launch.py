"""Fake `launch` for install.py tests: records is_installed/run_pip calls."""

import argparse
import importlib.util

args = argparse.Namespace(skip_install=False)
calls: list = []


def is_installed(package):
    calls.append(("is_installed", package))
    return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    calls.append(("run_pip", command, desc))
