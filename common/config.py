"""Typed training configuration shared by every training script, and its command line.

Precedence: dataclass defaults < preset < ``--config FILE.toml`` < command-line flags.
A TOML file may hold any TrainConfig field at top level and model overrides in a ``[model]`` table::

    max_steps = 200
    lr = 6e-4
    [model]
    n_layers = 6
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import tomllib

from common.errors import UserError
from common.model import MODEL_PRESETS, ModelConfig, model_config

__all__ = ["TrainConfig", "UserError", "load_config", "make_config", "script_options", "TRAIN_PRESETS"]


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
    data_dir: str = doc("where tokenizers and token shards are cached", "data")
    tokenizer: str = doc("'bpe' (train a byte-level BPE) or a Hugging Face tokenizer name/path", "bpe")
    vocab_size: int = doc("vocabulary size of a trained BPE", 4096)
    out_dir: str = doc("run folder: log.jsonl, summary.json, checkpoints/ (default runs/<strategy>-<preset>)", "")
    resume: bool = doc("continue from the latest checkpoint in out_dir if there is one", False)
    log_interval: int = doc("log every N steps", 10)
    eval_interval: int = doc("validation loss every N steps (0 = only at the end)", 100)
    eval_batches: int = doc("validation batches per evaluation", 8)
    ckpt_interval: int = doc("checkpoint every N steps (0 = only at the end)", 0)
    sample_tokens: int = doc("tokens of text to generate at the end (0 = none)", 100)
    threads: int = doc("CPU threads per process (0 = cores / processes on this node)", 0)
    peak_tflops: float = doc("peak TFLOP/s per device for MFU (0 = from the device table or measured)", 0.0)
    timeout_s: int = doc("collective timeout in seconds: a hang becomes an error", 600)
    compile: bool = doc("torch.compile the model (slow first step on CPU)", False)
    progress: bool = doc("tqdm progress bar on rank 0", True)
    model: dict = doc("model overrides from the config file's [model] table", default_factory=dict)
    options: dict = doc("script-specific options (e.g. fsdp.py --cpu-offload); [options] table in a config file",
                        default_factory=dict)

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


# A script's own flags: {name: (default, help)}; e.g. {"cpu_offload": (False, "keep parameters on the CPU")}.
Options = dict[str, tuple[object, str]]


def _add_flag(p: argparse.ArgumentParser, name: str, typ, help: str, **kw) -> None:
    flag = "--" + name.replace("_", "-")
    if typ in ("bool", bool):
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help, **kw)
    else:
        p.add_argument(flag, dest=name, type={"int": int, "float": float, "str": str}.get(str(typ), typ), help=help,
                       **kw)


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), with_defaults: bool = False):
    """One ``--field-name`` flag per field of the dataclass ``cls``, with the field's help text."""
    for f in fields(cls):
        if f.name in skip:
            continue
        if with_defaults:
            _add_flag(p, f.name, f.type, f"{f.metadata['help']} (default {f.default})", default=f.default)
        else:
            _add_flag(p, f.name, f.type, f.metadata["help"])


def build_parser(description: str = "", options: Options | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML file with overrides (see common/config.py)")
    if options:
        group = p.add_argument_group("options of this script")
        for name, (default, help) in options.items():
            _add_flag(group, name, type(default), f"{help} (default: {default})")
    add_dataclass_flags(p, TrainConfig, skip=("model", "options"))
    return p


def load_config(argv: list[str] | None = None, description: str = "", options: Options | None = None,
                **defaults) -> TrainConfig:
    """Parse the command line into a TrainConfig. Errors become UserError (one line).

    ``options`` declares the script's own flags; their values land in ``cfg.options``.
    """
    args = vars(build_parser(description, options).parse_args(argv))
    given_options = {k: args.pop(k) for k in list(args) if k in (options or {})}
    values: dict = dict(defaults)
    config_file = args.pop("config", None)
    file_values: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {config_file}")
        file_values = tomllib.loads(path.read_text())
    preset = args.get("preset", file_values.get("preset", values.get("preset", "tiny")))
    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    values.update(TRAIN_PRESETS[preset])
    values.update(file_values)
    values.update(args)
    values["options"] = {**values.get("options", {}), **given_options}
    if "device" not in args and "device" not in file_values and os.environ.get("LLM_DEVICE"):
        values["device"] = os.environ["LLM_DEVICE"]
    return make_config(**values)


def make_config(**values) -> TrainConfig:
    """TrainConfig from keyword values (preset training defaults applied first), validated."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown config keys {sorted(unknown)}")
    preset = values.get("preset", "tiny")
    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    cfg = TrainConfig(**{**TRAIN_PRESETS[preset], **values})
    validate(cfg)
    return cfg


def script_options(cfg: TrainConfig, options: Options) -> SimpleNamespace:
    """The script's options with their defaults filled in; an unknown option is a UserError."""
    unknown = set(cfg.options) - set(options)
    if unknown:
        raise UserError(f"unknown options {sorted(unknown)} for this script; known: {sorted(options)}")
    return SimpleNamespace(**{name: cfg.options.get(name, default) for name, (default, _) in options.items()})


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, not {cfg.device!r}"),
        (cfg.precision in ("auto", "fp32", "bf16", "fp16"),
         f"--precision must be auto, fp32, bf16 or fp16, not {cfg.precision!r}"),
        (cfg.max_steps > 0, "--max-steps must be positive"),
        (cfg.batch_size > 0 and cfg.micro_batch_size > 0, "batch sizes must be positive"),
        (cfg.seq_len > 1, "--seq-len must be at least 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        cfg.model_config()
    except ValueError as e:
        raise UserError(str(e)) from None
