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
        manifest.json            sha256 of every other file (DCP's .metadata included)

Reading the weights without a process group::

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save("iter_0000060/model", "model.pt")   # {"fc.weight": ..., ...}

A checkpoint is written to ``iter_X.partial`` and renamed once every rank has finished, so
``latest`` never points at a half-written directory. Rotation keeps the ``max_checkpoints`` highest
iteration numbers plus ``latest`` and ``best``.

Loading trusts nothing in the directory: ``verify_manifest`` checks every file against
``manifest.json`` before DCP unpickles ``.metadata``; pointer files must name an ``iter_*`` sibling;
exact resume refuses a checkpoint whose dataset fingerprint or planned total steps differ from
this run's (``training.resume_accept_mismatch`` accepts them).
"""

from __future__ import annotations

import json
import logging
import re
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
from spec_core.utils.files import atomic_write_json, atomic_write_text
from spec_core.utils.fingerprint import file_sha256, files_digest, tree_files

log = logging.getLogger(__name__)

FROZEN_KEYS = ("embed_tokens.weight",)
LATEST = "latest"
BEST = "best"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# What a checkpoint must match to be resumed exactly (besides the world size).
IDENTITY_KEYS = ("dataset_fingerprint", "total_steps")
_ITER = re.compile(r"iter_(\d+)")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def iter_step(name: str) -> Optional[int]:
    """The step of a finished checkpoint dir name (``iter_0000060`` -> 60), else None."""
    match = _ITER.fullmatch(name)
    return int(match.group(1)) if match else None


def run_identity(train_data: str | Path, total_steps: int) -> dict[str, Any]:
    """What an exact resume must match (``IDENTITY_KEYS``): the tokenized train split's Arrow
    bytes (sample ids and tokens, so a reused id with new content differs) and the plan length."""
    shards = [(n, p) for n, p in tree_files(Path(train_data)) if n.endswith(".arrow")]
    return {"dataset_fingerprint": files_digest(shards), "total_steps": int(total_steps)}


def read_pointer(root: Path, name: str) -> Optional[Path]:
    """The checkpoint a ``latest``/``best`` pointer file names, or None when there is no pointer.
    The content must be one ``iter_*`` name of an existing sibling dir: it is joined into paths
    that export and rotation later delete, so nothing else is followed."""
    pointer = Path(root) / name
    if not pointer.is_file():
        return None
    with pointer.open("rb") as fh:
        text = fh.read(256).decode("utf-8", "replace").strip()
    if iter_step(text) is None or not (pointer.parent / text).is_dir():
        raise ConfigError(
            f"{pointer} names {text[:80]!r}, not an iter_* checkpoint dir beside it; write the "
            f"name of one of {pointer.parent}'s iter_* dirs into it, or delete it"
        )
    return pointer.parent / text


def write_manifest(ckpt: Path) -> Path:
    """Record the sha256 of every file in ``ckpt`` (written last, atomically)."""
    files = {rel: file_sha256(path) for rel, path in tree_files(ckpt) if rel != MANIFEST}
    return atomic_write_json(
        Path(ckpt) / MANIFEST, {"format": MANIFEST_FORMAT, "files": files}, sort_keys=True
    )


def verify_manifest(ckpt: Path) -> None:
    """Refuse a checkpoint whose files differ from its manifest, before anything is unpickled.

    It catches files changed, added or lost after specflow wrote the checkpoint (a bad copy, a
    planted ``.metadata``); someone who can rewrite ``manifest.json`` too is not stopped by it."""
    ckpt = Path(ckpt)
    manifest_file = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        expected = dict(manifest["files"])
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except FileNotFoundError:
        raise ConfigError(
            f"{ckpt}: no {MANIFEST}, so its files cannot be checked before loading; only "
            "checkpoints written by specflow load (save it again with specflow)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{manifest_file}: unreadable checkpoint manifest ({exc})") from None
    present = {rel: path for rel, path in tree_files(ckpt) if rel != MANIFEST}
    for rel in sorted(set(present) | set(expected)):
        if rel not in expected:
            problem = "is not in its manifest (unknown file)"
        elif rel not in present:
            problem = "is listed in its manifest but missing"
        elif file_sha256(present[rel]) != expected[rel]:
            problem = "does not match the sha256 in its manifest (changed after saving)"
        else:
            continue
        raise ConfigError(
            f"{ckpt / rel} {problem}; refusing to load {ckpt.name} (restore the checkpoint from "
            "where specflow wrote it, or use another one)"
        )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from an ``iter_*`` dir, a ``checkpoints`` dir or a run dir (-> latest)."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    for ckpt_root in (path, path / "checkpoints"):
        target = read_pointer(ckpt_root, LATEST)
        if target is not None and (target / STATE_FILE).is_file():
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
    """Weights (and vocab buffers) only, into a possibly sharded model, in place
    (``training.continual_from``); the files are verified first."""
    verify_manifest(ckpt)
    _load_weights(model, ckpt)


def _load_weights(model: nn.Module, ckpt: Path) -> None:
    state = model_state(model)
    dcp.load(state, checkpoint_id=str(ckpt / "model"))
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


class Checkpointer:
    """Saves, rotates and exactly restores one run's checkpoints.

    ``identity`` (``IDENTITY_KEYS``: the train split's fingerprint, the planned total steps) is
    written into every checkpoint and must match on resume, unless ``accept_mismatch``."""

    def __init__(
        self,
        checkpoint_dir: Path,
        rank: int,
        world_size: int,
        max_checkpoints: int,
        identity: Optional[dict[str, Any]] = None,
        accept_mismatch: bool = False,
    ):
        self.root = Path(checkpoint_dir)
        self.rank = rank
        self.world_size = world_size
        self.max_checkpoints = max_checkpoints
        self.identity = dict(identity or {})
        self.accept_mismatch = accept_mismatch

    @property
    def latest(self) -> Optional[Path]:
        return read_pointer(self.root, LATEST)

    @property
    def best(self) -> Optional[Path]:
        return read_pointer(self.root, BEST)

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
            state.update(self.identity)
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
            write_manifest(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            atomic_write_text(self.root / LATEST, final.name)
            if is_best:
                atomic_write_text(self.root / BEST, final.name)
            self._rotate()
        _barrier()
        return final

    def _rotate(self) -> None:
        """Keep the ``max_checkpoints`` highest steps (by number, not name), plus whatever
        ``latest`` and ``best`` name (a reused run dir may hold higher steps of an older run)."""
        if self.max_checkpoints <= 0:
            return
        steps = {p: iter_step(p.name) for p in self.root.iterdir() if p.is_dir()}
        ckpts = sorted((step, p) for p, step in steps.items() if step is not None)
        keep = {p for _, p in ckpts[-self.max_checkpoints :]}
        keep |= {p for p in (self.latest, self.best) if p is not None}
        for _, path in ckpts:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _check_identity(self, ckpt: Path, state: dict[str, Any]) -> None:
        for key in IDENTITY_KEYS:
            now, then = self.identity.get(key), state.get(key)
            if now is None or now == then:
                continue
            then, now = (str(v)[:16] if isinstance(v, str) else v for v in (then, now))
            message = (
                f"{ckpt} has {key} {then!r}, this run {now!r}: resuming would replay its data "
                "cursor over different samples; start a fresh run (or use "
                "'training.continual_from'), or set 'training.resume_accept_mismatch: true'"
            )
            if not self.accept_mismatch:
                raise ConfigError(message)
            log.warning("accepted by training.resume_accept_mismatch: %s", message)

    def load(
        self,
        ckpt: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        source: SampleSource,
    ) -> dict[str, Any]:
        """Exact resume: weights, optimizer, scheduler, RNG and data cursor. Returns trainer state.
        Every file is verified against the manifest before any is read."""
        verify_manifest(ckpt)
        state = json.loads((ckpt / STATE_FILE).read_text())
        if int(state["world_size"]) != self.world_size:
            raise ConfigError(
                f"{ckpt} was written by {state['world_size']} ranks, now {self.world_size}: exact "
                "resume needs the same world size (use 'training.continual_from' for weights only)"
            )
        self._check_identity(ckpt, state)
        _load_weights(model, ckpt)
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
