"""DSpark heads and loss terms: Markov bias and teacher forcing, L1 = 2(1 - sum min(p, q)),
detached confidence target, CE-only without last hidden states, pre-norm last hidden states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_dflash_model import (
    DSPARK_HEADS,
    HIDDEN,
    VOCAB,
    grads,
    head,
    plan_for,
    random_batch,
    tiny_config,
    tiny_model,
)

from spec_core.models.block.dspark import MarkovHead
from spec_core.models.block.losses import COL, BlockRows, LossWeights, block_loss, pooled_scale
from spec_core.models.common.target import TargetProjection


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_markov_bias_shapes_and_teacher_forcing(kind: str):
    config = tiny_config("dspark", **{**DSPARK_HEADS, "markov_head_type": kind})
    model = tiny_model(config)
    ids, attn, loss, _, _ = random_batch()
    plan = plan_for(config, ids, attn, loss)
    prev = model.prev_ids(ids, plan)
    # prev of prediction 0 is the anchor token, of prediction j the label of prediction j - 1
    assert torch.equal(prev[:, :, 0], ids.gather(1, plan.anchors))
    labels = ids.gather(1, plan.label_pos.flatten(1)).view_as(plan.label_pos)
    both = plan.mask[:, :, 1:]
    assert torch.equal(prev[:, :, 1:][both], labels[:, :, :-1][both])

    markov: MarkovHead = model.markov_head
    hidden = torch.randn(*prev.shape, HIDDEN, dtype=torch.float64)
    bias = markov.bias(prev, hidden)
    assert bias.shape == (*prev.shape, VOCAB)
    assert markov.latent(prev, hidden).shape == (*prev.shape, 6)
    if kind == "vanilla":  # b(prev) = W2 W1[prev], independent of the hidden state
        expected = markov.markov_w1.weight[prev] @ markov.markov_w2.weight.T
        assert torch.allclose(bias, expected)
        assert torch.allclose(bias, markov.bias(prev, torch.zeros_like(hidden)))
    changed = prev.clone()
    changed[:, :, 2] = (changed[:, :, 2] + 1) % VOCAB
    diff = (markov.bias(changed, hidden) - bias).abs().amax(dim=-1)  # [B, A, P]
    assert diff[:, :, :2].eq(0).all() and diff[:, :, 2].gt(0).all()  # never looks ahead
    if kind == "rnn":  # the recurrence carries the prefix to later slots
        assert diff[:, :, 3].gt(0).all()
    else:
        assert diff[:, :, 3].eq(0).all()


def test_l1_term_is_two_times_one_minus_overlap():
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 9, 30
    head_w = torch.randn(vocab, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, 16, generator=gen, dtype=torch.float64)
    target_hidden = torch.randn(rows, 16, generator=gen, dtype=torch.float64)
    block = BlockRows(
        x=x,
        labels=torch.randint(0, vocab, (rows,), generator=gen),
        weight=torch.ones(rows, dtype=torch.float64),
        slot=torch.arange(rows) % 3,
        target_hidden=target_hidden,
    )
    _, metrics, alpha = block_loss(
        block, head_w, 3, pooled_scale(rows, 1), LossWeights(ce=0.1, l1=0.9), chunk_rows=4
    )
    p, q = torch.softmax(x @ head_w.T, -1), torch.softmax(target_hidden @ head_w.T, -1)
    overlap = torch.minimum(p, q).sum(-1)
    l1 = (p - q).abs().sum(-1)
    assert torch.allclose(l1, 2 * (1 - overlap))
    per_slot = torch.zeros(3, dtype=torch.float64).index_add(0, block.slot, l1)
    assert torch.allclose(metrics[:, COL["l1"]], per_slot)
    assert torch.allclose(alpha, overlap)  # the acceptance proxy is sum_v min(p, q)


def test_confidence_target_is_detached():
    """With only the BCE term, nothing that shapes p (the Markov W2, the backbone through the
    logits) may receive a gradient from alpha; only the confidence head and its inputs do."""
    extra = {
        **DSPARK_HEADS,
        "confidence_head_with_markov": False,
        "specflow": {"ce_weight": 0.0, "l1_weight": 0.0, "confidence_weight": 1.0},
    }
    config = tiny_config("dspark", **extra)
    model = tiny_model(config)
    ids, attn, loss, aux, last = random_batch()
    plan = plan_for(config, ids, attn, loss)
    value, metrics = model(
        ids, aux, plan, head(), pooled_scale(plan.total_weight, 1), last_hidden=last
    )
    value.backward()
    g = grads(model)
    assert g["confidence_head.proj.weight"].abs().sum() > 0
    assert g["layers.0.mlp.down_proj.weight"].abs().sum() > 0  # through the head's features
    assert g["markov_head.markov_w2.weight"].abs().sum() == 0  # W2 only moves p, hence alpha
    assert g["markov_head.markov_w1.weight"].abs().sum() == 0
    assert metrics[:, COL["w_bce"]].sum() > 0 and metrics[:, COL["w_ce"]].sum() > 0  # logged


def test_ce_only_dspark_needs_no_last_hidden_states():
    extra = {
        **DSPARK_HEADS,
        "enable_confidence_head": False,
        "confidence_head_with_markov": False,
        "specflow": {"ce_weight": 1.0, "l1_weight": 0.0, "confidence_weight": 1.0},
    }
    config = tiny_config("dspark", **extra)
    model = tiny_model(config)
    assert not model.needs_last_hidden and model.confidence_head is None
    ids, attn, loss, aux, _ = random_batch()
    plan = plan_for(config, ids, attn, loss)
    value, metrics = model(ids, aux, plan, head(), pooled_scale(plan.total_weight, 1))
    value.backward()
    assert torch.isfinite(value) and metrics[:, COL["count"]].sum() == plan.mask.sum()
    assert metrics[:, COL["w_l1"]].sum() == 0 and metrics[:, COL["accept"]].sum() == 0
    assert grads(model)["markov_head.markov_w2.weight"].abs().sum() > 0

    with_l1 = tiny_model(tiny_config("dspark", **DSPARK_HEADS))
    with pytest.raises(ValueError, match="last hidden states"):
        with_l1(ids, aux, plan, head(), pooled_scale(plan.total_weight, 1))


def test_prenorm_last_hidden_gets_the_target_final_norm():
    config = tiny_config("dspark", **DSPARK_HEADS)
    model = tiny_model(config)
    ids, attn, loss, aux, last = random_batch()
    plan = plan_for(config, ids, attn, loss)
    norm_weight = torch.rand(HIDDEN, dtype=torch.float64) + 0.5
    post = norm_weight * F.rms_norm(last, (HIDDEN,), eps=1e-5)
    scale = pooled_scale(plan.total_weight, 1)
    base = head()
    with torch.no_grad():
        a, ma = model(ids, aux, plan, base, scale, last_hidden=post)
        prenorm = TargetProjection(base.weight, None, norm_weight, 1e-5)
        b, mb = model(ids, aux, plan, prenorm, scale, last_hidden=last)
        c, _ = model(ids, aux, plan, base, scale, last_hidden=last)
    assert torch.allclose(a, b) and torch.allclose(ma, mb)
    assert not torch.allclose(a, c)  # the norm matters: skipping it changes the L1 term
