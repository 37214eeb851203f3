"""The batch plan: how many samples an optimizer step takes, how many steps a run makes, and how
many epochs the producers must stream for them. One place, so the producers, the key queue, the
trainer's LR schedule and the pipeline's progress bar agree on the same numbers.

A global batch is ``micro_batch_size x accumulation_steps x`` data-parallel world (``nproc_per_node
x nnodes``). A run trains ``training.num_steps`` steps, or ``num_epochs`` passes over the split
(the last step of an epoch may be short). Producers stream whole epochs, enough to cover the
steps; a ``num_steps`` run may stop before the last epoch ends.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from spec_core.config import Config


@dataclass(frozen=True)
class DataPlan:
    """What the key queue deals (docs/architecture.md §key-queue): set once per run, the same on
    every machine, so every producer shuffles and every trainer rank counts the same way."""

    num_samples: int
    num_epochs: int
    seed: int
    num_ranks: int = 1  # trainer data-parallel ranks the refs are dealt to

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s shuffled sample indices: the same on every machine."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def to_json(self) -> str:
        return json.dumps(
            {
                "num_samples": self.num_samples,
                "num_epochs": self.num_epochs,
                "seed": self.seed,
                "num_ranks": self.num_ranks,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> DataPlan:
        data = json.loads(raw)
        return cls(
            int(data["num_samples"]),
            int(data["num_epochs"]),
            int(data["seed"]),
            int(data.get("num_ranks", 1)),
        )


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int  # train split size
    micro_batch_size: int
    accumulation_steps: int
    world_size: int  # data-parallel ranks
    num_epochs: int
    num_steps: Optional[int]  # None: num_epochs passes
    seed: int

    @classmethod
    def from_config(
        cls, cfg: Config, num_samples: int, world_size: Optional[int] = None
    ) -> BatchPlan:
        """``world_size`` defaults to the configured one (a launched trainer passes its own)."""
        t = cfg.training
        return cls(
            num_samples=int(num_samples),
            micro_batch_size=t.micro_batch_size,
            accumulation_steps=t.accumulation_steps,
            world_size=world_size if world_size is not None else t.nproc_per_node * t.nnodes,
            num_epochs=t.num_epochs,
            num_steps=t.num_steps,
            seed=t.seed,
        )

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, over all ranks."""
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run (what the LR schedule spans)."""
        if self.num_steps is not None:
            return self.num_steps
        return self.num_epochs * math.ceil(self.num_samples / self.global_batch)

    @property
    def samples_to_train(self) -> int:
        """Sample slots the steps consume (a num_steps run may stop before the data ends)."""
        return self.total_steps * self.global_batch

    @property
    def epochs_to_produce(self) -> int:
        """Whole epochs the producers stream: ``num_epochs``, or enough for ``num_steps``."""
        if self.num_steps is None:
            return self.num_epochs
        return max(1, math.ceil(self.samples_to_train / max(self.num_samples, 1)))

    def data_plan(self) -> DataPlan:
        return DataPlan(
            num_samples=self.num_samples,
            num_epochs=self.epochs_to_produce,
            seed=self.seed,
            num_ranks=self.world_size,
        )
