import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.data import Sampler, clean_play, prepare, read_documents, shakespeare_plays
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_clean_play_keeps_speakers_and_strips_markdown():
    md = ("# Title\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be:  \nthat is it.\n\n\n\n"
          "**OPHELIA**  \nGood my lord,")
    text = clean_play(md)
    assert "HAMLET:\nTo be, or not to be:\nthat is it." in text
    assert "OPHELIA:\nGood my lord," in text
    assert "[Enter HAMLET]" in text
    assert "**" not in text and "#" not in text and "  \n" not in text and "\n\n\n" not in text


def test_embedded_corpus_is_all_plays():
    plays = shakespeare_plays()
    assert len(plays) == 38
    assert sum(len(t) for t in plays.values()) > 4_000_000
    assert "HAMLET:" in plays["hamlet"]


def test_tokenizer_round_trip_and_transformers_loads_it(data_dir):
    from transformers import PreTrainedTokenizerFast

    d = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    text = "ROMEO:\nBut, soft! what light through yonder window breaks? 123 ünïcödé ✓"
    ids = d.tokenizer.encode(text)
    assert d.tokenizer.decode(ids) == text  # byte-level: lossless, even for unseen characters
    assert len(ids) < len(text.encode()) / 2  # BPE merged something
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d.dir / "tokenizer.json"))
    assert hf.encode(text) == ids
    meta = json.loads((d.dir / "meta.json").read_text())
    assert meta["tokens"]["train"] == len(d.train) and d.train.dtype == np.uint16
    assert 0.02 < len(d.val) / len(d.train) < 0.1
    assert d.tokenizer.eot_id == 0 and int(d.train[-1]) == 0  # documents end with <|endoftext|>


def test_sampler_deterministic_disjoint_and_resumable(data_dir):
    d = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    s = Sampler(d.train, 64, 8, seed=3)
    x0, y0 = s.batch(5)
    assert x0.shape == (8, 64) and (x0[:, 1:] == y0[:, :-1]).all()
    # a fresh sampler (a resumed run) gives the same batch for the same step
    x1, _ = Sampler(d.train, 64, 8, seed=3).batch(5)
    assert (x0 == x1).all()
    # ranks take disjoint slices whose union is the global batch, for any data-parallel size
    for dp in (2, 4, 8):
        parts = [s.batch(5, r, dp)[0] for r in range(dp)]
        assert all(len(p) == 8 // dp for p in parts)
        assert (np.concatenate(parts) == x0.numpy()).all()
        ids = [s.window_ids(5)[r * 8 // dp : (r + 1) * 8 // dp] for r in range(dp)]
        assert len(set(np.concatenate(ids))) == 8
    # no window repeats within an epoch; another seed gives another order
    seen = np.concatenate([s.window_ids(k) for k in range(s.steps_per_epoch)])
    assert len(set(seen)) == len(seen)
    assert not (Sampler(d.train, 64, 8, seed=4).batch(5)[0] == x0).all()
    with pytest.raises(UserError, match="not divisible"):
        s.batch(0, 0, 3)


def test_local_text_folder_and_missing_data(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n" * 300)
    (tmp_path / "corpus" / "b.md").write_text("goodbye moon\n" * 300)
    d = prepare(str(tmp_path / "corpus"), tmp_path / "data", "bpe", 300, progress=False)
    assert d.vocab_size <= 300 and len(d.train) > 100
    assert d.tokenizer.decode(d.train[:4].tolist()).startswith("hello")
    with pytest.raises(UserError, match="data not found"):
        prepare(str(tmp_path / "nope"), tmp_path / "data", progress=False)
    with pytest.raises(UserError, match="dataset too small"):
        Sampler(d.train[:100], 64, 8, seed=0)


def test_hf_dataset_source_reads_through_datasets(tmp_path, monkeypatch):
    """hf:NAME goes through datasets.load_dataset; a local dataset folder stands in for the hub here."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ds = tmp_path / "tiny_ds"
    ds.mkdir()
    (ds / "train.txt").write_text("first line of text\nsecond line of text\n")
    docs = list(read_documents(f"hf:{ds}"))
    assert docs == ["first line of text", "second line of text"]


def test_eight_processes_prepare_once(tmp_path):
    """8 ranks starting at once: one builds under the lock, all see the same finished shards."""
    (tmp_path / "t.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(3000)))
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from common.data import prepare; "
            f"d = prepare({str(tmp_path / 't.txt')!r}, {str(tmp_path / 'data')!r}, 'bpe', 300, progress=False); "
            "print(len(d.train), int(d.train.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1, outs
    built = [p for p in (tmp_path / "data").iterdir() if p.is_dir()]
    assert len(built) == 1  # no leftover temporary folders
    pid = json.loads((built[0] / "meta.json").read_text())["builder_pid"]
    assert pid in [p.pid for p in procs]
