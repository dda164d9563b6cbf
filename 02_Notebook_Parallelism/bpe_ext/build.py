"""Tiny build helper: compile bpe_merge.cpp into an importable module, or fall back to Python."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "bpe_merge.cpp"


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else c++ or g++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(out_dir: Path = HERE / "build", verbose: bool = False) -> Path:
    """Compile the extension (once per source version) and return the path of the shared library."""
    import pybind11

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    digest = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
    target = out_dir / digest / ("_bpe_merge" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp{os.getpid()}-{target.name}")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(tmp)]
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, target)  # atomic: a second process never imports a half-written file
    return target


def load(verbose: bool = False):
    """(train_merges, backend): the compiled loop if it can be built, else the Python one."""
    from .reference import train_merges

    if os.environ.get("BPE_EXT_FORCE_PYTHON") == "1":
        return train_merges, "python"
    try:
        path = build(verbose=verbose)
    except (ImportError, RuntimeError) as e:
        warnings.warn(f"bpe_ext: using the pure-Python fallback ({e})", stacklevel=2)
        return train_merges, "python"
    spec = importlib.util.spec_from_file_location("_bpe_merge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault("_bpe_merge", module)
    return module.train_merges, "c++"
