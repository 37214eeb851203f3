"""Trainer building blocks in one process: schedule, collate, the in-process source, the
non-finite-step guard, and the checkpoint round trip through a real (world-1, gloo) process group."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import make_split

from spec_core.config import load_config
from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import CapturedSample
from spec_core.engines.hf import HFEngine
from spec_core.errors import DataError
from spec_core.training.collate import collate, padding_sample
from spec_core.training.inprocess import InProcessSource, TokenizedSplit
from spec_core.training.schedule import lr_factor
from spec_core.training.sources import SampleSource, SampleSpec, StepData

SPEC = SampleSpec(aux_dim=6, hidden_dim=2, with_last_hidden=True)


def test_lr_schedules():
    f = lambda s, kind: lr_factor(s, 100, 10, kind, min_ratio=0.1)  # noqa: E731
    assert f(0, "cosine") == pytest.approx(0.1) and f(9, "cosine") == pytest.approx(1.0)
    assert f(10, "cosine") == pytest.approx(1.0)
    assert f(55, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100, "cosine") == pytest.approx(0.1) and f(100, "linear") == pytest.approx(0.1)
    assert f(55, "linear") == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(99, "constant") == 1.0
    assert f(79, "wsd") == 1.0 and f(80, "wsd") == pytest.approx(1.0)
    assert f(90, "wsd") == pytest.approx(0.1 + 0.9 * 0.5) and f(100, "wsd") == pytest.approx(0.1)


def test_collate_pads_to_bucket_and_checks_shapes():
    a = CapturedSample(
        "a",
        torch.arange(5),
        torch.tensor([0, 1, 1, 0, 1], dtype=torch.uint8),
        torch.ones(5, 6),
        torch.ones(5, 2),
    )
    batch = collate([a, padding_sample(SPEC, 3)], SPEC, seq_bucket=8)
    assert batch.input_ids.shape == (2, 8) and batch.aux_hidden.shape == (2, 8, 6)
    assert batch.attention_mask.sum(1).tolist() == [5, 3]
    assert batch.loss_mask[1].sum() == 0 and batch.sample_ids == ["a", ""]
    assert batch.num_real == 1 and batch.aux_hidden[0, 5:].abs().sum() == 0
    bad = CapturedSample(
        "b", torch.arange(4), torch.zeros(4, dtype=torch.uint8), torch.ones(4, 5), torch.ones(4, 2)
    )
    with pytest.raises(DataError, match="'b'.*aux_hidden"):
        collate([bad], SPEC, 8)


@pytest.fixture(scope="module")
def engine(tiny_target_dir: Path) -> HFEngine:
    return HFEngine(tiny_target_dir, CaptureSpec((1, 2, 3), with_last_hidden=True), batch_size=4)


def _source(split, engine, rank, world, seed=0, epochs=1):
    spec = SampleSpec(aux_dim=3 * 64, hidden_dim=64, with_last_hidden=True)
    return InProcessSource(
        split,
        engine,
        spec,
        rank=rank,
        world_size=world,
        micro_batch_size=2,
        accumulation_steps=2,
        seq_bucket=8,
        seed=seed,
        num_epochs=epochs,
    )


def test_inprocess_source_slices_ranks_pads_and_resumes(tmp_path: Path, engine: HFEngine):
    split = TokenizedSplit.load(str(make_split(tmp_path / "train", 11)))
    ranks = [_source(split, engine, r, 2) for r in range(2)]
    seen: list[str] = []
    for _ in range(2):  # 11 samples, global batch 8: the second step is part padding
        per_rank = [s.next_step() for s in ranks]
        for data in per_rank:
            assert len(data.micro_batches) == 2  # always accum micro-batches, padded if needed
            b = data.micro_batches[0]
            assert b.last_hidden is not None and b.aux_hidden.shape[-1] == 3 * 64
        seen += [sid for d in per_rank for sid in d.sample_ids]
    assert sorted(seen) == sorted(f"s0-{i}" for i in range(11))  # every sample once
    assert all(s.next_step().num_real == 0 for s in ranks)  # exhausted: padding only

    # resume: a fresh source restored from the state after step 1 yields the same step 2
    first = _source(split, engine, 0, 2)
    first.next_step()
    first.ack(["x"])
    state = first.state_dict()
    expected = first.next_step()
    restored = _source(split, engine, 0, 2)
    restored.load_state_dict(state)
    assert restored.acked == ["x"] and restored.acked_total == 1
    got = restored.next_step()
    assert got.sample_ids == expected.sample_ids
    for a, b in zip(got.micro_batches, expected.micro_batches, strict=True):
        assert torch.equal(a.aux_hidden, b.aux_hidden)
    with pytest.raises(DataError, match="same world size"):
        _source(split, engine, 0, 1).load_state_dict(state)
    # a different seed shuffles differently
    assert (
        _source(split, engine, 0, 2, seed=1).next_step().sample_ids
        != _source(split, engine, 0, 2).next_step().sample_ids
    )


class ListSource(SampleSource):
    """A real SampleSource over fixed steps (for in-process trainer tests)."""

    def __init__(self, steps: list[StepData]) -> None:
        self.steps, self.acked = steps, []

    def next_step(self) -> StepData:
        return self.steps.pop(0)

    def ack(self, sample_ids: list[str]) -> None:
        self.acked += sample_ids

    def state_dict(self) -> dict:
        return {"left": len(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_non_finite_step_is_skipped_and_counted(
    tmp_path: Path, tiny_target_dir: Path, process_group, engine: HFEngine
):
    from spec_core.models.common.target import load_target_head
    from spec_core.training.fsdp import DistInfo, build_mesh, parallelize
    from spec_core.training.job import TrainJob
    from spec_core.training.optim import build_optimizer
    from spec_core.training.schedule import build_scheduler
    from spec_core.training.trainer import Trainer
    from spec_core.training.worker import build_draft, draft_config_for, target_projection

    cfg = load_config(None, ["training.learning_rate=1e-2", "draft.ttt_length=2"])
    job = TrainJob.create(cfg, run_dir=str(tmp_path), target_dir=str(tiny_target_dir))
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    head = load_target_head(tiny_target_dir, cfg.target)
    dcfg = draft_config_for(job, cfg, None)
    model = build_draft(dcfg, cfg, head, None, info.device)
    parallelize(model, build_mesh(info), cfg.training, {model.embed_tokens.weight})
    optimizer = build_optimizer(model, cfg.training)
    spec = SampleSpec(aux_dim=dcfg.aux_dim, hidden_dim=64, with_last_hidden=True)
    split = TokenizedSplit.load(str(make_split(tmp_path / "train", 4)))
    good = _source(split, engine, 0, 1, epochs=None).next_step()
    poisoned = _source(split, engine, 0, 1, epochs=None).next_step()
    poisoned.micro_batches[0].aux_hidden[0, 0, 0] = float("inf")
    source = ListSource([poisoned, good])
    trainer = Trainer(
        cfg=cfg,
        info=info,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.training, 10),
        source=source,
        target=target_projection(head, cfg, None, info.device),
        total_steps=10,
    )

    def full(v):
        return v.full_tensor() if hasattr(v, "full_tensor") else v

    before = {k: full(v).clone() for k, v in model.state_dict().items()}
    out = trainer.train_step(source.next_step())
    assert out.skipped and trainer.skipped_steps == 1 and not math.isfinite(out.record["grad_norm"])
    after = {k: full(v) for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing applied
    assert all(p.grad is None for p in model.parameters())
    out = trainer.train_step(source.next_step())
    assert not out.skipped and trainer.skipped_steps == 1 and math.isfinite(out.record["grad_norm"])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], full(v))]
    assert "fc.weight" in changed and "lm_head.weight" in changed
    assert "embed_tokens.weight" not in changed
    assert trainer.step == 2 and len(source.acked) == 8  # 2 steps x micro 2 x accum 2
    assert spec.aux_dim == 3 * 64


def test_checkpoint_rotation_keeps_best_and_latest(tmp_path: Path):
    from spec_core.training.checkpoint import Checkpointer, resolve_checkpoint

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    config = tmp_path / "draft_config.json"
    config.write_text("{}")
    ckpts = Checkpointer(tmp_path / "checkpoints", rank=0, world_size=1, max_checkpoints=2)
    for step in (10, 20, 30, 40):
        ckpts.save(
            step, model, optimizer, scheduler, ListSource([]), {}, config, None, is_best=step == 20
        )
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["iter_0000020", "iter_0000030", "iter_0000040"]  # best survives rotation
    assert ckpts.latest.name == "iter_0000040" and ckpts.best.name == "iter_0000020"
    assert resolve_checkpoint(tmp_path) == ckpts.latest  # a run dir resolves to latest
    assert resolve_checkpoint(tmp_path / "checkpoints" / "iter_0000030").name == "iter_0000030"
    with pytest.raises(Exception, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")
