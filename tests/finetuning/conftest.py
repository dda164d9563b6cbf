"""Fixtures of the fine-tuning tests: a tiny model pretrained by chapter 03 and exported to HF format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ftutil import load_chapter

# Small on purpose (~15k tokens of pretraining): the tests need a real exported checkpoint, not a good model.
PRETRAIN = dict(max_steps=30, batch_size=8, micro_batch_size=8, seq_len=64, eval_interval=0, eval_batches=2,
                log_interval=10, seed=3)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, data_dir) -> Path:
    """``make_base_model.build``: pretrain the tiny preset with ddp.py (1 process), export; once per session."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = tmp_path_factory.mktemp("base") / "run"
    hf = load_chapter("make_base_model").build(run, data_dir=str(data_dir), **PRETRAIN)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["losses"][-1] < summary["losses"][0] - 1.0  # the pretraining learned something
    return hf


@pytest.fixture(scope="session")
def chat_data(base_model, tmp_path_factory) -> Path:
    """``torchtune/prepare.py``: chat examples as JSON + the tokenizer files (torchtune and Unsloth read them)."""
    out = tmp_path_factory.mktemp("chat-data")
    load_chapter("torchtune/prepare").main(["--model", str(base_model), "--out-dir", str(out),
                                            "--train-examples", "200", "--val-examples", "16"])
    return out
