"""Acceptance as the serving engine measures it (``evaluation.engine: vllm | sglang``).

The evaluator's prompt sets go to the engine that will serve the draft, started twice on the
target in the engine's own venv (``spec_core/engines/eval_worker.py``): plain, then with the
exported draft as its speculative method (vLLM: ``speculative_config.method`` = the draft's
algorithm, ``eagle3``; vLLM 0.32 also names ``dflash``/``dspark``). Every set runs greedily at
concurrency 1 and at ``evaluation.concurrency``. From the engine's own counters at concurrency 1:
tau = 1 + accepted / drafts (vLLM's mean acceptance length), acceptance per position = accepted at
position i / drafts, alpha_i = accepted at i / accepted at i - 1, and the accept-length histogram
(drafts stop at the first rejection, so rounds with exactly i accepted = accepted at i - 1 minus
accepted at i). Throughput is output tokens / wall seconds with and without the draft at each
concurrency, and the speed-up their ratio. Lossless means the speculative engine's tokens equal
the same engine's plain greedy tokens, prompt by prompt, at every concurrency.

The result per set has the in-process evaluator's fields (so the weighted summary, MLflow and the
gate treat both alike) plus ``concurrency``: per concurrency, tau, tokens/s both ways, speed-up and
losslessness. There is no depth sweep here: that needs acceptance at every output position.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from spec_core.config import EvaluationConfig
from spec_core.data.prompt_sets import PromptSet
from spec_core.errors import ConfigError, ServiceError

WORKER = "spec_core.engines.eval_worker"
ENGINE_TIMEOUT_S = 3600


def engine_job(
    ev: EvaluationConfig,
    hf_dir: str | Path,
    target_dir: Path,
    sets: list[PromptSet],
    stop_ids: set[int],
    dtype: str = "float32",
) -> dict[str, Any]:
    """What the worker runs: target, draft and its engine method, settings, prompts."""
    from spec_core.models import algorithm_of

    longest = max(len(p.input_ids) for s in sets for p in s.prompts)
    return {
        "engine": ev.engine,
        "target": str(target_dir),
        "draft": str(hf_dir),
        "method": algorithm_of(hf_dir).name,
        "k": ev.num_draft_tokens,
        "dtype": dtype,
        "max_new_tokens": ev.max_new_tokens,
        # the prompt, the budget and the k drafts a last verify step may hold
        "max_model_len": longest + ev.max_new_tokens + ev.num_draft_tokens + 8,
        "ignore_eos": ev.ignore_eos,
        "stop_ids": sorted(stop_ids),
        "concurrency": sorted({1, ev.concurrency}),
        "mem_fraction": ev.mem_fraction,
        "engine_args": dict(ev.engine_args),
        "sets": {s.name: [p.input_ids for p in s.prompts] for s in sets},
    }


def run_worker(python: str, job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The worker in the engine venv; its log's tail in the error when it fails."""
    if not Path(python).is_file():
        raise ConfigError(
            f"'evaluation.python' {python} is not an executable file; point it at the "
            f"{job['engine']} venv's python (e.g. .venv-vllm/bin/python from `make vllm-venv`)"
        )
    job_file, out_file, log_file = (workdir / n for n in ("job.json", "out.json", "engine.log"))
    job_file.write_text(json.dumps(job))
    with log_file.open("w") as log:
        proc = subprocess.run(
            [python, "-m", WORKER, str(job_file), str(out_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=ENGINE_TIMEOUT_S,
        )
    if proc.returncode != 0 or not out_file.is_file():
        tail = " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-5:])
        raise ServiceError(f"{job['engine']} evaluation failed (exit {proc.returncode}): {tail}")
    return json.loads(out_file.read_text())


def evaluate_served(
    ev: EvaluationConfig,
    hf_dir: str | Path,
    target_dir: Path,
    sets: list[PromptSet],
    stop_ids: set[int],
) -> dict[str, dict[str, Any]]:
    """Per-set results measured by ``ev.engine`` (see the module docstring)."""
    if ev.python is None:
        raise ConfigError(
            f"evaluation.engine {ev.engine} runs in the engine's own venv: set 'evaluation.python' "
            f"(or 'inference.python') to its interpreter, e.g. .venv-vllm/bin/python from "
            "`make vllm-venv`"
        )
    job = engine_job(ev, hf_dir, target_dir, sets, stop_ids)
    python = ev.python
    with tempfile.TemporaryDirectory(prefix=f"specflow-{ev.engine}-eval-") as tmp:
        raw = run_worker(python, job, Path(tmp))
    return {s.name: set_result(s, raw, ev.num_draft_tokens) for s in sets}


def counter_stats(counters: dict[str, Any], k: int) -> dict[str, Any]:
    """tau, alpha_k, per-position acceptance and the accept-length histogram from the counters."""
    drafts, accepted = int(counters["drafts"]), int(counters["accepted"])
    per_pos = (list(counters["per_pos"]) + [0] * k)[:k]
    reached = [drafts, *per_pos[:-1]]
    histogram = [r - p for r, p in zip(reached, per_pos, strict=True)] + [per_pos[-1]]
    return {
        "tau": 1.0 + accepted / drafts if drafts else 1.0,
        "alpha": [p / r if r else 0.0 for p, r in zip(per_pos, reached, strict=True)],
        "accept_rate_per_position": [p / drafts if drafts else 0.0 for p in per_pos],
        "acceptance_rate": accepted / counters["draft_tokens"] if counters["draft_tokens"] else 0.0,
        "num_steps": drafts,
        "num_draft_tokens": int(counters["draft_tokens"]),
        "num_accepted_tokens": accepted,
        "accepted_per_position": per_pos,
        "accept_length_histogram": histogram,
    }


def set_result(ps: PromptSet, raw: dict[str, Any], k: int) -> dict[str, Any]:
    """One set's result in the evaluator's schema, from the worker's raw phases."""
    plain, spec = (raw["modes"][m]["sets"][ps.name] for m in ("plain", "spec"))
    by_c = {}
    for c in spec:
        same = [a == b for a, b in zip(spec[c]["tokens"], plain[c]["tokens"], strict=True)]
        spec_tokens = sum(len(t) for t in spec[c]["tokens"])
        plain_tokens = sum(len(t) for t in plain[c]["tokens"])
        spec_tps = spec_tokens / max(spec[c]["wall_s"], 1e-9)
        plain_tps = plain_tokens / max(plain[c]["wall_s"], 1e-9)
        by_c[c] = {
            "tau": counter_stats(spec[c]["counters"], k)["tau"],
            "spec_tokens_per_s": spec_tps,
            "plain_tokens_per_s": plain_tps,
            "speedup": spec_tps / max(plain_tps, 1e-9),
            "lossless": all(same),
            "mismatched_prompts": [p.id for p, ok in zip(ps.prompts, same, strict=True) if not ok],
        }
    one = spec["1"]
    records = [
        {
            "id": p.id,
            "prompt_tokens": len(p.input_ids),
            "prompt_ids": p.input_ids,
            "new_tokens": len(tokens),
            "tokens": tokens,
            "lossless": tokens == plain["1"]["tokens"][i],
        }
        for i, (p, tokens) in enumerate(zip(ps.prompts, one["tokens"], strict=True))
    ]
    generated = sum(len(t) for t in one["tokens"])
    return {
        **counter_stats(one["counters"], k),
        "lossless": all(c["lossless"] for c in by_c.values()),
        "mismatched_prompts": sorted({m for c in by_c.values() for m in c["mismatched_prompts"]}),
        "num_prompts": len(ps.prompts),
        "generated_tokens": generated,
        "speculative": {"wall_s": one["wall_s"], "tokens_per_s": by_c["1"]["spec_tokens_per_s"]},
        "baseline": {
            "tau": 1.0,
            "wall_s": plain["1"]["wall_s"],
            "tokens_per_s": by_c["1"]["plain_tokens_per_s"],
        },
        "wall_speedup": by_c["1"]["speedup"],
        "concurrency": by_c,
        "engine_load_s": {m: raw["modes"][m]["load_s"] for m in ("plain", "spec")},
        "prompts": records,
    }
