"""Losses and metrics of the block drafters (DFlash, DSpark) over the frozen target ``lm_head``.

Rows are the counted predictions of all blocks (``BlockPlan.mask``), each with its label, its
weight w = exp(-i / gamma) and its slot i. Per row, with draft logits z = W_lm x (+ the DSpark
Markov bias W2 u):

* CE(z, label) - hard-label cross-entropy against the data token (DFlash's only term);
* L1 = ||softmax(z) - q||_1 with q = softmax(W_lm h_target) the target's distribution of the same
  token (DSpark); alpha = clamp(1 - L1/2, 0, 1) = sum_v min(p, q), the exact acceptance
  probability of rejection sampling, used (detached) as the confidence head's BCE target.

Pooling: the step loss is ``sum_rows w (a_ce CE + a_l1 L1 + a_conf BCE) / D`` where D = sum of w
over every micro-batch and rank of the optimizer step (known from the plans before any forward);
the trainer passes ``scale = world_size / D`` so FSDP's gradient averaging over ranks yields
exactly one big batch's gradient. Like the EAGLE-3 loss, the vocab projection runs in row chunks
and the gradient with respect to the logits is folded into x / u / W2 gradients inside the
forward, so [rows, V] is never materialized and each chunk's logits are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# Per-slot metric sums (all-reduced SUM across micro-batches and ranks).
METRIC_COLUMNS = (
    "count",  # counted predictions
    "ce",  # sum CE
    "correct",  # sum [argmax z == label]
    "weight",  # sum w
    "w_ce",  # sum w CE
    "w_l1",  # sum w L1 (DSpark)
    "w_bce",  # sum w BCE(confidence, alpha) (DSpark)
    "accept",  # sum alpha (DSpark)
    "prefix_accept",  # sum over blocks of prod_{j<=i} alpha_j (DSpark)
    "conf_err",  # sum |sigmoid(confidence) - alpha| (DSpark)
    "l1",  # sum L1 (DSpark)
)
COL = {name: i for i, name in enumerate(METRIC_COLUMNS)}
NUM_METRICS = len(METRIC_COLUMNS)
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32)
MIN_CHUNK_ROWS = 16


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms; a term with weight 0 is never computed."""

    ce: float = 1.0
    l1: float = 0.0
    confidence: float = 0.0


def pooled_scale(global_weight: float, world_size: int) -> torch.Tensor:
    """world_size / D (0 when nothing in the step is supervised)."""
    value = world_size / global_weight if global_weight > 0 else 0.0
    return torch.tensor(value, dtype=torch.float64)


class _BlockLogitLoss(torch.autograd.Function):
    """sum_i c_ce,i CE(z_i, y_i) + c_l1,i ||softmax(z_i) - q_i||_1, z_i = x_i W^T (+ u_i W2^T).

    Returns (loss, ce [M], l1 [M], alpha [M], argmax [M]); only ``loss`` is differentiable, and
    its gradients are computed chunk by chunk in the forward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        latent: Optional[torch.Tensor],
        bias_weight: Optional[torch.Tensor],
        head: torch.Tensor,
        target_hidden: Optional[torch.Tensor],
        labels: torch.Tensor,
        coef_ce: torch.Tensor,
        coef_l1: torch.Tensor,
        compute_grad: bool,
        chunk_rows: int,
    ):
        math = torch.promote_types(x.dtype, torch.float32)
        rows = x.shape[0]
        vocab = head.shape[0]
        loss = torch.zeros((), dtype=math, device=x.device)
        ce_all = torch.zeros(rows, dtype=math, device=x.device)
        l1_all = torch.zeros(rows, dtype=math, device=x.device)
        alpha_all = torch.zeros(rows, dtype=math, device=x.device)
        pred_all = torch.zeros(rows, dtype=torch.long, device=x.device)
        grad_x = torch.zeros_like(x) if compute_grad else None
        grad_u = torch.zeros_like(latent) if compute_grad and latent is not None else None
        grad_w2 = (
            torch.zeros(bias_weight.shape, dtype=math, device=x.device)
            if compute_grad and bias_weight is not None
            else None
        )
        step = max(MIN_CHUNK_ROWS, min(chunk_rows, CHUNK_ELEMENTS // vocab))
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            z = (x[lo:hi] @ head.T).to(math)
            if latent is not None:
                z += (latent[lo:hi] @ bias_weight.T).to(math)  # type: ignore[union-attr]
            y = labels[lo:hi]
            lse = torch.logsumexp(z, dim=-1)
            ce = lse - z.gather(1, y[:, None]).squeeze(1)
            pred_all[lo:hi] = z.argmax(dim=-1)
            p = z.sub_(lse[:, None]).exp_()  # in place: z is not needed any more
            del z
            chunk_loss = (coef_ce[lo:hi].to(math) * ce).sum()
            sign = None
            if target_hidden is not None:
                q = torch.softmax((target_hidden[lo:hi] @ head.T).to(math), dim=-1)
                diff = p - q
                del q
                l1 = diff.abs().sum(dim=-1)
                sign = diff.sign_()
                l1_all[lo:hi] = l1
                alpha_all[lo:hi] = (1.0 - 0.5 * l1).clamp(0.0, 1.0)
                chunk_loss = chunk_loss + (coef_l1[lo:hi].to(math) * l1).sum()
            loss += chunk_loss
            ce_all[lo:hi] = ce
            if not compute_grad:
                continue
            # dL/dz = c_ce (p - onehot(y)) + c_l1 p * (s - <s, p>), s = sign(p - q)
            c_ce = coef_ce[lo:hi].to(math)[:, None]
            if sign is not None:
                c_l1 = coef_l1[lo:hi].to(math)[:, None]
                g = sign.sub_(torch.linalg.vecdot(sign, p)[:, None]).mul_(c_l1).add_(c_ce)
                g = g.mul_(p)
            else:
                g = p.mul_(c_ce)
            g[torch.arange(hi - lo, device=g.device), y] -= c_ce.squeeze(1)
            grad_x[lo:hi] = (g.to(head.dtype) @ head).to(x.dtype)  # type: ignore[index]
            if grad_u is not None:
                grad_u[lo:hi] = (g.to(bias_weight.dtype) @ bias_weight).to(latent.dtype)  # type: ignore[union-attr]
                grad_w2.addmm_(g.T, latent[lo:hi].to(math))  # type: ignore[union-attr]
        if compute_grad:
            ctx.save_for_backward(
                grad_x,
                grad_u if grad_u is not None else torch.empty(0),
                grad_w2.to(bias_weight.dtype) if grad_w2 is not None else torch.empty(0),  # type: ignore[union-attr]
            )
        ctx.has_latent = latent is not None
        ctx.mark_non_differentiable(ce_all, l1_all, alpha_all, pred_all)
        return loss, ce_all, l1_all, alpha_all, pred_all

    @staticmethod
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        grad_x, grad_u, grad_w2 = ctx.saved_tensors
        gx = grad_x * grad_loss.to(grad_x.dtype)
        gu = grad_u * grad_loss.to(grad_u.dtype) if ctx.has_latent else None
        gw = grad_w2 * grad_loss.to(grad_w2.dtype) if ctx.has_latent else None
        return gx, gu, gw, *([None] * 7)


@dataclass
class BlockRows:
    """The counted predictions of one micro-batch, flattened to rows."""

    x: torch.Tensor  # [M, H] draft hidden after the final norm
    labels: torch.Tensor  # [M] target token ids
    weight: torch.Tensor  # [M] exp(-slot / gamma)
    slot: torch.Tensor  # [M] prediction index i
    latent: Optional[torch.Tensor] = None  # [M, r] DSpark Markov latent (bias = latent W2^T)
    target_hidden: Optional[torch.Tensor] = None  # [M, Ht] target last hidden (post-norm)
    confidence: Optional[torch.Tensor] = None  # [M] confidence-head logits


def block_loss(
    rows: BlockRows,
    head: torch.Tensor,
    num_slots: int,
    scale: torch.Tensor,
    weights: LossWeights,
    bias_weight: Optional[torch.Tensor] = None,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(pooled loss contribution, per-slot metric sums [P, NUM_METRICS], alpha [M] or None).

    ``rows.target_hidden`` is needed iff the L1 or the confidence term is on.
    """
    device = rows.x.device
    scale = scale.to(device=device, dtype=torch.float64)
    w = rows.weight.to(torch.float64)
    use_l1 = weights.l1 > 0
    use_conf = weights.confidence > 0 and rows.confidence is not None
    if (use_l1 or use_conf) and rows.target_hidden is None:
        raise ValueError("the L1 / confidence terms need the target's last hidden states")
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rows.x, rows.latent, bias_weight)
    )
    math = torch.promote_types(rows.x.dtype, torch.float32)
    coef_ce = (scale * weights.ce * w).to(math)
    coef_l1 = (scale * weights.l1 * w).to(math)
    loss, ce, l1, alpha, pred = _BlockLogitLoss.apply(
        rows.x,
        rows.latent,
        bias_weight,
        head,
        rows.target_hidden if (use_l1 or use_conf) else None,
        rows.labels,
        coef_ce,
        coef_l1,
        compute_grad,
        chunk_rows,
    )
    has_alpha = use_l1 or use_conf
    stats = torch.zeros(rows.x.shape[0], NUM_METRICS, dtype=torch.float64, device=device)
    stats[:, COL["count"]] = 1.0
    stats[:, COL["ce"]] = ce.double()
    stats[:, COL["correct"]] = (pred == rows.labels).double()
    stats[:, COL["weight"]] = w
    stats[:, COL["w_ce"]] = w * ce.double()
    if has_alpha:
        stats[:, COL["w_l1"]] = w * l1.double()
        stats[:, COL["accept"]] = alpha.double()
        stats[:, COL["l1"]] = l1.double()
    if rows.confidence is not None:
        conf = rows.confidence.to(math)
        if use_conf:
            bce = F.binary_cross_entropy_with_logits(conf, alpha.to(math), reduction="none")
            loss = loss + (scale * weights.confidence * w).to(bce.dtype).mul(bce).sum()
            stats[:, COL["w_bce"]] = w * bce.detach().double()
            err = (conf.detach().sigmoid() - alpha.to(math)).abs()
            stats[:, COL["conf_err"]] = err.double()
        else:  # an untrained head still takes part in the graph (FSDP reduces every gradient)
            loss = loss + conf.sum() * 0.0
    metrics = torch.zeros(num_slots, NUM_METRICS, dtype=torch.float64, device=device)
    metrics.index_add_(0, rows.slot, stats)
    return loss, metrics, (alpha if has_alpha else None)


def prefix_accept(alpha: torch.Tensor, mask: torch.Tensor, metrics: torch.Tensor) -> torch.Tensor:
    """Fill the ``prefix_accept`` column: sum over blocks of prod_{j<=i} alpha_j (rows = ``mask``)."""
    dense = torch.zeros(mask.shape, dtype=torch.float64, device=alpha.device)
    dense[mask] = alpha.double()
    prefix = dense.cumprod(dim=-1) * mask
    metrics[:, COL["prefix_accept"]] = prefix.flatten(0, -2).sum(dim=0)
    return metrics


def summarize_block(sums: torch.Tensor, weights: LossWeights, first_slot: int = 0) -> dict:
    """Pooled metric sums [P, NUM_METRICS] -> the logged numbers (index k = k-th drafted token).

    ``loss`` is the pooled objective the optimizer saw; ``acc_k`` greedy accuracy against the data
    token; ``sim_acc_len`` = sum_k prod_{j<=k} acc_j (TorchSpec's convention) and ``tau_sim`` adds
    the bonus token. With the DSpark L1/confidence terms, ``accept_rate_k`` is the mean rejection-
    sampling acceptance sum_v min(p, q) and ``tau_prob`` 1 + the expected accepted drafts per block.
    ``first_slot`` names the block slot of k = 0 (DFlash 1, DSpark 0) in ``block_slot_k``.
    """
    s = sums.to(torch.float64).cpu()
    count = s[:, COL["count"]]
    safe = count.clamp(min=1)
    total_w = float(s[:, COL["weight"]].sum())
    denom = max(total_w, 1e-12)
    ce_loss = float(s[:, COL["w_ce"]].sum()) / denom
    l1_loss = float(s[:, COL["w_l1"]].sum()) / denom
    conf_loss = float(s[:, COL["w_bce"]].sum()) / denom
    acc_k = (s[:, COL["correct"]] / safe).tolist()
    sim, running = 0.0, 1.0
    for k, acc in enumerate(acc_k):
        if count[k] == 0:
            break
        running *= acc
        sim += running
    record = {
        "loss": weights.ce * ce_loss + weights.l1 * l1_loss + weights.confidence * conf_loss,
        "ce_loss": ce_loss,
        "loss_k": (s[:, COL["ce"]] / safe).tolist(),
        "acc_k": acc_k,
        "supervised_k": [int(c) for c in count.tolist()],
        "block_slot_k": [first_slot + k for k in range(len(acc_k))],
        "sim_acc_len": sim,
        "tau_sim": 1.0 + sim,
    }
    if weights.l1 > 0 or weights.confidence > 0:
        blocks = max(float(count[0]), 1.0)
        record.update(
            l1_loss=l1_loss,
            accept_rate_k=(s[:, COL["accept"]] / safe).tolist(),
            tau_prob=1.0 + float(s[:, COL["prefix_accept"]].sum()) / blocks,
        )
    if weights.confidence > 0:
        record.update(
            confidence_loss=conf_loss,
            confidence_abs_err=float(s[:, COL["conf_err"]].sum()) / max(float(count.sum()), 1.0),
        )
    return record
