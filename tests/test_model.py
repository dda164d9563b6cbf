import pytest
import torch
import torch.nn.functional as F

from common.model import GPT, MODEL_PRESETS, ModelConfig, apply_rope, model_config, rope_table

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=32)


def test_forward_shape_and_finite():
    torch.manual_seed(0)
    m = GPT(SMALL)
    x = torch.randint(0, 101, (3, 17))
    logits = m(x)
    assert logits.shape == (3, 17, 101)
    assert torch.isfinite(logits).all()
    loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5  # ~uniform at init


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_causality(kv):
    """Changing future tokens never changes the logits of earlier positions."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=50, max_seq_len=32))
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 50, (2, 8))
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_is_a_rotation_and_relative():
    rope = rope_table(16, 32, 10000.0)
    q = torch.randn(1, 32, 2, 16)
    rq = apply_rope(q, rope)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # rotations keep the norm
    k = torch.randn(1, 1, 2, 16).expand(1, 32, 2, 16)
    qq = torch.randn(1, 1, 2, 16).expand(1, 32, 2, 16)
    dots = (apply_rope(qq, rope)[0, 5:] * apply_rope(k, rope)[0, :-5]).sum(-1)  # offset 5 everywhere
    torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset,low,high", [
    ("tiny", 1.5e6, 2.5e6), ("gpt2-small", 115e6, 130e6), ("gpt2-medium", 330e6, 370e6), ("llama-1b", 0.95e9, 1.25e9),
])
def test_preset_parameter_counts(preset, low, high):
    with torch.device("meta"):
        m = GPT(MODEL_PRESETS[preset])
    assert low <= m.num_params() <= high


def test_tied_embeddings_share_storage_and_count_once():
    tied = GPT(ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True}))
    untied = GPT(SMALL)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 101 * 64


def test_flops_per_token_matches_6n_rule():
    m = GPT(SMALL)
    n_matmul = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2) - 101 * 64
    assert m.flops_per_token(32) == 6 * n_matmul + 12 * 2 * 64 * 32


def test_generate_appends_tokens_deterministically():
    torch.manual_seed(0)
    m = GPT(SMALL)
    x = torch.randint(0, 101, (2, 5))
    a = m.generate(x, 7, generator=torch.Generator().manual_seed(1))
    b = m.generate(x, 7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 12) and torch.equal(a[:, :5], x) and torch.equal(a, b)
    greedy = m.generate(x, 3, temperature=0)
    assert torch.equal(greedy[:, 5], m(x)[:, -1].argmax(-1))


def test_pipeline_friendly_stage_split():
    """Deleting layers and the ends (as a pipeline stage does) keeps names and composes to the full model."""
    torch.manual_seed(0)
    full = GPT(SMALL)
    first, second = GPT(SMALL), GPT(SMALL)
    first.load_state_dict(full.state_dict())
    second.load_state_dict(full.state_dict())
    del first.layers["1"]
    first.norm = first.output = None
    del second.layers["0"]
    second.tok_embeddings = None
    assert "layers.1.attention.wq.weight" in dict(second.named_parameters())
    x = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(second(first(x)), full(x))


def test_model_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("huge")
    with pytest.raises(ValueError, match="n_heads"):
        GPT(ModelConfig(dim=64, n_heads=5))
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPT(ModelConfig(dim=64, n_heads=4, n_kv_heads=3))
