"""Login-node step: download a hub model (+ tokenizer) and an SFT dataset into the cache, once.

Compute nodes usually have no internet. Run this where there is (the login node), into a cache on a
shared filesystem; then jobs run with ``HF_HUB_OFFLINE=1`` and the same ``HF_HOME``, and
``from_pretrained(NAME)`` / ``load_dataset(NAME)`` read the cache without touching the network.

    export HF_HOME=$SCRATCH/llm-across-platforms/huggingface   # what 01_Basics/site.env sets; nodes must read it
    hf auth login                                   # gated models (Llama) need a token, once
    python 04_Finetuning/prefetch.py --model meta-llama/Llama-3.2-1B-Instruct --dataset HuggingFaceH4/no_robots
    python 04_Finetuning/prefetch.py --model Qwen/Qwen2.5-0.5B-Instruct --dry-run    # only print the plan
    HF_HUB_OFFLINE=1 sbatch 04_Finetuning/fsdp_sft.slurm --model meta-llama/Llama-3.2-1B-Instruct \\
        --data hf:HuggingFaceH4/no_robots

Only the files needed to fine-tune are fetched (config, tokenizer, safetensors weights; no
``original/`` consolidated checkpoints, no other formats), so a 1B model is ~2.5 GB, an 8B ~16 GB.
"""

from __future__ import annotations

import argparse
import os
import sys

# what fine-tuning needs from a model repository (torchtune and transformers alike)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
SKIP_FILES = ["original/*", "*.pth", "*.bin", "*.onnx", "*.gguf", "*.h5", "*.msgpack"]


def plan(args) -> list[str]:
    cache = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    lines = [f"cache: {cache} (set HF_HOME to change; compute jobs must use the same HF_HOME)"]
    if args.model:
        lines.append(f"model: {args.model} (files {MODEL_FILES}, skipping {SKIP_FILES})")
    if args.dataset:
        lines.append(f"dataset: {args.dataset}" + (f" config {args.config}" if args.config else ""))
    lines.append("then run jobs with HF_HUB_OFFLINE=1")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub model id, e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--dataset", help="hub dataset id with a 'messages' or instruction/output columns")
    p.add_argument("--config", help="dataset configuration name, if it has several")
    p.add_argument("--revision", help="model revision (branch, tag or commit) to pin")
    p.add_argument("--dry-run", action="store_true", help="print what would be downloaded and exit")
    args = p.parse_args(argv)
    if not (args.model or args.dataset):
        p.error("give --model and/or --dataset")
    for line in plan(args):
        print(line)
    if args.dry_run:
        return 0
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        print("error: HF_HUB_OFFLINE=1 is set; unset it on the login node to download", file=sys.stderr)
        return 2
    if args.model:
        from huggingface_hub import snapshot_download

        path = snapshot_download(args.model, revision=args.revision, allow_patterns=MODEL_FILES,
                                 ignore_patterns=SKIP_FILES)
        print(f"model in {path}")
        from transformers import AutoTokenizer  # checks that the tokenizer files are complete

        AutoTokenizer.from_pretrained(path)
    if args.dataset:
        from datasets import load_dataset

        ds = load_dataset(args.dataset, args.config)
        print(f"dataset: {ds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
