"""Pipeline parallel (every schedule) and DeepSpeed ZeRO 1/2/3 (+ offload) on 2 gloo processes == 1 process.

One ``torchrun`` launch (tests/parallel_driver.py) runs all 2-process trainings; the reference is plain
1-process training (ddp.py without a process group) on the same seed, weights and global batch.
Also: checkpoint round trips (PP via DCP, ZeRO via DeepSpeed's own checkpoints), a PP checkpoint loaded
into one process, and the layout errors, raised before any process group exists.
"""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch
from testutil import ROOT, assert_spike_skipped_like, load_script, nan_at_step, torchrun

from common.config import make_config
from common.trainer import run_main

ddp = load_script("03_LLM_Training_on_GPU/ddp.py")
pp = load_script("03_LLM_Training_on_GPU/pp.py")
zero = load_script("03_LLM_Training_on_GPU/zero.py")

COMMON = dict(preset="tiny", batch_size=8, micro_batch_size=2, seq_len=64, log_interval=5, eval_interval=5,
              eval_batches=2, sample_tokens=0, progress=False, seed=7, max_steps=10)
SCHEDULES = list(pp.SCHEDULES)
CKPT_SCHEDULE = "interleaved1f1b"  # two stages per process: the hardest case for checkpoints
ZERO_CONFIGS = ["zero1", "zero2", "zero3", "zero2_offload"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
FP32_TOL = 1e-5  # measured here: <= 1e-6 for every schedule and ZeRO stage
SPIKE = 3  # the step whose output is NaN on rank 0 (testutil.nan_at_step): a loss spike to be skipped


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """The 1-process reference (in this process) and every 2-process run (one torchrun launch)."""
    d = tmp_path_factory.mktemp("pp_zero")
    base = {**COMMON, "data_dir": str(data_dir)}
    reference = ddp.main(make_config(**base, out_dir=str(d / "reference")))
    with nan_at_step(SPIKE):
        ddp.main(make_config(**base, out_dir=str(d / "reference-spike")))
    jobs = []
    for s in SCHEDULES:
        job = dict(script="pp", config={**base, "out_dir": str(d / s), "schedule": s, "n_microbatches": 4})
        if s == CKPT_SCHEDULE:  # checkpoint at 5 and 10, then resume from 5
            job.update(rewind_to=5, config={**job["config"], "ckpt_interval": 5})
        jobs.append(job)
    jobs.append(dict(script="pp", nan_at_step=SPIKE, config={**base, "out_dir": str(d / "pp-spike"),
                                                             "schedule": "1f1b", "n_microbatches": 4}))
    if HAS_DEEPSPEED:
        for name in ZERO_CONFIGS:
            ds_config = str(ROOT / f"03_LLM_Training_on_GPU/ds_{name}.json")
            job = dict(script="zero", config={**base, "out_dir": str(d / name), "ds_config": ds_config})
            if name == "zero3":
                job.update(rewind_to=5, config={**job["config"], "ckpt_interval": 5})
            jobs.append(job)
        zero2 = str(ROOT / "03_LLM_Training_on_GPU/ds_zero2.json")
        jobs.append(dict(script="zero", nan_loss_at_step=SPIKE,
                         config={**base, "out_dir": str(d / "zero2-nan-loss"), "ds_config": zero2}))
        for stage in (1, 2, 3):
            ds_config = str(ROOT / f"03_LLM_Training_on_GPU/ds_zero{stage}.json")
            jobs.append(dict(script="zero", nan_at_step=SPIKE,
                             config={**base, "out_dir": str(d / f"zero{stage}-spike"), "ds_config": ds_config}))
    (d / "jobs.json").write_text(json.dumps(jobs))
    torchrun(2, "tests/parallel_driver.py", str(d / "jobs.json"), timeout=900)
    return d, reference


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == COMMON["max_steps"]
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp_two_processes_match_one_process(runs, schedule):
    d, reference = runs
    s = json.loads((d / schedule / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == "pp" and s["params"] == reference["params"]
    assert max_diff(s["losses"], reference["losses"]) <= FP32_TOL
    assert abs(s["val_loss"] - reference["val_loss"]) <= FP32_TOL
    assert [e[0] for e in s["evals"]] == [5, 10]
    p, m = 2, 4
    v = 2 if pp.SCHEDULES[schedule][1] else 1
    assert s["pipeline"]["stages"] == p * v and s["pipeline"]["n_microbatches"] == m
    assert s["pipeline"]["expected_bubble"] == pytest.approx((p - 1) / (v * m + p - 1))
    # each process holds only its stages: together they hold the model once
    assert sum(r["params"] for r in s["memory_per_rank"]) == reference["memory_per_rank"][0]["params"]


def test_pp_checkpoint_resume_and_load_into_one_process(runs, data_dir):
    """The stages' DCP shards load into one whole model (for export / evaluation), which scores the run's own
    validation batches exactly as the pipeline did (1e-5: the same weights, one process instead of two).
    Against the 1-process reference run the weights are compared relative to how far training moved them:
    AdamW turns tiny gradient differences on rarely-seen embedding rows into lr-sized steps (one CI machine
    saw 1.35e-5 absolute there), so an absolute bound on weights would test the CPU, not the loading."""
    d, reference = runs
    straight = json.loads((d / CKPT_SCHEDULE / "summary.json").read_text())
    resumed = json.loads((d / CKPT_SCHEDULE / "resumed.json").read_text())
    assert max_diff(resumed["losses"], straight["losses"]) <= 1e-6
    from common import checkpoint
    from common.data import Sampler, prepare
    from common.distributed import DistInfo
    from common.model import GPT
    from common.trainer import loss_fn

    cfg = make_config(**COMMON)
    mcfg = cfg.model_config(vocab_size=4096)
    merged, single = GPT(mcfg), GPT(mcfg)
    torch.manual_seed(cfg.seed)
    initial = GPT(mcfg)  # the weights both runs started from (seeded like build_model)
    checkpoint.load(d / CKPT_SCHEDULE / "checkpoints" / "step_000010", merged, None, DistInfo())
    checkpoint.load(d / "reference" / "checkpoints" / "step_000010", single, None, DistInfo())
    data = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    sampler = Sampler(data.val, cfg.seq_len, cfg.batch_size, cfg.seed + 1)
    with torch.no_grad():
        val = sum(loss_fn(merged.eval()(x), y).item() for x, y in (sampler.batch(i) for i in range(2))) / 2
    assert abs(val - straight["val_loss"]) <= 1e-5
    start = initial.state_dict()
    for (name, a), (_, b) in zip(merged.state_dict().items(), single.state_dict().items()):
        moved = (b - start[name]).abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 + 0.01 * moved, name  # <= 1% of the distance trained


@needs_deepspeed
@pytest.mark.parametrize("name", ZERO_CONFIGS)
def test_zero_two_processes_match_one_process(runs, name):
    d, reference = runs
    s = json.loads((d / name / "summary.json").read_text())
    stage = int(name[4])
    assert s["world_size"] == 2 and s["zero_stage"] == stage and s["offload_optimizer"] == ("offload" in name)
    assert s["params"] == reference["params"]
    assert max_diff(s["losses"], reference["losses"]) <= FP32_TOL
    assert abs(s["val_loss"] - reference["val_loss"]) <= FP32_TOL
    ddp_optim = reference["memory_per_rank"][0]["optim"]  # AdamW moments: 2 x params
    for mem in s["memory_per_rank"]:  # each rank: half of the moments + half of the fp32 master weights
        assert mem["optim"] <= 0.8 * ddp_optim
        if stage == 3:  # weights partitioned too (those above stage3_param_persistence_threshold elements)
            assert mem["params"] <= 0.8 * reference["memory_per_rank"][0]["params"]


@pytest.mark.parametrize("name", ["pp-spike"] + [pytest.param(f"zero{k}-spike", marks=needs_deepspeed)
                                                  for k in (1, 2, 3)])
def test_a_loss_spike_is_skipped_and_training_goes_on_like_one_process(runs, name):
    """Rank 0's output is NaN in one step (the first stage under PP; under ZeRO-1/2/3 one of 2 micro-batches
    per rank): every rank skips that update, and every later step matches 1-process training that skipped the
    same step (FP32_TOL, as for the straight runs). For ZeRO the step's gradient partitions must be dropped
    and DeepSpeed must keep counting micro-batches: the skip used to bypass ``engine.step()``, and the
    accumulation boundary then fell one micro-batch early in every later step (losses 0.05 off)."""
    d, _ = runs
    assert_spike_skipped_like(d / "reference-spike", d / name, SPIKE, COMMON["max_steps"], FP32_TOL)


@needs_deepspeed
def test_zero_stops_when_deepspeed_applies_a_step_whose_loss_was_not_finite(runs):
    """Only the reported loss is NaN (gradients finite): DeepSpeed's overflow check sees nothing and applies
    the update, which the non-finite guard promised to skip; the run stops with one line instead."""
    d, _ = runs
    message = (d / "zero2-nan-loss" / "error.txt").read_text()
    assert "non-finite loss left finite gradients and DeepSpeed applied the step" in message, message
    assert "\n" not in message


@needs_deepspeed
def test_zero2_ranks_hold_half_the_gradients_of_zero1(runs):
    """Gradient bytes after backward, before the step (common.zero_memory.zero_grad_bytes), with 2 micro-batches per
    rank: ZeRO-1 holds every gradient (the full ``param.grad`` until the last micro-batch), exactly as much
    as one process; ZeRO-2 only its reduce-scattered partition, 1/2 on 2 ranks."""
    d, reference = runs
    full = reference["memory_per_rank"][0]["grads"]
    zero1, zero2 = ([m["grads"] for m in json.loads((d / n / "summary.json").read_text())["memory_per_rank"]]
                    for n in ("zero1", "zero2"))
    assert zero1 == [full, full]
    # DeepSpeed splits each parameter group's flat buffer in two and keeps the gradient of a tensor that the split
    # cuts whole on both ranks: here one RMSNorm weight of the no-decay group (128 floats), +256 bytes per rank
    # (measured). The split depends only on the parameters' order and sizes, never on the machine; 0.5 % of the
    # gradients (38 KB) leaves room for such a tensor and none for a full copy.
    assert all(full / 2 <= g <= 0.505 * full for g in zero2), (zero2, full)


@needs_deepspeed
def test_zero_checkpoint_resume(runs):
    d, _ = runs
    straight = json.loads((d / "zero3" / "summary.json").read_text())
    resumed = json.loads((d / "zero3" / "resumed.json").read_text())
    assert max_diff(resumed["losses"], straight["losses"]) <= 1e-6
    step = d / "zero3" / "checkpoints" / "step_000005"
    assert len(list(step.glob("*optim_states.pt"))) == 2  # one optimizer partition per rank


@pytest.mark.parametrize("argv,world,message", [
    (["--schedule", "interleaved1f1b"], 4, "4 layers cannot fill 8 pipeline stages"),
    (["--n-microbatches", "1"], 2, "--n-microbatches 1 is fewer than the 2 pipeline processes"),
    (["--batch-size", "6", "--n-microbatches", "4"], 2, "--batch-size 6 is not divisible by --n-microbatches 4"),
    (["--preset", "gpt2-small"], 2, "tied embeddings cannot be split"),
    (["--schedule", "zigzag"], 2, "--schedule 'zigzag' is unknown"),
])
def test_pp_bad_layout_is_one_clear_line(argv, world, message, monkeypatch, capsys, tmp_path):
    for k, v in dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:  # no process group is ever created: it would hang waiting for peers
        run_main(pp.main, "", argv + ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")],
                 cls=pp.Config)
    assert exc.value.code == 2 and not torch.distributed.is_initialized()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_zero_missing_config_is_one_clear_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_main(zero.main, "", ["--ds-config", str(tmp_path / "none.json"), "--data-dir", str(tmp_path)],
                 cls=zero.Config)
    assert exc.value.code == 2
    assert "none.json: file not found" in capsys.readouterr().err


def test_untied_config_lets_the_gpt2_presets_be_pipelined():
    from common.config import load_config

    cfg = load_config(["--preset", "gpt2-small", "--config", str(ROOT / "03_LLM_Training_on_GPU/untied.toml")],
                      cls=pp.Config)
    layout = pp.plan(replace(cfg, schedule="interleaved1f1b", n_microbatches=8, virtual_stages=2), world=4)
    assert layout["n_stages"] == 8 and sum(map(len, layout["layers_of_stage"])) == 12
    assert layout["stage_ids"](1) == [1, 5] and layout["bubble"] == pytest.approx(3 / 19)
    one = pp.plan(make_config(pp.Config, **COMMON, schedule="interleaved1f1b"), world=1)
    assert one["n_stages"] == 1 and one["bubble"] == 0  # one process: the whole model is one stage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hidden_states_cross_stages_in_low_precision(dtype):
    """bf16/fp16 runs send half the bytes between stages: a middle stage's output (what PipelineStage
    sends forward) and the gradient of its input (what it sends backward) are in the autocast dtype, while
    the stage computes its residual stream in fp32; the first stage takes tokens, the last returns logits."""
    from common.model import GPT, model_config

    model = GPT(model_config("tiny", vocab_size=64))
    middle = pp.LowPrecisionBoundary(model.stage_view([1, 2], False, False), dtype, first=False, last=False)
    x = torch.randn(2, 8, 128, dtype=dtype, requires_grad=True)
    seen = []
    handle = model.layers["1"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    y = middle(x)
    handle.remove()
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype and seen == [torch.float32]
    # the same stage without the boundary, in fp32: equal up to the rounding of input and output to dtype
    ref = model.stage_view([1, 2], False, False)(x.detach().float())
    tol = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]  # one rounding of each side, relative
    assert torch.allclose(y.float(), ref, rtol=4 * tol, atol=4 * tol * ref.abs().max().item())
    last = pp.LowPrecisionBoundary(model.stage_view([3], False, True), dtype, first=False, last=True)
    first = pp.LowPrecisionBoundary(model.stage_view([0], True, False), dtype, first=True, last=False)
    assert last(x).dtype == torch.float32 and first(torch.zeros(2, 8, dtype=torch.long)).dtype == dtype
