"""Data you can trust: the shard cache follows the sources' contents, damaged shards and non-text input
are refused with one line naming the file, and builders that died leave nothing behind for long.

Each fault case asserts the exception, its one-line message, and that the good state (the source, a
shard folder built before, the fix the message names) still works.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from common import data
from common.data import prepare
from common.errors import UserError


def text(n=2000, word="line"):
    return "".join(f"{word} {i} of a small corpus\n" for i in range(n))


def one_line(e) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def shard_dirs(data_dir):
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir())


def test_a_changed_source_rebuilds(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(text(word="line"))
    a = prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    first = np.array(a.train)
    assert prepare(str(src), tmp_path / "data", "bpe", 300, progress=False).dir == a.dir  # unchanged: cached
    src.write_text(text(word="word"))  # same size, other content
    b = prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    assert b.dir != a.dir and b.tokenizer.decode(b.train[:3].tolist()).startswith("word")
    assert len(shard_dirs(tmp_path / "data")) == 2
    assert np.array_equal(np.array(a.train), first)  # the older build is untouched (another run may use it)
    hashes = json.loads((tmp_path / "data" / ".source-hashes.json").read_text())
    assert len(hashes) == 1 and next(iter(hashes)).startswith(f"{src.resolve()}|")  # the old version is forgotten
    c = prepare(str(src), tmp_path / "data", "bpe", 400, progress=False)  # tokenizer settings are in the key
    assert c.dir not in (a.dir, b.dir)


def test_an_empty_source_is_refused_and_not_cached(tmp_path):
    src = tmp_path / "empty.txt"
    src.write_text("")
    with pytest.raises(UserError) as e:
        prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    assert one_line(e).startswith(f"{src} is empty")
    assert shard_dirs(tmp_path / "data") == []
    src.write_text("   \n\n")  # whitespace only: no text either
    with pytest.raises(UserError, match="no text in"):
        prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    assert shard_dirs(tmp_path / "data") == []
    src.write_text(text())  # filled in: builds now
    d = prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    assert len(d.train) > 1000


@pytest.mark.parametrize("damage", ["truncate", "random_bytes", "missing", "meta"])
def test_damaged_shards_are_refused_with_the_fix(tmp_path, damage):
    src = tmp_path / "t.txt"
    src.write_text(text())
    d = prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    good = np.array(d.train)
    train = d.dir / "train.bin"
    del d
    if damage == "truncate":
        train.write_bytes(train.read_bytes()[: train.stat().st_size // 10])
        says = f"data shard {train} holds"
    elif damage == "random_bytes":
        train.write_bytes(np.random.default_rng(0).bytes(train.stat().st_size))
        says = f"data shard {train} does not match its sha256"
    elif damage == "missing":
        train.unlink()
        says = f"data shard {train} is missing"
    else:
        (train.parent / "meta.json").write_text("{")
        says = f"{train.parent / 'meta.json'} is unreadable"
    with pytest.raises(UserError) as e:
        prepare(str(src), tmp_path / "data", "bpe", 300, progress=False)
    msg = one_line(e)
    assert msg.startswith(says) and msg.endswith(f"delete {train.parent} to rebuild it")
    import shutil

    shutil.rmtree(train.parent)  # the fix the message names gives back the same tokens
    assert np.array_equal(np.array(prepare(str(src), tmp_path / "data", "bpe", 300, progress=False).train), good)


@pytest.mark.parametrize("content, says", [
    (b"some text\x00\x01\x02 binary" * 200, "is not a text file (it contains NUL bytes)"),
    ("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 300, "is not UTF-8 text"),
])
def test_non_text_input_is_refused_with_the_file_name(tmp_path, content, says):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(text())
    (corpus / "b.txt").write_bytes(content)
    with pytest.raises(UserError) as e:
        prepare(str(corpus), tmp_path / "data", "bpe", 300, progress=False)
    assert one_line(e).startswith(f"{corpus / 'b.txt'} {says}")
    assert shard_dirs(tmp_path / "data") == []  # nothing cached, no temporary folder left
    (corpus / "b.txt").write_bytes(text().encode() + b"\xff")  # one stray byte in 50 kB: accepted, replaced
    d = prepare(str(corpus), tmp_path / "data", "bpe", 300, progress=False)
    assert "\ufffd" in d.tokenizer.decode(d.val.tolist())  # the end of each file is validation


def test_stale_build_folders_are_removed_live_ones_kept(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {
            "dead": data_dir / f".x-bpe300-aaaa.tmp-{host}-{dead_pid}",
            "alive": data_dir / f".x-bpe300-bbbb.tmp-{host}-{alive.pid}",
            "other_host_young": data_dir / f".x-bpe300-cccc.tmp-elsewhere-{dead_pid}",
            "other_host_old": data_dir / f".x-bpe300-dddd.tmp-elsewhere-{dead_pid}",
            "dead_but_locked": data_dir / f".x-bpe300-eeee.tmp-{host}-{dead_pid}",
        }
        for f in folders.values():
            f.mkdir()
            (f / "train.bin").write_bytes(b"\0" * 10)
        old = time.time() - data.STALE_BUILD_S - 60
        os.utime(folders["other_host_old"], (old, old))
        import fcntl

        with open(data_dir / "x-bpe300-eeee.lock", "w") as lock:  # a builder of that folder is at work
            fcntl.flock(lock, fcntl.LOCK_EX)
            src = tmp_path / "t.txt"
            src.write_text(text())
            prepare(str(src), data_dir, "bpe", 300, progress=False)
        left = {k for k, f in folders.items() if f.exists()}
        assert left == {"alive", "other_host_young", "dead_but_locked"}
    finally:
        alive.kill()
        alive.wait()


def test_embedded_data_opens_fast(data_dir):
    prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    t = time.perf_counter()
    d = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)  # fingerprint + full shard check
    assert time.perf_counter() - t < 0.5
    meta = json.loads((d.dir / "meta.json").read_text())
    assert set(meta["sha256"]) == {"train", "val"} and meta["tokens"]["train"] == len(d.train)


def test_prepare_command_line_error_is_one_line_exit_2(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 50)
    proc = subprocess.run([sys.executable, "-m", "common.data", "--data", str(binary), "--data-dir",
                           str(tmp_path / "data"), "--vocab-size", "300"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    last = proc.stderr.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after tqdm's progress line
    assert last == f"error: {binary} is not a text file (it contains NUL bytes): --data takes UTF-8 .txt/.md files"
    assert "Traceback" not in proc.stderr
    assert shard_dirs(tmp_path / "data") == []
