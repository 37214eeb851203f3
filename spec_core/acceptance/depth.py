"""Drafting depth: tau for every k = 1..K from one pass per prompt, no decode per k.

Under greedy verification a round that starts at output position j (its last known token is
``out[j]``) accepts ``min(A(j), k)`` drafts when drafting k tokens, where A(j) is how many of the
depth-K drafts proposed at j equal the target's greedy continuation - provided the k drafts are the
first k of the K drafts and the drafter's state at j does not depend on how earlier rounds were
cut. Both hold for every proposer here: EAGLE-3 chains token by token and keeps only verified
positions in its cache; DFlash/DSpark draft a whole block and truncate it to k (DSpark's
confidence cut does not depend on k). What does depend on k is *which* positions rounds start at,
so a k-sweep replays the rounds: j_0 = 0, a = min(A(j), k), j' = j + a + 1, until the output is
complete - exactly the live decoder's rounds, including the last round's drafts accepted past the
budget or the stop token (the target's greedy continuation, ``tail``, supplies them).

A(j) for every j comes from one target forward over prompt + output (teacher forcing: its hidden
states are the ones the live decoder's verify forwards produce, up to float rounding between one
long forward and several short ones) and one K-token proposal per position, each round fed the
hidden state of exactly one new position. ``tau_k`` at the live decoder's k reproduces its tau
(``tests/test_depth_sweep.py`` checks every k against a live decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spec_core.acceptance.stats import acceptance_stats


@torch.inference_mode()
def acceptance_profile(
    target: Any, proposer: Any, prompt: list[int], out: list[int], tail: list[int], depth: int
) -> list[int]:
    """A(j) for j = 0 .. len(out) - 2: accepted drafts of a depth-``depth`` round started at j.

    ``out`` is the greedy output (stop token included), ``tail`` at least ``depth`` greedy tokens
    after it (generated past any stop token, as the target's verify forward would predict them).
    """
    if len(out) < 2:
        return []
    full = [*prompt, *out, *tail]
    n_known = len(prompt) + len(out) - 1  # positions whose states any round can consume
    states = target(
        input_ids=torch.tensor([full[:n_known]]), output_hidden_states=True, logits_to_keep=1
    ).hidden_states
    proposer.reset()
    p = len(prompt)
    profile = []
    for j in range(len(out) - 1):
        lo, hi = (0, p) if j == 0 else (p + j - 1, p + j)
        drafts = proposer.propose(full[: p + j + 1], tuple(h[:, lo:hi] for h in states), depth)
        truth = full[p + j + 1 : p + j + 1 + depth]
        a = 0
        while a < min(len(drafts), len(truth)) and drafts[a] == truth[a]:
            a += 1
        profile.append(a)
    return profile


def replay_rounds(profile: Sequence[int], k: int) -> list[int]:
    """Accepted drafts per round of a depth-k decode whose per-position profile is ``profile``."""
    accepted, j = [], 0
    while j < len(profile):
        a = min(profile[j], k)
        accepted.append(a)
        j += a + 1
    return accepted


def depth_curve(profiles: Sequence[Sequence[int]], depth: int) -> dict[str, Any]:
    """tau, alpha_k and acceptance per position for k = 1..depth over prompts' profiles."""
    per_k = []
    for k in range(1, depth + 1):
        rounds = [a for profile in profiles for a in replay_rounds(profile, k)]
        stats = acceptance_stats(rounds, k)
        per_k.append(
            {
                "k": k,
                "tau": stats["tau"],
                "alpha": stats["alpha"],
                "accept_rate_per_position": stats["accept_rate_per_position"],
                "num_steps": stats["num_steps"],
            }
        )
    return {
        "max_depth": depth,
        "k": [r["k"] for r in per_k],
        "tau": [r["tau"] for r in per_k],
        "per_k": per_k,
    }


def plot_depth(curves: dict[str, dict[str, Any]], summary: dict[str, Any], path: Any) -> Any:
    """tau against drafting depth k: one line per prompt set and the weighted summary (PNG)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, curve in curves.items():
        ax.plot(curve["k"], curve["tau"], "o-", alpha=0.7, label=name)
    ax.plot(summary["k"], summary["tau"], "s-", color="black", lw=2, label="summary (weighted)")
    ax.set(
        xlabel="draft tokens per round k (num_speculative_tokens)",
        ylabel="τ (tokens per target step)",
        xticks=summary["k"],
        title="acceptance length by drafting depth",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
