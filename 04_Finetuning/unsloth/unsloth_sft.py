"""LoRA (and, on a GPU, 4-bit QLoRA) fine-tuning with Unsloth + TRL's SFTTrainer, on the same chat data.

Unsloth patches the model with fused kernels (GPU) and wraps PEFT/TRL; without a GPU it falls back to
plain PyTorch for text LoRA / full fine-tuning — slow, but the same code path, so it runs in CI.
The data are the chats of ``../sft_data.py`` as JSON (written by ``../torchtune/prepare.py``), given
to TRL in prompt/completion form, so only the answer is learned (``completion_only_loss``).
Runs in ``.venv-unsloth`` (``bash 04_Finetuning/unsloth/setup.sh``):

    python 04_Finetuning/torchtune/prepare.py --model runs/base-tiny/hf --out-dir runs/sft-data   # .venv
    .venv-unsloth/bin/python 04_Finetuning/unsloth/unsloth_sft.py --model runs/base-tiny/hf --data-dir runs/sft-data
    .venv-unsloth/bin/python 04_Finetuning/unsloth/unsloth_sft.py --model unsloth/Llama-3.2-1B-Instruct \\
        --data-dir runs/sft-data --qlora                                   # GPU: 4-bit base + LoRA
    sbatch 04_Finetuning/unsloth/unsloth.slurm --model runs/base-tiny/hf --data-dir runs/sft-data
One process, one GPU: Unsloth's free version does not shard over several GPUs (see README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sft_data  # noqa: E402  (only its stdlib parts: template, metric)


def load_split(data_dir: Path, split: str, n: int) -> list[dict]:
    rows = json.loads((data_dir / f"{split}.json").read_text())[: n or None]
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def exact_match(model, tokenizer, rows, max_new_tokens: int) -> float:
    import torch

    tokenizer.padding_side = "left"
    preds = []
    for i in range(0, len(rows), 16):
        chunk = rows[i : i + 16]
        texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        preds += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return sft_data.exact_match(preds, [r["completion"][0]["content"] for r in rows])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/base-tiny/hf")
    p.add_argument("--data-dir", default="runs/sft-data", help="train.json / val.json from prepare.py")
    p.add_argument("--out-dir", default="runs/unsloth")
    p.add_argument("--train-examples", type=int, default=0)
    p.add_argument("--val-examples", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--qlora", action="store_true", help="load the base in 4 bit (bitsandbytes; GPU only)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    if a.qlora and not torch.cuda.is_available():
        raise SystemExit("error: --qlora needs a CUDA GPU (bitsandbytes 4-bit); use LoRA on CPU")
    from unsloth import FastLanguageModel  # isort: skip  (first: it patches transformers/trl)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    # bf16 needs Ampere (compute capability 8.0) or newer: torch.cuda.is_bf16_supported() is True on a V100
    # too (emulated, slow), so ask the hardware; V100 trains in fp16 with loss scaling
    bf16 = on_gpu and torch.cuda.get_device_capability(0)[0] >= 8
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=a.model, max_seq_length=a.max_len, load_in_4bit=a.qlora,
        dtype=(torch.bfloat16 if bf16 else torch.float16) if on_gpu else torch.float32)
    sft_data.ensure_chat_template(tokenizer)
    model = FastLanguageModel.get_peft_model(
        model, r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, bias="none", random_state=a.seed,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if on_gpu else False)
    train, val = (load_split(Path(a.data_dir), s, n) for s, n in (("train", a.train_examples), ("val", a.val_examples)))
    args = SFTConfig(output_dir=a.out_dir, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
                     per_device_eval_batch_size=16, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=5,
                     logging_steps=1, save_strategy="no", report_to=[], seed=a.seed, max_length=a.max_len,
                     completion_only_loss=True, bf16=bf16, fp16=on_gpu and not bf16, dataset_num_proc=1)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(val), args=args)
    before = {"val_loss": trainer.evaluate()["eval_loss"], "exact_match": exact_match(model, tokenizer, val,
                                                                                        a.max_new_tokens)}
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    after = {"val_loss": trainer.evaluate()["eval_loss"], "exact_match": exact_match(model, tokenizer, val,
                                                                                       a.max_new_tokens)}
    out = Path(a.out_dir)
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    peak = torch.cuda.max_memory_allocated() if on_gpu else __import__("resource").getrusage(0).ru_maxrss * 1024
    summary = dict(route="unsloth", qlora=a.qlora, device="cuda" if on_gpu else "cpu", steps=a.max_steps,
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   params=sum(p.numel() for p in model.parameters()), losses=losses, before=before, after=after,
                   train_seconds=seconds, train_loss=result.training_loss, peak_memory_bytes=peak)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"before {before} | after {after} | {seconds:.1f} s")
    return summary


if __name__ == "__main__":
    main()
