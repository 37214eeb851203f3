"""Does vLLM (its CPU build) load our exported EAGLE-3 draft, and do its own acceptance counters
agree with specflow's evaluator on the same prompts?

Run with the vLLM venv (not .venv), in a network namespace with only loopback::

    unshare -n bash -c 'ip link set lo up; .venv-vllm/bin/python benchmarks/vllm_acceptance.py'

Input is an ``acceptance.json`` written by ``spec_core.evaluate`` (default: the newest one under
``outputs/runs/*/eval/``): it names the draft dir, the target dir, the decoding settings and, per
prompt, the prompt token ids and the tokens our evaluator produced. The script needs nothing from
specflow itself. It runs two vLLM engines in child processes, greedy, same prompts:

1. plain target (no speculation): the engine's reference greedy output;
2. target + ``speculative_config={"method": "eagle3", "model": <draft>, "num_speculative_tokens": k}``
   with ``disable_log_stats=False``; acceptance from ``llm.get_metrics()``:
   tau = 1 + accepted / drafts (vLLM's "mean acceptance length"), per-position counts.

Checks: speculative output == vLLM's plain greedy (lossless), how many prompts match our tokens,
and |tau_vllm - tau_ours|. vLLM batches the prompts and runs its own kernels, so a near-tie can
flip a token where HF fp32 did not; tau is compared over the whole set, the tolerance covers
that. The last line is ``RESULT vllm_tau_abs_diff=<d> target<=<tol> PASS|FAIL``; PASS needs the
draft to load, the engine to be lossless, and the difference within the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Python puts this script's folder first on sys.path; drop it so no sibling script can shadow a
# module that vLLM imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

TAU_TOLERANCE = 0.05
ENGINE_ARGS = dict(
    enforce_eager=True,
    max_model_len=1024,
    seed=0,
    gpu_memory_utilization=0.25,  # on CPU: the fraction of the NUMA node reserved for KV cache
)


def newest_eval_json(root: Path) -> Path:
    found = sorted(root.glob("runs/*/eval/acceptance.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(
            f"error: no {root}/runs/*/eval/acceptance.json; run `specflow evaluate` first or pass "
            "--eval-json"
        )
    return found[-1]


def spec_counters(llm) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for metric in llm.get_metrics():
        if metric.name in names:
            out[names[metric.name]] += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            values = list(metric.values)
            if len(out["per_pos"]) < len(values):
                out["per_pos"] += [0] * (len(values) - len(out["per_pos"]))
            out["per_pos"] = [a + int(b) for a, b in zip(out["per_pos"], values, strict=False)]
    return out


def run_engine(job: dict) -> dict:
    """Child process: one engine, all prompts in one generate() call."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(ENGINE_ARGS, model=job["target"], dtype=job["dtype"], disable_log_stats=False)
    if job["draft"]:
        kwargs["speculative_config"] = {
            "method": "eagle3",
            "model": job["draft"],
            "num_speculative_tokens": job["k"],
        }
    started = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - started
    params = SamplingParams(
        temperature=0.0,
        max_tokens=job["max_new_tokens"],
        ignore_eos=job["ignore_eos"],
        stop_token_ids=job["stop_ids"] or None,
    )
    before = spec_counters(llm)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params)
    gen_s = time.perf_counter() - started
    after = spec_counters(llm)
    counters = {
        k: (after[k] - before[k])
        if k != "per_pos"
        else [a - b for a, b in zip(after[k], before[k] + [0] * len(after[k]), strict=False)]
        for k in after
    }
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "counters": counters,
        "load_s": load_s,
        "generate_s": gen_s,
    }


def engine_in_child(job: dict, name: str, workdir: Path) -> dict:
    job_file, out_file = workdir / f"{name}-job.json", workdir / f"{name}-out.json"
    job_file.write_text(json.dumps(job))
    log_file = workdir / f"{name}.log"
    with log_file.open("w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(job_file), str(out_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"error: the {name} engine failed (exit {proc.returncode}); log above")
    return json.loads(out_file.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-json", default=None, help="acceptance.json from specflow evaluate")
    parser.add_argument("--outputs", default="outputs", help="where to look for the newest one")
    parser.add_argument("--draft", default=None, help="override the draft dir in the JSON")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(run_engine(job)))
        return 0

    eval_json = Path(args.eval_json) if args.eval_json else newest_eval_json(Path(args.outputs))
    ours = json.loads(eval_json.read_text())
    # per-set records (``sets``) since evaluation.prompts; one flat list before
    records = ours.get("prompts") or [r for s in ours["sets"].values() for r in s["prompts"]]
    if not records or "prompt_ids" not in records[0]:
        raise SystemExit(f"error: {eval_json} has no per-prompt token ids; re-run the evaluation")
    settings = ours["settings"]
    k = int(settings["num_draft_tokens"])
    draft = args.draft or ours["hf_dir"]
    job = {
        "target": ours["target_dir"],
        "dtype": args.dtype,
        "k": k,
        "max_new_tokens": int(settings["max_new_tokens"]),
        "ignore_eos": bool(settings["ignore_eos"]),
        "stop_ids": settings.get("stop_ids", []),
        "prompts": [r["prompt_ids"] for r in records],
        "draft": None,
    }
    print(f"evaluator result: {eval_json}")
    print(
        f"draft: {draft}\ntarget: {job['target']} ({args.dtype}), {len(records)} prompts, "
        f"k={k}, {job['max_new_tokens']} new tokens"
    )
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory(prefix="vllm-acceptance-") as tmp:
        plain = engine_in_child(job, "plain", Path(tmp))
        spec = engine_in_child({**job, "draft": draft}, "eagle3", Path(tmp))

    c = spec["counters"]
    tau_vllm = 1.0 + c["accepted"] / c["drafts"] if c["drafts"] else float("nan")
    per_pos = c["per_pos"][:k]
    reached = [c["drafts"], *per_pos[:-1]]
    alpha_vllm = [p / r if r else 0.0 for p, r in zip(per_pos, reached, strict=False)]
    lossless = spec["tokens"] == plain["tokens"]
    same_as_ours = sum(s == r["tokens"] for s, r in zip(spec["tokens"], records, strict=True))
    diff = abs(tau_vllm - float(ours["tau"]))
    ok = c["drafts"] > 0 and lossless and diff <= TAU_TOLERANCE

    print(
        f"vLLM load {spec['load_s']:.1f}s, generate {spec['generate_s']:.1f}s "
        f"(plain generate {plain['generate_s']:.1f}s)"
    )
    print(
        f"vLLM counters: drafts {c['drafts']}, draft tokens {c['draft_tokens']}, accepted "
        f"{c['accepted']}, per position {per_pos}"
    )
    print(
        f"ours:          steps {ours['num_steps']}, draft tokens {ours['num_draft_tokens']}, "
        f"accepted {ours['num_accepted_tokens']}, per position {ours['accepted_per_position']}"
    )
    print(f"tau   vLLM {tau_vllm:.4f}  ours {ours['tau']:.4f}")
    print(
        "alpha vLLM "
        + " ".join(f"{a:.3f}" for a in alpha_vllm)
        + "  ours "
        + " ".join(f"{a:.3f}" for a in ours["alpha"])
    )
    print(
        f"vLLM speculative == vLLM plain greedy: {lossless}; prompts identical to our "
        f"evaluator's tokens: {same_as_ours}/{len(records)}"
    )
    print(f"RESULT vllm_tau_abs_diff={diff:.4f} target<={TAU_TOLERANCE} {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
