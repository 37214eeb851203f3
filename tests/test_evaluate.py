"""Acceptance evaluation: prompts, plain greedy, and real speculative decoding with drafts loaded
back from their HF export dirs.

The "trained" drafts here are built by hand, not trained: on a *bigram target* (a Llama whose
attention and MLP outputs are zero, so its hidden states are the token embedding and its greedy
next token is pi(x_t) for a fixed permutation pi, a single cycle with no fixed point), the draft
that copies the deepest capture through ``fc`` and reads it with an ``lm_head`` whose argmax is
pi(pi(x_t)) predicts exactly x_{t+2} - what EAGLE-3 alignment asks of step 0 - so every first
draft is accepted and none after it (its chained steps repeat the same guess). tau = 2 and
alpha = (1, 0, 0) then come out of real decoding; an evaluator with an off-by-one feature or token
alignment gets tau = 1 from the same draft, as does a draft that predicts x_{t+1} (pi instead of
pi^2) and a random-weight draft. With pi = identity the target repeats one token and the same
construction is accepted at every position (tau = k + 1), which exercises full acceptance, the
bonus token and cache cropping at the end of the chain.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from spec_core.assets import TINY_TARGET_VOCAB, build_tiny_target
from spec_core.config import load_config
from spec_core.data.conversation import Conversation, Message
from spec_core.evaluate import (
    NO_ASSISTANT_TURN,
    PROMPT_TOO_LONG,
    EvalPrompt,
    SpeculativeDecoder,
    acceptance_stats,
    crop_cache,
    eval_prompt_ids,
    generation_prompt_ids,
    greedy_decode,
    load_proposer,
    load_target,
    run_evaluation,
)
from spec_core.export import export_draft
from spec_core.models import get_algorithm
from spec_core.models.common.target import read_tensors
from spec_core.models.eagle3.config import derive_eagle3_config
from spec_core.models.eagle3.model import Eagle3Draft

V, H = TINY_TARGET_VOCAB, 64
EMB = "model.embed_tokens.weight"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # decoding is many tiny ops


def export_model(model: Eagle3Draft, root: Path, step: int = 1) -> Path:
    """Write ``model`` in the trainer's checkpoint layout and export it: the evaluator only ever
    sees drafts through the HF dir."""
    import torch.distributed.checkpoint as dcp

    from spec_core.training.checkpoint import model_state, write_manifest

    ckpt = root / "checkpoints" / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    with warnings.catch_warnings():  # "torch.distributed is disabled": a one-process save
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(model_state(model), checkpoint_id=str(ckpt / "model"), no_dist=True)
    model.config.save(ckpt / "config.json")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(ckpt)  # loaders refuse a checkpoint without one
    (root / "checkpoints" / "latest").write_text(ckpt.name)
    return export_draft(root / "checkpoints", root / "hf").out_dir


def decode_with_export(
    model: Eagle3Draft,
    root: Path,
    target,
    target_dir: Path,
    prompts: list[EvalPrompt],
    max_new_tokens: int,
    stop_ids: set[int] = frozenset(),
) -> dict:
    """Speculative decoding of ``prompts`` (3 draft tokens) with ``model`` loaded back from its
    export under ``root``."""
    hf_dir = export_model(model, root)
    proposer = load_proposer(hf_dir, target, target_dir)
    return run_evaluation(
        target,
        proposer,
        prompts,
        num_draft_tokens=3,
        max_new_tokens=max_new_tokens,
        stop_ids=set(stop_ids),
    )


def cycle(seed: int = 0) -> torch.Tensor:
    """A permutation that is one cycle through the whole vocab (no fixed points)."""
    order = torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(V, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def unit_rows(seed: int) -> torch.Tensor:
    rows = torch.randn(V, H, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=1, keepdim=True)


def successor_head(emb: torch.Tensor, succ: torch.Tensor) -> torch.Tensor:
    """Rows such that argmax_j (head_j . e_x) = succ(x) for unit-norm embeddings e."""
    head = torch.empty_like(emb)
    head[succ] = emb
    return head


def make_bigram_target(out: Path, tokenizer_dir: Path, perm: torch.Tensor) -> Path:
    from transformers import LlamaForCausalLM

    build_tiny_target(out, tokenizer_dir, hidden=H, tie=False)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    emb = unit_rows(1)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(successor_head(emb, perm))
    model.save_pretrained(out)
    return out


def draft_for(target_dir: Path, capture=(1, 2, 3)) -> Eagle3Draft:
    target_json = json.loads((target_dir / "config.json").read_text())
    cfg = load_config(None, [f"draft.capture_indices={list(capture)}"])
    model = Eagle3Draft(derive_eagle3_config(target_json, cfg.draft, V, str(target_dir)))
    model.init_weights(torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.embed_tokens.weight.copy_(read_tensors(target_dir, [EMB])[EMB])
    return model


def lens_draft(target_dir: Path, succ: torch.Tensor) -> Eagle3Draft:
    """fc copies the deepest capture, attention/MLP add nothing, lm_head's argmax is succ(x_t)."""
    model = draft_for(target_dir)
    emb = read_tensors(target_dir, [EMB])[EMB]
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 2 * H :] = torch.eye(H)
        model.midlayer.self_attn.o_proj.weight.zero_()
        model.midlayer.mlp.down_proj.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(successor_head(emb, succ))
    return model


def random_prompts(n: int, length: int = 12, seed: int = 3) -> list[EvalPrompt]:
    gen = torch.Generator().manual_seed(seed)
    return [
        EvalPrompt(f"p{i}", torch.randint(3, V, (length,), generator=gen).tolist())
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def bigram_targets(tmp_path_factory, smollm2_dir) -> dict[str, tuple[Path, torch.Tensor]]:
    root = tmp_path_factory.mktemp("bigram")
    perms = {"cycle": cycle(), "identity": torch.arange(V)}
    return {name: (make_bigram_target(root / name, smollm2_dir, p), p) for name, p in perms.items()}


# ----------------------------------------------------------------------------- prompts


def chat(*turns: str, system: str | None = None) -> Conversation:
    messages = [Message("system", system)] if system else []
    messages += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return Conversation("c", messages)


@pytest.fixture(scope="module")
def renderer(smollm2_tokenizer):
    from spec_core.data.render import ConversationRenderer

    return ConversationRenderer(smollm2_tokenizer)


def test_generation_prompt_equals_add_generation_prompt(renderer, smollm2_tokenizer):
    conv = chat("hi there", "hello! how are you?", "fine, and you?", system="Be brief.")
    messages = [m.to_dict() for m in conv.messages]
    expected = smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    ids = generation_prompt_ids(renderer, conv.messages)
    assert ids == smollm2_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert smollm2_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_eval_prompt_is_the_context_of_the_last_assistant_turn(renderer):
    conv = chat(
        "first question " * 20,
        "first answer " * 20,
        "second question",
        "second answer",
        system="Be brief.",
    )
    full, reason = eval_prompt_ids(conv, renderer, 10_000)
    assert reason is None
    assert full == generation_prompt_ids(renderer, conv.messages[:4])  # up to "second question"
    # Too long: the earliest user/assistant turns go, the system turn stays.
    short_budget = len(generation_prompt_ids(renderer, [conv.messages[0], conv.messages[3]]))
    assert short_budget < len(full)
    cut, reason = eval_prompt_ids(conv, renderer, short_budget)
    assert reason is None
    assert cut == generation_prompt_ids(renderer, [conv.messages[0], conv.messages[3]])
    assert eval_prompt_ids(conv, renderer, 5) == (None, PROMPT_TOO_LONG)
    assert eval_prompt_ids(chat("only a question"), renderer, 512) == (None, NO_ASSISTANT_TURN)


# ----------------------------------------------------------------------------- decoding


def test_greedy_decode_is_hf_greedy_generate(tiny_target_dir):
    target = load_target(tiny_target_dir)
    prompt = random_prompts(1, 9)[0].input_ids
    ours = greedy_decode(target, prompt, 12, {2}).tokens
    hf = target.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=2, pad_token_id=2
    )
    assert ours == hf[0, len(prompt) :].tolist()


def test_crop_cache_keeps_the_prefix(tiny_target_dir):
    from transformers import DynamicCache

    target = load_target(tiny_target_dir)
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(input_ids=torch.arange(3, 13)[None], past_key_values=cache, use_cache=True)
    keys = cache.layers[0].keys.clone()
    crop_cache(cache, 6)
    assert cache.get_seq_length() == 6
    assert torch.equal(cache.layers[0].keys, keys[..., :6, :])
    crop_cache(cache, 8)  # nothing to remove
    assert cache.get_seq_length() == 6


def test_acceptance_stats_by_hand():
    stats = acceptance_stats([0, 1, 3, 2], 3)
    assert stats["tau"] == pytest.approx(1 + 6 / 4)
    assert stats["accepted_per_position"] == [3, 2, 1]
    assert stats["alpha"] == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert stats["accept_rate_per_position"] == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    assert stats["accept_length_histogram"] == [1, 1, 1, 1]
    assert stats["acceptance_rate"] == pytest.approx(6 / 12)


def test_random_draft_on_random_target_is_lossless(tiny_target_dir, tmp_path):
    target = load_target(tiny_target_dir)
    draft = draft_for(tiny_target_dir)
    result = decode_with_export(
        draft, tmp_path, target, tiny_target_dir, random_prompts(3), 20, {2}
    )
    assert result["lossless"] and result["mismatched_prompts"] == []
    assert result["tau"] >= 1.0 and result["num_steps"] > 0
    assert sum(result["accept_length_histogram"]) == result["num_steps"]
    for record in result["prompts"]:
        # one token from the prefill, then 1 + accepted per verify step (until the budget)
        assert record["new_tokens"] <= 1 + record["steps"] + sum(record["accepted"])
        assert record["new_tokens"] == 20 or record["tokens"][-1] == 2


@pytest.mark.parametrize(
    "target_name, head, tau, alpha",
    [
        ("cycle", "pi^2", 2.0, [1.0, 0.0, 0.0]),  # predicts x_{t+2}: the first draft always
        ("cycle", "pi", 1.0, [0.0, 0.0, 0.0]),  # predicts x_{t+1}: off by one, never accepted
        ("identity", "pi^2", 4.0, [1.0, 1.0, 1.0]),  # repeating target: every draft accepted
    ],
)
def test_acceptance_on_a_bigram_target(bigram_targets, tmp_path, target_name, head, tau, alpha):
    target_dir, perm = bigram_targets[target_name]
    succ = perm[perm] if head == "pi^2" else perm
    target = load_target(target_dir)
    draft = lens_draft(target_dir, succ)
    result = decode_with_export(draft, tmp_path, target, target_dir, random_prompts(3), 24)
    assert result["lossless"]
    assert result["tau"] == pytest.approx(tau)
    assert result["alpha"] == pytest.approx(alpha)
    for record in result["prompts"]:
        prompt = random_prompts(3)[int(record["id"][1:])].input_ids
        expected, x = [], prompt[-1]
        for _ in range(24):
            x = int(perm[x])
            expected.append(x)
        assert record["tokens"] == expected  # the target really is the bigram chain


def test_trained_draft_beats_a_random_draft(bigram_targets, tmp_path):
    target_dir, perm = bigram_targets["cycle"]
    target = load_target(target_dir)
    taus = {}
    for name, model in [
        ("random", draft_for(target_dir)),
        ("trained", lens_draft(target_dir, perm[perm])),
    ]:
        result = decode_with_export(
            model, tmp_path / name, target, target_dir, random_prompts(2), 16
        )
        assert result["lossless"]
        taus[name] = result["tau"]
    assert taus["random"] < 1.1
    assert taus["trained"] > taus["random"] + 0.8


def test_decoder_checks_the_draft_fits_the_target(tiny_target_dir, bigram_targets):
    target = load_target(tiny_target_dir)
    draft = draft_for(tiny_target_dir, capture=(1, 2, 3))
    draft.config.specflow["capture_indices"] = [1, 2, 9]
    eagle3 = get_algorithm("eagle3")
    with pytest.raises(
        Exception, match=r"invalid: each index must be in \[0, 3\] for a target with 4 layers"
    ):
        eagle3.proposer(draft, target)
    with pytest.raises(Exception, match="num_draft_tokens"):
        SpeculativeDecoder(target, eagle3.proposer(draft_for(tiny_target_dir), target), 0)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory, tiny_target_dir, asset_cache) -> Path:
    from spec_core.data.tokenize import prepare_dataset

    cfg = load_config(
        None,
        [
            "dataset.max_conversations=24",
            "dataset.eval_conversations=4",
            "dataset.num_proc=1",
            "dataset.max_seq_length=256",
        ],
    )
    work = tmp_path_factory.mktemp("eval-data")
    return prepare_dataset(
        cfg.dataset, tiny_target_dir, work, asset_cache, progress=False
    ).eval_path


def test_cli_writes_json_and_plot_on_held_out_prompts(
    tiny_target_dir, eval_split, tmp_path, capsys
):
    from spec_core.evaluate import main

    hf_dir = export_model(draft_for(tiny_target_dir), tmp_path / "draft")
    args = [
        "--draft",
        str(hf_dir),
        "--eval-data",
        str(eval_split),
        "--out",
        str(tmp_path / "ev"),
        f"target.path={tiny_target_dir}",
        "evaluation.num_prompts=2",
        "evaluation.max_new_tokens=6",
        f"run.output_dir={tmp_path}",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("tau ")
    result = json.loads((tmp_path / "ev" / "acceptance.json").read_text())
    assert (tmp_path / "ev" / "acceptance.png").stat().st_size > 1000
    assert result["num_prompts"] == 2 and result["lossless"]
    prepared = json.loads((eval_split.parent / "prepared.json").read_text())
    assert result["dataset_hash"] == prepared["cache_key"]
    assert result["settings"]["max_new_tokens"] == 6 and len(result["alpha"]) == 3
    # Same prompts and settings -> same eval-set hash; other settings -> another one.
    assert main(args + [f"--out={tmp_path / 'ev2'}"]) == 0
    again = json.loads((tmp_path / "ev2" / "acceptance.json").read_text())
    assert again["eval_set_hash"] == result["eval_set_hash"]
    assert (
        main(
            args[:-3]
            + [
                "evaluation.max_new_tokens=5",
                f"run.output_dir={tmp_path}",
                f"--out={tmp_path / 'ev3'}",
            ]
        )
        == 0
    )
    other = json.loads((tmp_path / "ev3" / "acceptance.json").read_text())
    assert other["eval_set_hash"] != result["eval_set_hash"]


@pytest.mark.slow
def test_lossless_on_real_smollm2(smollm2_dir, tmp_path, renderer, chitchat_path):
    """The real 30-layer target in fp32: batched verify forwards reproduce plain greedy."""
    from spec_core.data.load import load_conversations

    convs = load_conversations(chitchat_path, limit=2).conversations
    prompts = []
    for conv in convs:
        ids, _ = eval_prompt_ids(conv, renderer, 256)
        prompts.append(EvalPrompt(conv.id, ids))
    target = load_target(smollm2_dir)
    draft = draft_for(smollm2_dir, capture=(2, 15, 27))
    result = decode_with_export(draft, tmp_path, target, smollm2_dir, prompts, 16, {2})
    assert result["lossless"] and result["num_prompts"] == 2 and result["tau"] >= 1.0
