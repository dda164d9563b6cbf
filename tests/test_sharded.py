"""FSDP2, tensor parallel (with and without sequence parallel) and 2-D FSDP x TP == 1-process training.

Two torchrun launches in all (tests/strategy_driver.py runs several trainings per launch):
- 2 ranks: FSDP (checkpoint every 5 steps), FSDP resumed from step 5, FSDP with activation
  checkpointing + CPU offload, TP, TP + sequence parallel + loss parallel, FSDP and TP in fp16 (2 steps),
  FSDP and TP with a NaN output on rank 0 in one step (skipped on every rank, then == a 1-process run that
  skipped the same step);
- 4 ranks: FSDP x TP on a 2 x 2 mesh (+ SP + loss parallel), FSDP on 4 ranks (memory).
Reference: ddp.py in this process (1 process = plain training), same seed, same global batch.

Tolerances: fp32 losses, max |dloss| over 10 steps <= 1e-5 (measured ~1e-6); final val loss <= 1e-5;
a sharded checkpoint loaded into one process gives the run's val loss within 1e-5 and logits within
1e-4 of the reference model's; fp16 (FSDP mixed precision or TP autocast, + GradScaler) within 5e-2 of fp32.
Layout errors are raised before any process group exists (checked in-process, < 1 s each).
"""

import json
import time

import pytest
import torch
from testutil import assert_spike_skipped_like, load_script, nan_at_step, torchrun

from common import checkpoint
from common.config import TrainConfig, make_config
from common.data import Sampler, prepare
from common.distributed import DistInfo
from common.errors import UserError
from common.model import GPT
from common.trainer import loss_fn, padded_vocab

CH = "03_LLM_Training_on_GPU"
SPIKE = 3  # the step whose output is NaN on rank 0 (testutil.nan_at_step): a loss spike to be skipped
COMMON = dict(preset="tiny", batch_size=8, micro_batch_size=2, seq_len=64, max_steps=10, log_interval=5,
              eval_interval=5, eval_batches=2, sample_tokens=0, progress=False, seed=7, threads=1)


def plan_step(name, script, tmp, data_dir, **kw):
    return {"name": name, "script": f"{CH}/{script}",
            "config": {**COMMON, "data_dir": str(data_dir), "out_dir": str(tmp / name), **kw}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """The reference run in this process, then the two launches; returns {name: summary}."""
    tmp = tmp_path_factory.mktemp("sharded")
    ddp = load_script(f"{CH}/ddp.py")
    ref = ddp.main(make_config(**{**COMMON, "data_dir": str(data_dir), "out_dir": str(tmp / "ref")}))
    with nan_at_step(SPIKE):
        ddp.main(make_config(**{**COMMON, "data_dir": str(data_dir), "out_dir": str(tmp / "ref_spike")}))
    two = [
        plan_step("fsdp", "fsdp.py", tmp, data_dir, ckpt_interval=5),
        {"rewind": str(tmp / "fsdp"), "to": "step_000005"},
        plan_step("fsdp_resumed", "fsdp.py", tmp, data_dir, resume=True, out_dir=str(tmp / "fsdp")),
        plan_step("fsdp_ac_offload", "fsdp.py", tmp, data_dir,
                  activation_checkpointing="full", cpu_offload=True),
        plan_step("tp", "tp.py", tmp, data_dir),
        plan_step("tp_sp", "tp.py", tmp, data_dir, sequence_parallel=True, loss_parallel=True),
        plan_step("fsdp_fp16", "fsdp.py", tmp, data_dir, precision="fp16", max_steps=2),
        plan_step("tp_fp16", "tp.py", tmp, data_dir, precision="fp16", max_steps=2),
        {**plan_step("fsdp_spike", "fsdp.py", tmp, data_dir), "nan_at_step": SPIKE},
        {**plan_step("tp_spike", "tp.py", tmp, data_dir), "nan_at_step": SPIKE},
    ]
    four = [
        plan_step("fsdp_tp", "fsdp_tp.py", tmp, data_dir,
                  tp=2, sequence_parallel=True, loss_parallel=True),
        plan_step("fsdp4", "fsdp.py", tmp, data_dir, max_steps=2),
    ]
    for nproc, plan in ((2, two), (4, four)):
        (tmp / f"plan{nproc}.json").write_text(json.dumps(plan))
        t0 = time.perf_counter()
        proc = torchrun(nproc, "tests/strategy_driver.py", str(tmp / f"plan{nproc}.json"), str(tmp), timeout=400)
        print(f"{nproc}-rank launch: {time.perf_counter() - t0:.0f} s;",
              "; ".join(line[8:] for line in proc.stdout.splitlines() if line.startswith("driver: ")))
    out = {p["name"]: json.loads((tmp / f"{p['name']}.json").read_text()) for p in two + four if "name" in p}
    return {"ref": ref, "tmp": tmp, **out}


@pytest.mark.parametrize("name", ["fsdp_spike", "tp_spike"])
def test_a_loss_spike_is_skipped_on_every_rank_and_training_goes_on(runs, name):
    """Rank 0's output is NaN in one step: the all-reduced loss makes every rank skip that update (fused
    AdamW's ``found_inf`` on sharded DTensor parameters), and every later step matches 1-process training
    that skipped the same step (1e-5, the straight runs' tolerance)."""
    assert_spike_skipped_like(runs["tmp"] / "ref_spike", runs["tmp"] / name, SPIKE, COMMON["max_steps"], 1e-5)


def max_diff(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("name,world", [("fsdp", 2), ("fsdp_ac_offload", 2), ("tp", 2), ("tp_sp", 2),
                                        ("fsdp_tp", 4)])
def test_loss_parity_with_one_process(runs, name, world):
    ref, s = runs["ref"], runs[name]
    assert s["world_size"] == world and len(s["losses"]) == COMMON["max_steps"]
    assert max_diff(ref["losses"], s["losses"]) <= 1e-5
    assert abs(ref["val_loss"] - s["val_loss"]) <= 1e-5
    assert s["losses"][-1] < s["losses"][0] - 0.3  # it learns


def test_strategy_facts_in_summary(runs):
    assert runs["tp_sp"]["tp"] == {"degree": 2, "sequence_parallel": True, "loss_parallel": True}
    assert runs["fsdp_tp"]["fsdp_tp"]["dp"] == 2 and runs["fsdp_tp"]["strategy"] == "fsdp_tp"
    assert runs["fsdp_ac_offload"]["fsdp"]["cpu_offload"] is True


def test_fsdp_resume_equals_uninterrupted(runs):
    assert max_diff(runs["fsdp"]["losses"], runs["fsdp_resumed"]["losses"]) <= 1e-6
    assert abs(runs["fsdp"]["val_loss"] - runs["fsdp_resumed"]["val_loss"]) <= 1e-6


@pytest.mark.parametrize("name", ["fsdp_fp16", "tp_fp16"])
def test_fp16_with_loss_scaling_on_dtensor_gradients(runs, name):
    """torch.amp.GradScaler on sharded DTensor gradients (its inf check is reduced over the mesh)."""
    s = runs[name]
    assert s["precision"] == "fp16" and all(abs(x) < 100 for x in s["losses"])
    assert max_diff(runs["ref"]["losses"][:2], s["losses"]) <= 5e-2


def bytes_held(mem: dict) -> int:
    return mem["params"] + mem["grads"] + mem["optim"]


def test_fsdp_memory_per_rank_is_a_quarter(runs):
    """DDP replicates everything: its per-rank bytes equal the 1-process run's."""
    ddp = bytes_held(runs["ref"]["memory_per_rank"][0])
    mem = runs["ref"]["memory_per_rank"][0]
    assert mem["grads"] == mem["params"] and mem["optim"] >= 2 * mem["params"]  # grads counted, Adam: 2 moments
    for m in runs["fsdp4"]["memory_per_rank"]:
        assert bytes_held(m) <= ddp / 3, (bytes_held(m), ddp)
        assert m["grads"] == m["params"]  # sharded gradients, counted by their local shard
    for m in runs["fsdp_tp"]["memory_per_rank"]:  # 2 x 2: each rank holds ~1/4 too
        assert bytes_held(m) <= ddp / 3


def test_memory_planner_equals_the_fsdp_ranks(runs):
    """common.memory's weights/gradients/AdamW bytes for FSDP on 4 ranks == the largest rank's measured ones."""
    from common.memory import plan

    p = plan("tiny", "fsdp", 4, micro_batch=2, seq_len=64, precision="fp32", vocab_size=4096)
    largest = max(runs["fsdp4"]["memory_per_rank"], key=lambda m: m["params"])
    assert (p.params, p.grads, p.optim) == (largest["params"], largest["grads"], largest["optim"])


def test_sharded_checkpoint_loads_into_one_process(runs, data_dir):
    data = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    cfg = make_config(**COMMON)
    models = {}
    for name in ("fsdp", "fsdp_ac_offload", "ref"):  # also: names without the checkpoint wrapper's prefix
        torch.manual_seed(0)  # different init: the checkpoint must overwrite every weight
        model = GPT(cfg.model_config(vocab_size=padded_vocab(data.vocab_size)))
        checkpoint.load(checkpoint.latest(runs["tmp"] / name), model, None, DistInfo())
        models[name] = model.eval()
    sampler = Sampler(data.val, cfg.seq_len, cfg.batch_size, cfg.seed + 1)
    with torch.no_grad():
        batches = [sampler.batch(i) for i in range(cfg.eval_batches)]
        logits = {k: m(batches[0][0]) for k, m in models.items()}
        for name in ("fsdp", "fsdp_ac_offload"):
            val = sum(loss_fn(models[name](x), y).item() for x, y in batches) / len(batches)
            assert abs(val - runs[name]["val_loss"]) <= 1e-5, name
            assert (logits[name] - logits["ref"]).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("script,world,kw,message", [
    ("tp.py", 3, {}, "n_heads=4 (tiny) is not divisible by the tensor-parallel degree 3"),
    ("tp.py", 4, {"model": {"n_kv_heads": 2}}, "n_kv_heads=2 (tiny) is not divisible by the tensor-parallel degree 4"),
    ("tp.py", 2, {"seq_len": 63, "sequence_parallel": True}, "--seq-len 63 must be divisible"),
    ("fsdp_tp.py", 6, {"tp": 4}, "--tp 4 does not divide the 6 launched processes"),
    ("fsdp_tp.py", 6, {"tp": 3}, "n_heads=4 (tiny) is not divisible by the tensor-parallel degree 3"),
    ("fsdp.py", 2, {"cpu_offlaod": True}, "unknown config keys ['cpu_offlaod']"),
    ("tp.py", 2, {"cpu_offload": True}, "--cpu-offload is not available with tp.py: tensor parallelism keeps"),
    ("ddp.py", 2, {"sequence_parallel": True}, "--sequence-parallel is not available with ddp.py"),
])
def test_bad_layout_fails_fast_before_any_collective(script, world, kw, message, monkeypatch, tmp_path):
    for k, v in dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    module = load_script(f"{CH}/{script}")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        module.main(make_config(getattr(module, "Config", TrainConfig),
                                **{**COMMON, "data_dir": str(tmp_path), "out_dir": str(tmp_path / "o"), **kw}))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not torch.distributed.is_initialized() and time.perf_counter() - t0 < 5


def test_script_flags_on_the_command_line():
    from common.config import load_config

    cfg = load_config(["--cpu-offload", "--max-steps", "3", "--activation-checkpointing"])
    assert cfg.cpu_offload and cfg.max_steps == 3 and cfg.activation_checkpointing == "full"
    assert load_config(["--activation-checkpointing", "selective"]).activation_checkpointing == "selective"
    fsdp_tp = load_script(f"{CH}/fsdp_tp.py")
    cfg = load_config(["--tp", "4", "--sequence-parallel"], cls=fsdp_tp.Config)
    assert cfg.tp == 4 and cfg.sequence_parallel and type(cfg).__name__ == "Config"
