"""``InProcessSource``: captures computed next to the trainer by an HF target on this rank.

Used for tests, for eval, and for single-machine runs without the streaming services. Data order is
a pure function of (seed, epoch, cursor): each epoch is a seeded permutation of the tokenized
split; global step s of an epoch takes ``order[s*G : (s+1)*G]`` (G = micro x accum x world) and
rank r takes the r-th slice of that. So the state is two integers, resume is exact, and every rank
knows what every other rank trains. An epoch's last, short step is filled with padding samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from spec_core.contracts.samples import TokenizedSample
from spec_core.engines.base import HiddenStateEngine
from spec_core.errors import DataError
from spec_core.training.collate import collate, padding_sample
from spec_core.training.sources import SampleSource, SampleSpec, StepData


class TokenizedSplit:
    """Random access to a tokenized split (``datasets`` dir with sample_id/input_ids/loss_mask)."""

    def __init__(self, dataset: Any, name: str = "split") -> None:
        missing = {"sample_id", "input_ids", "loss_mask"} - set(dataset.column_names)
        if missing:
            raise DataError(f"{name}: tokenized split lacks columns {sorted(missing)}")
        self.dataset = dataset
        self.name = name

    @classmethod
    def load(cls, path: str) -> TokenizedSplit:
        from spec_core.data.tokenize import load_tokenized

        return cls(load_tokenized(path), name=str(path))

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: Sequence[int]) -> list[TokenizedSample]:
        rows = self.dataset.select(list(indices)) if indices else []
        return [
            TokenizedSample(
                sample_id=str(r["sample_id"]),
                input_ids=list(r["input_ids"]),
                loss_mask=list(r["loss_mask"]),
            )
            for r in rows
        ]


class InProcessSource(SampleSource):
    def __init__(
        self,
        split: TokenizedSplit,
        engine: HiddenStateEngine,
        spec: SampleSpec,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        accumulation_steps: int,
        seq_bucket: int,
        seed: int,
        num_epochs: Optional[int],
        shuffle: bool = True,
    ) -> None:
        if len(split) == 0:
            raise DataError(f"{split.name}: no samples to train on")
        self.split = split
        self.engine = engine
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.micro = micro_batch_size
        self.accum = accumulation_steps
        self.seq_bucket = seq_bucket
        self.seed = seed
        self.num_epochs = num_epochs  # None = cycle forever (the trainer stops at num_steps)
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0  # global steps taken in the current epoch
        self.acked: list[str] = []  # acked ids of epoch ``acked_epoch``
        self.acked_epoch = 0
        self.acked_total = 0
        self._claim_epoch = 0  # epoch of the samples handed out last
        self._order_cache: tuple[int, list[int]] | None = None

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.split) // self.global_batch)

    def order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.split)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=gen).tolist()
            else:
                perm = list(range(n))
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def _claim(self) -> list[int]:
        """Indices this rank trains in the next step; advances the cursor."""
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            return []
        order = self.order(self.epoch)
        start = self.cursor * self.global_batch
        step_slice = order[start : start + self.global_batch]
        per_rank = self.micro * self.accum
        mine = step_slice[self.rank * per_rank : (self.rank + 1) * per_rank]
        self._claim_epoch = self.epoch
        self.cursor += 1
        if start + self.global_batch >= len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
        return mine

    def next_step(self) -> StepData:
        samples = self.split.get(self._claim())
        samples.sort(key=lambda s: len(s.input_ids), reverse=True)  # similar lengths per batch
        step = StepData()
        for i in range(self.accum):
            chunk = samples[i * self.micro : (i + 1) * self.micro]
            started = time.perf_counter()
            captured = self.engine.capture(chunk) if chunk else []
            captured += [padding_sample(self.spec, 1)] * (self.micro - len(captured))
            batch = collate(captured, self.spec, self.seq_bucket)
            batch.data_wait_s = time.perf_counter() - started
            step.micro_batches.append(batch)
        return step

    def ack(self, sample_ids: list[str]) -> None:
        if self._claim_epoch != self.acked_epoch:
            self.acked, self.acked_epoch = [], self._claim_epoch
        self.acked.extend(sample_ids)
        self.acked_total += len(sample_ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "inprocess",
            "epoch": self.epoch,
            "cursor": self.cursor,
            "acked": list(self.acked),
            "acked_epoch": self.acked_epoch,
            "acked_total": self.acked_total,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "inprocess":
            raise DataError(
                f"cannot resume an in-process source from a {state.get('kind')!r} state"
            )
        if int(state["world_size"]) != self.world_size or int(state["seed"]) != self.seed:
            raise DataError(
                "exact resume needs the same world size and seed as the checkpoint "
                f"(checkpoint: world {state['world_size']}, seed {state['seed']}; now: world "
                f"{self.world_size}, seed {self.seed}); use 'training.continual_from' instead"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.acked = list(state["acked"])
        self.acked_epoch = self._claim_epoch = int(state["acked_epoch"])
        self.acked_total = int(state["acked_total"])
