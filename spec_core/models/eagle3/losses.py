"""EAGLE-3 alignment, the chunked soft-label loss, and its metrics.

Alignment (docs/architecture.md §training-alignment): for a sequence x_0..x_{T-1}, TTT step k at
position t feeds embed(x_{t+1+k}) and is trained toward softmax(z_{t+1+k}) = the target's
distribution of x_{t+2+k}; it counts iff x_{t+2+k} exists and is supervised. "Target row" u = t+1+k is the position whose last hidden state
gives that distribution, so one target row serves up to K (step, position) pairs: target
probabilities are computed once per row and reused by every step that needs them.

The loss never materializes [B, T, V]: rows are processed in chunks, and the gradient with respect
to the draft logits is turned into gradients of the draft hidden rows and of ``lm_head`` inside the
forward, chunk by chunk (the logits are dropped right away). Peak memory is O(chunk x V) whatever
B x T is, and each target row's probabilities are computed exactly once.
"""

from __future__ import annotations

from typing import Optional

import torch

from spec_core.models.common.target import TargetProjection

# Columns of the per-step metric sums (all-reduced SUM across micro-batches and ranks).
M_COUNT, M_CE, M_CORRECT, M_IN_VOCAB = range(4)
NUM_METRICS = 4
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32)
MIN_CHUNK_ROWS = 64  # below this, re-reading the vocab weights dominates


def label_rows(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: target row u is used iff token u+1 exists and is supervised."""
    rows = torch.zeros_like(attention_mask, dtype=torch.bool)
    rows[:, :-1] = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    return rows


def step_valid(rows: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[K, B, T] bool: (step k, position t) is supervised iff target row t+1+k is used."""
    bsz, length = rows.shape
    valid = torch.zeros(num_steps, bsz, length, dtype=torch.bool, device=rows.device)
    for k in range(num_steps):
        shift = 1 + k
        if shift < length:
            valid[k, :, : length - shift] = rows[:, shift:]
    return valid


def supervised_counts(
    loss_mask: torch.Tensor, attention_mask: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """N_k for one micro-batch: supervised (position, step k) pairs, known before any forward."""
    return step_valid(label_rows(loss_mask, attention_mask), num_steps).sum(dim=(1, 2))


def step_weights(num_steps: int, decay: float) -> torch.Tensor:
    return torch.tensor([decay**k for k in range(num_steps)], dtype=torch.float64)


def pooled_scales(
    global_counts: torch.Tensor, num_steps: int, decay: float, world_size: int = 1
) -> torch.Tensor:
    """Per-step factor w_k / N_k (N_k pooled over micro-batches and ranks), 0 where N_k = 0.

    Multiplied by ``world_size`` because data-parallel gradient reduction averages over ranks;
    with it, the summed gradient equals that of one big batch.
    """
    counts = global_counts.to(torch.float64)
    w = step_weights(num_steps, decay)
    scale = torch.where(counts > 0, w / counts.clamp(min=1), torch.zeros_like(w))
    return scale * world_size


class _ChunkedSoftCE(torch.autograd.Function):
    """sum_i w_i * CE(softmax(z_{u_i}), softmax(x_i W^T)) with gradients computed in the forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        target_hidden: torch.Tensor,
        target_weight: torch.Tensor,
        target_rest: Optional[torch.Tensor],
        row_target: torch.Tensor,
        row_weight: torch.Tensor,
        row_step: torch.Tensor,
        num_steps: int,
        chunk_rows: int,
    ):
        math = torch.promote_types(x.dtype, torch.float32)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=math, device=x.device)
        loss = torch.zeros((), dtype=math, device=x.device)
        metrics = torch.zeros(num_steps, NUM_METRICS, dtype=torch.float64, device=x.device)
        num_targets = target_hidden.shape[0]
        # x rows are sorted by target row: offsets[u] = first x row whose target row is >= u.
        offsets = torch.searchsorted(
            row_target, torch.arange(num_targets + 1, device=row_target.device)
        ).tolist()
        # at most chunk_rows draft rows and CHUNK_ELEMENTS logits per chunk: peak memory is
        # bounded whatever B x T and V are
        rows = max(MIN_CHUNK_ROWS, min(chunk_rows, CHUNK_ELEMENTS // weight.shape[0]))
        per_chunk = max(1, rows // num_steps)
        for a in range(0, num_targets, per_chunk):
            b = min(a + per_chunk, num_targets)
            lo, hi = offsets[a], offsets[b]
            if lo == hi:
                continue
            th = target_hidden[a:b]
            z = (th @ target_weight.T).to(math)  # [c, Vd]
            t_max, t_arg = z.max(dim=-1)
            if target_rest is not None:
                rest = (th.to(target_rest.dtype) @ target_rest.T).amax(dim=-1)
                in_vocab = t_max >= rest.to(math)
            else:
                in_vocab = torch.ones_like(t_arg, dtype=torch.bool)
            p = torch.softmax(z, dim=-1)
            del z
            local = row_target[lo:hi] - a
            p_rows = p.index_select(0, local)  # [m, Vd]
            del p
            xs = x[lo:hi]
            y = (xs @ weight.T).to(math)  # [m, Vd] draft logits
            y_max, pred = y.max(dim=-1)
            ce = -torch.linalg.vecdot(p_rows, y)  # + lse below
            e = y.sub_(y_max[:, None]).exp_()  # in place: y is not needed any more
            total = e.sum(dim=-1)
            ce += y_max + total.log()
            w = row_weight[lo:hi].to(math)
            loss += (ce * w).sum()
            # dLoss/dlogits = w * (softmax(y) - p), in place over e
            g = e.mul_((w / total)[:, None]).addcmul_(p_rows, w[:, None], value=-1.0)
            del p_rows
            grad_x[lo:hi] = (g.to(weight.dtype) @ weight).to(x.dtype)
            grad_w.addmm_(g.T, xs.to(math))
            correct = (pred == t_arg[local]) & in_vocab[local]
            stats = torch.stack(
                [torch.ones_like(ce), ce, correct.to(math), in_vocab[local].to(math)], dim=-1
            )
            metrics.index_add_(0, row_step[lo:hi], stats.to(torch.float64))
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_metrics: torch.Tensor):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        return (
            grad_x * grad_loss.to(grad_x.dtype),
            grad_w * grad_loss.to(grad_w.dtype),
            *([None] * 8),
        )


def chunked_soft_ce(
    x: torch.Tensor,
    weight: torch.Tensor,
    target_hidden: torch.Tensor,
    target: TargetProjection,
    row_target: torch.Tensor,
    row_weight: torch.Tensor,
    row_step: torch.Tensor,
    num_steps: int,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted soft-label CE of draft rows ``x`` [M, H] (post final norm) against target rows.

    ``row_target`` [M] (non-decreasing) indexes ``target_hidden`` [N, Ht]; ``row_weight`` [M] is
    w_k / N_k for the row's step; ``row_step`` [M] its step. Returns (loss, metric sums [K, 4]).
    """
    return _ChunkedSoftCE.apply(
        x,
        weight,
        target_hidden,
        target.weight,
        target.rest,
        row_target,
        row_weight,
        row_step,
        num_steps,
        chunk_rows,
    )


def summarize(metric_sums: torch.Tensor, decay: float) -> dict:
    """Turn pooled metric sums [K, 4] into the logged numbers (per TTT position k).

    acc_k is over all supervised positions (a position whose target argmax is outside the draft
    vocab counts as a miss: the draft can never propose it); acc_in_vocab_k is over the positions
    whose argmax is in the draft vocab. sim_acc_len = sum_k prod_{j<=k} acc_j (TorchSpec's
    convention); tau_sim adds the bonus token, comparable to measured acceptance length tau.
    """
    sums = metric_sums.to(torch.float64).cpu()
    count = sums[:, M_COUNT]
    safe = count.clamp(min=1)
    loss_k = (sums[:, M_CE] / safe).tolist()
    acc_k = (sums[:, M_CORRECT] / safe).tolist()
    acc_in_vocab_k = (sums[:, M_CORRECT] / sums[:, M_IN_VOCAB].clamp(min=1)).tolist()
    w = step_weights(len(loss_k), decay)
    present = count > 0
    loss = float((w * torch.tensor(loss_k, dtype=torch.float64) * present).sum())
    sim, running = 0.0, 1.0
    for k, acc in enumerate(acc_k):
        if not present[k]:
            break
        running *= acc
        sim += running
    return {
        "loss": loss,
        "loss_k": loss_k,
        "acc_k": acc_k,
        "acc_in_vocab_k": acc_in_vocab_k,
        "in_vocab_k": (sums[:, M_IN_VOCAB] / safe).tolist(),
        "supervised_k": [int(c) for c in count.tolist()],
        "sim_acc_len": sim,
        "tau_sim": 1.0 + sim,
    }
