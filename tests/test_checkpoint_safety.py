"""Checkpoints that cannot run code, cannot be half-written, and are not loaded into the wrong model.

Each fault case asserts the exception (a one-line ``UserError`` naming the file or folder), that no
side effect happened (a gadget would create a marker file), and that the earlier good checkpoint is
still found by ``latest`` and loads.
"""

import errno
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import checkpoint, manifest, safe_load
from common.distributed import DistInfo, log
from common.errors import UserError
from common.model import GPT, ModelConfig

CFG = dict(dim=32, n_heads=4, vocab_size=128, max_seq_len=32)


def make_model(n_layers=2, seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layers=n_layers, **CFG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 128, (2, 16))).sum().backward()
    optimizer.step()
    return model, optimizer


def save(out, step, model, optimizer, **kw):
    state = {"losses": [1.0], "model_config": {"n_layers": model.cfg.n_layers, "dim": model.cfg.dim}}
    return checkpoint.save(out, step, model, optimizer, DistInfo(), state, **kw)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.fixture
def warnings_seen():
    """Messages of ``log.warning`` (the project logger does not propagate to pytest's caplog)."""
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    yield seen
    log.removeHandler(handler)


@pytest.fixture
def two_steps(tmp_path):
    """A run folder with intact checkpoints at steps 1 and 2 (different weights); returns (out, models)."""
    out = tmp_path / "run"
    m1, o1 = make_model(seed=1)
    save(out, 1, m1, o1)
    m2, o2 = make_model(seed=2)
    save(out, 2, m2, o2)
    return out, {1: m1, 2: m2}


def reseal(folder):
    """Rewrite the manifest to match tampered files: an attacker can do that too, a manifest is no signature."""
    files = manifest.describe_own_files(folder, DistInfo())
    manifest.write_manifest(folder, manifest.step_of(folder), files, DistInfo(), None)


# ----------------------------------------------------------------------------- crafted pickles
class Reduce:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def dotted_name_gadget(command: str) -> bytes:
    """STACK_GLOBAL('torch.distributed.checkpoint.filesystem', 'os.system')(command): a prefix allowlist admits it."""
    def unicode(s):
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return (b"\x80\x04" + unicode("torch.distributed.checkpoint.filesystem") + unicode("os.system") + b"\x93"
            + unicode(command) + b"\x85R.")


def load_from_bytes_gadget(command: str) -> bytes:
    """torch.storage._load_from_bytes(payload) unpickles payload with weights_only=False."""
    buf = io.BytesIO()
    torch.save(Reduce(command), buf)

    class Call:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (buf.getvalue(),)

    return pickle.dumps(Call(), protocol=2)


GADGETS = {
    "dotted_name": dotted_name_gadget,
    "load_from_bytes": load_from_bytes_gadget,
    "reduce": lambda command: pickle.dumps(Reduce(command)),
    "not_allowlisted": lambda command: pickle.dumps(getattr),  # builtins.getattr: a gadget-chain primitive
}


@pytest.mark.parametrize("kind", ["dotted_name", "load_from_bytes", "reduce"])
def test_gadgets_are_real(tmp_path, kind):
    """Unrestricted unpickling of each crafted pickle runs the command: the refusals below mean something."""
    marker = tmp_path / "PWNED"
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code], input=GADGETS[kind](f"touch {marker}"), capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("kind", list(GADGETS))
def test_crafted_metadata_is_refused_without_side_effect(two_steps, tmp_path, kind):
    out, models = two_steps
    marker = tmp_path / "PWNED"
    step2 = out / "checkpoints" / "step_000002"
    (step2 / ".metadata").write_bytes(GADGETS[kind](f"touch {marker}"))
    reseal(step2)
    assert checkpoint.latest(out) == step2  # consistent manifest: only the unpickler stands in the way
    target, optimizer = make_model(seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as e:
        checkpoint.load(step2, target, optimizer, DistInfo())
    msg = one_line(e)
    assert str(step2 / ".metadata") in msg and msg.startswith("refusing to load checkpoint metadata")
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded
    checkpoint.load(out / "checkpoints" / "step_000001", target, optimizer, DistInfo())  # earlier state intact
    assert same_weights(target, models[1])


def test_metadata_allowlist_is_exact():
    names = safe_load.METADATA_GLOBALS
    assert ("torch.storage", "_load_from_bytes") not in names
    assert all("." not in name for _, name in names)  # no dotted names
    with pytest.raises(pickle.UnpicklingError):
        safe_load._MetadataUnpickler(io.BytesIO(pickle.dumps(torch.storage._load_from_bytes))).load()
    # BUILD on an allowlisted class itself would patch it in this process (here: Metadata.injected = 1)
    patch_class = b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\nN}X\x08\x00\x00\x00injectedK\x01s\x86b."
    with pytest.raises(pickle.UnpicklingError, match="sets the state of a type"):
        safe_load._MetadataUnpickler(io.BytesIO(patch_class)).load()
    from torch.distributed.checkpoint.metadata import Metadata

    assert not hasattr(Metadata, "injected")


def test_check_pickles_refuses_a_crafted_pt_and_accepts_deepspeed_classes(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "ds" / "step_000002"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19"}, folder / "mp_rank_00_model_states.pt")
    (folder / "zero_to_fp32.py").write_text("print('not a pickle')\n")
    extra = {}
    try:  # the classes DeepSpeed's own optimizer files need (found in real ZeRO-1/2/3 checkpoints)
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        extra = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2)}
    except ImportError:
        pass
    torch.save({"optimizer_state_dict": {"state": {0: torch.zeros(3)}}, **extra},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert len(checkpoint.check_pickles(folder)) == 2
    evil = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Reduce(f"touch {marker}")}, evil)
    with pytest.raises(UserError) as e:
        checkpoint.check_pickles(folder)
    msg = one_line(e)
    assert str(evil) in msg and "system" in msg
    assert not marker.exists()
    (folder / "evil.pkl").write_bytes(load_from_bytes_gadget(f"touch {marker}"))  # a bare pickle is checked too
    evil.unlink()
    with pytest.raises(UserError, match="evil.pkl"):
        checkpoint.check_pickles(folder)
    assert not marker.exists()


# ----------------------------------------------------------------------------- manifest and latest
def test_seal_gives_a_foreign_folder_a_manifest(tmp_path, warnings_seen):
    """DeepSpeed writes its own step folders: seal() adds the manifest, so latest() can trust and fall back."""
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        folder = root / f"step_00000{step}"
        folder.mkdir(parents=True)
        torch.save({"module": {"w": torch.full((4,), float(step))}}, folder / "mp_rank_00_model_states.pt")
        (root / "latest").write_text(folder.name)  # DeepSpeed moves its pointer itself, before the manifest
        assert checkpoint.latest(tmp_path) == (None if step == 1 else root / "step_000001")
        checkpoint.seal(folder, step, DistInfo(), {"n_layers": 2}, keep=1)
    assert checkpoint.latest(tmp_path) == root / "step_000002" and not (root / "step_000001").exists()
    assert checkpoint.check_pickles(root / "step_000002") == [root / "step_000002" / "mp_rank_00_model_states.pt"]
    assert json.loads((root / "step_000002" / "manifest.json").read_text())["model_config"] == {"n_layers": 2}


def test_manifest_records_every_file_and_is_written_last(tmp_path):
    model, optimizer = make_model()
    path = save(tmp_path, 3, model, optimizer)
    m = json.loads((path / "manifest.json").read_text())
    names = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == names >= {".metadata", "__0_0.distcp", "rng_rank0.pt", "trainer_state.json"}
    assert m["step"] == 3 and m["world_size"] == 1
    assert m["model_config"] == {"n_layers": 2, "dim": 32}
    for name, rec in m["files"].items():
        assert rec["size"] == (path / name).stat().st_size and len(rec["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003"]  # no temp


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file", "no_manifest", "bad_manifest"])
def test_latest_falls_back_to_newest_intact(two_steps, warnings_seen, damage):
    out, models = two_steps
    step2 = out / "checkpoints" / "step_000002"
    data = step2 / "__0_0.distcp"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 10])
    elif damage == "flip_byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete_file":
        data.unlink()
    elif damage == "no_manifest":
        (step2 / "manifest.json").unlink()
    else:
        (step2 / "manifest.json").write_text("{not json")
    assert checkpoint.latest(out) == out / "checkpoints" / "step_000001"
    assert len(warnings_seen) == 1 and "newest intact checkpoint" in warnings_seen[0]
    assert str(step2) in warnings_seen[0]
    target, optimizer = make_model(seed=9)
    checkpoint.load(checkpoint.latest(out), target, optimizer, DistInfo())
    assert same_weights(target, models[1])
    if damage in ("truncate", "flip_byte", "delete_file"):  # loading the damaged folder directly: names the file
        with pytest.raises(UserError) as e:
            checkpoint.load(step2, target, optimizer, DistInfo())
        assert str(data) in one_line(e)


def test_latest_with_a_bad_pointer_or_nothing_intact(two_steps, warnings_seen):
    out, _ = two_steps
    ckpts = out / "checkpoints"
    (ckpts / "latest").write_text("../../etc")
    assert checkpoint.latest(out) == ckpts / "step_000002"
    assert "not a step folder name" in warnings_seen[-1]
    (ckpts / "latest").write_text("step_000001")  # a deliberate rewind is honoured
    assert checkpoint.latest(out) == ckpts / "step_000001"
    for step in (1, 2):
        (ckpts / f"step_00000{step}" / "manifest.json").unlink()
    assert checkpoint.latest(out) is None
    assert warnings_seen[-1].startswith(f"no intact checkpoint in {ckpts} (2 step folder(s))")
    assert checkpoint.latest(out / "empty") is None and len(warnings_seen) == 2  # nothing there: no warning


def test_load_refuses_a_model_that_does_not_fit(two_steps):
    out, models = two_steps
    step2 = out / "checkpoints" / "step_000002"
    for n_layers, says in ((1, "9 tensor(s) in it are not in the model"), (3, "9 tensor(s) of the model are not")):
        model, optimizer = make_model(n_layers=n_layers, seed=9)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UserError) as e:
            checkpoint.load(step2, model, optimizer, DistInfo())
        msg = one_line(e)
        assert str(step2) in msg and says in msg and f"saved with n_layers=2 (model: {n_layers})" in msg
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wide = GPT(ModelConfig(n_layers=2, **{**CFG, "vocab_size": 256}))
    with pytest.raises(UserError, match=r"tok_embeddings.weight is \[128, 32\] in it but \[256, 32\]"):
        checkpoint.load(step2, wide, None, DistInfo())
    stage = GPT(ModelConfig(n_layers=2, **CFG))  # a pipeline stage holds a part of the model: that loads
    del stage.layers["1"]
    checkpoint.load(step2, stage, None, DistInfo())
    assert torch.equal(stage.layers["0"].attention.wq.weight, models[2].layers["0"].attention.wq.weight)


# ----------------------------------------------------------------------------- keep, re-save, disk full
def test_keep_prunes_only_older_intact_folders(tmp_path):
    model, optimizer = make_model()
    save(tmp_path, 1, model, optimizer)
    save(tmp_path, 2, model, optimizer)
    (tmp_path / "checkpoints" / "step_000002" / "manifest.json").unlink()  # damaged: kept for inspection
    for step in (3, 4, 5):
        save(tmp_path, step, model, optimizer, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000004", "step_000005"]
    save(tmp_path, 3, model, optimizer, keep=1)  # an earlier step again: newer folders are not "older"
    assert checkpoint.latest(tmp_path).name == "step_000003"
    assert (tmp_path / "checkpoints" / "step_000005").is_dir()


def test_saving_a_step_again_replaces_the_folder_whole(tmp_path):
    m1, o1 = make_model(seed=1)
    path = save(tmp_path, 5, m1, o1)
    (path / "__9_0.distcp").write_bytes(b"left from another layout")
    m2, o2 = make_model(seed=2)
    assert save(tmp_path, 5, m2, o2) == path
    assert not (path / "__9_0.distcp").exists()
    target, optimizer = make_model(seed=9)
    checkpoint.load(checkpoint.latest(tmp_path), target, optimizer, DistInfo())
    assert same_weights(target, m2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000005"]


def _assert_previous_intact(out, good):
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]  # no partial folder
    assert checkpoint.latest(out) == ckpts / "step_000001"
    target, optimizer = make_model(seed=9)
    checkpoint.load(ckpts / "step_000001", target, optimizer, DistInfo())
    assert same_weights(target, good)


@pytest.mark.parametrize("where", ["shards", "manifest"])
def test_disk_full_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch, where):
    good, optimizer = make_model(seed=1)
    save(tmp_path, 1, good, optimizer)
    real_save = checkpoint.dcp.save

    def full_disk(*args, **kwargs):
        if where == "shards":
            real_save(*args, **kwargs)  # some files are on disk, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(kwargs["checkpoint_id"]) + "/__0_0.distcp")
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "shards":
        monkeypatch.setattr(checkpoint.dcp, "save", full_disk)
    else:
        monkeypatch.setattr(checkpoint, "write_manifest", lambda *a: full_disk())
    model, optimizer = make_model(seed=2)
    with pytest.raises(UserError) as e:
        save(tmp_path, 2, model, optimizer)
    msg = one_line(e)
    assert msg.startswith(f"no space left on {tmp_path / 'checkpoints'} while writing checkpoint step 2;")
    assert "latest is still step_000001" in msg
    monkeypatch.undo()
    _assert_previous_intact(tmp_path, good)


def test_other_write_errors_are_one_line(tmp_path, monkeypatch):
    good, optimizer = make_model(seed=1)
    save(tmp_path, 1, good, optimizer)
    monkeypatch.setattr(checkpoint, "write_manifest", lambda *a: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", "manifest.json")))
    with pytest.raises(UserError) as e:
        save(tmp_path, 2, *make_model(seed=2))
    assert one_line(e).startswith("could not write checkpoint step 2 in ") and "Permission denied" in str(e.value)
    monkeypatch.undo()
    _assert_previous_intact(tmp_path, good)


def test_disk_full_on_a_real_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root (the simulated ENOSPC test covers the logic)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        good, optimizer = make_model(seed=1)
        save(mnt, 1, good, optimizer)  # ~0.9 MB: fits once
        with pytest.raises(UserError) as e:
            save(mnt, 2, *make_model(seed=2))
        assert one_line(e).startswith(f"no space left on {mnt / 'checkpoints'} while writing checkpoint step 2;")
        _assert_previous_intact(mnt, good)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ----------------------------------------------------------------------------- two ranks
def _two_rank_worker(rank: int, out: str, port: int, fail_rank: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)
    model, optimizer = make_model(seed=1)
    checkpoint.save(out, 1, model, optimizer, info, {"losses": []})
    if rank == fail_rank:  # this rank's disk fills up after DCP's collective write: only this rank knows
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        checkpoint._rng_state = full
    try:
        checkpoint.save(out, 2, model, optimizer, info, {"losses": []})
        result = "saved"
    except UserError as e:
        result = str(e)
    (Path(out) / f"result{rank}").write_text(result)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_write_one_manifest_and_fail_together(tmp_path):
    """Each rank hashes its own files; one rank's full disk fails the save on both, with no partial folder."""
    import socket as s

    import torch.multiprocessing as mp

    with s.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(str(tmp_path), port, 1), nprocs=2, join=True)
    m = json.loads((tmp_path / "checkpoints" / "step_000001" / "manifest.json").read_text())
    assert m["world_size"] == 2 and {"rng_rank0.pt", "rng_rank1.pt", "__0_0.distcp", "__1_0.distcp"} <= set(m["files"])
    r0, r1 = ((tmp_path / f"result{r}").read_text() for r in (0, 1))
    assert r1.startswith(f"no space left on {tmp_path / 'checkpoints'} while writing checkpoint step 2;")
    assert r0.startswith("another rank failed while writing checkpoint step 2") and "latest is still step_000001" in r0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert checkpoint.latest(tmp_path).name == "step_000001"


def test_hf_export_of_a_crafted_checkpoint_is_one_line_exit_2(tmp_path, data_dir):
    """``python -m common.hf export`` (the other way checkpoints get loaded) refuses it the same way."""
    from common.config import make_config
    from common.trainer import padded_vocab

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'preset = "tiny"\ndata_dir = "{data_dir}"\n')
    cfg = make_config(preset="tiny", data_dir=str(data_dir))
    model = GPT(cfg.model_config(vocab_size=padded_vocab(4096)))
    step = checkpoint.save(run, 1, model, torch.optim.AdamW(model.parameters()), DistInfo(), {})
    marker = tmp_path / "PWNED"
    (step / ".metadata").write_bytes(pickle.dumps(Reduce(f"touch {marker}")))
    reseal(step)
    proc = subprocess.run([sys.executable, "-m", "common.hf", "export", str(step), str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: refusing to load checkpoint metadata {step / '.metadata'}")
    assert proc.stderr.count("\n") == 1 and not marker.exists() and not (tmp_path / "hf").exists()
