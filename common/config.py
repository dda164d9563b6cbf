"""Typed training configuration: one dataclass per script, one command line, one TOML format.

Every training script's config is ``TrainConfig`` or a subclass that adds the script's own fields
(``pp.py``'s schedule, ``zero.py``'s DeepSpeed file); each field carries a one-line help text, and
its flag is generated from it (``--max-steps``, ``--sequence-parallel`` ...).

Precedence: dataclass defaults < preset < ``--config FILE.toml`` < command-line flags.
A TOML file holds any field at top level and model overrides in a ``[model]`` table::

    max_steps = 200
    lr = 6e-4
    [model]
    n_layers = 6

Every run writes its resolved config as ``config.toml`` next to its log; ``--config`` accepts it back
(the same run again) and ``--print-config`` prints it and exits.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import tomllib

from common.errors import UserError
from common.model import MODEL_PRESETS, ModelConfig, model_config

__all__ = ["TrainConfig", "UserError", "load_config", "make_config", "to_toml", "TRAIN_PRESETS"]

AC_MODES = ("none", "full", "selective")


def doc(text: str, default=MISSING, **kw):
    """A dataclass field with a one-line help text."""
    if default is MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    preset: str = doc("model + training preset: " + ", ".join(MODEL_PRESETS), "tiny")
    max_steps: int = doc("optimizer steps to train", 200)
    batch_size: int = doc("global batch in sequences per optimizer step (any number of processes)", 16)
    micro_batch_size: int = doc("sequences per forward pass per process (accumulation adapts)", 16)
    seq_len: int = doc("tokens per sequence", 128)
    lr: float = doc("peak learning rate", 3e-3)
    min_lr: float = doc("final learning rate of the cosine schedule", 3e-4)
    warmup_steps: int = doc("linear warm-up steps", 20)
    weight_decay: float = doc("AdamW weight decay (matrices only)", 0.1)
    grad_clip: float = doc("clip the global gradient norm to this (0 = off)", 1.0)
    seed: int = doc("seed for weights and data order", 1337)
    device: str = doc("auto, cpu or cuda (default: $LLM_DEVICE or auto)", "auto")
    precision: str = doc("auto, fp32, bf16 or fp16 (auto: bf16 on A100/H100, fp16 on V100, fp32 on CPU)", "auto")
    data: str = doc("'shakespeare' (embedded), a text file or folder, or hf:DATASET", "shakespeare")
    data_dir: str = doc("where tokenizers and token shards are cached (default: $LLM_DATA or data)", "data")
    tokenizer: str = doc("'bpe' (train a byte-level BPE) or a Hugging Face tokenizer name/path", "bpe")
    vocab_size: int = doc("vocabulary size of a trained BPE", 4096)
    out_dir: str = doc("run folder: log.jsonl, summary.json, checkpoints/ (default $LLM_RUNS or runs, then "
                       "/<strategy>-<preset>)", "")
    resume: bool = doc("continue from the latest checkpoint in out_dir if there is one", False)
    overwrite: bool = doc("start afresh in an out_dir that holds an earlier run (deletes its log and checkpoints)",
                          False)
    allow_batch_change: bool = doc("--resume: accept a global batch or sequence length other than the checkpoint's",
                                   False)
    log_interval: int = doc("log every N steps", 10)
    eval_interval: int = doc("validation loss every N steps (0 = only at the end)", 100)
    eval_batches: int = doc("validation batches per evaluation", 8)
    ckpt_interval: int = doc("checkpoint every N steps (0 = only at the end)", 0)
    final_checkpoint: bool = doc("write a checkpoint at the end (--no-final-checkpoint for benchmarks)", True)
    keep_checkpoints: int = doc("keep the newest K checkpoints, delete older ones (0 = keep all)", 3)
    sample_tokens: int = doc("tokens of text to generate at the end (0 = none)", 100)
    threads: int = doc("CPU threads per process (0 = cores / processes on this node)", 0)
    peak_tflops: float = doc("peak TFLOP/s per device for MFU (0 = from the device table or measured)", 0.0)
    timeout_s: int = doc("collective timeout in seconds: a hang becomes an error", 600)
    tf32: bool = doc("CUDA, Ampere or newer: fp32 matmuls on TF32 tensor cores (--no-tf32: exact fp32)", True)
    progress: bool = doc("tqdm progress bar on rank 0", True)
    tensorboard: bool = doc("also write TensorBoard event files to <out_dir>/tb (needs the tensorboard package)",
                            False)
    wandb: bool = doc("also log to Weights & Biases in offline mode (needs wandb; sync later on the login node)",
                      False)
    # How the model is parallelized / made to fit. Each script accepts those it can do and refuses the
    # others before any process group starts (common.parallelize.SUPPORT has the table and the reasons).
    compile: bool = doc("torch.compile each transformer block (slow first step, faster after)", False)
    activation_checkpointing: str = doc(
        "recompute activations in backward: none, full (every block) or selective (keep matmul and attention "
        "outputs, recompute the cheap elementwise ops); a bare flag means full", "none")
    sequence_parallel: bool = doc("TP: split norms and the residual stream along the sequence", False)
    loss_parallel: bool = doc("TP: cross-entropy on vocabulary-sharded logits (never gathers the full logits)",
                              False)
    cpu_offload: bool = doc("FSDP: keep sharded parameters, gradients and optimizer state in CPU memory", False)
    reshard_after_forward: bool = doc(
        "FSDP: free gathered weights after forward (ZeRO-3); --no-reshard-after-forward keeps them until "
        "backward (ZeRO-2-like: more memory, one all-gather less)", True)
    model: dict = doc("model overrides: the config file's [model] table", default_factory=dict)

    NOT_USED: ClassVar[tuple[str, ...]] = ()  # fields a subclass's script ignores: no flag for them

    @classmethod
    def defaults(cls, preset: str) -> dict:
        """Training defaults that sit between the dataclass defaults and the user's values."""
        return TRAIN_PRESETS[preset]

    def check(self) -> None:
        """Checks of the model shape (a subclass with another kind of model overrides this)."""
        try:
            self.model_config()
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        over = dict(self.model)
        if vocab_size is not None:
            over["vocab_size"] = vocab_size
        over.setdefault("max_seq_len", max(self.seq_len, MODEL_PRESETS[self.preset].max_seq_len))
        return model_config(self.preset, **over)

    def to_dict(self) -> dict:
        return asdict(self)


# Training defaults per preset (the model shape lives in common.model.MODEL_PRESETS).
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(batch_size=16, micro_batch_size=16, seq_len=128, lr=3e-3, max_steps=200),
    "gpt2-small": dict(batch_size=32, micro_batch_size=8, seq_len=1024, lr=6e-4, min_lr=6e-5,
                       warmup_steps=100, max_steps=2000, vocab_size=8192),
    "gpt2-medium": dict(batch_size=32, micro_batch_size=4, seq_len=1024, lr=3e-4, min_lr=3e-5,
                        warmup_steps=100, max_steps=2000, vocab_size=8192),
    "llama-1b": dict(batch_size=32, micro_batch_size=2, seq_len=2048, lr=3e-4, min_lr=3e-5,
                     warmup_steps=100, max_steps=2000, vocab_size=8192),
}

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}


def field_type(f) -> type:
    return _TYPES.get(str(f.type), f.type) if isinstance(f.type, str) else f.type


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), with_defaults: bool = False):
    """One ``--field-name`` flag per field of the dataclass ``cls``, with the field's help text."""
    for f in fields(cls):
        if f.name in skip or field_type(f) is dict:
            continue
        flag, typ = "--" + f.name.replace("_", "-"), field_type(f)
        kw = dict(dest=f.name, help=f.metadata["help"])
        if with_defaults:
            kw.update(default=f.default, help=f"{f.metadata['help']} (default {f.default})")
        if f.name == "activation_checkpointing":  # a bare --activation-checkpointing means full
            p.add_argument(flag, nargs="?", const="full", choices=AC_MODES, **kw)
        elif typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=typ, **kw)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a bad flag is one line (exit 2 via run_main), not a usage dump
        raise UserError(f"{message} (see --help)")


def build_parser(cls=TrainConfig, description: str = "") -> argparse.ArgumentParser:
    p = _Parser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with overrides (e.g. a run's config.toml; see common/config.py)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    add_dataclass_flags(p, cls, skip=cls.NOT_USED)
    return p


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def load_config(argv: list[str] | None = None, description: str = "", cls=TrainConfig, **defaults) -> TrainConfig:
    """Parse the command line into a ``cls`` (TrainConfig or a script's subclass). Errors become UserError."""
    args = vars(build_parser(cls, description).parse_args(argv))
    print_config = args.pop("print_config", False)
    values: dict = dict(defaults)
    config_file = args.pop("config", None)
    file_values = read_toml(config_file) if config_file else {}
    for name, var in (("device", "LLM_DEVICE"), ("data_dir", "LLM_DATA")):  # the site profile's choices
        if name not in args and name not in file_values and os.environ.get(var) and name in known_fields(cls):
            values[name] = os.environ[var]
    values.update(file_values)
    values.update(args)
    cfg = make_config(cls, **values)
    if print_config:
        print(to_toml(cfg), end="")
        sys.exit(0)
    return cfg


def known_fields(cls) -> set[str]:
    return {f.name for f in fields(cls)} - set(cls.NOT_USED)


def make_config(cls=TrainConfig, /, **values) -> TrainConfig:
    """``cls`` from keyword values (the preset's training defaults applied first), type-checked and validated."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise UserError(f"unknown config keys {sorted(unknown)} for {cls.__name__}")
    preset = values.get("preset", "tiny")
    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    merged = {**cls.defaults(preset), **values}
    for name, value in merged.items():
        merged[name] = _typed(name, value, field_type(known[name]))
    cfg = cls(**merged)
    validate(cfg)
    return cfg


def _typed(name: str, value, typ):
    """A config value of the field's type (an int is accepted for a float), else a one-line error."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise UserError(f"config key {name!r} must be {typ.__name__}, not {type(value).__name__} ({value!r})")


def validate(cfg: TrainConfig) -> None:
    """Every check of a value that needs no process group, once, with the fix in the message."""
    checks = [
        (cfg.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, not {cfg.device!r}"),
        (cfg.precision in ("auto", "fp32", "bf16", "fp16"),
         f"--precision must be auto, fp32, bf16 or fp16, not {cfg.precision!r}"),
        (cfg.activation_checkpointing in AC_MODES,
         f"--activation-checkpointing must be one of {', '.join(AC_MODES)}, not {cfg.activation_checkpointing!r}"),
        (cfg.max_steps > 0, "--max-steps must be positive"),
        (cfg.batch_size > 0 and cfg.micro_batch_size > 0, "batch sizes must be positive"),
        (cfg.seq_len > 1, "--seq-len must be at least 2"),
        (all(math.isfinite(v) and v >= 0 for v in (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.grad_clip)),
         "--lr, --min-lr, --weight-decay and --grad-clip must be finite and >= 0"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.eval_batches > 0, "--eval-batches must be at least 1 (the final validation needs a batch)"),
        (min(cfg.warmup_steps, cfg.log_interval - 1, cfg.eval_interval, cfg.ckpt_interval, cfg.keep_checkpoints,
             cfg.threads, cfg.sample_tokens) >= 0,
         "--warmup-steps, --eval-interval, --ckpt-interval, --keep-checkpoints, --threads and --sample-tokens "
         "must be >= 0, --log-interval >= 1"),
        (cfg.timeout_s > 0, "--timeout-s must be positive"),
        (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops >= 0, "--peak-tflops must be finite and >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    cfg.check()


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (scalars at top level, model overrides in [model]); --config reads it back."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        return str(v)

    d = cfg.to_dict()
    model = d.pop("model") if isinstance(d.get("model"), dict) else {}
    lines = [f"{k} = {value(v)}" for k, v in d.items() if v is not None]
    if model:
        lines += ["", "[model]", *(f"{k} = {value(v)}" for k, v in model.items())]
    return "\n".join(lines) + "\n"
