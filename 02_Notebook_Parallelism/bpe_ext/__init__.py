"""Byte-pair-encoding merge loop: a pybind11 C++ extension with a pure-Python fallback.

    from bpe_ext import load
    train_merges, backend = load()   # backend: "c++" or "python"

``load()`` compiles ``bpe_merge.cpp`` with the system C++ compiler on first use (a few seconds; the
module is cached under ``bpe_ext/build/``, keyed by the source's hash). Without a compiler, without
pybind11, or with ``BPE_EXT_FORCE_PYTHON=1`` it returns the Python loop of ``reference.py``.
"""

from .build import load  # noqa: F401
from .reference import train_merges as train_merges_python  # noqa: F401
