"""Captures handed from an engine's worker process to our producer process through tmpfs.

vLLM's KV connector and SGLang's forward hooks run inside the engine's own worker processes; the
producer (which owns the key-queue claims, the byte budget and the Mooncake client) runs in ours.
A *bundle* carries one capture across: ``{name}.bin`` holds the raw tensor bytes back to back and
``{name}.json`` their names, dtypes, shapes and offsets. The JSON is renamed into place last, so a
bundle exists only once it is complete. On tmpfs (``/dev/shm``) nothing touches disk and the cost is
one memcpy on each side, small next to the prefill that produced the tensors. No pickle: the
reader trusts nothing but the JSON header and checks sizes against it.

Why not put into Mooncake from inside the engine (zero extra copies, TorchSpec's route)? The
producer would then need its claim/budget/publish logic split across two processes and a second
code path; keeping the engine a plain ``HiddenStateEngine`` keeps one producer loop for HF, vLLM
and SGLang.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from spec_core.errors import ServiceError
from spec_core.utils.files import atomic_write_json
from spec_core.utils.procs import pid_alive

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_PREFIX = "specflow-handoff-"
_ALIGN = 64


def default_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def make_handoff_dir(root: str | Path | None = None) -> Path:
    """A fresh directory owned by this process; directories left by dead producers are removed."""
    root = Path(root) if root else default_root()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_PREFIX}*"):
        pid = stale.name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))


def write_bundle(directory: str | Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (moved to CPU) as one bundle; returns the JSON path that commits it."""
    directory = Path(directory)
    header: dict[str, dict] = {}
    offset = 0
    data_path = directory / f"{name}.bin"
    with open(data_path, "wb") as fh:
        for key, tensor in tensors.items():
            cpu = tensor.detach().to("cpu").contiguous()
            dtype = str(cpu.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise ValueError(f"handoff cannot carry dtype {cpu.dtype} ({key})")
            pad = -offset % _ALIGN  # aligned offsets let the reader view bytes as any dtype
            fh.write(b"\0" * pad)
            offset += pad
            raw = cpu.reshape(-1).view(torch.uint8).numpy()
            fh.write(raw.data)
            header[key] = {"dtype": dtype, "shape": list(cpu.shape), "offset": offset}
            offset += raw.nbytes
    return atomic_write_json(directory / f"{name}.json", {"nbytes": offset, "tensors": header})


def bundle_names(directory: str | Path) -> list[str]:
    """Committed bundles in ``directory``, sorted by name."""
    return sorted(p.stem for p in Path(directory).glob("*.json"))


def read_bundle(directory: str | Path, name: str, remove: bool = True) -> dict[str, torch.Tensor]:
    """Load a committed bundle into private memory (and delete its files unless ``remove=False``)."""
    directory = Path(directory)
    meta_path, data_path = directory / f"{name}.json", directory / f"{name}.bin"
    try:
        header = json.loads(meta_path.read_text())
        nbytes = int(header["nbytes"])
        size = data_path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServiceError(f"engine capture {meta_path} is missing or unreadable: {exc}") from None
    if size != nbytes:
        raise ServiceError(f"engine capture {data_path} holds {size} bytes, header says {nbytes}")
    raw = (
        torch.from_file(str(data_path), shared=False, size=nbytes, dtype=torch.uint8)
        if nbytes
        else torch.empty(0, dtype=torch.uint8)
    )
    out: dict[str, torch.Tensor] = {}
    for key, meta in header["tensors"].items():
        dtype = DTYPES[meta["dtype"]]
        shape = [int(d) for d in meta["shape"]]
        count = 1
        for d in shape:
            count *= d
        start = int(meta["offset"])
        length = count * torch.empty(0, dtype=dtype).element_size()
        if start < 0 or start + length > nbytes:
            raise ServiceError(f"engine capture {meta_path}: tensor {key} lies outside the data")
        out[key] = raw[start : start + length].view(dtype).reshape(shape)
    if remove:
        meta_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
    return out
