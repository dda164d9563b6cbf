"""Supervised fine-tuning (SFT) of any Hugging Face causal LM with FSDP2, full or LoRA.

SFT trains on chats: the loss counts only the assistant's answer (prompt tokens get label -100), and
the text is laid out by the tokenizer's chat template (ours gets a minimal one, see ``sft_data``).
FSDP2 shards every decoder layer (``fully_shard`` on each, then on the root): a layer's parameters
are all-gathered just before its forward/backward and freed after, gradients are reduce-scattered, so
each rank stores 1/N of weights, gradients and optimizer state. ``--lora`` freezes the model and
trains low-rank adapters (PEFT); FSDP2 shards frozen and trainable parameters alike.
Evaluation before and after: validation loss on the answers and exact match of greedy answers.

Launch (from the repository root; the model is an HF folder or a hub name fetched by prefetch.py):
    python 04_Finetuning/make_base_model.py --out-dir runs/base-tiny            # our pretrained tiny model
    python 04_Finetuning/fsdp_sft.py --model runs/base-tiny/hf                   # one process
    torchrun --standalone --nproc_per_node=2 04_Finetuning/fsdp_sft.py --model runs/base-tiny/hf --lora
    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=4 04_Finetuning/fsdp_sft.py \\
        --model meta-llama/Llama-3.2-1B-Instruct --data hf:HuggingFaceH4/no_robots --activation-checkpointing
    sbatch 04_Finetuning/fsdp_sft.slurm --model runs/base-tiny/hf
Outputs in --out-dir: summary.json, log.jsonl, checkpoints/step_N (sharded DCP), hf/ (merged model
+ tokenizer, loads with AutoModelForCausalLM), adapter/ (LoRA only). SIGUSR1 (Slurm's time-limit warning)
saves a checkpoint and stops; ``--resume`` continues from it with the same losses. Options: ``--help``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft_data  # noqa: E402

from common import checkpoint, distributed  # noqa: E402
from common.config import add_dataclass_flags, doc  # noqa: E402
from common.distributed import log  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.metrics import JsonlLog, Throughput, mfu, peak_memory_bytes, peak_tflops  # noqa: E402
from common.precision import choose_precision, describe  # noqa: E402
from common.trainer import Signals, build_optimizer, lr_at  # noqa: E402


@dataclass
class SFTConfig:
    model: str = doc("HF model folder, or a hub name already in the cache (prefetch.py)", "runs/base-tiny/hf")
    data: str = doc("'shakespeare' (offline, from the plays) or hf:NAME[:CONFIG]", "shakespeare")
    tasks: str = doc("comma-separated question types for --data shakespeare (speaker, next)", "speaker,next")
    train_examples: int = doc("use the first N training examples (0 = all)", 0)
    val_examples: int = doc("validation examples for loss and exact match", 64)
    max_len: int = doc("longest example in tokens (the prompt's start is cut first)", 256)
    max_steps: int = doc("optimizer steps", 100)
    batch_size: int = doc("global batch in examples per step (any number of processes)", 16)
    micro_batch_size: int = doc("examples per forward pass per process", 16)
    lr: float = doc("peak learning rate (LoRA likes ~10x the full fine-tuning rate)", 1e-4)
    min_lr: float = doc("final learning rate of the cosine schedule", 1e-5)
    warmup_steps: int = doc("linear warm-up steps", 10)
    weight_decay: float = doc("AdamW weight decay (matrices only)", 0.0)
    grad_clip: float = doc("clip the global gradient norm (0 = off)", 1.0)
    seed: int = doc("seed for data order and adapter initialisation", 0)
    device: str = doc("auto, cpu or cuda", "auto")
    precision: str = doc("auto, fp32, bf16 or fp16 (auto: bf16 on A100/H100, fp16 on V100, fp32 on CPU)", "auto")
    lora: bool = doc("train LoRA adapters (PEFT) instead of all weights", False)
    lora_r: int = doc("LoRA rank", 8)
    lora_alpha: int = doc("LoRA scale numerator (scale = alpha / r)", 16)
    lora_dropout: float = doc("dropout on the LoRA input", 0.0)
    activation_checkpointing: bool = doc("recompute layer activations in backward (less memory)", False)
    out_dir: str = doc("run folder", "runs/sft")
    ckpt_interval: int = doc("sharded checkpoint every N steps (0 = only at the end)", 0)
    resume: bool = doc("continue from the latest checkpoint in out_dir if there is one", False)
    max_new_tokens: int = doc("longest generated answer for exact match", 16)
    eval_batch_size: int = doc("examples per evaluation batch per process", 16)
    log_interval: int = doc("log every N steps", 10)
    threads: int = doc("CPU threads per process (0 = cores / processes)", 0)
    peak_tflops: float = doc("peak TFLOP/s per device for MFU (0 = from the device table or measured)", 0.0)
    timeout_s: int = doc("collective timeout in seconds", 600)


def parse(argv: list[str] | None = None) -> SFTConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, SFTConfig, with_defaults=True)
    return SFTConfig(**vars(p.parse_args(argv)))


def load_model(cfg: SFTConfig):
    """Tokenizer (with a chat template) and model, identical on every rank (LoRA init is seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    sft_data.ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        model = add_lora(model, cfg)
    return tokenizer, model


def add_lora(model, cfg: SFTConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def flops_per_token(model, lora: bool) -> tuple[int, int]:
    """Training FLOPs per token = a + b * seq_len (as ``GPT.flops_per_token``, PaLM appendix B): 6 per matmul
    weight (forward 2, backward 4; a frozen weight under LoRA skips its own gradient: 4) plus attention scores.
    The input embedding is a lookup, not a matmul (unless it is tied to the output layer)."""
    c = model.config
    matmul = [p for p in model.parameters() if p.dim() == 2]
    total = sum(p.numel() for p in matmul)
    total -= 0 if c.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    trained = sum(p.numel() for p in matmul if p.requires_grad)
    return (4 * total + 2 * trained if lora else 6 * total), 12 * c.num_hidden_layers * c.hidden_size


def apply_fsdp(model, precision, mesh):
    """fully_shard each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layer_types = tuple(getattr(model, "_no_split_modules", None) or ["LlamaDecoderLayer"])
    mp = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise UserError(f"no decoder layers of type {layer_types} found to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, length: int):
    """Right-pad to ``length``: (input_ids, attention_mask, labels)."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), sft_data.IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def token_loss_sum(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over answer tokens, and their count."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum",
                           ignore_index=sft_data.IGNORE)
    return loss, int((targets != sft_data.IGNORE).sum())


@torch.no_grad()
def evaluate(model, tokenizer, val, val_tok, info, precision, cfg: SFTConfig) -> dict:
    """Validation loss (answer tokens) and exact match; every rank takes an equal share."""
    per = len(val) // info.world_size
    mine = range(info.rank * per, (info.rank + 1) * per)
    model.eval()
    loss_sum, count, hits = 0.0, 0, 0
    tokenizer.padding_side = "left"
    for start in range(mine.start, mine.stop, cfg.eval_batch_size):
        idx = list(range(start, min(start + cfg.eval_batch_size, mine.stop)))
        rows = [val_tok[i] for i in idx]
        with precision.autocast():
            s, n = token_loss_sum(model, *[t.to(info.device) for t in
                                           collate(rows, tokenizer.pad_token_id, max(len(r[0]) for r in rows))])
            enc = tokenizer([sft_data.prompt_text(tokenizer, val[i]) for i in idx], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(info.device)
            # synced_gpus: every rank keeps stepping until all are done (FSDP needs the same forward count)
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=info.world_size > 1)
        preds = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        hits += round(sft_data.exact_match(preds, [val[i].answer for i in idx]) * len(idx))
        loss_sum, count = loss_sum + float(s), count + n
    model.train()
    t = torch.tensor([loss_sum, count, hits], dtype=torch.float64, device=info.device)
    if info.world_size > 1:
        dist.all_reduce(t)
    return {"val_loss": t[0].item() / max(t[1].item(), 1), "exact_match": t[2].item() / (per * info.world_size),
            "examples": per * info.world_size, "example_prediction": preds[0] if preds else ""}


def save_hf(model, tokenizer, cfg: SFTConfig, info, out: Path) -> None:
    """Gather the full weights on rank 0 and write an HF folder (LoRA: the adapter and the merged model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=torch.float32)
        fresh = add_lora(fresh, cfg) if cfg.lora else fresh
        fresh.load_state_dict(sd, strict=False, assign=True)
        fresh.tie_weights() if hasattr(fresh, "tie_weights") else None
        if cfg.lora:
            fresh.save_pretrained(out / "adapter")
            fresh = fresh.merge_and_unload()
        fresh.save_pretrained(out / "hf")
        tokenizer.save_pretrained(out / "hf")
    distributed.barrier(info)


def main(cfg: SFTConfig) -> dict:
    info = distributed.init(cfg.device, timeout_s=cfg.timeout_s, threads=cfg.threads)
    precision = choose_precision(cfg.precision, info.device)
    if cfg.batch_size % info.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {info.world_size} processes")
    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    tokenizer, model = load_model(cfg)
    data = sft_data.load_sft(cfg.data, tuple(cfg.tasks.split(",")), seed=cfg.seed)
    train = data["train"][: cfg.train_examples or None]
    val = data["val"][: cfg.val_examples - cfg.val_examples % info.world_size]
    train_tok = [sft_data.tokenize(tokenizer, ex, cfg.max_len) for ex in train]
    val_tok = [sft_data.tokenize(tokenizer, ex, cfg.max_len) for ex in val]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    flops_a, flops_b = flops_per_token(model, cfg.lora)  # before sharding: full shapes
    log.info(f"fsdp_sft: {info.world_size} process(es) on {info.device.type} | {describe(precision)} | "
             f"{'LoRA' if cfg.lora else 'full'}: {n_train:,} of {n_all:,} parameters trained | "
             f"{len(train)} train / {len(val)} val examples")
    if info.world_size > 1:  # one process is the reference: the plain model, no wrapper
        model = apply_fsdp(model, precision, distributed.make_mesh(info, dp=info.world_size))
    model.to(info.device)
    optimizer = build_optimizer(model, cfg)
    scaler = precision.scaler()  # fp16 (V100): DTensor all-reduces the inf check, so ranks step alike
    start, losses, before = 0, [], None
    resume_from = checkpoint.latest(out) if cfg.resume else None
    if resume_from:  # weights, optimizer, RNG; the data order is a function of the step
        state = checkpoint.load(resume_from, model, optimizer, info)
        start, losses, before = state["step"], state["losses"], state.get("before")
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        log.info(f"resumed from {resume_from} at step {start}")
    if before is None:
        before = evaluate(model, tokenizer, val, val_tok, info, precision, cfg)
    log.info(f"before: val loss {before['val_loss']:.4f} | exact match {before['exact_match']:.1%}")

    def save(step: int) -> Path:
        return checkpoint.save(out, step, model, optimizer, info, {
            "losses": losses, "before": before, "scaler": scaler.state_dict() if scaler.is_enabled() else None})

    per_rank = cfg.batch_size // info.world_size
    micro = max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cfg.micro_batch_size)
    jsonl, meter = JsonlLog(out / "log.jsonl" if info.is_main else None), Throughput()
    lengths = []  # padded sequence length per step, for the attention FLOPs
    peak, peak_src = peak_tflops(info.device, precision.name, cfg.peak_tflops)
    log.info(f"peak {peak or float('nan'):.2f} TFLOP/s per device ({peak_src}) for MFU")
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(train)} training examples are fewer than one batch of {cfg.batch_size}")
    model.train()
    with Signals() as signals:  # Slurm's USR1 before the time limit (or TERM): checkpoint and stop
        for step in range(start, cfg.max_steps):
            meter.start()
            epoch, k = divmod(step, steps_per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
            batch = [train_tok[i] for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
            length = max(len(x) for x, _ in batch)  # pad the global batch alike on every rank
            n_target = sum(sum(t != sft_data.IGNORE for t in y[1:]) for _, y in batch)
            ids, mask, labels = collate(batch[info.rank * per_rank : (info.rank + 1) * per_rank],
                                        tokenizer.pad_token_id, length)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            total = 0.0
            for m in range(0, per_rank, micro):
                if info.world_size > 1:  # reduce-scatter gradients only after the last micro-batch
                    model.set_requires_gradient_sync(m + micro >= per_rank)
                with precision.autocast():
                    s, _ = token_loss_sum(model, *(t[m : m + micro].to(info.device) for t in (ids, mask, labels)))
                # mean over the global batch's answer tokens; FSDP averages gradients over ranks, so x world
                scaler.scale(s * info.world_size / n_target).backward()
                total += s.item() / n_target
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                  cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss = distributed.all_reduce_mean(total, info) * info.world_size
            tok_s = meter.stop(int(sum(len(x) for x, _ in batch)))
            lengths.append(length)
            step_mfu = mfu(flops_a + flops_b * length, tok_s, peak, info.world_size)
            losses.append(loss)
            jsonl.write(step=step + 1, loss=loss, grad_norm=float(norm), tokens_per_s=tok_s, mfu=step_mfu)
            if (step + 1) % cfg.log_interval == 0 or step == 0:
                log.info(f"step {step + 1}/{cfg.max_steps} | loss {loss:.4f} | grad_norm {float(norm):.3f} | "
                         f"{tok_s:,.0f} tok/s" + (f" | mfu {step_mfu:.1%}" if step_mfu else ""))
            if distributed.any_rank(signals.received is not None, info):
                path = save(step + 1)
                log.info(f"preempted: checkpoint saved at step {step + 1} ({path}); rerun with --resume")
                return {"preempted": True, "step": step + 1}
            if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0:
                save(step + 1)
    after = evaluate(model, tokenizer, val, val_tok, info, precision, cfg)
    log.info(f"after:  val loss {after['val_loss']:.4f} | exact match {after['exact_match']:.1%} | "
             f"e.g. {after['example_prediction']!r}")
    save(cfg.max_steps)
    save_hf(model, tokenizer, cfg, info, out)
    mean_flops = flops_a + flops_b * float(np.mean(lengths or [0]))
    summary = dict(model=cfg.model, lora=cfg.lora, world_size=info.world_size, device=info.device.type,
                   precision=precision.name, steps=cfg.max_steps, trainable_params=n_train, params=n_all,
                   losses=losses, before=before, after=after, tokens_per_s=meter.tokens_per_s,
                   mfu=mfu(mean_flops, meter.tokens_per_s, peak, info.world_size),
                   peak_memory_bytes=peak_memory_bytes(info.device))
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    try:
        main(parse())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown()
        sys.exit(2)
    distributed.teardown()
