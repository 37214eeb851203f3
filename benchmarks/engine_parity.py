"""Engine parity and throughput: the same prompts through the HF reference and a production engine.

For each chitchat prompt (rendered with the target's chat template) the HF engine (fp32, the
capture convention's reference) and the engine under test (``--engine vllm`` by default, or
``sglang`` on a GPU) capture the same layers. For every capture index k the engine's column is
compared with HF's ``output_hidden_states`` at k - 1, k and k + 1: it must be closest to k (an
off-by-one fails even when it is within tolerance) and within the relative tolerance of the
engine dtype; the last hidden state must match HF's post-norm ``last_hidden_state``. Throughput
(samples/s, prefill tokens/s) is measured for both engines on the same prompts after a warm-up
batch, engine load time excluded.

Runs from the repo root with no arguments: with ``.venv/bin/python`` it re-executes itself under
``.venv-vllm/bin/python`` when vLLM is only installed there (``make vllm-venv``). On a GPU::

    python benchmarks/engine_parity.py --engine vllm --dtype bfloat16
    python benchmarks/engine_parity.py --engine sglang --dtype bfloat16

The last line is ``RESULT engine_parity_rel_err=<max> target<=<tol> PASS|FAIL``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the project from the repo root, never sibling scripts from this folder.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 3e-2}
VLLM_VENV = HERE.parent / ".venv-vllm"


def reexec_in_vllm_venv(engine: str) -> None:
    python = VLLM_VENV / "bin" / "python"
    if engine == "vllm" and importlib.util.find_spec("vllm") is None and python.is_file():
        if Path(sys.prefix).resolve() != VLLM_VENV.resolve():  # venv pythons share one binary
            print(f"vllm is not installed here; re-running under {python}", flush=True)
            os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


def load_prompts(cfg, num_samples: int):
    """Chitchat conversations rendered with the target's chat template, as TokenizedSamples."""
    from transformers import AutoTokenizer

    from spec_core.assets import resolve_dataset, resolve_target
    from spec_core.contracts.samples import TokenizedSample

    target = resolve_target(cfg)
    data = resolve_dataset(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    samples = []
    with open(data) as fh:
        for line in fh:
            record = json.loads(line)
            turns = record.get("conversations") or record.get("messages") or []
            messages = [
                {
                    "role": "user"
                    if t.get("from", t.get("role")) in ("human", "user")
                    else "assistant",
                    "content": t.get("value", t.get("content", "")),
                }
                for t in turns
            ]
            if not messages:
                continue
            rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
            ids = list(rendered["input_ids"])[: cfg.dataset.max_seq_length]
            samples.append(TokenizedSample(f"parity-{len(samples)}", ids, [1] * len(ids)))
            if len(samples) == num_samples:
                break
    return target, samples


def timed_capture(engine, samples, batch_size: int):
    """Captures for all samples, plus (samples/s, tokens/s) excluding the first (warm-up) batch."""
    out = engine.capture(samples[:batch_size])
    t0 = time.perf_counter()
    for start in range(batch_size, len(samples), batch_size):
        out.extend(engine.capture(samples[start : start + batch_size]))
    wall = time.perf_counter() - t0
    timed = samples[batch_size:]
    tokens = sum(len(s.input_ids) for s in timed)
    return out, (len(timed) / wall if wall else 0.0), (tokens / wall if wall else 0.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare(ref_caps, ref_indices, eng_caps, capture, hidden):
    """Max relative error per capture column, and the HF index each column is closest to."""
    errors: dict[str, float] = {}
    closest: dict[int, int] = {}
    for j, k in enumerate(capture):
        per_neighbour = {}
        for kk in (k - 1, k, k + 1):
            if kk not in ref_indices:
                continue
            col = ref_indices.index(kk)
            per_neighbour[kk] = max(
                rel_err(
                    e.aux_hidden[:, j * hidden : (j + 1) * hidden],
                    r.aux_hidden[:, col * hidden : (col + 1) * hidden],
                )
                for e, r in zip(eng_caps, ref_caps, strict=True)
            )
        errors[f"capture {k}"] = per_neighbour[k]
        closest[k] = min(per_neighbour, key=per_neighbour.get)
        neighbours = ", ".join(f"{kk}: {v:.2e}" for kk, v in sorted(per_neighbour.items()))
        print(f"  capture {k:>3}: rel err vs HF hidden_states[{{{neighbours}}}]")
    if eng_caps[0].last_hidden is not None:
        errors["last hidden"] = max(
            rel_err(e.last_hidden, r.last_hidden) for e, r in zip(eng_caps, ref_caps, strict=True)
        )
        print(f"  last hidden (post-norm): rel err {errors['last hidden']:.2e}")
    return errors, closest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "sglang", "hf"])
    parser.add_argument("--config", default="configs/smollm2-chitchat.yaml")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--mem-fraction", type=float, default=None)
    parser.add_argument("--extra-args", default="{}", help="JSON passed to the engine")
    args = parser.parse_args()
    reexec_in_vllm_venv(args.engine)

    from spec_core.config import load_config
    from spec_core.contracts.capture import CaptureSpec
    from spec_core.engines import build_engine
    from spec_core.engines.hf import HFEngine
    from spec_core.models.common.target import read_target_config

    on_gpu = torch.cuda.is_available()
    mem_fraction = args.mem_fraction or (0.5 if on_gpu else 0.25)  # CPU: share of the NUMA node
    overrides = [
        f"inference.engine={args.engine}",
        f"inference.batch_size={args.batch_size}",
        f"inference.tp_size={args.tp_size}",
        f"inference.mem_fraction={mem_fraction}",
        f"target.dtype={args.dtype}",
        "inference.dtype=float32",
    ]
    cfg = load_config(args.config, overrides)
    cfg.inference.extra_args = json.loads(args.extra_args)
    target, samples = load_prompts(cfg, args.num_samples)
    config = read_target_config(target)
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    capture = tuple(cfg.draft.capture_indices or (2, layers // 2, layers - 3))
    spec = CaptureSpec(capture, with_last_hidden=True, dtype=torch.float32)
    ref_indices = sorted({kk for k in capture for kk in (k - 1, k, k + 1) if 0 <= kk < layers})
    tokens = sum(len(s.input_ids) for s in samples)
    print(
        f"target {target.name}: {layers} layers, hidden {hidden}; {len(samples)} prompts, "
        f"{tokens} tokens; engine {args.engine} ({args.dtype}) vs HF fp32 reference"
    )

    device = "cuda" if on_gpu else "cpu"
    ref_spec = CaptureSpec(tuple(ref_indices), with_last_hidden=True, dtype=torch.float32)
    with HFEngine(target, ref_spec, device=device, batch_size=args.batch_size) as ref:
        ref_caps, hf_sps, hf_tps = timed_capture(ref, samples, args.batch_size)
    print(f"  HF fp32 ({device}): {hf_sps:.2f} samples/s, {hf_tps:.0f} prefill tokens/s")

    t0 = time.perf_counter()
    engine = build_engine(cfg, target, spec)
    load_s = time.perf_counter() - t0
    try:
        eng_caps, sps, tps = timed_capture(engine, samples, args.batch_size)
    finally:
        engine.close()
    print(
        f"  {args.engine} ({args.dtype}): load {load_s:.1f}s, {sps:.2f} samples/s, {tps:.0f} "
        f"prefill tokens/s ({sps / hf_sps if hf_sps else 0:.2f}x HF)"
    )
    for e, r in zip(eng_caps, ref_caps, strict=True):
        assert torch.equal(e.input_ids, r.input_ids), "engines saw different tokens"
    errors, closest = compare(ref_caps, ref_indices, eng_caps, capture, hidden)
    worst = max(errors.values())
    tol = TOLERANCE[args.dtype]
    off_by = {k: c for k, c in closest.items() if c != k}
    if off_by:
        print(f"  OFF-BY-ONE: engine columns are closest to HF indices {off_by}")
    ok = worst <= tol and not off_by
    print(f"RESULT engine_parity_rel_err={worst:.2e} target<={tol:g} {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
