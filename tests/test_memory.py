"""The memory planner (common/memory.py) against what PyTorch really holds on CPU.

Activations: the bytes autograd saves for backward (saved-tensor hooks, each storage counted once,
parameters and buffers excluded), fp32, for three model shapes, with and without full activation
checkpointing. Tolerance 1%: the planner's count is per token and leaves out a few bytes that do not
grow with the model (the token ids the embedding keeps, one scalar per norm) -- measured here <= 0.3%.
Weights / gradients / AdamW state: equal to a real run's ``memory_per_rank`` (tests/test_sharded.py
compares FSDP on 4 ranks; here one process).
"""

import pytest
import torch
from testutil import load_script

from common.config import make_config
from common.memory import activation_bytes, fits, main, plan
from common.model import GPT, ModelConfig
from common.parallelize import apply_ac
from common.trainer import loss_fn

SHAPES = [dict(dim=128, n_layers=4, n_heads=4), dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2),
          dict(dim=192, n_layers=3, n_heads=6, ffn_hidden=1024)]


def saved_bytes(model: GPT, b: int, s: int) -> int:
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, model.cfg.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), x)
    return sum(seen.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ac", ["none", "full"])
def test_activation_bytes_match_what_autograd_saves(shape, ac):
    torch.manual_seed(0)
    model = apply_ac(GPT(ModelConfig(vocab_size=512, max_seq_len=128, **shape)), ac)
    b, s = 3, 96
    measured = saved_bytes(model, b, s)
    predicted = activation_bytes(model.cfg, b * s, model.cfg.n_layers, ac, low=False)
    if ac == "full":  # the recomputed block lives only inside backward, where the hooks do not look
        predicted -= b * s * 4 * (8 * model.cfg.dim + 2 * model.cfg.kv_heads * model.cfg.head_dim
                                  + 4 * model.cfg.hidden_dim + model.cfg.n_heads + 2)
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)


def test_weights_grads_and_adam_state_equal_a_real_run(tmp_path, data_dir):
    ddp = load_script("03_LLM_Training_on_GPU/ddp.py")
    s = ddp.main(make_config(preset="tiny", max_steps=2, batch_size=4, micro_batch_size=4, seq_len=32,
                             eval_batches=1, sample_tokens=0, progress=False, data_dir=str(data_dir),
                             out_dir=str(tmp_path / "r")))
    measured = s["memory_per_rank"][0]
    p = plan("tiny", "ddp", 1, micro_batch=4, seq_len=32, precision="fp32", vocab_size=4096)
    assert (p.params, p.grads, p.optim) == (measured["params"], measured["grads"], measured["optim"])


def test_the_cli_and_the_what_fits_where_table(capsys):
    main(["--preset", "llama-1b", "--strategy", "fsdp", "--gpus", "4", "--activation-checkpointing", "full"])
    out = capsys.readouterr().out
    assert "GiB per GPU" in out and "fits: V100-16" in out
    main(["--table"])
    table = capsys.readouterr().out
    assert table.count("\n| ") == 4 and "llama-1b (2 x 2048)" in table
    # DDP holds the whole 1B model's state (16 bytes/param): it cannot fit a 16 GB V100; FSDP on 4 can
    assert not fits(plan("llama-1b", "ddp", 4))["V100-16"] and fits(plan("llama-1b", "fsdp", 4))["V100-16"]
