"""Serve the top-level ``patches/`` folder as ``hf_moe_opt.patches`` in a source checkout.

Installed packages get this mapping from setup.py's ``package_dir``; running from a checkout with
``PYTHONPATH=.`` (no install) needs it done by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def map_source_patches() -> None:
    if "hf_moe_opt.patches" in sys.modules or importlib.util.find_spec("hf_moe_opt.patches") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "patches"
    if not (folder / "__init__.py").exists():
        return
    spec = importlib.util.spec_from_file_location(
        "hf_moe_opt.patches", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_moe_opt.patches"] = module
    spec.loader.exec_module(module)
