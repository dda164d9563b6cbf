"""Write what torchtune needs next to an exported model: its tokenizer as tiktoken + special tokens, and the data.

torchtune's Llama 3 tokenizer reads a *tiktoken* file (one ``base64(token bytes) rank`` line per
token) and puts its chat special tokens (``<|start_header_id|>`` ...) at ids 128000+ unless it gets a
special-tokens JSON. Our model has 4096 embedding rows, so this script maps them into the vocabulary:
the end-of-text token (which the model saw between documents in pretraining) serves as begin/end of
text, end of turn and padding; the two header markers take the ids of the two *last* BPE merges, which
are taken out of the tiktoken ranks (rare tokens; the text they spelled is then two tokens).
A hub Llama 3 model needs none of this: use its ``original/tokenizer.model`` as is.

The chat data (``sft_data``, OpenAI "messages" format) is written as JSON for torchtune's ``chat_dataset``.
Run in the project's environment (.venv), then torchtune in .venv-torchtune:

    python 04_Finetuning/make_base_model.py --out-dir runs/base-tiny
    python 04_Finetuning/torchtune/prepare.py --model runs/base-tiny/hf --out-dir runs/torchtune-data
    .venv-torchtune/bin/tune run full_finetune_single_device --config 04_Finetuning/torchtune/full_single_device.yaml
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>")
EOT_ALIASES = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>",
               "<|step_id|>", "<|python_tag|>", "<|image|>", "<|video|>")


def byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable characters stand for themselves, the other
    bytes were shifted to code points 256+ in order (so every byte has a visible character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def write_tokenizer(hf_dir: Path, out_dir: Path) -> dict[str, int]:
    """tokenizer.model (tiktoken ranks) + special_tokens.json (HF 'added_tokens' form); returns the specials."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    if tj["model"]["type"] != "BPE" or tj.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        raise SystemExit("expected a byte-level BPE tokenizer.json (as common.hf exports)")
    rows = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    eot = added.get("<|endoftext|>")
    if eot is None:
        raise SystemExit("no <|endoftext|> token in tokenizer.json")
    vocab = {tok: i for tok, i in tj["model"]["vocab"].items() if tok not in added}
    top = sorted(vocab.values())[-len(HEADER_TOKENS):]
    if max(vocab.values()) + len(HEADER_TOKENS) < rows:  # spare embedding rows: use them, keep every merge
        top = [max(vocab.values()) + 1 + i for i in range(len(HEADER_TOKENS))]
    specials = {**{t: eot for t in EOT_ALIASES}, **dict(zip(HEADER_TOKENS, top))}
    dec = byte_decoder()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "tokenizer.model", "w") as f:
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i not in top:
                f.write(base64.b64encode(bytes(dec[c] for c in tok)).decode() + f" {i}\n")
    added_tokens = [{"id": i, "content": t, "special": True} for t, i in specials.items()]
    (out_dir / "special_tokens.json").write_text(json.dumps({"added_tokens": added_tokens}, indent=1))
    return specials


def write_data(out_dir: Path, train_examples: int, val_examples: int, tasks: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import sft_data

    data = sft_data.shakespeare_sft(tuple(tasks.split(",")))
    for split, n in (("train", train_examples), ("val", val_examples)):
        rows = [{"messages": ex.messages} for ex in data[split][: n or None]]
        (out_dir / f"{split}.json").write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/base-tiny/hf", help="HF folder exported by common.hf")
    p.add_argument("--out-dir", default="runs/torchtune-data")
    p.add_argument("--train-examples", type=int, default=0, help="first N training examples (0 = all)")
    p.add_argument("--val-examples", type=int, default=256)
    p.add_argument("--tasks", default="speaker,next")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    specials = write_tokenizer(Path(a.model), out)
    write_data(out, a.train_examples, a.val_examples, a.tasks)
    print(f"wrote {out}/tokenizer.model, special_tokens.json ({len(specials)} specials), train.json, val.json")
    return out


if __name__ == "__main__":
    main()
