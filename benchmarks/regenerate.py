"""Regeneration throughput on CPU: batched decoding (``HFGenerator``) vs one conversation at a time
with transformers' ``generate``, both greedy on the real SmolLM2-135M-Instruct, fp32, in one run.

Prompts are the first user turns of chitchat rendered with SmolLM2's chat template (what
``dataset.regenerate.max_turns: 2`` regenerates); replies stop at <|im_end|> or
``MAX_NEW_TOKENS``. The baseline runs on the first ``BASELINE_PROMPTS`` prompts (it is slow); each
batch size runs on all ``PROMPTS``. Throughput = generated tokens (stop token included) / wall
seconds. Other processes share these 2 cores, so figures move from run to run; the ratio is taken
within the run.

Usage: ``.venv/bin/python benchmarks/regenerate.py`` (no arguments; a few minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts in benchmarks/ may be named like library modules: never import from here.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import os  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PROMPTS = 32
BASELINE_PROMPTS = 6
MAX_NEW_TOKENS = 48
BATCH_SIZES = (8, 16, 32)
TARGET_RATIO = 4.0


def prompts_and_model() -> tuple[list[list[int]], Path, object]:
    from transformers import AutoTokenizer

    from spec_core.assets import resolve_dataset_path, resolve_target_path
    from spec_core.data.load import load_conversations

    cache = Path("~/.cache/specflow").expanduser()
    target = resolve_target_path("builtin:smollm2-135m-instruct", cache)
    data = resolve_dataset_path("builtin:chitchat", cache)
    tok = AutoTokenizer.from_pretrained(target)
    convs = load_conversations(data, limit=PROMPTS).conversations
    texts = [
        tok.apply_chat_template(
            [convs[i].messages[0].to_dict()], add_generation_prompt=True, tokenize=False
        )
        for i in range(PROMPTS)
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts], target, tok


def baseline(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[int, float]:
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(
                input_ids=torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=2,
            )
            tokens += out.shape[1] - len(p)
    return tokens, time.perf_counter() - start


def batched(gen: object, prompts: list[list[int]], batch_size: int) -> tuple[int, float, int]:
    from spec_core.data.generators import STOP, SamplingParams

    params = SamplingParams(MAX_NEW_TOKENS)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # as regenerate does
    tokens = stops = 0
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        outs = gen.generate([prompts[j] for j in order[i : i + batch_size]], params, 0)
        tokens += sum(o.num_tokens for o in outs)
        stops += sum(o.finish_reason == STOP for o in outs)
    return tokens, time.perf_counter() - start, stops


def main() -> int:
    from spec_core.config import RegenerateConfig
    from spec_core.data.generators import HFGenerator, SamplingParams

    threads = RegenerateConfig().num_threads  # the product default, for both sides
    if threads > 0:
        torch.set_num_threads(threads)
    prompts, target, tok = prompts_and_model()
    gen = HFGenerator(target, tok, [2], batch_size=max(BATCH_SIZES))
    print(
        f"SmolLM2-135M fp32, {torch.get_num_threads()} torch threads, {PROMPTS} chitchat prompts "
        f"(mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), max_new_tokens {MAX_NEW_TOKENS}",
        flush=True,
    )
    gen.generate(prompts[:2], SamplingParams(4), 0)  # warm-up
    base_tokens, base_s = baseline(gen.model, prompts[:BASELINE_PROMPTS])
    base_rate = base_tokens / base_s
    print(
        f"  unbatched generate : {base_tokens:5d} tokens {base_s:7.1f} s {base_rate:7.1f} tok/s",
        flush=True,
    )
    best = 0.0
    for size in BATCH_SIZES:
        tokens, seconds, stops = batched(gen, prompts, size)
        rate = tokens / seconds
        best = max(best, rate)
        print(
            f"  batched B={size:<3d}       : {tokens:5d} tokens {seconds:7.1f} s {rate:7.1f} tok/s "
            f"({rate / base_rate:.1f}x, {stops}/{PROMPTS} stopped at <|im_end|>)",
            flush=True,
        )
    ratio = best / base_rate
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(
        f"RESULT batched_over_unbatched_tok_per_s={ratio:.2f} target>={TARGET_RATIO} {verdict}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
