"""Test helpers shared by several test modules (fixtures live in conftest.py): random engine
samples, the capture-column comparison of an engine against HF, and tiny training configs."""

from __future__ import annotations

import random

import torch

from spec_core.contracts.samples import TokenizedSample


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
