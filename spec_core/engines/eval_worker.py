"""Speculative decoding served by a real engine, for ``evaluation.engine: vllm | sglang``.

Runs inside the engine's own venv (``python -m spec_core.engines.eval_worker JOB OUT``: vLLM's and
SGLang's pins clash with the trainer's); this module imports only the standard library and the
engine. ``JOB`` (JSON) names the target, the exported draft and its engine ``method``, k, the
decoding settings, the concurrencies and the prompt sets (token ids); ``OUT`` gets, per engine mode
(``plain``, ``spec``), set and concurrency: the output tokens, the wall time and the engine's own
spec-decode counters for that phase (deltas of its cumulative counters: drafts, draft tokens,
accepted tokens, accepted per position).

``EvalRunner`` is the small interface an engine implements: start with or without the draft,
``generate`` a list of prompts with at most ``concurrency`` requests in flight, read its counters.

* ``VllmRunner`` - ``vllm.LLM`` with ``speculative_config {"method", "model",
  "num_speculative_tokens"}`` and stats on; counters from ``LLM.get_metrics()``
  (``vllm:spec_decode_num_drafts``, ``…_num_draft_tokens``, ``…_num_accepted_tokens``,
  ``…_num_accepted_tokens_per_pos``). Runs here on vLLM's CPU build (``make vllm-test``).
* ``SglangRunner`` - ``sglang.Engine`` with ``speculative_algorithm`` EAGLE3, top-1 chains of k
  steps; SGLang reports per request ``spec_verify_ct`` and ``completion_tokens`` (no per-position
  counts). **GPU only (SGLang has no CPU build); not run on this machine.**

Concurrency c > 1 submits the prompts in groups of c (one ``generate`` call each), so at most c
requests are in flight; the engine batches them as it serves.
"""

from __future__ import annotations

import json
import os
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

COUNTER_KEYS = ("drafts", "draft_tokens", "accepted")


class EvalRunner(ABC):
    def __init__(self, job: dict[str, Any], speculative: bool) -> None:
        self.job, self.speculative = job, speculative

    @abstractmethod
    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy output tokens of ``prompts``, submitted together."""

    @abstractmethod
    def counters(self) -> dict[str, Any]:
        """Cumulative spec-decode counters: drafts, draft_tokens, accepted, per_pos (list)."""

    def close(self) -> None:
        """Stop the engine."""


class VllmRunner(EvalRunner):
    def __init__(self, job: dict[str, Any], speculative: bool) -> None:
        super().__init__(job, speculative)
        from vllm import LLM, SamplingParams

        kwargs = dict(
            model=job["target"],
            dtype=job["dtype"],
            enforce_eager=True,
            max_model_len=job["max_model_len"],
            max_num_seqs=max(job["concurrency"]),
            seed=0,
            disable_log_stats=False,
            gpu_memory_utilization=job["mem_fraction"],
        )
        if speculative:
            kwargs["speculative_config"] = {
                "method": job["method"],
                "model": job["draft"],
                "num_speculative_tokens": job["k"],
            }
        self.llm = LLM(**kwargs, **job.get("engine_args", {}))
        self.params = SamplingParams(
            temperature=0.0,
            max_tokens=job["max_new_tokens"],
            ignore_eos=job["ignore_eos"],
            stop_token_ids=job["stop_ids"] or None,
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], self.params, use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outputs]

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: 0 for key in COUNTER_KEYS}
        out["per_pos"] = []
        names = {
            "vllm:spec_decode_num_drafts": "drafts",
            "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted",
        }
        for metric in self.llm.get_metrics():
            if metric.name in names:
                out[names[metric.name]] += int(metric.value)
            elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
                values = [int(v) for v in metric.values]
                out["per_pos"] += [0] * (len(values) - len(out["per_pos"]))
                out["per_pos"] = [a + b for a, b in zip(out["per_pos"], values, strict=False)]
        return out

    def close(self) -> None:
        del self.llm


class SglangRunner(EvalRunner):
    """GPU only: SGLang has no CPU build."""

    def __init__(self, job: dict[str, Any], speculative: bool) -> None:
        super().__init__(job, speculative)
        import sglang as sgl

        kwargs = dict(
            model_path=job["target"],
            dtype=job["dtype"],
            context_length=job["max_model_len"],
            max_running_requests=max(job["concurrency"]),
            mem_fraction_static=job["mem_fraction"],
            random_seed=0,
        )
        if speculative:
            kwargs.update(
                speculative_algorithm="EAGLE3",
                speculative_draft_model_path=job["draft"],
                speculative_num_steps=job["k"],
                speculative_eagle_topk=1,
                speculative_num_draft_tokens=job["k"] + 1,
            )
        self.engine = sgl.Engine(**kwargs, **job.get("engine_args", {}))
        self.totals = {key: 0 for key in COUNTER_KEYS}
        self.sampling = {
            "temperature": 0.0,
            "max_new_tokens": job["max_new_tokens"],
            "ignore_eos": job["ignore_eos"],
            "stop_token_ids": job["stop_ids"] or None,
        }

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        outputs = self.engine.generate(input_ids=prompts, sampling_params=self.sampling)
        for o in outputs:
            verify = int(o["meta_info"].get("spec_verify_ct", 0))
            self.totals["drafts"] += verify
            self.totals["draft_tokens"] += verify * self.job["k"]
            self.totals["accepted"] += max(0, int(o["meta_info"]["completion_tokens"]) - verify)
        return [list(o["output_ids"]) for o in outputs]

    def counters(self) -> dict[str, Any]:
        return {**self.totals, "per_pos": []}

    def close(self) -> None:
        self.engine.shutdown()


RUNNERS = {"vllm": VllmRunner, "sglang": SglangRunner}


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {key: after[key] - before[key] for key in COUNTER_KEYS}
    base = before["per_pos"] + [0] * (len(after["per_pos"]) - len(before["per_pos"]))
    out["per_pos"] = [a - b for a, b in zip(after["per_pos"], base, strict=True)]
    return out


def run_phase(runner: EvalRunner, prompts: list[list[int]], concurrency: int) -> dict[str, Any]:
    """All ``prompts`` with at most ``concurrency`` in flight: tokens, wall time, counters."""
    before = runner.counters()
    started = time.perf_counter()
    tokens: list[list[int]] = []
    for i in range(0, len(prompts), concurrency):
        tokens += runner.generate(prompts[i : i + concurrency])
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "counters": _delta(runner.counters(), before)}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Both engine modes, every set, every concurrency (the plain engine first)."""
    result: dict[str, Any] = {"engine": job["engine"], "modes": {}}
    for mode in ("plain", "spec"):
        started = time.perf_counter()
        runner = RUNNERS[job["engine"]](job, speculative=mode == "spec")
        load_s = time.perf_counter() - started
        try:
            phases = {
                name: {str(c): run_phase(runner, prompts, c) for c in job["concurrency"]}
                for name, prompts in job["sets"].items()
            }
        finally:
            runner.close()
        result["modes"][mode] = {"load_s": load_s, "sets": phases}
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m spec_core.engines.eval_worker JOB.json OUT.json", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_job(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
