"""Config modules (`get_config(arg)`, big_vision style) that ship with the package, and the loader.

Every command reads one: `--config NAME[:arg]` names a module here (`stage1`, `demo`, `eval`, ...)
or `--config path/to/file.py[:arg]` a file of your own; `--config.a.b=value` overrides a field.
The top-level `configs/` folder of the repository holds the same recipes as files to copy and edit.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional

import ml_collections

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> List[str]:
    """The packaged config modules, by name."""
    return sorted(f[:-3] for f in os.listdir(PACKAGE_DIR) if f.endswith(".py") and not f.startswith("_")
                  and f != "common.py")


def resolve(spec: str) -> str:
    """'NAME[:arg]' or 'FILE.py[:arg]' -> 'path/to/file.py[:arg]' (a file path wins over a name)."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path) or path.endswith(".py") or os.sep in path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--config {spec}: no file {path}")
        return spec
    packaged = os.path.join(PACKAGE_DIR, f"{path}.py")
    if path in names():
        return packaged + sep + arg
    raise FileNotFoundError(f"--config {spec}: neither a file nor a packaged config (packaged: {', '.join(names())})")


def load(spec: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a packaged config name or a config file path ('NAME[:arg]' works too)."""
    path_and_arg = resolve(spec)
    path, _, spec_arg = path_and_arg.partition(":")
    arg = arg if arg is not None else (spec_arg or None)
    name = "_svj_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"config file {path} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
