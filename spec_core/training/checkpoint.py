"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): exact resume and weights-only.

Layout (docs/architecture.md §checkpoint-layout)::

    <run_dir>/checkpoints/
      latest                     text: name of the newest complete checkpoint (iter_0000060)
      best                       text: name of the checkpoint with the best eval tau_sim
      iter_0000060/              step = optimizer steps completed (not +1)
        model/                   DCP: draft weights under their HF export names (fc.weight,
                                 midlayer.*, norm.weight, lm_head.weight, d2t, t2d); the frozen
                                 embed_tokens.weight is NOT stored (it is the target's)
        optimizer/               DCP: AdamW state (fp32) keyed by the same names
        trainer_state.json       step, scheduler, skipped steps, consumed samples/tokens,
                                 world size, eval metrics at save time, best score
        data_state_rank{r}.json  that rank's SampleSource.state_dict() (cursor, acked ids)
        rng_rank{r}.pt           torch (and CUDA) RNG state of rank r
        config.json              draft config (LlamaForCausalLMEagle3 + specflow metadata)
        vocab_map.safetensors    d2t/t2d, only when the draft vocab is pruned

Reading the weights without a process group::

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save("iter_0000060/model", "model.pt")   # {"fc.weight": ..., ...}

A checkpoint is written to ``iter_X.partial`` and renamed once every rank has finished, so
``latest`` never points at a half-written directory. Rotation keeps ``max_checkpoints`` newest
plus ``best``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from spec_core.errors import ConfigError
from spec_core.training.sources import SampleSource
from spec_core.utils.files import atomic_write_text

FROZEN_KEYS = ("embed_tokens.weight",)
LATEST = "latest"
BEST = "best"
STATE_FILE = "trainer_state.json"


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from an ``iter_*`` dir, a ``checkpoints`` dir or a run dir (-> latest)."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    for ckpt_root in (path, path / "checkpoints"):
        pointer = ckpt_root / LATEST
        if pointer.is_file():
            target = ckpt_root / pointer.read_text().strip()
            if (target / STATE_FILE).is_file():
                return target
    raise ConfigError(
        f"no checkpoint at {path}: expected an iter_* dir with {STATE_FILE}, or a run/checkpoints "
        f"dir with a '{LATEST}' pointer"
    )


def model_state(model: nn.Module) -> dict[str, Any]:
    state = get_model_state_dict(model)
    for key in FROZEN_KEYS:
        state.pop(key, None)
    return state


def load_model_weights(model: nn.Module, ckpt: Path) -> None:
    """Weights (and vocab buffers) only, into a possibly sharded model, in place."""
    state = model_state(model)
    dcp.load(state, checkpoint_id=str(ckpt / "model"))
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


class Checkpointer:
    def __init__(self, checkpoint_dir: Path, rank: int, world_size: int, max_checkpoints: int):
        self.root = Path(checkpoint_dir)
        self.rank = rank
        self.world_size = world_size
        self.max_checkpoints = max_checkpoints

    @property
    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    @property
    def best(self) -> Optional[Path]:
        pointer = self.root / BEST
        return self.root / pointer.read_text().strip() if pointer.is_file() else None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        source: SampleSource,
        trainer_state: dict[str, Any],
        draft_config_file: Path,
        vocab_map_file: Optional[Path],
        is_best: bool = False,
    ) -> Path:
        """Collective: every rank calls it with its own source/RNG state."""
        final = self.root / iter_name(step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        dcp.save(model_state(model), checkpoint_id=str(partial / "model"))
        dcp.save(
            get_optimizer_state_dict(model, optimizer), checkpoint_id=str(partial / "optimizer")
        )
        (partial / f"data_state_rank{self.rank}.json").write_text(json.dumps(source.state_dict()))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, partial / f"rng_rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            state = dict(trainer_state)
            state.update(
                step=step,
                world_size=self.world_size,
                scheduler=scheduler.state_dict(),
                saved_at=time.time(),
            )
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
            shutil.copy(draft_config_file, partial / "config.json")
            if vocab_map_file is not None:
                shutil.copy(vocab_map_file, partial / "vocab_map.safetensors")
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            atomic_write_text(self.root / LATEST, final.name)
            if is_best:
                atomic_write_text(self.root / BEST, final.name)
            self._rotate()
        _barrier()
        return final

    def _rotate(self) -> None:
        """Keep the ``max_checkpoints`` newest, plus ``best`` wherever it is."""
        if self.max_checkpoints <= 0:
            return
        ckpts = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and "." not in p.name)
        keep = {p.name for p in ckpts[-self.max_checkpoints :]}
        if self.best is not None:
            keep.add(self.best.name)
        for path in ckpts:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load(
        self,
        ckpt: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        source: SampleSource,
    ) -> dict[str, Any]:
        """Exact resume: weights, optimizer, scheduler, RNG and data cursor. Returns trainer state."""
        state = json.loads((ckpt / STATE_FILE).read_text())
        if int(state["world_size"]) != self.world_size:
            raise ConfigError(
                f"{ckpt} was written by {state['world_size']} ranks, now {self.world_size}: exact "
                "resume needs the same world size (use 'training.continual_from' for weights only)"
            )
        load_model_weights(model, ckpt)
        optim_state = get_optimizer_state_dict(model, optimizer)
        dcp.load(optim_state, checkpoint_id=str(ckpt / "optimizer"))
        set_optimizer_state_dict(model, optimizer, optim_state)
        scheduler.load_state_dict(state["scheduler"])
        data_file = ckpt / f"data_state_rank{self.rank}.json"
        source.load_state_dict(json.loads(data_file.read_text()))
        rng = torch.load(ckpt / f"rng_rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return state
