"""Export to Hugging Face LlamaForCausalLM format: same logits, offline, and back again."""

import os

import pytest
import torch

from common.hf import export, import_hf
from common.model import GPT, ModelConfig


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("tie,kv", [(False, None), (True, 2)])
def test_export_matches_transformers_logits(tmp_path, data_dir, tie, kv):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data import prepare

    d = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=4096, max_seq_len=64,
                      tie_embeddings=tie, rope_theta=5000.0)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # make the norms non-trivial so a wrong mapping shows
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = export(ours, d.dir / "tokenizer.json", tmp_path / "hf", d.tokenizer.eot_id)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "HAMLET:\nTo be, or not to be, that is the question:"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == d.tokenizer.encode(text)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
        back = import_hf(out).eval()
        torch.testing.assert_close(back(ids), ours(ids), atol=1e-6, rtol=1e-6)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
