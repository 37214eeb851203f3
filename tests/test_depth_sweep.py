"""Drafting depth: tau for k = 1..K from one pass equals a live decode at every k.

The replay (``spec_core.acceptance.depth``) is checked against real speculative decoding with the
live ``SpeculativeDecoder`` at each k, on a real (tiny, random) Llama target, with three proposers:

* ``TableProposer`` drafts the target's true greedy continuation with mistakes at fixed
  (position, draft index) pairs, so acceptance lengths vary from round to round (0..k) - the case
  where which positions rounds start at matters. It is a real ``Proposer`` (a lookup table, not a
  mock of one) and it asserts that it is fed exactly one hidden-state row per new position.
* the EAGLE-3 lens draft on the bigram targets of ``test_evaluate`` (tau 2 at every k on the
  cycle; k + 1 on the repeating target), loaded back from its export;
* a DFlash block draft, whose proposer refuses any context that is not one feature row per
  position before its anchor.
"""

from __future__ import annotations

import pytest
from test_block_proposer import _draft as block_draft
from test_block_proposer import target as block_target  # noqa: F401  (fixture)
from test_evaluate import bigram_targets as bigram  # noqa: F401  (fixture)
from test_evaluate import (
    draft_for,
    export_model,
    lens_draft,
    random_prompts,
)

from spec_core.acceptance.depth import replay_rounds
from spec_core.evaluate import (
    EvalPrompt,
    SpeculativeDecoder,
    greedy_decode,
    load_proposer,
    load_target,
    run_evaluation,
)
from spec_core.models.algorithm import Proposer
from spec_core.models.block.proposer import BlockProposer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_NEW, DEPTH = 20, 5


class TableProposer(Proposer):
    """Drafts the target's greedy continuation of each prompt, wrong where ``wrong(pos, i)``."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], vocab: int) -> None:
        self.continuations, self.vocab = continuations, vocab
        self.reset()

    def reset(self) -> None:
        self.seen = 0  # hidden-state rows received since the prompt started

    @staticmethod
    def wrong(pos: int, i: int) -> bool:
        return (pos * 7 + i * 3) % 5 == 0

    def propose(self, seq, hidden_states, k):
        self.seen += hidden_states[0].shape[1]
        assert self.seen == len(seq) - 1, "one state row per position before the last token"
        prompt = next(p for p in self.continuations if list(seq[: len(p)]) == list(p))
        pos = len(seq) - len(prompt)
        truth = self.continuations[prompt][pos : pos + k]
        return [(t + 1) % self.vocab if self.wrong(pos, i) else t for i, t in enumerate(truth)]


def live_taus(target, proposer, prompts, stop_ids=frozenset()) -> list[float]:
    """tau of a live speculative decode at each k = 1..DEPTH (accepted counts pooled)."""
    taus = []
    for k in range(1, DEPTH + 1):
        decoder = SpeculativeDecoder(target, proposer, k)
        accepted = [
            a
            for p in prompts
            for a in decoder.generate(p.input_ids, MAX_NEW, set(stop_ids)).accepted
        ]
        taus.append(1 + sum(accepted) / len(accepted))
    return taus


def sweep(target, proposer, prompts, stop_ids=frozenset(), k=3) -> dict:
    return run_evaluation(
        target,
        proposer,
        prompts,
        num_draft_tokens=k,
        max_new_tokens=MAX_NEW,
        stop_ids=set(stop_ids),
        sweep_depth=DEPTH,
    )


def test_replay_rounds_by_hand():
    profile = [2, 0, 0, 3, 1, 0, 4, 0]  # A(j) at output positions 0..7
    assert replay_rounds(profile, 1) == [1, 0, 1, 0, 1]  # starts 0, 2, 3, 5, 6
    assert replay_rounds(profile, 3) == [2, 3, 0]  # starts 0, 3, 7
    assert replay_rounds(profile, 9) == [2, 3, 0]
    assert replay_rounds([], 3) == []


def test_sweep_equals_live_decoding_at_every_depth(tiny_target_dir):
    target = load_target(tiny_target_dir)
    prompts = random_prompts(3, length=10)
    stop = {2}
    continuations = {}
    for p in prompts:  # far enough past the budget for the last round's drafts
        tokens = greedy_decode(target, p.input_ids, MAX_NEW + DEPTH + 2, set()).tokens
        continuations[tuple(p.input_ids)] = tokens
    proposer = TableProposer(continuations, target.config.vocab_size)
    result = sweep(target, proposer, prompts, stop)
    assert result["lossless"]
    live = live_taus(target, proposer, prompts, stop)
    assert result["depth"]["tau"] == pytest.approx(live, abs=1e-12)
    assert result["depth"]["tau"][2] == pytest.approx(result["tau"])  # the run's own k = 3
    taus = result["depth"]["tau"]
    assert taus[0] < taus[1] < taus[2]  # mixed accept lengths: tau moves with k
    histogram = result["accept_length_histogram"]
    assert sum(1 for h in histogram if h) >= 3
    assert all(len(r["depth_profile"]) == r["new_tokens"] - 1 for r in result["prompts"])


@pytest.mark.parametrize("target_name, expected", [("cycle", [2.0] * DEPTH), ("identity", None)])
def test_sweep_of_an_exported_eagle3_draft(bigram, tmp_path, target_name, expected):  # noqa: F811
    target_dir, perm = bigram[target_name]
    target = load_target(target_dir)
    proposer = load_proposer(
        export_model(lens_draft(target_dir, perm[perm]), tmp_path), target, target_dir
    )
    prompts = random_prompts(2)
    result = sweep(target, proposer, prompts)
    expected = expected or [k + 1.0 for k in range(1, DEPTH + 1)]
    assert result["depth"]["tau"] == pytest.approx(expected)
    assert result["depth"]["tau"] == pytest.approx(live_taus(target, proposer, prompts))


def test_sweep_of_a_random_eagle3_draft(tiny_target_dir, tmp_path):
    target = load_target(tiny_target_dir)
    prompts = random_prompts(2, length=8)
    hf_dir = export_model(draft_for(tiny_target_dir), tmp_path)
    eagle = load_proposer(hf_dir, target, tiny_target_dir)
    result = sweep(target, eagle, prompts, {2})
    assert result["depth"]["tau"] == pytest.approx(live_taus(target, eagle, prompts, {2}))


def test_sweep_of_a_dflash_draft(block_target):  # noqa: F811
    prompts = [EvalPrompt(f"b{i}", list(range(3 + i, 15 + i))) for i in range(2)]
    proposer = BlockProposer(block_draft(block_target, "dflash"), block_target)
    result = sweep(block_target, proposer, prompts, k=4)
    assert result["lossless"]
    assert result["depth"]["tau"] == pytest.approx(live_taus(block_target, proposer, prompts))


@pytest.mark.slow  # two spawned processes
def test_two_worker_processes_give_the_in_process_result(bigram, tmp_path):  # noqa: F811
    """``evaluation.workers: 2`` splits the prompts over two processes; records, tau, alpha and
    the depth curve are those of one process (only wall times differ)."""
    from spec_core.config import load_config
    from spec_core.evaluate import PromptSet, evaluate_prompts

    target_dir, perm = bigram["cycle"]
    hf_dir = export_model(lens_draft(target_dir, perm[perm]), tmp_path)
    sets = [
        PromptSet(random_prompts(3, seed=5), {}, 3, name="a"),
        PromptSet(random_prompts(2, seed=6), {}, 2, name="b"),
    ]
    results = {}
    for workers in (1, 2):
        cfg = load_config(None, ["evaluation.max_new_tokens=10", f"evaluation.workers={workers}"])
        results[workers] = evaluate_prompts(cfg.evaluation, hf_dir, target_dir, sets)
    one, two = results[1], results[2]
    for name in ("a", "b"):
        assert [r["tokens"] for r in two["sets"][name]["prompts"]] == [
            r["tokens"] for r in one["sets"][name]["prompts"]
        ]
        assert two["sets"][name]["depth"]["tau"] == one["sets"][name]["depth"]["tau"]
    assert two["tau"] == one["tau"] == pytest.approx(2.0) and two["lossless"]
    assert two["alpha"] == one["alpha"] and two["eval_set_hash"] == one["eval_set_hash"]
