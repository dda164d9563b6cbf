"""Helpers of the fine-tuning tests (a module of its own: `conftest` is ambiguous with tests/conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_chapter(name: str):
    """Import a script of 04_Finetuning (its folder starts with a digit, so not as a package)."""
    import sys

    sys.path.insert(0, str(ROOT / "04_Finetuning"))
    spec = importlib.util.spec_from_file_location("ft_" + name.replace("/", "_"), ROOT / "04_Finetuning" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
