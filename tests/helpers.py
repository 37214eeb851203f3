"""Test helpers shared by several test modules (fixtures live in conftest.py): random engine
samples, the capture-column comparison of an engine against HF, an engine without its runtime,
random tokenized splits and tiny torchrun training runs."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import TokenizedSample
from spec_core.errors import ConfigError


def random_samples(n: int, *, lo: int, hi: int, seed: int = 0) -> list[TokenizedSample]:
    """``n`` samples of ``lo``..``hi`` random SmolLM2 token ids (no special ids) and random masks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(3, 49152) for _ in range(length)]
        mask = [rng.randint(0, 1) for _ in range(length)]
        out.append(TokenizedSample(sample_id=f"s{i}", input_ids=ids, loss_mask=mask))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_columns_nearest_own_index(
    got: list, reference: list, capture: tuple[int, ...], hidden: int, tol: float
) -> None:
    """``reference`` captured every index next to each of ``capture`` (HF, the ground truth):
    each column of ``got`` must be closest to its own index (no off-by-one) and within ``tol``,
    and so must the last hidden state."""
    neighbours = capture_neighbours(capture)
    for g, r in zip(got, reference, strict=True):
        assert g.sample_id == r.sample_id and torch.equal(g.input_ids, r.input_ids)
        for j, k in enumerate(capture):
            col = g.aux_hidden[:, j * hidden : (j + 1) * hidden]
            errors = {
                kk: rel_err(col, r.aux_hidden[:, i * hidden : (i + 1) * hidden])
                for i, kk in enumerate(neighbours)
                if abs(kk - k) <= 1
            }
            assert min(errors, key=errors.get) == k, errors
            assert errors[k] < tol, errors
        assert rel_err(g.last_hidden, r.last_hidden) < tol


def capture_neighbours(capture: tuple[int, ...]) -> tuple[int, ...]:
    """Every capture index and the ones either side: what the HF reference captures."""
    return tuple(sorted({kk for k in capture for kk in (k - 1, k, k + 1)}))


def assert_engine_refused_without(
    module: str, engine_cls: type, label: str, target_dir: Path, tmp_path: Path
) -> None:
    """Without ``module`` installed the engine fails with one clear error and leaves no handoff
    files behind (skipped where ``module`` is installed)."""
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ConfigError, match=f"{label} is not installed"):
        engine_cls(target_dir, CaptureSpec((1,), False), handoff_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def make_split(path: Path, n: int, seed: int = 0, zero_mask: bool = False) -> Path:
    """A tokenized split of ``n`` random samples (ids < 2000, second half of each supervised, or
    none with ``zero_mask``) saved where the trainer's in-process source reads it."""
    import datasets

    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in ("sample_id", "input_ids", "loss_mask", "num_tokens")}
    for i in range(n):
        length = int(torch.randint(6, 30, (1,), generator=gen))
        ids = torch.randint(3, 2000, (length,), generator=gen).tolist()
        mask = [0] * length if zero_mask else [0] * (length // 2) + [1] * (length - length // 2)
        rows["sample_id"].append(f"s{seed}-{i}")
        rows["input_ids"].append(ids)
        rows["loss_mask"].append(mask)
        rows["num_tokens"].append(length)
    rows["num_loss_tokens"] = [sum(m) for m in rows["loss_mask"]]
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


def make_train_eval(root: Path, n_train: int, n_eval: int) -> Path:
    """``root/train`` and ``root/eval`` splits (seeds 0 and 1): the data dir ``launch_job`` reads."""
    make_split(root / "train", n_train, seed=0)
    make_split(root / "eval", n_eval, seed=1)
    return root


def launch_job(
    base: list[str],
    tmp: Path,
    name: str,
    target: Path,
    data: Path,
    world: int,
    overrides: list[str],
    *,
    eval_data: bool = True,
    timeout_s: float = 240,
    **fields,
):
    """A real torchrun training run ``tmp/name`` on ``world`` ranks: ``base`` + ``overrides`` over
    the default config, the train (and eval) split of ``data``; ``fields`` go to the TrainJob."""
    from spec_core.config import load_config
    from spec_core.training.job import TrainJob
    from spec_core.training.launcher import launch_training

    cfg = load_config(None, [*base, f"training.nproc_per_node={world}", *overrides])
    job = TrainJob.create(
        cfg,
        run_dir=str(tmp / name),
        target_dir=str(target),
        train_data=str(data / "train"),
        eval_data=str(data / "eval") if eval_data else None,
        **fields,
    )
    return launch_training(job, world, echo=False, timeout_s=timeout_s)
