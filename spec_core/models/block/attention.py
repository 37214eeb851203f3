"""Block-parallel drafting layout (DFlash, DSpark): anchors, labels, the block mask, attention.

One training forward drafts ``A`` blocks of ``S`` slots per sequence at once:

* **Anchors** are sampled among positions p with ``loss_mask[p] = loss_mask[p+1] = 1`` (the anchor
  is a response token and its first label is supervised), uniformly without replacement, sorted.
  The count is always ``A`` - when a sequence has fewer candidates the rest are padding anchors
  (``keep = False``, position 0, weight 0) so every batch has the same query length ``A x S``
  (no recompiles under flex_attention).
* **Noise input**: block slot 0 holds the real anchor token, slots 1..S-1 the MASK token.
* **Keys/values** are ``[T context rows ‖ A x S block rows]``. Block ``a`` attends to context rows
  strictly before its anchor and bidirectionally to its own block, never to other blocks. A padding
  block attends only to its own block: its output is never used, and keeping at least one visible
  key per row keeps softmax finite (a NaN row would poison weight gradients through ``0 x NaN``).
* **Predictions**: prediction i (0-based) of a block is trained toward the token at
  ``anchor + i + 1``. DFlash reads it from slot ``i + 1`` (slot k predicts anchor + k, slot 0 only
  carries the anchor: ``S - 1`` predictions); DSpark reads it from slot ``i`` (slot j predicts
  anchor + j + 1, the anchor slot predicts too: ``S`` predictions). A prediction counts while the
  block is kept and every label up to it is in bounds and supervised (a contiguous prefix: a block
  never drafts across an unsupervised gap at decode time); its loss weight is ``exp(-i / gamma)``.

Two attention paths with identical results: ``sdpa`` (a dense boolean mask; CPU training) and
``flex`` (one flex_attention call with a block mask; CUDA training - flex has no CPU backward).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BlockPlan:
    """Where one micro-batch drafts: fixed before the forward, so the pooled loss denominator
    (the sum of ``weight``) is known before any backward."""

    anchors: torch.Tensor  # [B, A] int64 anchor positions (0 for padding anchors)
    keep: torch.Tensor  # [B, A] bool, False for padding anchors
    label_pos: torch.Tensor  # [B, A, P] int64 anchor + i + 1 (clamped into the sequence)
    mask: torch.Tensor  # [B, A, P] bool, prediction i counts (contiguous prefix per block)
    weight: torch.Tensor  # [B, A, P] float32 mask * exp(-i / gamma)

    def to(self, device: torch.device | str) -> BlockPlan:
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        return BlockPlan(**moved)

    @property
    def total_weight(self) -> float:
        return float(self.weight.double().sum())


def anchor_candidates(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: p is a candidate iff tokens p and p+1 are real and supervised."""
    sup = loss_mask.bool() & attention_mask.bool()
    valid = torch.zeros_like(sup)
    valid[:, :-1] = sup[:, :-1] & sup[:, 1:]
    return valid


def sample_anchors(
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    num_anchors: int,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [B, A] sorted ascending among kept ones, keep [B, A]) - exactly A per sequence."""
    valid = anchor_candidates(loss_mask, attention_mask)
    bsz, length = valid.shape
    keys = torch.rand(bsz, length, generator=generator, device=valid.device)
    keys = keys.masked_fill(~valid, 2.0)  # candidates first, in random order
    order = keys.argsort(dim=1)
    if length < num_anchors:
        order = F.pad(order, (0, num_anchors - length))
    picked = order[:, :num_anchors]
    keep = torch.arange(num_anchors, device=valid.device)[None, :] < valid.sum(dim=1, keepdim=True)
    picked = picked.masked_fill(~keep, length)  # padding anchors sort last
    anchors = picked.sort(dim=1).values.masked_fill(~keep, 0)
    return anchors, keep


def make_plan(
    input_len: int,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    num_predictions: int,
    gamma: float,
) -> BlockPlan:
    """Labels and weights of every prediction of every block (see the module docstring)."""
    offsets = torch.arange(1, num_predictions + 1, device=anchors.device)
    label_pos = anchors[:, :, None] + offsets  # [B, A, P]
    in_bounds = label_pos < input_len
    safe = label_pos.clamp(max=input_len - 1)
    sup = (loss_mask.bool() & attention_mask.bool()).gather(1, safe.flatten(1)).view_as(safe)
    mask = (keep[:, :, None] & in_bounds & sup).int().cumprod(dim=-1).bool()
    decay = torch.exp(-torch.arange(num_predictions, dtype=torch.float32) / gamma)
    weight = mask.float() * decay.to(anchors.device)
    return BlockPlan(anchors, keep, safe, mask, weight)


def block_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, A*S] RoPE positions of the block rows: anchor + slot."""
    slots = torch.arange(block_size, device=anchors.device)
    return (anchors[:, :, None] + slots).flatten(1)


def block_mask_dense(
    anchors: torch.Tensor, keep: torch.Tensor, context_len: int, block_size: int
) -> torch.Tensor:
    """[B, A*S, T + A*S] bool: which key each block row may attend to (True = visible)."""
    bsz, num_blocks = anchors.shape
    q_block = torch.arange(num_blocks * block_size, device=anchors.device) // block_size
    kv = torch.arange(context_len + num_blocks * block_size, device=anchors.device)
    anchor_q = anchors[:, q_block]  # [B, Q]
    keep_q = keep[:, q_block]
    context = (kv[None, None, :] < context_len) & (kv[None, None, :] < anchor_q[:, :, None])
    context = context & keep_q[:, :, None]
    own_block = ((kv - context_len) // block_size)[None, :] == q_block[:, None]
    own_block = own_block & (kv >= context_len)[None, :]
    return context | own_block[None]


def sdpa_attend(mask: torch.Tensor) -> Attend:
    """Masked SDPA over ``[B, N, H, d]`` tensors with a ``[B, Q, KV]`` boolean mask."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None],
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    return attend


def flex_mask_mod(anchors: torch.Tensor, keep: torch.Tensor, context_len: int, block_size: int):
    """The same rule as ``block_mask_dense`` as a flex_attention ``mask_mod``."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_block = q_idx // block_size
        in_context = kv_idx < context_len
        before_anchor = kv_idx < anchors[b, q_block]
        own_block = (kv_idx - context_len) // block_size == q_block
        return (in_context & before_anchor & keep[b, q_block]) | (~in_context & own_block)

    return mask_mod


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if compiled else flex_attention


def flex_attend(
    anchors: torch.Tensor, keep: torch.Tensor, context_len: int, block_size: int
) -> Attend:
    """flex_attention with one block mask built per forward and shared by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    bsz, num_blocks = anchors.shape
    q_len = num_blocks * block_size
    block_mask = create_block_mask(
        flex_mask_mod(anchors, keep, context_len, block_size),
        bsz,
        None,
        q_len,
        context_len + q_len,
        device=anchors.device,
    )
    kernel = _flex_kernel(anchors.device.type == "cuda")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = kernel(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    return attend


def block_attend(
    backend: str, anchors: torch.Tensor, keep: torch.Tensor, context_len: int, block_size: int
) -> Attend:
    if backend == "flex":
        return flex_attend(anchors, keep, context_len, block_size)
    return sdpa_attend(block_mask_dense(anchors, keep, context_len, block_size))
