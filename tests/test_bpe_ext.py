"""The pybind11 BPE extension builds here, its Python fallback works, and both equal the reference and HF."""

import importlib.util
import json
import sys
from collections import Counter

import pytest
from testutil import ROOT

sys.path.insert(0, str(ROOT / "02_Notebook_Parallelism"))
import bpe_ext  # noqa: E402
from bpe_ext import build as bpe_build  # noqa: E402

from common.data import EOT, shakespeare_plays, train_bpe  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    """A slice of the embedded corpus as (word ids, counts, initial vocab), pre-tokenized like common.data."""
    from tokenizers import pre_tokenizers

    text = "".join(shakespeare_plays().values())[:40_000]
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(w for w, _ in pre.pre_tokenize_str(text))
    vocab = [EOT] + sorted(pre_tokenizers.ByteLevel.alphabet())
    index = {t: i for i, t in enumerate(vocab)}
    return text, [[index[c] for c in w] for w in words], list(words.values()), vocab


def test_toy_example_by_hand():
    # "abab" x3 and "ba" x1: (a,b) occurs 6 times -> "ab"; then (ab,ab) 3 times; then (b,a) once
    merges = bpe_ext.train_merges_python([[1, 2, 1, 2], [2, 1]], [3, 1], ["", "a", "b"], 6)
    assert merges == [(1, 2, 3), (3, 3, 4), (2, 1, 5)]


def test_extension_builds_and_matches_reference_and_hf(tmp_path, corpus):
    text, words, counts, vocab = corpus
    path = bpe_build.build(out_dir=tmp_path)  # a fresh compile with the system compiler
    spec = importlib.util.spec_from_file_location("_bpe_merge", path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    reference = bpe_ext.train_merges_python(words, counts, vocab, 400)
    assert len(reference) >= 400 - len(vocab)
    assert [tuple(m) for m in ext.train_merges(words, counts, vocab, 400)] == reference
    # HF tokenizers, trained the way common.data trains it, learns the same merges in the same order
    train_bpe([text], 400, tmp_path / "tok.json")
    hf = json.loads((tmp_path / "tok.json").read_text())["model"]["merges"]
    hf = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in hf]
    strings = list(vocab)
    ours = []
    for a, b, new in reference:
        if new == len(strings):
            strings.append(strings[a] + strings[b])
        ours.append((strings[a], strings[b]))
    assert ours == hf


def test_load_uses_cpp_when_a_compiler_is_present(monkeypatch):
    monkeypatch.delenv("BPE_EXT_FORCE_PYTHON", raising=False)
    fn, backend = bpe_ext.load()
    assert backend == "c++" and fn is not bpe_ext.train_merges_python


def test_fallback_forced_by_env(monkeypatch, corpus):
    _, words, counts, vocab = corpus
    monkeypatch.setenv("BPE_EXT_FORCE_PYTHON", "1")
    fn, backend = bpe_ext.load()
    assert backend == "python"
    args = (words[:200], counts[:200], vocab, 300)
    assert fn(*args) == bpe_ext.train_merges_python(*args)


def test_fallback_without_compiler(monkeypatch, tmp_path):
    monkeypatch.delenv("BPE_EXT_FORCE_PYTHON", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no c++, g++ or clang++
    assert bpe_build.compiler() is None
    with pytest.warns(UserWarning, match="pure-Python fallback"):
        fn, backend = bpe_ext.load()
    assert backend == "python" and fn([[1, 2]], [1], ["", "a", "b"], 4) == [(1, 2, 3)]
