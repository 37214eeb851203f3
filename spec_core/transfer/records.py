"""The one record that travels through the key queue: a ``SampleRef``.

Tensors go to Mooncake under ``{run}/{epoch}/{sample_id}/{name}``; only this small JSON record goes
through the queue. No pickle: ``from_json`` validates every field, so a corrupt or foreign message
fails with a clear error instead of executing anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from spec_core.contracts.samples import TENSOR_NAMES
from spec_core.errors import ServiceError

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1}


def tensor_key(run: str, epoch: int, sample_id: str, name: str, attempt: int = 0) -> str:
    """Attempt > 0 (a sample re-produced after its producer died) gets its own keys, so a late
    writer of an earlier attempt can never overwrite or delete the data a trainer is reading."""
    suffix = f".{attempt}" if attempt else ""
    return f"{run}/{epoch}/{sample_id}/{name}{suffix}"


@dataclass(frozen=True)
class TensorMeta:
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SampleRef:
    run: str
    epoch: int
    sample_id: str
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    producer: str = ""
    attempt: int = 0  # production attempt (see tensor_key); 0 unless a claim was re-claimed
    pos: int = 0  # place in the epoch's shuffled order: the key queue deals it to rank pos % R

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.tensors.values()]

    def to_json(self) -> str:
        return json.dumps(
            {
                "run": self.run,
                "epoch": self.epoch,
                "sample_id": self.sample_id,
                "producer": self.producer,
                "attempt": self.attempt,
                "pos": self.pos,
                "nbytes": self.nbytes,
                "tensors": {
                    name: {"key": t.key, "shape": list(t.shape), "dtype": t.dtype}
                    for name, t in self.tensors.items()
                },
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> SampleRef:
        try:
            data = json.loads(raw)
            tensors = {}
            for name, meta in data["tensors"].items():
                if name not in TENSOR_NAMES:
                    raise ValueError(f"unknown tensor name {name!r}")
                if meta["dtype"] not in DTYPE_SIZES:
                    raise ValueError(f"unknown dtype {meta['dtype']!r}")
                shape = tuple(int(d) for d in meta["shape"])
                tensors[name] = TensorMeta(key=str(meta["key"]), shape=shape, dtype=meta["dtype"])
            ref = cls(
                run=str(data["run"]),
                epoch=int(data["epoch"]),
                sample_id=str(data["sample_id"]),
                tensors=tensors,
                producer=str(data.get("producer", "")),
                attempt=int(data.get("attempt", 0)),
                pos=int(data.get("pos", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ServiceError(f"malformed SampleRef on the key queue: {exc}") from None
        if "nbytes" in data and int(data["nbytes"]) != ref.nbytes:
            raise ServiceError(
                f"malformed SampleRef for {ref.sample_id}: nbytes {data['nbytes']} != {ref.nbytes}"
            )
        return ref
