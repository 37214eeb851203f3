"""Engine-served evaluation (``evaluation.engine: vllm``): the real vLLM CPU build serves the target
plus an exported EAGLE-3 draft; its own counters give tau, and it must be lossless against its own
plain greedy output at concurrency 1 and 8.

The real-engine test needs the vLLM venv, so it runs only when ``SPECFLOW_VLLM_PYTHON`` names its
interpreter (``make vllm-test``); the counter arithmetic below runs everywhere.
"""

from __future__ import annotations

import os

import pytest
from test_evaluate import draft_for, export_model

from spec_core.acceptance.served import counter_stats, evaluate_served
from spec_core.config import load_config
from spec_core.errors import ConfigError
from spec_core.evaluate import EvalPrompt, PromptSet, evaluate_prompts

VLLM_PYTHON = os.environ.get("SPECFLOW_VLLM_PYTHON", "")


def test_counter_stats_by_hand():
    # 10 rounds of k = 3: 6 accepted the first draft, 3 the second, 1 all three
    stats = counter_stats(
        {"drafts": 10, "draft_tokens": 30, "accepted": 10, "per_pos": [6, 3, 1]}, 3
    )
    assert stats["tau"] == pytest.approx(2.0)
    assert stats["alpha"] == pytest.approx([0.6, 0.5, 1 / 3])
    assert stats["accept_rate_per_position"] == pytest.approx([0.6, 0.3, 0.1])
    assert stats["accept_length_histogram"] == [4, 3, 2, 1]
    assert sum(i * n for i, n in enumerate(stats["accept_length_histogram"])) == 10
    empty = counter_stats({"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}, 2)
    assert empty["tau"] == 1.0 and empty["accept_length_histogram"] == [0, 0, 0]


def test_a_missing_engine_interpreter_fails_with_one_line(tiny_target_dir, tmp_path):
    ev = load_config(None, ["evaluation.engine=vllm", "evaluation.python=/nowhere/python"])
    hf_dir = export_model(draft_for(tiny_target_dir), tmp_path)
    prompts = PromptSet([EvalPrompt("p", [5, 6, 7])], {}, 1, name="x")
    with pytest.raises(ConfigError, match="'evaluation.python' /nowhere/python is not an exec"):
        evaluate_served(ev.evaluation, hf_dir, tiny_target_dir, [prompts], {2})
    unset = load_config(None, ["evaluation.engine=vllm"]).evaluation
    with pytest.raises(ConfigError, match="set 'evaluation.python'.*make vllm-venv"):
        evaluate_served(unset, hf_dir, tiny_target_dir, [prompts], {2})


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two vLLM CPU engine starts
@pytest.mark.skipif(not VLLM_PYTHON, reason="needs the vLLM venv (make vllm-test)")
def test_vllm_serves_the_draft_lossless_with_hf_tau(smollm2_dir, tmp_path):
    from test_evaluate import random_prompts

    hf_dir = export_model(draft_for(smollm2_dir, capture=(2, 15, 27)), tmp_path)
    sets = [
        PromptSet(random_prompts(4, length=16, seed=1), {}, 4, name="a"),
        PromptSet(random_prompts(3, length=24, seed=2), {}, 3, name="b"),
    ]
    common = [
        "evaluation.max_new_tokens=24",
        "evaluation.concurrency=8",
        "evaluation.sweep_depth=0",
    ]
    hf = evaluate_prompts(load_config(None, common).evaluation, hf_dir, smollm2_dir, sets)
    served_cfg = load_config(
        None, [*common, "evaluation.engine=vllm", f"evaluation.python={VLLM_PYTHON}"]
    )
    vllm = evaluate_prompts(served_cfg.evaluation, hf_dir, smollm2_dir, sets)
    assert vllm["engine"] == "vllm" and vllm["eval_set_hash"] != hf["eval_set_hash"]
    assert vllm["lossless"], vllm["mismatched_prompts"]
    for name in ("a", "b"):
        r = vllm["sets"][name]
        assert set(r["concurrency"]) == {"1", "8"}
        assert all(
            at["lossless"] and at["spec_tokens_per_s"] > 0 for at in r["concurrency"].values()
        )
        assert r["num_steps"] > 0 and sum(r["accept_length_histogram"]) == r["num_steps"]
        assert abs(r["tau"] - hf["sets"][name]["tau"]) <= 0.05
    assert vllm["concurrency"]["8"]["lossless"] and "depth" not in vllm
