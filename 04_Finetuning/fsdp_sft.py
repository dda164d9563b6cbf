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
The training loop, checkpoints, logging, MFU and preemption are chapter 03's (``common.trainer.train``);
this script brings the model, the chat batches, the answer-only loss and the evaluation.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft_data  # noqa: E402

from common import distributed  # noqa: E402
from common.config import TrainConfig, doc  # noqa: E402
from common.distributed import log  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.trainer import Batch, Strategy, Task, build_optimizer, run_main, setup, train  # noqa: E402


@dataclass
class SFTConfig(TrainConfig):
    """The shared training config (steps, batch, lr schedule, precision, checkpoints ...) + what SFT adds."""

    model: str = doc("HF model folder, or a hub name already in the cache (prefetch.py)", "runs/base-tiny/hf")
    tasks: str = doc("comma-separated question types for --data shakespeare (speaker, next)", "speaker,next")
    train_examples: int = doc("use the first N training examples (0 = all)", 0)
    val_examples: int = doc("validation examples for loss and exact match", 64)
    max_len: int = doc("longest example in tokens (the prompt's start is cut first)", 256)
    lora: bool = doc("train LoRA adapters (PEFT) instead of all weights", False)
    lora_r: int = doc("LoRA rank", 8)
    lora_alpha: int = doc("LoRA scale numerator (scale = alpha / r)", 16)
    lora_dropout: float = doc("dropout on the LoRA input", 0.0)
    max_new_tokens: int = doc("longest generated answer for exact match", 16)
    eval_batch_size: int = doc("examples per evaluation batch per process", 16)

    NOT_USED = ("preset", "seq_len", "tokenizer", "vocab_size", "data_dir", "eval_batches", "sample_tokens")

    @classmethod
    def defaults(cls, preset: str) -> dict:  # fine-tuning defaults (a pretrained model: small lr, no decay)
        return dict(lr=1e-4, min_lr=1e-5, max_steps=100, warmup_steps=10, weight_decay=0.0, seed=0,
                    out_dir="runs/sft", eval_interval=0, batch_size=16, micro_batch_size=16)

    def check(self) -> None:
        if self.activation_checkpointing == "selective":
            raise UserError("--activation-checkpointing selective is not available with fsdp_sft.py: Hugging Face "
                            "models checkpoint whole layers; use --activation-checkpointing (full)")
        if self.max_len < 2 or self.val_examples < 1 or self.eval_batch_size < 1:
            raise UserError("--max-len must be >= 2, --val-examples and --eval-batch-size >= 1")


def load_model(cfg: SFTConfig):
    """Tokenizer (with a chat template) and model, identical on every rank (LoRA init is seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    sft_data.ensure_chat_template(tokenizer)
    full_ac = cfg.activation_checkpointing == "full"
    # a KV cache is useless in training and conflicts with recomputation: off when checkpointing
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, **({"use_cache": False} if full_ac
                                                                                     else {}))
    if full_ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    """fully_shard each decoder layer, then the root (embeddings, final norm, head): chapter 03's pattern
    (``common.parallelize.apply_fsdp``) on the layers of a Hugging Face model."""
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


def sft_task(run, model, tokenizer, train_tok, val, val_tok) -> Task:
    """Chats in a seeded order per epoch; the global batch is padded alike on every rank, and each
    example carries the weight world / (answer tokens of the global batch): the loss is the mean over
    every answer token of the global batch, whatever the number of ranks or micro-batches."""
    cfg, info = run.cfg, run.info
    per_rank, steps_per_epoch = run.per_rank_batch, len(train_tok) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_tok)} training examples are fewer than one batch of {cfg.batch_size}")
    lengths = []

    def batch(step: int) -> Batch:
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_tok))
        rows = [train_tok[i] for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        length = max(len(x) for x, _ in rows)
        n_target = sum(sum(t != sft_data.IGNORE for t in y[1:]) for _, y in rows)
        ids, mask, labels = collate(rows[info.rank * per_rank : (info.rank + 1) * per_rank], tokenizer.pad_token_id,
                                    length)
        weight = torch.full((per_rank,), info.world_size / n_target)
        lengths.append(length)
        run.facts["mean_seq_len"] = float(np.mean(lengths))  # for the summary's MFU
        return Batch(tuple(t.to(info.device) for t in (ids, mask, labels, weight)),
                     sum(len(x) for x, _ in rows), length)

    return Task(batch, lambda: evaluate(model, tokenizer, val, val_tok, info, run.precision, cfg), evaluate_first=True)


def main(cfg: SFTConfig) -> dict:
    run = setup(cfg, strategy="fsdp_sft", token_data=False)
    info = run.info
    tokenizer, model = load_model(cfg)
    data = sft_data.load_sft(cfg.data, tuple(cfg.tasks.split(",")), seed=cfg.seed)
    train_ex = data["train"][: cfg.train_examples or None]
    val = data["val"][: cfg.val_examples - cfg.val_examples % info.world_size]
    train_tok = [sft_data.tokenize(tokenizer, ex, cfg.max_len) for ex in train_ex]
    val_tok = [sft_data.tokenize(tokenizer, ex, cfg.max_len) for ex in val]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    flops_a, flops_b = flops_per_token(model, cfg.lora)  # before sharding: full shapes
    log.info(f"fsdp_sft: {'LoRA' if cfg.lora else 'full'}: {n_train:,} of {n_all:,} parameters trained | "
             f"{len(train_ex)} train / {len(val)} val examples")
    sharded = info.world_size > 1  # one process is the reference: the plain model, no wrapper
    if sharded:
        model = apply_fsdp(model, run.precision, distributed.make_mesh(info, dp=info.world_size))
    model.to(info.device)
    run.facts.update(model=cfg.model, lora=cfg.lora, trainable_params=n_train)

    @contextmanager
    def grad_sync(last: bool):  # accumulation: reduce-scatter the gradients only after the last micro-batch
        if sharded:
            model.set_requires_gradient_sync(last)
        yield

    def loss_of(ids, mask, labels, weight) -> torch.Tensor:
        return token_loss_sum(model, ids, mask, labels)[0] * weight[0]

    summary = train(run, Strategy(model, build_optimizer(model, cfg), lambda seq_len: flops_a + flops_b * seq_len,
                                  n_all, grad_sync=grad_sync, loss_of=loss_of),
                    sft_task(run, model, tokenizer, train_tok, val, val_tok))
    if not summary.get("preempted"):
        save_hf(model, tokenizer, cfg, info, run.out_dir)
    return summary


if __name__ == "__main__":
    run_main(main, __doc__, cls=SFTConfig)
