"""tau and alpha_k from accepted counts, per prompt set and as the weighted summary of the sets.

A run evaluates several prompt sets (``evaluation.prompts``); each set gets its own result and the
run's headline numbers - what ``acceptance.json`` holds at top level, what MLflow logs under
``acceptance/`` and what the registry gate compares - are their weighted summary:
``sum_s w_s * x_s / sum_s w_s`` for tau, alpha_k, the acceptance rates and the wall speed-up,
with w_s the set's ``weight`` (1 each by default, so every kind of prompt counts the same however
many prompts it has). Counts (prompts, steps, accepted tokens, the accept-length histogram) are
summed, throughputs pooled (all tokens / all seconds), and the summary is lossless only if every
set is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WEIGHTED = ("tau", "acceptance_rate", "wall_speedup")
WEIGHTED_LISTS = ("alpha", "accept_rate_per_position")
SUMMED = ("num_prompts", "num_steps", "num_draft_tokens", "num_accepted_tokens", "generated_tokens")
SUMMED_LISTS = ("accepted_per_position", "accept_length_histogram")


def acceptance_stats(accepted: list[int], k: int) -> dict[str, Any]:
    """tau, per-position conditional (alpha) and unconditional acceptance from accepted counts."""
    steps = len(accepted)
    per_pos = [sum(1 for a in accepted if a > i) for i in range(k)]
    reached = [steps, *per_pos[:-1]]
    histogram = [sum(1 for a in accepted if a == i) for i in range(k + 1)]
    total = sum(accepted)
    return {
        "tau": 1.0 + total / steps if steps else 1.0,
        "alpha": [p / r if r else 0.0 for p, r in zip(per_pos, reached, strict=True)],
        "accept_rate_per_position": [p / steps if steps else 0.0 for p in per_pos],
        "acceptance_rate": total / (steps * k) if steps else 0.0,
        "num_steps": steps,
        "num_draft_tokens": steps * k,
        "num_accepted_tokens": total,
        "accepted_per_position": per_pos,
        "accept_length_histogram": histogram,
    }


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def weighted_summary(sets: dict[str, dict[str, Any]], weights: dict[str, float]) -> dict[str, Any]:
    """The run's headline result from its per-set results (see the module docstring)."""
    names = list(sets)
    w = [float(weights[n]) for n in names]
    if sum(w) <= 0:
        w = [1.0] * len(names)
    results = [sets[n] for n in names]
    out: dict[str, Any] = {key: _weighted([r[key] for r in results], w) for key in WEIGHTED}
    for key in WEIGHTED_LISTS:
        out[key] = [_weighted(col, w) for col in zip(*(r[key] for r in results), strict=True)]
    for key in SUMMED:
        out[key] = sum(int(r[key]) for r in results)
    for key in SUMMED_LISTS:
        out[key] = [sum(col) for col in zip(*(r[key] for r in results), strict=True)]
    out["lossless"] = all(bool(r["lossless"]) for r in results)
    out["mismatched_prompts"] = [f"{n}/{p}" for n in names for p in sets[n]["mismatched_prompts"]]
    for side in ("speculative", "baseline"):
        wall = sum(r[side]["wall_s"] for r in results)
        tokens = sum(r[side]["tokens_per_s"] * r[side]["wall_s"] for r in results)
        out[side] = {"wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9)}
    out["baseline"]["tau"] = 1.0
    out["weights"] = dict(zip(names, w, strict=True))
    if all("depth" in r for r in results):
        out["depth"] = _depth_summary([r["depth"] for r in results], w)
    if all("concurrency" in r for r in results):  # served engines: per concurrency
        out["concurrency"] = {
            c: {
                key: _weighted([r["concurrency"][c][key] for r in results], w)
                for key in ("tau", "speedup", "spec_tokens_per_s", "plain_tokens_per_s")
            }
            | {"lossless": all(r["concurrency"][c]["lossless"] for r in results)}
            for c in results[0]["concurrency"]
        }
    return out


def _depth_summary(curves: list[dict[str, Any]], w: list[float]) -> dict[str, Any]:
    depth = min(c["max_depth"] for c in curves)
    tau = [_weighted([c["tau"][i] for c in curves], w) for i in range(depth)]
    return {"max_depth": depth, "k": list(range(1, depth + 1)), "tau": tau}


def set_table(sets: dict[str, dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per prompt set plus the weighted summary: what MLflow and Prefect show as a table."""
    rows = []
    for name, r in [*sets.items(), ("summary (weighted)", summary)]:
        row = {
            "set": name,
            "weight": summary["weights"].get(name, sum(summary["weights"].values())),
            "prompts": r["num_prompts"],
            "tau": round(r["tau"], 4),
            "alpha": " ".join(f"{a:.3f}" for a in r["alpha"]),
            "lossless": bool(r["lossless"]),
            "wall_speedup": round(r["wall_speedup"], 3),
        }
        if "depth" in r:
            row["tau_by_k"] = " ".join(f"{t:.3f}" for t in r["depth"]["tau"])
        rows.append(row)
    return rows
