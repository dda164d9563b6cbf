"""Export our GPT (+ tokenizer) to Hugging Face ``LlamaForCausalLM`` format, and import it back.

Our parameter names map one-to-one onto Llama's and our RoPE uses the same rotate-half convention,
so the export is a rename: no weight permutation. The result loads offline with
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``; the
fine-tuning chapter starts from it.

    python -m common.hf export runs/ddp-tiny/checkpoints/step_000200 runs/ddp-tiny/hf
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from common.data import EOT
from common.errors import UserError
from common.model import GPT, ModelConfig

_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"


def from_hf_name(name: str) -> str:
    top = {v: k for k, v in _TOP_MAP.items()}
    if name in top:
        return top[name]
    layer = {v: k for k, v in _LAYER_MAP.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    return f"layers.{m.group(1)}.{layer[m.group(2)]}"


def llama_config(cfg: ModelConfig, eot_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=eot_id, eos_token_id=eot_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, torch_dtype="float32",
    )


def export(model: GPT, tokenizer_json: str | Path, out_dir: str | Path, eot_id: int = 0) -> Path:
    """Write config.json, model.safetensors and tokenizer files that ``transformers`` loads offline."""
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llama_config(model.cfg, eot_id).save_pretrained(out)
    tensors = {to_hf_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: transformers re-ties it on load
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOT, bos_token=EOT,
                                  unk_token=None, pad_token=EOT)
    tok.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eot_id, "eos_token_id": eot_id}))
    return out


def import_hf(path: str | Path) -> GPT:
    """Load an exported (or any compatible Llama) checkpoint folder into our GPT."""
    from safetensors.torch import load_file

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                      ffn_hidden=c["intermediate_size"], norm_eps=c["rms_norm_eps"], rope_theta=theta,
                      max_seq_len=c["max_position_embeddings"], tie_embeddings=c.get("tie_word_embeddings", False))
    model = GPT(cfg)
    state = {from_hf_name(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True)
    return model


def main(argv: list[str] | None = None) -> None:
    """``python -m common.hf export CHECKPOINT_STEP_DIR OUT_DIR``: a DCP checkpoint -> HF folder."""
    import argparse

    from common import checkpoint
    from common.data import Tokenizer
    from common.distributed import DistInfo
    from common.trainer import padded_vocab

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("command", choices=["export"])
    p.add_argument("checkpoint", help="a step folder, e.g. runs/ddp-tiny/checkpoints/step_000200")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    run_dir = Path(a.checkpoint).resolve().parents[1]
    from dataclasses import fields

    from common.config import TrainConfig, make_config, read_toml

    known = {f.name for f in fields(TrainConfig)}  # a script's own fields (pp.py's schedule ...) do not matter here
    cfg = make_config(**{k: v for k, v in read_toml(run_dir / "config.toml").items() if k in known})
    from common.data import prepare

    data = prepare(cfg.data, cfg.data_dir, cfg.tokenizer, cfg.vocab_size, progress=False)
    model = GPT(cfg.model_config(vocab_size=padded_vocab(data.vocab_size)))
    checkpoint.load(a.checkpoint, model, None, DistInfo())
    tok = Tokenizer(data.dir / "tokenizer.json")
    print(export(model, data.dir / "tokenizer.json", a.out_dir, tok.eot_id))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # bad input: one line, exit code 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
