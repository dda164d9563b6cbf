"""Shared fixtures: a prepared copy of the embedded data. Helpers live in tests/testutil.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from testutil import ROOT  # noqa: F401  (also puts the repository root on sys.path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Shakespeare shards + BPE (vocab 4096), built once per test session."""
    from common.data import prepare

    d = tmp_path_factory.mktemp("data")
    prepare("shakespeare", d, "bpe", 4096, progress=False)
    return d
