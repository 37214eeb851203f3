"""DFlash / DSpark speculative decoding: the proposer's rollout is the training-time computation,
and decoding through it is lossless (a useless draft gives tau ~ 1, never a wrong token)."""

from __future__ import annotations

import pytest
import torch

from spec_core.config import load_config
from spec_core.evaluate import EvalPrompt, SpeculativeDecoder, greedy_decode, run_evaluation
from spec_core.models.block.attention import make_plan
from spec_core.models.block.config import derive_block_config
from spec_core.models.block.export import model_class
from spec_core.models.block.proposer import BlockProposer

VOCAB = 96
LAYERS = 4


@pytest.fixture(scope="module")
def target():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def _draft(target, algorithm: str, seed: int = 1):
    overrides = [
        f"draft.algorithm={algorithm}",
        "draft.num_layers=1",
        "draft.capture_indices=[1,2,3]",
        "draft.block_size=5",
        "draft.mask_token_id=0",
        "evaluation.enabled=false",
        "registry.enabled=false",
    ]
    if algorithm == "dspark":
        overrides += ["draft.markov_rank=8", "draft.markov_head_type=gated"]
    cfg = load_config(None, overrides)
    dcfg = derive_block_config(target.config.to_dict(), cfg)
    model = model_class(dcfg)(dcfg)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.2)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        if getattr(model, "markov_head", None) is not None:  # W2 starts at 0: make the bias real
            model.markov_head.markov_w2.weight.normal_(0, 0.5)
    return model.eval()


def _hidden_states(target, ids: list[int]):
    with torch.no_grad():
        return target(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_rollout_equals_the_training_computation(target, algorithm):
    """Drafts from the proposer equal what the training forward predicts at the same anchor when
    the data after the anchor are those drafts (DSpark's Markov bias teacher-forced on them)."""
    draft = _draft(target, algorithm)
    proposer = BlockProposer(draft, target)
    prompt = torch.randint(1, VOCAB, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    anchor = len(prompt) - 1
    drafts = proposer.propose(prompt, _hidden_states(target, prompt[:-1]), k=99)
    assert len(drafts) == draft.config.num_predictions

    full = prompt + drafts
    ids = torch.tensor([full])
    aux = torch.cat([_hidden_states(target, full)[i] for i in (1, 2, 3)], dim=-1)
    anchors = torch.tensor([[anchor]])
    keep = torch.ones_like(anchors, dtype=torch.bool)
    ones = torch.ones_like(ids)
    plan = make_plan(len(full), ones, ones, anchors, keep, draft.config.num_predictions, 7.0)
    with torch.no_grad():
        pred = draft.prediction_hidden(draft.backbone(ids, aux, anchors, keep))
        logits = pred @ target.get_output_embeddings().weight.T
        if algorithm == "dspark":
            prev = draft.prev_ids(ids, plan)
            logits = logits + draft.markov_head.bias(prev, pred)
    torch.testing.assert_close(pred[0, 0], proposer.block_hidden(prompt), rtol=1e-5, atol=1e-5)
    assert logits[0, 0].argmax(-1).tolist() == drafts


def test_proposer_respects_k_and_the_confidence_cut(target):
    draft = _draft(target, "dspark")
    prompt = list(range(5, 15))
    hidden = _hidden_states(target, prompt[:-1])
    assert len(BlockProposer(draft, target).propose(prompt, hidden, k=2)) == 2
    with torch.no_grad():  # a confidence head that predicts rejection everywhere
        draft.confidence_head.proj.weight.zero_()
        draft.confidence_head.proj.bias.fill_(-10.0)
    cut = BlockProposer(draft, target, min_confidence=0.5).propose(prompt, hidden, k=99)
    assert len(cut) == 1  # the first draft is always proposed, then the block ends


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_block_decoding_is_lossless_and_a_useless_draft_gives_tau_one(target, algorithm):
    draft = _draft(target, algorithm)
    prompts = [EvalPrompt(f"p{i}", list(range(3 + i, 13 + i))) for i in range(3)]
    k = draft.config.num_predictions
    result = run_evaluation(
        target,
        BlockProposer(draft, target),
        prompts,
        num_draft_tokens=k,
        max_new_tokens=24,
        stop_ids=set(),
    )
    assert result["lossless"] and result["num_prompts"] == 3
    assert 1.0 <= result["tau"] <= 1.0 + k

    with torch.no_grad():  # corrupt the drafter: every weight noise
        for p in draft.parameters():
            p.normal_(0, 3.0)
    decoder = SpeculativeDecoder(target, BlockProposer(draft, target), k)
    for p in prompts:
        spec = decoder.generate(p.input_ids, 24, set())
        assert spec.tokens == greedy_decode(target, p.input_ids, 24, set()).tokens
        assert sum(spec.accepted) <= len(spec.accepted)  # tau ~ 1: at most chance hits
