"""DFlash block layout and model: anchors, block mask, label alignment, loss vs a naive oracle,
pooled normalization, flex == SDPA, config/capture derivation. Tiny shapes, float64 where exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spec_core.config import load_config
from spec_core.errors import ConfigError
from spec_core.models import capture_spec_for, get_algorithm
from spec_core.models.block.attention import (
    anchor_candidates,
    block_mask_dense,
    flex_mask_mod,
    make_plan,
    sample_anchors,
)
from spec_core.models.block.config import (
    BlockDraftConfig,
    default_capture_indices,
    default_layer_ids,
    derive_block_config,
    resolve_mask_token_id,
)
from spec_core.models.block.dflash import DFlashDraft
from spec_core.models.block.dspark import DSparkDraft
from spec_core.models.block.losses import COL, LossWeights, pooled_scale
from spec_core.models.common.target import TargetProjection

VOCAB, HIDDEN, AUX = 40, 32, 3


def tiny_config(algorithm: str = "dflash", block_size: int = 4, **kw) -> BlockDraftConfig:
    specflow = {"num_anchors": 3, "loss_decay_gamma": 3.0}
    specflow.update(kw.pop("specflow", {}))
    return BlockDraftConfig(
        algorithm=algorithm,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        target_hidden_size=HIDDEN,
        target_num_hidden_layers=6,
        capture_indices=[2, 3, 5],
        block_size=block_size,
        mask_token_id=VOCAB - 1,
        specflow=specflow,
        **kw,
    )


def tiny_model(config: BlockDraftConfig, seed: int = 0, backend: str = "sdpa") -> DFlashDraft:
    cls = DSparkDraft if config.algorithm == "dspark" else DFlashDraft
    model = cls(config, backend)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        model.embed_tokens.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen))
        for name, p in model.named_parameters():  # non-zero Markov W2 for a real bias
            if name.endswith("markov_w2.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.double()


def random_batch(seed: int = 0, lengths=(20, 14), supervised_from=(6, 3)):
    gen = torch.Generator().manual_seed(seed)
    bsz, width = len(lengths), max(lengths)
    ids = torch.randint(0, VOCAB - 1, (bsz, width), generator=gen)
    attn = torch.zeros(bsz, width, dtype=torch.bool)
    loss = torch.zeros(bsz, width, dtype=torch.uint8)
    for b, (n, s) in enumerate(zip(lengths, supervised_from, strict=True)):
        attn[b, :n] = True
        loss[b, s:n] = 1
    aux = torch.randn(bsz, width, AUX * HIDDEN, generator=gen, dtype=torch.float64)
    last = torch.randn(bsz, width, HIDDEN, generator=gen, dtype=torch.float64)
    return ids, attn, loss, aux, last


def head(seed: int = 3) -> TargetProjection:
    gen = torch.Generator().manual_seed(seed)
    return TargetProjection(torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64), None)


def plan_for(config, ids, attn, loss, seed=0, anchors=3):
    gen = torch.Generator().manual_seed(seed)
    a, keep = sample_anchors(loss, attn, anchors, gen)
    gamma = config.specflow["loss_decay_gamma"]
    return make_plan(ids.shape[1], loss, attn, a, keep, config.num_predictions, gamma)


# ----------------------------------------------------------------------------- anchors


def test_anchor_sampling_supervised_constant_count_and_padding():
    loss = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 1, 1, 0, 0],  # candidates 2, 3, 6 (p and p+1 supervised)
            [0, 1, 0, 1, 0, 1, 0, 0, 0, 0],  # no two supervised in a row: none
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],  # 8 candidates (0..7); p=8 has no supervised p+1
        ],
        dtype=torch.uint8,
    )
    attn = torch.ones_like(loss, dtype=torch.bool)
    attn[2, 6:] = False  # padding is never an anchor nor a label: candidates 0..4
    cand = anchor_candidates(loss, attn)
    assert cand[0].nonzero().flatten().tolist() == [2, 3, 6]
    assert not cand[1].any()
    assert cand[2].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    seen = set()
    for seed in range(20):
        anchors, keep = sample_anchors(loss, attn, 4, torch.Generator().manual_seed(seed))
        assert anchors.shape == keep.shape == (3, 4)  # constant count whatever the data
        assert keep.tolist() == [[True] * 3 + [False], [False] * 4, [True] * 4]
        assert anchors[0, :3].tolist() == [2, 3, 6]  # all candidates, sorted
        assert anchors[~keep].eq(0).all()
        kept = anchors[2].tolist()
        assert kept == sorted(kept) and len(set(kept)) == 4 and set(kept) <= {0, 1, 2, 3, 4}
        seen.add(tuple(kept))
        plan = make_plan(10, loss, attn, anchors, keep, 3, 7.0)
        assert not plan.mask[~keep].any() and plan.weight[~keep].eq(0).all()  # padding masked
    assert len(seen) > 1  # a random subset when there are more candidates than anchors
    again = sample_anchors(loss, attn, 4, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], sample_anchors(loss, attn, 4, torch.Generator().manual_seed(5))[0])


def test_plan_labels_are_a_contiguous_supervised_prefix_with_decay():
    loss = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.uint8)
    attn = torch.ones_like(loss, dtype=torch.bool)
    anchors, keep = torch.tensor([[1, 5]]), torch.tensor([[True, True]])
    plan = make_plan(8, loss, attn, anchors, keep, 4, 2.0)
    assert plan.label_pos[0, 0].tolist() == [2, 3, 4, 5]
    assert plan.mask[0, 0].tolist() == [True, True, False, False]  # 4 unsupervised: stop there
    assert plan.mask[0, 1].tolist() == [True, True, False, False]  # 8 is past the end
    decay = torch.exp(-torch.arange(4.0) / 2.0)
    assert torch.allclose(plan.weight[0, 0], decay * torch.tensor([1.0, 1, 0, 0]))
    assert plan.total_weight == pytest.approx(2 * float(decay[:2].sum()))


# ----------------------------------------------------------------------------- block mask


def test_block_mask_hand_drawn():
    # T=4 context rows, 2 blocks of S=2; block 0 anchored at 2, block 1 is padding.
    mask = block_mask_dense(torch.tensor([[2, 0]]), torch.tensor([[True, False]]), 4, 2)
    #   keys:   c0 c1 c2 c3 | b0s0 b0s1 | b1s0 b1s1
    expected = [
        [1, 1, 0, 0, 1, 1, 0, 0],  # block 0 slot 0: context < 2, own block (bidirectional)
        [1, 1, 0, 0, 1, 1, 0, 0],  # block 0 slot 1
        [0, 0, 0, 0, 0, 0, 1, 1],  # padding block: only itself (keeps softmax finite)
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]
    assert mask[0].int().tolist() == expected


def test_flex_mask_mod_matches_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask

    anchors = torch.tensor([[0, 3, 7], [2, 5, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    dense = block_mask_dense(anchors, keep, 9, 3)
    mod = flex_mask_mod(anchors, keep, 9, 3)
    flex = create_mask(mod, 2, 1, 9, 18, device="cpu")
    assert torch.equal(flex[:, 0], dense)


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_noise_inputs_and_label_alignment(algorithm: str):
    """DFlash slot k predicts anchor + k; DSpark slot j predicts anchor + j + 1."""
    config = tiny_config(algorithm)
    model = tiny_model(config)
    ids, attn, loss, _, _ = random_batch()
    plan = plan_for(config, ids, attn, loss)
    noise = model.noise_ids(ids, plan.anchors, plan.keep)
    assert torch.equal(noise[:, :, 0][plan.keep], ids.gather(1, plan.anchors)[plan.keep])
    assert noise[:, :, 1:].eq(config.mask_token_id).all()
    # a fake backbone output whose slot s holds the position anchor + s it sits at
    slot = torch.arange(config.block_size)
    positions = (plan.anchors[:, :, None] + slot).double()[..., None].expand(-1, -1, -1, HIDDEN)
    pred = model.prediction_hidden(positions)[..., 0]
    assert pred.shape[-1] == config.num_predictions == (3 if algorithm == "dflash" else 4)
    k = torch.arange(config.num_predictions)
    if algorithm == "dflash":  # prediction i is slot k = i + 1 and its label sits at anchor + k
        assert torch.equal(pred, (plan.anchors[:, :, None] + k + 1).double())
        assert torch.equal(plan.label_pos[plan.mask], pred.long()[plan.mask])
    else:  # prediction j is slot j and its label sits at anchor + j + 1
        assert torch.equal(pred, (plan.anchors[:, :, None] + k).double())
        assert torch.equal(plan.label_pos[plan.mask], pred.long()[plan.mask] + 1)


# ----------------------------------------------------------------------------- oracle


def naive_block_hidden(model: DFlashDraft, ids, aux, anchors, keep) -> torch.Tensor:
    """Each kept block alone: unmasked attention over [context before the anchor ; its block]."""
    from spec_core.models.block.attention import sdpa_attend

    out = torch.zeros(*anchors.shape, model.config.block_size, HIDDEN, dtype=torch.float64)
    context_all = model.hidden_norm(model.fc(aux))
    for b in range(ids.shape[0]):
        for a in range(anchors.shape[1]):
            if not keep[b, a]:
                continue
            p = int(anchors[b, a])
            block = model.noise_ids(
                ids[b : b + 1], anchors[b : b + 1, a : a + 1], keep[b : b + 1, a : a + 1]
            )
            h = model.embed_tokens(block.flatten(1))
            context = context_all[b : b + 1, :p]
            positions = torch.arange(p + model.config.block_size)[None]
            cos, sin = model.rotary_emb(h, positions)
            attend = sdpa_attend(
                torch.ones(1, model.config.block_size, positions.shape[1], dtype=torch.bool)
            )
            for layer in model.layers:
                h = layer(h, context, (cos[:, p:], sin[:, p:]), (cos, sin), attend)
            out[b, a] = model.norm(h)[0]
    return out


def reference_loss(model, ids, aux, last, plan, target, scale, weights: LossWeights):
    """Plain autograd over full logits: the definition the fused chunked loss must reproduce."""
    hidden = model.backbone(ids, aux, plan.anchors, plan.keep)
    pred = model.prediction_hidden(hidden)
    sel = plan.mask
    labels = ids.gather(1, plan.label_pos.flatten(1)).view_as(plan.label_pos)
    logits = pred @ target.weight.T
    markov = getattr(model, "markov_head", None)
    prev = ids.gather(1, (plan.label_pos - 1).flatten(1)).view_as(plan.label_pos)
    if markov is not None:
        logits = logits + markov.bias(prev, pred)
    logits, y, w = logits[sel], labels[sel], plan.weight[sel].double()
    ce = F.cross_entropy(logits, y, reduction="none")
    total = weights.ce * (w * ce).sum()
    if weights.l1 > 0 or weights.confidence > 0:
        th = last.gather(1, (plan.label_pos - 1).flatten(1)[..., None].expand(-1, -1, HIDDEN))
        q = torch.softmax(th.view(*plan.label_pos.shape, HIDDEN)[sel] @ target.weight.T, -1)
        p = torch.softmax(logits, -1)
        l1 = (p - q).abs().sum(-1)
        total = total + weights.l1 * (w * l1).sum()
        if weights.confidence > 0:
            alpha = torch.minimum(p, q).sum(-1).detach()
            feats = pred
            if model.config.confidence_head_with_markov:
                feats = torch.cat([pred, markov.prev_embeddings(prev)], -1)
            conf = model.confidence_head(feats)[sel]
            bce = F.binary_cross_entropy_with_logits(conf, alpha, reduction="none")
            total = total + weights.confidence * (w * bce).sum()
    return total * scale, ce, (logits.argmax(-1) == y)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


DSPARK_HEADS = {
    "markov_rank": 6,
    "enable_confidence_head": True,
    "confidence_head_with_markov": True,
    "specflow": {"ce_weight": 0.3, "l1_weight": 0.9, "confidence_weight": 0.7},
}


@pytest.mark.parametrize(
    "algorithm,extra",
    [
        ("dflash", {}),
        ("dspark", DSPARK_HEADS),
        ("dspark", {**DSPARK_HEADS, "markov_head_type": "gated"}),
        (
            "dspark",
            {**DSPARK_HEADS, "markov_head_type": "rnn", "confidence_head_with_markov": False},
        ),
    ],
)
def test_forward_matches_naive_oracle(algorithm: str, extra: dict):
    config = tiny_config(algorithm, **extra)
    model = tiny_model(config)
    ids, attn, loss, aux, last = random_batch()
    plan = plan_for(config, ids, attn, loss)
    assert plan.keep.any() and plan.mask.sum() > 4
    # the masked backbone equals running every block on its own
    hidden = model.backbone(ids, aux, plan.anchors, plan.keep)
    naive = naive_block_hidden(model, ids, aux, plan.anchors, plan.keep)
    assert torch.allclose(hidden[plan.keep], naive[plan.keep], atol=1e-10)

    target = head()
    scale = pooled_scale(plan.total_weight, 1)
    loss_value, metrics = model(ids, aux, plan, target, scale, chunk_rows=5, last_hidden=last)
    loss_value.backward()
    fused = grads(model)
    ref, ce, correct = reference_loss(
        model, ids, aux, last, plan, target, scale, model.loss_weights
    )
    ref.backward()
    expected = grads(model)
    assert torch.allclose(loss_value.double(), ref, atol=1e-10)
    assert set(fused) == set(expected)
    for name in expected:
        assert torch.allclose(fused[name], expected[name], atol=1e-9), name
    slots = torch.arange(config.num_predictions).expand_as(plan.mask)[plan.mask]
    assert torch.allclose(
        metrics[:, COL["ce"]],
        torch.zeros(config.num_predictions, dtype=torch.float64).index_add(0, slots, ce.detach()),
    )
    assert metrics[:, COL["correct"]].sum() == correct.sum()
    assert metrics[:, COL["count"]].sum() == plan.mask.sum()


def test_pooled_loss_equals_one_batch_when_split_across_microbatches_and_ranks():
    config = tiny_config("dspark", **DSPARK_HEADS)
    model = tiny_model(config)
    ids, attn, loss, aux, last = random_batch(
        seed=4, lengths=(20, 14, 17, 9), supervised_from=(3, 5, 2, 4)
    )
    plan = plan_for(config, ids, attn, loss, seed=1)
    target = head()

    def part(rows, scale):
        sub = type(plan)(
            *(getattr(plan, f)[rows] for f in ("anchors", "keep", "label_pos", "mask", "weight"))
        )
        return model(ids[rows], aux[rows], sub, target, scale, last_hidden=last[rows])

    whole, whole_metrics = part(slice(0, 4), pooled_scale(plan.total_weight, 1))
    whole.backward()
    one = grads(model)
    # two micro-batches on one rank: the same pooled scale, losses and gradients add up
    scale = pooled_scale(plan.total_weight, 1)
    (l_a, m_a), (l_b, m_b) = part(slice(0, 2), scale), part(slice(2, 4), scale)
    (l_a + l_b).backward()
    micro = grads(model)
    assert torch.allclose(l_a + l_b, whole, atol=1e-12)
    assert torch.allclose(m_a + m_b, whole_metrics)
    # two ranks, one micro-batch each: scale world/D, gradients averaged as FSDP reduces them
    scale = pooled_scale(plan.total_weight, 2)
    l_a, _ = part(slice(0, 2), scale)
    l_a.backward()
    rank0 = grads(model)
    l_b, _ = part(slice(2, 4), scale)
    l_b.backward()
    rank1 = grads(model)
    for name in one:
        assert torch.allclose(micro[name], one[name], atol=1e-10), name
        assert torch.allclose((rank0[name] + rank1[name]) / 2, one[name], atol=1e-10), name


def test_nothing_supervised_gives_zero_loss_reaching_every_weight():
    config = tiny_config("dspark", **DSPARK_HEADS)
    model = tiny_model(config)
    ids, attn, _, aux, last = random_batch()
    loss = torch.zeros_like(attn, dtype=torch.uint8)
    plan = plan_for(config, ids, attn, loss)
    assert not plan.keep.any()
    value, metrics = model(ids, aux, plan, head(), pooled_scale(0.0, 1), last_hidden=last)
    value.backward()
    assert float(value.detach()) == 0.0 and metrics.abs().sum() == 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in trainable)


# ----------------------------------------------------------------------------- attention paths


def test_flex_and_sdpa_agree_forward_on_cpu():
    config = tiny_config("dflash")
    sdpa = tiny_model(config).float()
    flex = tiny_model(config, backend="flex").float()
    ids, attn, loss, aux, _ = random_batch()
    plan = plan_for(config, ids, attn, loss)
    with torch.no_grad():
        a = sdpa.backbone(ids, aux.float(), plan.anchors, plan.keep)
        b = flex.backbone(ids, aux.float(), plan.anchors, plan.keep)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_and_sdpa_agree_forward_backward_on_cuda():
    config = tiny_config("dspark", **DSPARK_HEADS)
    ids, attn, loss, aux, last = random_batch()
    plan = plan_for(config, ids, attn, loss).to("cuda")
    target = head()
    target = TargetProjection(target.weight.float().cuda(), None)
    results = []
    for backend in ("sdpa", "flex"):
        model = tiny_model(config, backend=backend).float().cuda()
        value, metrics = model(
            ids.cuda(),
            aux.float().cuda(),
            plan,
            target,
            pooled_scale(plan.total_weight, 1),
            last_hidden=last.float().cuda(),
        )
        value.backward()
        results.append((value.detach(), metrics, grads(model)))
    (la, ma, ga), (lb, mb, gb) = results
    assert torch.allclose(la, lb, atol=1e-4) and torch.allclose(ma, mb, atol=1e-3)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-4, rtol=1e-3), name


# ----------------------------------------------------------------------------- config, captures


def test_default_layer_spread_matches_the_reference():
    assert default_layer_ids(36, 5) == [
        1,
        9,
        17,
        25,
        33,
    ]  # Qwen3-8B: SpecForge's qwen3-8b-dflash config
    assert default_capture_indices(36, 5) == (2, 10, 18, 26, 34)
    assert default_layer_ids(30, 5) == [1, 8, 14, 20, 27]  # SmolLM2: Python rounding (7.5 -> 8)
    assert default_layer_ids(30, 1) == [15]
    with pytest.raises(ConfigError, match="repeats"):
        default_layer_ids(5, 5)


def test_mask_token_for_smollm2_is_an_unused_special_token(smollm2_dir):
    from transformers import AutoTokenizer

    token_id = resolve_mask_token_id(smollm2_dir, 49152)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert token_id == 16 and tok.convert_ids_to_tokens(token_id) == "<empty_output>"
    assert token_id not in {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}


def test_derived_config_round_trips_through_the_hf_json(tiny_target_dir):
    from spec_core.models.common.target import read_target_config

    cfg = load_config(
        None,
        [
            "draft.algorithm=dspark",
            "vocab.draft_vocab_size=null",
            "evaluation.enabled=false",
            "draft.num_layers=3",
            "draft.capture_indices=[1,2,3]",
            "draft.block_size=5",
            "draft.markov_rank=4",
        ],
    )
    dcfg = derive_block_config(read_target_config(tiny_target_dir), cfg, tiny_target_dir)
    assert dcfg.mask_token_id == 16 and dcfg.num_hidden_layers == 3 and dcfg.aux_dim == 3 * 64
    hf = dcfg.to_hf_dict()
    assert hf["architectures"] == ["DSparkDraftModel"] and hf["num_target_layers"] == 4
    assert hf["dflash_config"]["target_layer_ids"] == [0, 1, 2]
    assert hf["dflash_config"]["projector_type"] == "dspark" and hf["block_size"] == 5
    assert hf["dflash_config"]["confidence_head_alpha"] == 1.0
    assert type(dcfg).from_hf_dict(hf) == dcfg


def test_capture_spec_skips_last_hidden_for_dflash_and_ce_only_dspark():
    def spec(*overrides):
        cfg = load_config(
            None, ["vocab.draft_vocab_size=null", "evaluation.enabled=false", *overrides]
        )
        return capture_spec_for(cfg, 30)

    assert spec().with_last_hidden and spec().capture_indices == (2, 15, 27)  # eagle3
    dflash = spec("draft.algorithm=dflash")
    assert not dflash.with_last_hidden and dflash.capture_indices == (2, 9, 15, 21, 28)
    assert spec("draft.algorithm=dspark").with_last_hidden
    assert not spec(
        "draft.algorithm=dspark", "draft.l1_weight=0", "draft.confidence_weight=0"
    ).with_last_hidden
    assert not spec(
        "draft.algorithm=dspark",
        "draft.l1_weight=0",
        "draft.enable_confidence_head=false",
        "draft.confidence_head_with_markov=false",
    ).with_last_hidden
    assert spec("draft.algorithm=dspark", "draft.l1_weight=0").with_last_hidden  # confidence
    assert spec("draft.algorithm=dflash", "draft.capture_indices=[3,4]").capture_indices == (3, 4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["draft.algorithm=dflash", "vocab.draft_vocab_size=1024"], "vocab pruning"),
        (
            [
                "draft.algorithm=dspark",
                "draft.ce_weight=0",
                "draft.l1_weight=0",
                "draft.confidence_weight=0",
            ],
            "needs a positive",
        ),
        (["draft.algorithm=dspark", "draft.markov_rank=0"], "confidence_head_with_markov"),
        (["draft.algorithm=dflash", "draft.num_anchors=0"], "num_anchors"),
        (["draft.algorithm=dspark", "draft.loss_decay_gamma=0"], "loss_decay_gamma"),
    ],
)
def test_inconsistent_settings_fail_fast(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["vocab.draft_vocab_size=null", "evaluation.enabled=false", *overrides])


def test_flex_training_on_cpu_is_refused(tiny_target_dir):
    from spec_core.models.common.target import load_target_head, read_target_config

    cfg = load_config(
        None,
        [
            "draft.algorithm=dflash",
            "vocab.draft_vocab_size=null",
            "evaluation.enabled=false",
            "draft.capture_indices=[1,2]",
            "draft.attention_backend=flex",
        ],
    )
    algo = get_algorithm("dflash")
    dcfg = algo.derive_config(read_target_config(tiny_target_dir), cfg, None, tiny_target_dir)
    head_ = load_target_head(tiny_target_dir, cfg.target)
    with pytest.raises(ConfigError, match="flex"):
        algo.build_model(dcfg, cfg, head_, None, torch.device("cpu"))


@pytest.mark.parametrize(
    "preset,algorithm,last_hidden,captures",
    [
        ("smollm2-chitchat-dflash", "dflash", False, (2, 9, 15, 21, 28)),
        ("smollm2-chitchat-dspark", "dspark", True, (2, 9, 15, 21, 28)),
        ("qwen3-8b-dflash", "dflash", False, (2, 10, 18, 26, 34)),
        ("qwen3-8b-dspark", "dspark", True, (2, 10, 18, 26, 34)),
    ],
)
def test_presets_select_model_loss_and_captures(preset, algorithm, last_hidden, captures):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{preset}.yaml")
    assert cfg.draft.algorithm == algorithm and cfg.vocab.draft_vocab_size is None
    layers = 36 if preset.startswith("qwen3") else 30
    spec = capture_spec_for(cfg, layers)
    assert spec.with_last_hidden is last_hidden and spec.capture_indices == captures


def test_every_algorithm_is_evaluated_through_its_proposer(tiny_target_dir):
    """A block-draft config keeps evaluation on (its presets register like EAGLE-3), and every
    algorithm's proposer drafts for a real HF target."""
    from transformers import AutoModelForCausalLM

    from spec_core.models import ALGORITHMS
    from spec_core.models.algorithm import Proposer

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    for name in ALGORITHMS:
        cfg = load_config(None, [f"draft.algorithm={name}", "vocab.draft_vocab_size=null"])
        assert cfg.evaluation.enabled and cfg.registry.enabled
    from spec_core.models.common.target import load_target_head, read_target_config

    for name in ("dflash", "dspark"):
        cfg = load_config(None, [f"draft.algorithm={name}", "draft.capture_indices=[1,2,3]"])
        algo = get_algorithm(name)
        dcfg = algo.derive_config(read_target_config(tiny_target_dir), cfg, None, tiny_target_dir)
        head_ = load_target_head(tiny_target_dir, cfg.target)
        draft = algo.build_model(dcfg, cfg, head_, None, torch.device("cpu")).eval()
        proposer = algo.proposer(draft, target, cfg.evaluation)
        assert isinstance(proposer, Proposer)
        drafts = proposer.propose(
            [5, 6, 7, 8],
            target(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states,
            3,
        )
        assert len(drafts) == 3 and all(0 <= t < dcfg.vocab_size for t in drafts)
