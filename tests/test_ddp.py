"""DDP on 2 gloo processes == 1 process on the same global batch; checkpoint/resume; summary; errors."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
from testutil import ROOT, load_script, torchrun

from common.config import load_config, make_config
from common.errors import UserError

ddp = load_script("03_LLM_Training_on_GPU/ddp.py")
COMMON = dict(preset="tiny", batch_size=8, micro_batch_size=4, seq_len=64, log_interval=5, eval_interval=10,
              eval_batches=2, sample_tokens=0, progress=False, seed=7)


def run_single(tmp_path, name, data_dir, **kw):
    cfg = make_config(**{**COMMON, "max_steps": 20, "data_dir": str(data_dir), "out_dir": str(tmp_path / name), **kw})
    return ddp.main(cfg)


def test_ddp_two_processes_match_one_process(tmp_path, data_dir):
    """fp32, 20 steps: max |loss_1proc - loss_2proc| <= 1e-5 (measured here ~1e-7 or exactly 0)."""
    single = run_single(tmp_path, "one", data_dir)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items() if not isinstance(v, bool)]
    torchrun(2, "03_LLM_Training_on_GPU/ddp.py", *args, "--no-progress", "--max-steps=20",
             f"--data-dir={data_dir}", f"--out-dir={tmp_path / 'two'}")
    multi = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert multi["world_size"] == 2 and single["world_size"] == 1
    assert len(multi["losses"]) == len(single["losses"]) == 20
    diff = max(abs(a - b) for a, b in zip(single["losses"], multi["losses"]))
    assert diff <= 1e-5, diff
    assert abs(single["val_loss"] - multi["val_loss"]) <= 1e-5
    assert multi["losses"][-1] < multi["losses"][0] - 1.0  # it actually learns
    log = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21)) and "val_loss" in log[9]


def test_summary_and_outputs(tmp_path, data_dir):
    s = run_single(tmp_path, "run", data_dir, max_steps=6, sample_tokens=20)
    for key in ("final_loss", "val_loss", "tokens_per_s", "mfu", "peak_memory_bytes", "world_size", "strategy",
                "precision", "device"):
        assert key in s, key
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["final_loss"] == s["final_loss"] and s["strategy"] == "ddp" and s["precision"] == "fp32"
    assert s["tokens_per_s"] > 0 and s["peak_memory_bytes"] > 0
    # MFU = FLOPs/token x tokens/s / peak. Not asserted < 1: the CPU peak is a matmul measured once per process,
    # and on a loaded machine it can come out lower than what training later achieves
    from common.model import GPT

    flops = GPT(make_config(**COMMON).model_config(vocab_size=4096)).flops_per_token(COMMON["seq_len"])
    assert s["mfu"] == pytest.approx(flops * s["tokens_per_s"] / (s["peak_tflops_per_device"] * 1e12))
    mem = s["memory_per_rank"][0]
    assert 0 <= mem["optim"] - 2 * mem["params"] < 1000  # AdamW: 2 moments (+ a step counter per tensor)
    assert s["sample"].startswith("ROMEO:") and len(s["sample"]) > len("ROMEO:\n")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000006"


def test_signal_checkpoint_then_resume_equals_straight_run(tmp_path, data_dir, monkeypatch):
    """SIGUSR1 mid-run -> checkpoint + stop; --resume continues; losses equal an uninterrupted run."""
    straight = run_single(tmp_path, "straight", data_dir)
    from common import data as data_mod

    original = data_mod.Sampler.batch

    def batch_with_signal(self, step, *a):
        if step == 9 and self.tokens is not None and len(self.tokens) > 1_000_000:  # training sampler
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, step, *a)

    monkeypatch.setattr(data_mod.Sampler, "batch", batch_with_signal)
    first = run_single(tmp_path, "split", data_dir)
    assert first == {"preempted": True, "step": 10}
    assert not (tmp_path / "split" / "summary.json").exists()
    monkeypatch.setattr(data_mod.Sampler, "batch", original)
    resumed = run_single(tmp_path, "split", data_dir, resume=True)
    assert len(resumed["losses"]) == 20
    diff = max(abs(a - b) for a, b in zip(straight["losses"], resumed["losses"]))
    assert diff <= 1e-6, diff
    assert abs(straight["val_loss"] - resumed["val_loss"]) <= 1e-6


def test_periodic_checkpoint_resume(tmp_path, data_dir):
    """ckpt every 10 steps; rewinding 'latest' to step 10 and resuming reproduces steps 11-20."""
    full = run_single(tmp_path, "p", data_dir, ckpt_interval=10)
    ckpts = tmp_path / "p" / "checkpoints"
    assert (ckpts / "step_000010").is_dir()
    (ckpts / "latest").write_text("step_000010")
    again = run_single(tmp_path, "p", data_dir, resume=True)
    assert max(abs(a - b) for a, b in zip(full["losses"], again["losses"])) <= 1e-6


def test_config_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('max_steps = 7\nlr = 0.01\n[model]\nn_layers = 2\n')
    cfg = load_config(["--config", str(f), "--lr", "0.02", "--batch-size", "4"])
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.seq_len) == (7, 0.02, 4, 128)
    assert cfg.model_config().n_layers == 2 and cfg.model_config().dim == 128
    assert load_config(["--preset", "gpt2-small"]).seq_len == 1024


@pytest.mark.parametrize("argv,env,message", [
    (["--preset", "huge"], {}, "unknown preset 'huge'"),
    (["--data", "/no/such/corpus"], {}, "data not found"),
    (["--batch-size", "5"], {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "not divisible by the 2"),
    (["--device", "cuda"], {}, "--device cuda was requested"),
    (["--precision", "fp8"], {}, "--precision must be"),
    (["--config", "/no/file.toml"], {}, "config file not found"),
    (["--lr", "nan"], {}, "--lr, --min-lr, --weight-decay and --grad-clip must be finite"),
    (["--threads", "-1"], {}, "--threads and --sample-tokens must be >= 0"),
    (["--eval-batches", "0"], {}, "--eval-batches must be at least 1"),
    (["--activation-checkpointing", "some"], {}, "invalid choice: 'some'"),
])
def test_bad_input_is_one_clear_line(argv, env, message, monkeypatch, capsys, tmp_path):
    import torch

    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        from common.trainer import run_main

        run_main(ddp.main, "", argv + ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_cli_error_from_a_real_process():
    proc = subprocess.run([sys.executable, str(ROOT / "03_LLM_Training_on_GPU/ddp.py"), "--preset", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown preset 'nope'; choose one of: tiny, gpt2-small, "
                                                "gpt2-medium, llama-1b"]


def test_config_toml_round_trip_and_print_config(tmp_path, capsys):
    """A run's config.toml read back with --config gives the same config; --print-config prints it."""
    from common.config import to_toml

    cfg = load_config(["--preset", "tiny", "--lr", "0.02", "--activation-checkpointing", "selective",
                       "--out-dir", 'runs/a "quoted" dir', "--no-progress", "--config", str(_toml(tmp_path))])
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    assert load_config(["--config", str(f)]) == cfg
    with pytest.raises(SystemExit) as exc:
        load_config(["--config", str(f), "--print-config"])
    assert exc.value.code == 0 and capsys.readouterr().out == to_toml(cfg)


def _toml(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("[model]\nn_layers = 2\nrope_theta = 500000.0\n")
    return f


@pytest.mark.parametrize("text,message", [
    ("max_steps = 'ten'", "config key 'max_steps' must be int, not str"),
    ("lr = [1]", "config key 'lr' must be float"),
    ("max_steps = ", "is not valid TOML"),
    ("[model]\nlayers = 3", "unknown model fields ['layers']"),
])
def test_bad_config_file_is_one_clear_line(text, message, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(["--config", str(f)])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_make_config_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown config keys"):
        make_config(nonsense=1)


def test_loss_plot_and_hf_export_cli(tmp_path, data_dir):
    """A finished run has loss.png, and `python -m common.hf export` turns its checkpoint into an HF folder."""
    from transformers import AutoModelForCausalLM

    from common.hf import main as hf_main

    run_single(tmp_path, "e", data_dir, max_steps=3)
    png = tmp_path / "e" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hf_main(["export", str(tmp_path / "e" / "checkpoints" / "step_000003"), str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128


def test_tensorboard_plot_and_wandb_sinks(tmp_path, data_dir):
    """--tensorboard writes event files with the logged scalars; python -m common.plot draws runs (also a log
    whose last line is half-written, as while a job runs); --wandb without wandb installed is one line."""
    import importlib.util

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.plot import main as plot_main

    s = run_single(tmp_path, "tb", data_dir, max_steps=4, tensorboard=True, eval_interval=2)
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(s["losses"]) and [e.step for e in events.Scalars("val/loss")] == [2]
    with open(tmp_path / "tb" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a job still writing
    run_single(tmp_path, "other", data_dir, max_steps=3)
    png = plot_main([str(tmp_path / "tb"), str(tmp_path / "other"), "-o", str(tmp_path / "c.png")])
    assert png.read_bytes()[:4] == b"\x89PNG"
    from common.plot import labels

    assert labels([tmp_path / "tb", tmp_path / "other"]) == ["eval_interval=2 max_steps=4 tensorboard=True",
                                                            "eval_interval=10 max_steps=3 tensorboard=False"]
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UserError, match="--wandb needs the wandb package"):
            run_single(tmp_path, "wb", data_dir, max_steps=2, wandb=True)


def test_non_finite_loss_is_skipped_then_stops_the_run(tmp_path, data_dir):
    """--lr 1e6: the steps go non-finite; each is skipped, 3 in a row stop the run with one line; the
    summary never exists and no checkpoint holds non-finite weights."""
    with pytest.raises(UserError) as err:
        run_single(tmp_path, "nan", data_dir, lr=1e6, ckpt_interval=1, max_steps=20)
    msg = str(err.value)
    assert "consecutive non-finite steps" in msg and "learning rate too high" in msg and "\n" not in msg, msg
    log = [json.loads(x) for x in (tmp_path / "nan" / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in log[-3:]] == [True] * 3
    assert all(r["loss"] is None or r["grad_norm"] is None for r in log[-3:])  # non-finite: null in strict JSON
    assert not (tmp_path / "nan" / "summary.json").exists()
    from common import checkpoint
    from common.distributed import DistInfo
    from common.model import GPT

    latest = checkpoint.latest(tmp_path / "nan")
    if latest is not None:  # whatever was checkpointed before the blow-up is finite
        model = GPT(make_config(**COMMON).model_config(vocab_size=4096))
        checkpoint.load(latest, model, None, DistInfo())
        assert all(p.isfinite().all() for p in model.parameters())


def test_no_final_checkpoint_for_benchmarks(tmp_path, data_dir):
    s = run_single(tmp_path, "bench", data_dir, max_steps=2, final_checkpoint=False)
    assert len(s["losses"]) == 2 and not (tmp_path / "bench" / "checkpoints").exists()


def test_the_host_reads_the_device_only_at_log_steps(tmp_path, data_dir, monkeypatch):
    """A step queues its work and returns its stats as a device tensor (loss, norm, skipped, signal):
    no .item()/.tolist()/bool()/float() of a tensor inside ``train_step``; ``Window.flush`` reads each
    window once, at log steps. (On a GPU this is what lets the host run ahead of the device.)"""
    import torch

    from common import trainer

    inside, reads, flushes = [False], [], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name):
            if inside[0]:
                reads.append(_name)
            return _original(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step, flush = trainer.train_step, trainer.Window.flush

    def step_counted(*a):
        inside[0] = True
        try:
            return step(*a)
        finally:
            inside[0] = False

    monkeypatch.setattr(trainer, "train_step", step_counted)
    monkeypatch.setattr(trainer.Window, "flush", lambda self, st, *a: flushes.append(st + 1) or flush(self, st, *a))
    s = run_single(tmp_path, "sync", data_dir, max_steps=12, eval_interval=0)
    assert reads == [], reads
    assert flushes == [1, 5, 10, 12]  # the first step, every --log-interval 5, the last
    assert len(s["losses"]) == 12 and all(math.isfinite(x) for x in s["losses"])
