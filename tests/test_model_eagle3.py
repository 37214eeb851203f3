"""EAGLE-3 draft: export names, alignment, the optimized TTT forward vs a naive dense oracle,
attention backends, decoding, the chunked loss and pooled normalization."""

from __future__ import annotations

import pytest
import torch

from spec_core.models.common.target import TargetProjection
from spec_core.models.eagle3.attention import (
    row_segments,
    ttt_attention_explicit,
    ttt_attention_flex,
    ttt_attention_sdpa,
)
from spec_core.models.eagle3.config import Eagle3Config
from spec_core.models.eagle3.losses import (
    chunked_soft_ce,
    label_rows,
    pooled_scales,
    step_valid,
    summarize,
    supervised_counts,
)
from spec_core.models.eagle3.model import Eagle3Draft
from spec_core.models.eagle3.reference import reference_loss, reference_ttt_hidden

V, H = 300, 32


def tiny_config(draft_vocab: int = 120, ttt: int = 4) -> Eagle3Config:
    return Eagle3Config(
        hidden_size=H,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=V,
        draft_vocab_size=draft_vocab,
        target_hidden_size=H,
        rope_theta=10000.0,
        specflow={"capture_indices": [1, 2, 3], "ttt_length": ttt},
    )


def tiny_model(draft_vocab: int = 120, seed: int = 0, std: float = 0.2) -> Eagle3Draft:
    model = Eagle3Draft(tiny_config(draft_vocab)).double()
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(gen, std=std)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.randn(V, H, generator=gen, dtype=torch.float64))
    if draft_vocab < V:
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[torch.randperm(V, generator=gen)[:draft_vocab]] = True
        model.set_vocab_map(t2d.nonzero().squeeze(1) - torch.arange(draft_vocab), t2d)
    return model


def random_batch(seed: int = 0, lengths=(17, 11, 5), density: float = 0.6):
    gen = torch.Generator().manual_seed(seed)
    bsz, length = len(lengths), max(lengths)
    ids = torch.randint(0, V, (bsz, length), generator=gen)
    attn = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    loss_mask = ((torch.rand(bsz, length, generator=gen) < density) & attn).to(torch.uint8)
    aux = torch.randn(bsz, length, 3 * H, generator=gen, dtype=torch.float64)
    last = torch.randn(bsz, length, H, generator=gen, dtype=torch.float64)
    return ids, attn, loss_mask, aux, last


def grads(model: Eagle3Draft) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_parameter_names_are_the_hf_export_names():
    pruned = Eagle3Draft(tiny_config(120))
    names = set(pruned.state_dict())
    assert names == {
        "embed_tokens.weight",
        "fc.weight",
        "midlayer.self_attn.q_proj.weight",
        "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight",
        "midlayer.self_attn.o_proj.weight",
        "midlayer.mlp.gate_proj.weight",
        "midlayer.mlp.up_proj.weight",
        "midlayer.mlp.down_proj.weight",
        "midlayer.hidden_norm.weight",
        "midlayer.input_layernorm.weight",
        "midlayer.post_attention_layernorm.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
    }
    sd = pruned.state_dict()
    assert sd["d2t"].dtype == torch.int64 and sd["d2t"].shape == (120,)
    assert sd["t2d"].dtype == torch.bool and sd["t2d"].shape == (V,)
    assert sd["lm_head.weight"].shape == (120, H)
    assert sd["fc.weight"].shape == (H, 3 * H)
    assert sd["midlayer.self_attn.q_proj.weight"].shape == (4 * 8, 2 * H)
    assert not pruned.embed_tokens.weight.requires_grad
    full = Eagle3Draft(tiny_config(V))
    assert "d2t" not in full.state_dict() and "t2d" not in full.state_dict()


def test_alignment_hand_built_example():
    # x:     x0 x1 x2 x3 x4 x5 | pad
    # mask:   0  0  1  1  0  1 |  0   (x2, x3, x5 supervised)
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1, 0]], dtype=torch.uint8)
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    # target row u is used iff x_{u+1} exists and is supervised: u = 1 (x2), 2 (x3), 4 (x5)
    assert label_rows(loss_mask, attn)[0].nonzero().squeeze(1).tolist() == [1, 2, 4]
    valid = step_valid(label_rows(loss_mask, attn), 3)[:, 0]
    # step k at position t feeds embed(x_{t+1+k}) and predicts x_{t+2+k}
    assert valid[0].nonzero().squeeze(1).tolist() == [0, 1, 3]  # labels x2, x3, x5
    assert valid[1].nonzero().squeeze(1).tolist() == [0, 2]  # labels x3, x5
    assert valid[2].nonzero().squeeze(1).tolist() == [1]  # label x5
    assert supervised_counts(loss_mask, attn, 3).tolist() == [3, 2, 1]


@pytest.mark.parametrize("draft_vocab", [120, V])
@pytest.mark.parametrize("chunk_rows", [5, 1024])
def test_forward_matches_naive_dense_reference(draft_vocab: int, chunk_rows: int):
    model = tiny_model(draft_vocab)
    ids, attn, loss_mask, aux, last = random_batch(1)
    target_w = torch.randn(V, H, dtype=torch.float64)
    scales = pooled_scales(supervised_counts(loss_mask, attn, 4), 4, 0.8)
    proj = TargetProjection.build(target_w, model.vocab_t2d)
    loss, metrics = model(ids, attn, loss_mask, aux, last, proj, scales, chunk_rows)
    loss.backward()
    ours = grads(model)
    ref, ref_metrics = reference_loss(model, ids, attn, loss_mask, aux, last, target_w, scales)
    ref.backward()
    theirs = grads(model)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics, ref_metrics, rtol=1e-12, atol=1e-10)
    assert set(ours) == set(theirs) and "embed_tokens.weight" not in ours
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_loss_equals_full_vocab_float64():
    gen = torch.Generator().manual_seed(7)
    m, n, vd, vt, h = 40, 13, 50, 80, 16
    x = torch.randn(m, h, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vd, h, generator=gen, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, h, generator=gen, dtype=torch.float64)
    tw = torch.randn(vt, h, generator=gen, dtype=torch.float64)
    t2d = torch.zeros(vt, dtype=torch.bool)
    t2d[torch.randperm(vt, generator=gen)[:vd]] = True
    row_target = torch.sort(torch.randint(0, n, (m,), generator=gen)).values
    row_step = torch.randint(0, 3, (m,), generator=gen)
    row_weight = torch.rand(m, generator=gen, dtype=torch.float64)
    proj = TargetProjection.build(tw, t2d)
    loss, metrics = chunked_soft_ce(x, w, th, proj, row_target, row_weight, row_step, 3, 6)
    loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    # naive: full [N, V_target] logits, restrict to the draft vocab, full softmax CE
    full = th @ tw.T
    p = torch.softmax(full[:, t2d], -1)[row_target]
    logq = torch.log_softmax(x @ w.T, -1)
    ce = -(p * logq).sum(-1)
    ref = (ce * row_weight).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gx, x.grad, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gw, w.grad, rtol=1e-12, atol=1e-13)
    in_vocab = t2d[full.argmax(-1)][row_target]
    correct = (logq.argmax(-1) == full[:, t2d].argmax(-1)[row_target]) & in_vocab
    for k in range(3):
        sel = row_step == k
        assert metrics[k, 0] == sel.sum()
        torch.testing.assert_close(metrics[k, 1], ce[sel].sum().detach())
        assert metrics[k, 2] == correct[sel].sum()
        assert metrics[k, 3] == in_vocab[sel].sum()


def test_pooled_normalization_equals_one_big_batch():
    """Split a batch over 2 simulated ranks x 2 micro-batches: with w_k/N_k pooled (times world
    size, as DP averages gradients) the loss and gradients equal the single-batch ones."""
    model = tiny_model(120)
    ids, attn, loss_mask, aux, last = random_batch(5, lengths=(17, 11, 5, 14), density=0.5)
    target_w = torch.randn(V, H, dtype=torch.float64)
    proj = TargetProjection.build(target_w, model.vocab_t2d)
    counts = supervised_counts(loss_mask, attn, 4)
    whole, _ = model(ids, attn, loss_mask, aux, last, proj, pooled_scales(counts, 4, 0.8))
    whole.backward()
    expected = grads(model)

    world = 2
    scales = pooled_scales(counts, 4, 0.8, world_size=world)
    rank_grads, total = [], torch.zeros((), dtype=torch.float64)
    for rank in range(world):
        for micro in (2 * rank, 2 * rank + 1):
            sl = slice(micro, micro + 1)
            part, _ = model(ids[sl], attn[sl], loss_mask[sl], aux[sl], last[sl], proj, scales)
            part.backward()
            total = total + part.detach() / world
        rank_grads.append(grads(model))
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-12)
    for name, g in expected.items():
        averaged = sum(rg[name] for rg in rank_grads) / world  # what the DP reduction does
        torch.testing.assert_close(averaged, g, rtol=1e-10, atol=1e-13, msg=name)


def test_zero_supervision_reaches_every_weight_with_zero_gradient():
    model = tiny_model(120)
    ids, attn, _, aux, last = random_batch(2)
    loss_mask = torch.zeros_like(ids, dtype=torch.uint8)
    proj = TargetProjection.build(torch.randn(V, H, dtype=torch.float64), model.vocab_t2d)
    loss, metrics = model(
        ids, attn, loss_mask, aux, last, proj, torch.zeros(4, dtype=torch.float64)
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics.abs().sum() == 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() == 0, name


def _packed_inputs(seed: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    bsz, length, hq, hkv, d = 3, 9, 4, 2, 8
    need = torch.rand(bsz, length, generator=gen) < 0.6
    rows = need.reshape(-1).nonzero().squeeze(1)
    q_batch, q_pos = rows // length, rows % length
    n = rows.numel()
    q = torch.randn(n, hq, d, generator=gen)
    k0 = torch.randn(bsz, length, hkv, d, generator=gen)
    v0 = torch.randn(bsz, length, hkv, d, generator=gen)
    dk = torch.randn(n, steps, hkv, d, generator=gen)
    dv = torch.randn(n, steps, hkv, d, generator=gen)
    segments = row_segments(q_batch, bsz)
    return q, k0, v0, dk, dv, q_pos, q_batch, segments


@pytest.mark.parametrize("steps", [1, 3])
def test_ttt_attention_paths_agree(steps: int):
    """flex (forward only on CPU), fused-SDPA and explicit scores: same outputs; the fused path's
    custom backward equals autograd through the explicit one."""
    q, k0, v0, dk, dv, q_pos, q_batch, segments = _packed_inputs(steps, steps)
    explicit = ttt_attention_explicit(q, k0, v0, dk, dv, q_pos, segments)
    flex = ttt_attention_flex(q, k0, v0, dk, dv, q_pos, q_batch)
    torch.testing.assert_close(flex, explicit, rtol=1e-5, atol=1e-5)
    inputs = [t.double().requires_grad_() for t in (q, k0, v0, dk, dv)]
    fused = ttt_attention_sdpa(*inputs, q_pos, segments)
    grad = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, inputs, grad)
    reference = ttt_attention_explicit(*inputs, q_pos, segments)
    reference_grads = torch.autograd.grad(reference, inputs, grad)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_flex_model_forward_matches_sdpa_on_cpu():
    model = tiny_model(120).float()
    ids, attn, loss_mask, aux, last = random_batch(4)
    target_w = torch.randn(V, H)
    proj = TargetProjection.build(target_w, model.vocab_t2d)
    scales = pooled_scales(supervised_counts(loss_mask, attn, 4), 4, 0.8)
    with torch.no_grad():
        sdpa, m1 = model(ids, attn, loss_mask, aux.float(), last.float(), proj, scales)
        model.attention_backend = "flex"
        flex, m2 = model(ids, attn, loss_mask, aux.float(), last.float(), proj, scales)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2[:, 1], m1[:, 1], rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_flex_and_sdpa_agree_forward_backward_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(120).float().cuda()
    ids, attn, loss_mask, aux, last = (t.cuda() for t in random_batch(4))
    proj = TargetProjection.build(torch.randn(V, H).cuda(), model.vocab_t2d)
    scales = pooled_scales(supervised_counts(loss_mask, attn, 4), 4, 0.8).cuda()
    results = []
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        loss, _ = model(ids, attn, loss_mask, aux.float(), last.float(), proj, scales)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-3, atol=1e-4, msg=name)


def test_incremental_decode_reproduces_ttt_steps():
    """Chain drafting with a KV cache sees exactly what TTT step k sees at position t."""
    model = tiny_model(120)
    ids, _, _, aux, _ = random_batch(6, lengths=(12,))
    steps = 4
    dense = reference_ttt_hidden(model, ids, aux, steps)
    t = 6
    with torch.no_grad():
        hidden = model.project_features(aux[:, : t + 1])
        out, cache = model.decode(ids[:, 1 : t + 2], hidden, torch.arange(t + 1)[None])
        torch.testing.assert_close(out[:, -1], dense[0][:, t])
        for k in range(1, steps):
            out, cache = model.decode(
                ids[:, t + 1 + k : t + 2 + k], out[:, -1:], torch.tensor([[t + k]]), cache
            )
            torch.testing.assert_close(out[:, -1], dense[k][:, t], msg=f"step {k}")
        assert cache[0].shape[1] == t + steps


def test_summarize_simulated_acceptance():
    sums = torch.tensor(
        [[10, 5.0, 8, 9], [10, 6.0, 5, 10], [5, 3.0, 0, 5]], dtype=torch.float64
    )  # count, ce, correct, in_vocab
    s = summarize(sums, 0.8)
    assert s["acc_k"] == [0.8, 0.5, 0.0]
    assert s["acc_in_vocab_k"] == pytest.approx([8 / 9, 0.5, 0.0])
    assert s["sim_acc_len"] == pytest.approx(0.8 + 0.8 * 0.5)
    assert s["tau_sim"] == pytest.approx(1 + 0.8 + 0.4)
    assert s["loss"] == pytest.approx(0.5 + 0.8 * 0.6 + 0.64 * 0.6)
