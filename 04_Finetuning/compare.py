"""Compare the fine-tuning routes on the same model, data and steps: peak memory, tokens/s, final metric.

Each route runs in its own process (its own environment for torchtune and Unsloth; a route whose
environment is missing is left out and said so); its peak resident memory (CPU) is measured by
``/usr/bin/time``. Afterwards every resulting model is evaluated by the same function
(``fsdp_sft.evaluate``: validation loss on the answers + exact match), in this process.

    python 04_Finetuning/make_base_model.py --out-dir runs/base-tiny
    python 04_Finetuning/compare.py --model runs/base-tiny/hf --steps 40 --out-dir runs/compare
Writes ``results.json``, ``table.md`` and ``compare.png`` into --out-dir (the chapter README shows them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run ``cmd`` under /usr/bin/time; (wall seconds, peak RSS bytes). Raises on failure."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (see {log}):\n{text[-2000:]}")
    return time.perf_counter() - t0, int(re.findall(r"MAXRSS_KB (\d+)", text)[-1]) * 1024


def run_routes(a, data: Path, out: Path) -> dict:
    py, tt, us = sys.executable, ROOT / ".venv-torchtune/bin", ROOT / ".venv-unsloth/bin/python"
    common = [f"--model={a.model}", f"--max-steps={a.steps}", f"--batch-size={a.batch_size}",
              f"--train-examples={a.train_examples}", f"--val-examples={a.val_examples}", "--max-new-tokens=2",
              f"--tasks={a.tasks}"]
    tune = [f"model_dir={a.model}", f"data_dir={data}", f"max_steps_per_epoch={a.steps}", f"batch_size={a.batch_size}"]
    routes = {
        "fsdp_sft full": ([py, str(HERE / "fsdp_sft.py"), *common, f"--lr={a.lr}", f"--out-dir={out / 'fsdp-full'}"],
                          out / "fsdp-full/hf"),
        "fsdp_sft LoRA": ([py, str(HERE / "fsdp_sft.py"), *common, "--lora", f"--lr={a.lora_lr}",
                           f"--out-dir={out / 'fsdp-lora'}"], out / "fsdp-lora/hf"),
    }
    if (tt / "tune").exists():
        for kind, lr in (("full", a.lr), ("lora", a.lora_lr)):
            routes[f"torchtune {kind}"] = ([str(tt / "tune"), "run", f"{kind}_finetune_single_device", "--config",
                                            str(HERE / f"torchtune/{kind}_single_device.yaml"), *tune,
                                            f"optimizer.lr={lr}", f"output_dir={out / ('tt-' + kind)}"],
                                           out / f"tt-{kind}/epoch_0")
    if us.exists():
        routes["unsloth LoRA"] = ([str(us), str(HERE / "unsloth/unsloth_sft.py"), f"--model={a.model}",
                                   f"--data-dir={data}", f"--max-steps={a.steps}", f"--batch-size={a.batch_size}",
                                   f"--lr={a.lora_lr}", "--val-examples=8", "--max-new-tokens=2",
                                   f"--out-dir={out / 'unsloth'}"], out / "unsloth/adapter")
    results = {}
    for name, (cmd, model_dir) in routes.items():
        print(f"== {name}", flush=True)
        wall, rss = timed(cmd, out / f"{name.replace(' ', '_')}.log")
        results[name] = dict(wall_s=wall, peak_rss_bytes=rss, model_dir=str(model_dir),
                             tokens_per_s=train_tokens_per_s(name, out))
    missing = [r for r in ("torchtune", "unsloth") if not any(k.startswith(r) for k in results)]
    return {"routes": results, "missing_envs": missing}


def train_tokens_per_s(name: str, out: Path) -> float:
    """Training tokens/s as each route reports it (prompt + answer tokens, no padding)."""
    if name.startswith("fsdp_sft"):
        return json.loads((out / f"fsdp-{name.split()[1].lower()}" / "summary.json").read_text())["tokens_per_s"]
    if name.startswith("torchtune"):
        text = "".join(p.read_text() for p in (out / f"tt-{name.split()[1]}" / "logs").glob("*.txt"))
        values = [float(x) for x in re.findall(r"tokens_per_second_per_gpu:([0-9.]+)", text)][1:]
        return sum(values) / max(len(values), 1)
    log = (out / "unsloth_LoRA.log").read_text()
    tokens = [float(x) for x in re.findall(r"'num_tokens': '([0-9.e+]+)'", log)]
    return tokens[-1] / json.loads((out / "unsloth" / "summary.json").read_text())["train_seconds"]


def evaluate_all(a, results: dict) -> None:
    """The same validation (loss on answers, exact match) for every route's final model."""
    import fsdp_sft
    import sft_data
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.distributed import DistInfo
    from common.precision import Precision

    cfg = fsdp_sft.SFTConfig(model=a.model, val_examples=a.val_examples, tasks=a.tasks)
    val = sft_data.load_sft("shakespeare", tuple(a.tasks.split(",")))["val"][: a.val_examples]
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    sft_data.ensure_chat_template(tokenizer)
    val_tok = [sft_data.tokenize(tokenizer, ex, cfg.max_len) for ex in val]
    for name, r in {"base model": {"model_dir": a.model}, **results["routes"]}.items():
        path = Path(r["model_dir"])
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(a.model), path).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ev = fsdp_sft.evaluate(model, tokenizer, val, val_tok, DistInfo(), Precision("fp32", "cpu"), cfg)
        r.update(val_loss=ev["val_loss"], exact_match=ev["exact_match"])
        if name == "base model":
            results["base"] = {"val_loss": ev["val_loss"], "exact_match": ev["exact_match"]}


def report(results: dict, out: Path) -> str:
    base = results["base"]
    lines = ["| route | peak RSS (MiB) | train tokens/s | wall (s) | val loss | exact match |",
             "|---|---|---|---|---|---|",
             f"| base model (no fine-tuning) | – | – | – | {base['val_loss']:.3f} | {base['exact_match']:.1%} |"]
    for name, r in results["routes"].items():
        lines.append(f"| {name} | {r['peak_rss_bytes'] / 2**20:,.0f} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} | "
                     f"{r['val_loss']:.3f} | {r['exact_match']:.1%} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["routes"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title, scale in ((axes[0], "peak_rss_bytes", "peak RSS (MiB)", 2**-20),
                                  (axes[1], "tokens_per_s", "train tokens/s", 1),
                                  (axes[2], "val_loss", "val loss on answers (lower is better)", 1)):
        ax.barh(names, [results["routes"][n][key] * scale for n in names], color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    axes[2].axvline(base["val_loss"], color="tab:red", ls="--", label="base model")
    axes[2].legend(fontsize=8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/base-tiny/hf")
    p.add_argument("--out-dir", default="runs/compare")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--val-examples", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="full fine-tuning learning rate")
    p.add_argument("--lora-lr", type=float, default=1e-2)
    p.add_argument("--tasks", default="speaker,next")
    a = p.parse_args(argv)
    a.model = str(Path(a.model).resolve())
    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tt_prepare", HERE / "torchtune/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    data = prepare.main(["--model", a.model, "--out-dir", str(out / "data"), "--train-examples",
                         str(a.train_examples), "--val-examples", str(a.val_examples), "--tasks", a.tasks])
    results = run_routes(a, data, out)
    evaluate_all(a, results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = report(results, out)
    print(table + ("\nnot run (environment missing): " + ", ".join(results["missing_envs"])
                   if results["missing_envs"] else ""))
    return table


if __name__ == "__main__":
    main()
