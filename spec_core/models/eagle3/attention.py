"""Attention cores for the EAGLE-3 draft: incremental decoding and the TTT pattern.

Layout: token-major ``[..., N, heads, head_dim]`` everywhere, so the same layer code runs on a dense
``[B, T]`` block (TTT step 0, decoding) and on a packed ``[n]`` list of rows (TTT steps >= 1, which
only visit positions that still lead to a supervised label).

TTT pattern: at unroll step k the query at position t attends to
  (a) step-0 keys at positions 0..t of its own sequence (the prefix built from target features), and
  (b) its own diagonal entry of every step 1..k (the draft's previous guesses at this position,
      itself included),
which is exactly what a chain drafter sees at decode time. Implementations with identical
results: ``ttt_attention_sdpa`` (CPU training path: the prefix on the fused flash-attention kernel,
merged with the diagonal keys by log-sum-exp), ``ttt_attention_explicit`` (explicit scores; the
readable reference and the non-CPU fallback of the sdpa backend) and ``ttt_attention_flex`` (one
flex_attention call with a block mask; the CUDA training path, since flex_attention has no
backward on CPU).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal self-attention, ``[B, T, H, d]`` in and out (TTT step 0)."""
    return _token_major_sdpa(q, k, v, is_causal=True)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Incremental decoding: ``q`` [B, n, H, d] are the newest n entries of ``k``/``v`` [B, L, H, d].

    New token i sees every cached key plus new keys up to itself; ``key_mask`` [B, L] (True = real)
    hides padding in a batch of unequal prefixes.
    """
    n, total = q.shape[1], k.shape[1]
    allowed = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
    mask = allowed[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :].bool()
    return _token_major_sdpa(q, k, v, attn_mask=mask)


def _token_major_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask: Any
) -> torch.Tensor:
    """SDPA on token-major ``[B, N, heads, d]`` tensors (SDPA itself wants heads first)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True, **mask
    )
    return out.transpose(1, 2)


def row_segments(q_batch: torch.Tensor, bsz: int) -> list[tuple[int, int, int]]:
    """(b, start, end) row ranges per sequence of packed rows sorted by sequence (``q_batch``
    [n] their sequence index); sequences without rows get none."""
    counts = torch.bincount(q_batch, minlength=bsz).tolist()
    segments, start = [], 0
    for b, n in enumerate(counts):
        if n:
            segments.append((b, start, start + n))
        start += n
    return segments


def ttt_attention_explicit(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    diag_k: torch.Tensor,
    diag_v: torch.Tensor,
    q_pos: torch.Tensor,
    segments: list[tuple[int, int, int]],
) -> torch.Tensor:
    """TTT attention for packed query rows, by explicit scores.

    q: [n, Hq, d] packed rows, sorted by sequence; k0/v0: [B, T, Hkv, d] step-0 keys/values;
    diag_k/diag_v: [n, s, Hkv, d] the same rows' keys/values at steps 1..s (current included);
    q_pos: [n] position t of each row; segments: (b, start, end) row ranges per sequence.
    Returns [n, Hq, d].
    """
    n, hq, d = q.shape
    hkv = k0.shape[2]
    group = hq // hkv
    scale = d**-0.5
    outs = []
    for b, lo, hi in segments:
        m = hi - lo
        pos = q_pos[lo:hi]
        span = int(pos.max()) + 1  # keys past the last query position are never visible
        qb = q[lo:hi].reshape(m, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, m, d]
        kb = k0[b, :span].permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, d, span]
        vb = v0[b, :span].permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, span, d]
        prefix = torch.matmul(qb, kb) * scale  # [Hkv, G, m, span]
        hidden = torch.arange(span, device=q.device)[None, :] > pos[:, None]
        prefix = prefix.masked_fill(hidden, float("-inf"))
        dk = diag_k[lo:hi].permute(2, 0, 3, 1).unsqueeze(1)  # [Hkv, 1, m, d, s]
        diag = torch.matmul(qb.unsqueeze(-2), dk).squeeze(-2) * scale  # [Hkv, G, m, s]
        scores = torch.cat([prefix, diag], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
        probs = probs.to(q.dtype)
        out = torch.matmul(probs[..., :span], vb)  # [Hkv, G, m, d]
        dv = diag_v[lo:hi].permute(2, 0, 1, 3).unsqueeze(1)  # [Hkv, 1, m, s, d]
        out = out + torch.matmul(probs[..., span:].unsqueeze(-2), dv).squeeze(-2)
        outs.append(out.permute(2, 0, 1, 3).reshape(m, hq, d))
    return torch.cat(outs, dim=0)


class _PrefixPlusDiagonal(torch.autograd.Function):
    """softmax over [prefix keys (masked) ‖ per-query diagonal keys] with the prefix part on the
    fused CPU flash-attention kernel.

    Forward: (o_p, lse_p) from the kernel, diagonal scores d explicitly, then merge by
    log-sum-exp. Backward: the prefix gradients come from the kernel's own backward fed with the
    *merged* output and log-sum-exp (its P = exp(S - lse_total) and D = rowsum(dO * O_total) are
    then exactly the merged attention's), the diagonal ones by hand. Shapes: q [H, m, d],
    k/v [H, S, d], mask [m, S] additive, diag_k/diag_v [H, m, s, d].
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, diag_k, diag_v, scale):  # type: ignore[override]
        o_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, False, attn_mask=mask[None, None], scale=scale
        )
        o_p, lse_p = o_p[0], lse_p[0].to(q.dtype)  # [H, m, d], [H, m]
        diag = torch.matmul(diag_k, q.unsqueeze(-1)).squeeze(-1) * scale  # [H, m, s]
        lse = torch.logaddexp(lse_p, torch.logsumexp(diag, dim=-1))
        w_diag = torch.exp(diag - lse.unsqueeze(-1))
        out = torch.exp(lse_p - lse).unsqueeze(-1) * o_p
        out = out + torch.matmul(w_diag.unsqueeze(-2), diag_v).squeeze(-2)
        ctx.save_for_backward(q, k, v, mask, diag_k, diag_v, out, lse, w_diag)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, mask, diag_k, diag_v, out, lse, w_diag = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out[None],
            q[None],
            k[None],
            v[None],
            out[None],
            lse[None],
            0.0,
            False,
            attn_mask=mask[None, None],
            scale=ctx.scale,
        )
        delta = (grad_out * out).sum(-1, keepdim=True)  # [H, m, 1]
        dot = torch.matmul(diag_v, grad_out.unsqueeze(-1)).squeeze(-1)  # [H, m, s]
        d_diag = w_diag * (dot - delta) * ctx.scale
        dq = dq[0] + torch.matmul(d_diag.unsqueeze(-2), diag_k).squeeze(-2)
        d_diag_k = d_diag.unsqueeze(-1) * q.unsqueeze(-2)
        d_diag_v = w_diag.unsqueeze(-1) * grad_out.unsqueeze(-2)
        return dq, dk[0], dv[0], None, d_diag_k, d_diag_v, None


def ttt_attention_sdpa(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    diag_k: torch.Tensor,
    diag_v: torch.Tensor,
    q_pos: torch.Tensor,
    segments: list[tuple[int, int, int]],
) -> torch.Tensor:
    """Same contract as ``ttt_attention_explicit``; on CPU the prefix part runs on the fused
    flash-attention kernel (no [m, T] score tensors kept for backward), elsewhere it falls back
    to the explicit version."""
    if q.device.type != "cpu":
        return ttt_attention_explicit(q, k0, v0, diag_k, diag_v, q_pos, segments)
    hq, d = q.shape[1], q.shape[2]
    group = hq // k0.shape[2]
    outs = []
    for b, lo, hi in segments:
        pos = q_pos[lo:hi]
        span = int(pos.max()) + 1
        hidden = torch.arange(span, device=q.device)[None, :] > pos[:, None]
        mask = torch.zeros(hi - lo, span, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(hidden, float("-inf"))
        keys = k0[b, :span].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, span, d]
        values = v0[b, :span].repeat_interleave(group, dim=1).transpose(0, 1)
        dk = diag_k[lo:hi].repeat_interleave(group, dim=2).permute(2, 0, 1, 3)  # [Hq, m, s, d]
        dv = diag_v[lo:hi].repeat_interleave(group, dim=2).permute(2, 0, 1, 3)
        out = _PrefixPlusDiagonal.apply(
            q[lo:hi].transpose(0, 1).contiguous(),
            keys.contiguous(),
            values.contiguous(),
            mask,
            dk,
            dv,
            d**-0.5,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if compiled else flex_attention


def ttt_attention_flex(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    diag_k: torch.Tensor,
    diag_v: torch.Tensor,
    q_pos: torch.Tensor,
    q_batch: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``ttt_attention_explicit`` as one flex_attention call.

    Keys are [all step-0 keys of all sequences (B*T) ‖ diagonal keys step-major (s*n)]; the block
    mask admits a step-0 key iff same sequence and position <= t, and a diagonal key iff it belongs
    to the query's own row.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n, hq, d = q.shape
    bsz, length, hkv, _ = k0.shape
    steps = diag_k.shape[1]
    prefix_len = bsz * length

    def mask_mod(b, h, qi, kv):
        in_prefix = kv < prefix_len
        same_seq = (kv // length) == q_batch[qi]
        causal = (kv % length) <= q_pos[qi]
        own_row = ((kv - prefix_len) % n) == qi
        return (in_prefix & same_seq & causal) | (~in_prefix & own_row)

    keys = torch.cat([k0.reshape(prefix_len, hkv, d), diag_k.transpose(0, 1).reshape(-1, hkv, d)])
    values = torch.cat([v0.reshape(prefix_len, hkv, d), diag_v.transpose(0, 1).reshape(-1, hkv, d)])
    total = prefix_len + steps * n
    block_mask = create_block_mask(mask_mod, 1, None, n, total, device=q.device)
    kernel = _flex_kernel(q.device.type == "cuda")
    out = kernel(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        block_mask=block_mask,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)
