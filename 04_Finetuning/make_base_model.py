"""A small pretrained base model for the fine-tuning chapter: pretrain with chapter 03, export to HF format.

No hub model is needed offline: ``ddp.py`` pretrains the ``tiny`` preset on the embedded plays and
``common.hf`` writes the result as a ``LlamaForCausalLM`` folder (config, safetensors, tokenizer) that
``transformers``, PEFT, torchtune and Unsloth all load. The two steps by hand:

    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/ddp.py --preset tiny --out-dir runs/base-tiny
    python -m common.hf export runs/base-tiny/checkpoints/step_000200 runs/base-tiny/hf

or in one command (one process; extra flags go to ddp.py):

    python 04_Finetuning/make_base_model.py --out-dir runs/base-tiny --max-steps 200
    sbatch 03_LLM_Training_on_GPU/ddp.slurm --preset gpt2-small   # bigger, on a cluster; then export as above
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(out_dir: str | Path, **train_overrides) -> Path:
    """Pretrain (one process, in this process) and export; returns the HF folder ``<out_dir>/hf``."""
    import importlib.util

    from common import checkpoint, hf
    from common.config import make_config
    from common.distributed import teardown

    spec = importlib.util.spec_from_file_location("ddp_pretrain", ROOT / "03_LLM_Training_on_GPU/ddp.py")
    ddp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp)
    out_dir = Path(out_dir)
    cfg = make_config(**{"preset": "tiny", "sample_tokens": 0, "progress": False, **train_overrides,
                         "out_dir": str(out_dir)})
    ddp.main(cfg)
    teardown()
    hf.main(["export", str(checkpoint.latest(out_dir)), str(out_dir / "hf")])
    return out_dir / "hf"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/base-tiny", help="run folder; the HF model goes to <out-dir>/hf")
    a, rest = p.parse_known_args(argv)
    from common.config import load_config

    cfg = load_config(rest + ["--out-dir", a.out_dir, "--sample-tokens", "0"])
    return build(a.out_dir, **{k: v for k, v in cfg.to_dict().items() if k != "out_dir"})


if __name__ == "__main__":
    print(main())
