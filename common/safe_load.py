"""Unpickling checkpoints without running code from them.

Checkpoints are shared between users on clusters, and a pickle can call any function it names. So
every pickle we read names only what it really needs, as exact ``(module, name)`` pairs — no module
prefixes (``torch.distributed.checkpoint.<anything>`` would admit a dotted name that walks to
``os.system``) and no ``torch.storage._load_from_bytes`` (it unpickles its payload with
``weights_only=False``):

- DCP's ``.metadata`` file: ``METADATA_GLOBALS``, found by saving this project's checkpoints (one
  process, FSDP, TP; torch 2.13) and listing what their metadata unpickles;
- tensors and small values inside DCP shards and ``rng_rank<R>.pt``: ``torch.load(weights_only=True)``;
- foreign folders (DeepSpeed's ``*.pt``, which DeepSpeed itself loads with ``weights_only=False``):
  ``check_pickles`` loads every pickle with ``weights_only=True`` plus ``DEEPSPEED_GLOBALS`` (found in
  ZeRO-1/2/3, CPU offload and bf16 checkpoints of ``zero.py``), so DeepSpeed's own load afterwards can
  only meet those names. A file swapped between the check and the load is not covered.

Anything else is refused with a one-line ``UserError`` naming the file, before any of it runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner itself uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from common.errors import UserError

_DCP = "torch.distributed.checkpoint"
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")
METADATA_GLOBALS = frozenset({
    (f"{_DCP}.metadata", "Metadata"), (f"{_DCP}.metadata", "StorageMeta"), (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"), (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"), (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"), (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id (Python 3.13 moved it)
    *(("torch", name) for name in _DTYPES),
})

DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # fp16 with dynamic loss scaling
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


class _MetadataUnpickler(pickle._Unpickler):  # the Python implementation: its BUILD can be checked too
    """Resolves exactly the names in ``METADATA_GLOBALS`` (no dotted names, no prefixes), and sets state
    (BUILD) only on instances of those classes, never on a class itself (that would patch it in-process)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which checkpoint metadata never needs")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to a persistent object, which checkpoint metadata never needs")

    def load_build(self):
        inst = self.stack[-2]  # the stack ends with (instance, state)
        if (type(inst).__module__, type(inst).__qualname__) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it sets the state of a {type(inst).__name__}, which metadata never does")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def _one_line(e: BaseException) -> str:
    """The informative line of an error (torch's weights_only errors put it in the middle)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = next((x for x in lines if "unsupported" in x.lower() or "GLOBAL" in x), lines[0] if lines else "")
    return f"{type(e).__name__}: {line}"[:300]


def load_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with the allowlist; ``UserError`` naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"checkpoint metadata {path} is missing: not a complete checkpoint folder") from None
    except Exception as e:  # noqa: BLE001 - any failure of a foreign pickle is the user's file, not our bug
        raise UserError(f"refusing to load checkpoint metadata {path}: {_one_line(e)} "
                        "(a damaged or tampered file; use another checkpoint)") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"refusing to load checkpoint metadata {path}: it holds a {type(metadata).__name__}, "
                        "not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with the allowlisted metadata unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _pickle_kind(path: Path) -> str | None:
    """"zip" (torch.save's format), "pickle" (a bare pickle, protocol >= 2) or None (not a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return "zip" if head == b"PK\x03\x04" else "pickle" if head[:1] == b"\x80" else None


def check_pickles(folder: str | Path, extra_globals: tuple = DEEPSPEED_GLOBALS) -> list[Path]:
    """Check every pickle-based file under ``folder`` before a library unpickles it unrestricted.

    Each file is loaded with ``torch.load(weights_only=True)`` (memory-mapped) allowing also the exact
    ``extra_globals`` (DeepSpeed's classes by default); DCP ``.metadata`` files go through the metadata
    allowlist. Returns the files checked; raises ``UserError`` naming the first file that needs more.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    allowed = []
    for module, name in extra_globals:
        try:
            allowed.append((getattr(__import__(module, fromlist=[name]), name), f"{module}.{name}"))
        except (ImportError, AttributeError):
            pass  # a library that is not installed cannot be loaded by it either
    checked = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == ".metadata":
            load_metadata(path)
        elif kind := _pickle_kind(path):
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
            except Exception as e:  # noqa: BLE001
                raise UserError(f"refusing to load {path}: {_one_line(e)} (only tensors, plain values and "
                                f"{len(allowed)} known DeepSpeed classes are accepted)") from None
        else:
            continue
        checked.append(path)
    return checked
