"""EAGLE-3 train step on CPU: specflow vs a naive full-vocab implementation, in one run.

Shapes are SmolLM2-135M's (H 576, 9/3 heads, head_dim 64, MLP 1536, target vocab 49,152), fp32,
TTT 7, draft vocab 8,192 (the embedded default). One step = TTT forward + loss + backward + AdamW.
"naive" is ``spec_core.models.eagle3.reference`` (TorchSpec's SDPA-path structure: every step on every
position, explicit attention scores, target and draft logits materialized over [B, T, V]).
Timing: ours and naive alternate step by step in one subprocess per shape (background load on
these shared 2 cores hits both alike), best of 3 after a warm-up. Memory: one fresh subprocess
per measurement, peak RSS of a step above what the model and batch already hold.

The headline compares our step time with TorchSpec's own model and loss re-measured on one of these
machines on a quiet hour: 4.4-4.7 s for 4 x 256 and 5.6-6.1 s for 1 x 1024 (the midpoints below;
the earlier 5.70 / 7.22 s came from a slower box and flattered us), with every real token supervised (our worst case: no
unsupervised rows to skip). Memory is reported for draft vocab 8,192 and 49,152 (no pruning):
ours grows with the vocabulary only by the lm_head's own gradient and optimizer temporaries
(O(V x H), whatever B x T is; measured at 1 x 64), the naive one grows with B x T x V.

Usage: ``.venv/bin/python benchmarks/train_step.py`` (no arguments; a few minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts in benchmarks/ may be named like stdlib modules (tokenize.py): never import from here.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

TARGET_VOCAB = 49152
DRAFT_VOCAB = 8192
TTT = 7
SHAPES = [(4, 256), (1, 1024)]
TORCHSPEC_S = {(4, 256): 4.55, (1, 1024): 5.85}
TARGET_RATIO = 0.5
SMOLLM2 = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": TARGET_VOCAB,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_draft(target: dict, ttt: int, draft_vocab: int):
    """A seeded EAGLE-3 draft for ``target`` and, when ``draft_vocab`` prunes, a random draft
    vocabulary set on it; returns (model, t2d or None). The GPU check builds its drafts here too."""
    import torch

    from spec_core.config import DraftConfig
    from spec_core.models.eagle3.config import derive_eagle3_config
    from spec_core.models.eagle3.model import Eagle3Draft

    vocab = target["vocab_size"]
    torch.manual_seed(0)
    cfg = derive_eagle3_config(target, DraftConfig(ttt_length=ttt), draft_vocab)
    model = Eagle3Draft(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    t2d = None
    if cfg.pruned:
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[torch.randperm(vocab)[:draft_vocab]] = True
        model.set_vocab_map(t2d.nonzero().squeeze(1) - torch.arange(draft_vocab), t2d)
    return model, t2d


def build(bsz: int, length: int, draft_vocab: int):
    """Draft, batch and target head for one configuration; returns {impl: step function}."""
    import torch

    from spec_core.models.common.target import TargetProjection
    from spec_core.models.eagle3.losses import pooled_scales, supervised_counts
    from spec_core.models.eagle3.reference import reference_loss

    model, t2d = random_draft(SMOLLM2, TTT, draft_vocab)
    hidden = SMOLLM2["hidden_size"]
    ids = torch.randint(0, TARGET_VOCAB, (bsz, length))
    attn = torch.ones(bsz, length, dtype=torch.bool)
    loss_mask = torch.ones(bsz, length, dtype=torch.uint8)
    aux = torch.randn(bsz, length, 3 * hidden)
    last = torch.nn.functional.rms_norm(torch.randn(bsz, length, hidden), (hidden,))
    lm_head = torch.randn(TARGET_VOCAB, hidden) * 0.05
    proj = TargetProjection.build(lm_head, t2d)
    if proj.rest is not None and torch.cpu._is_avx512_bf16_supported():
        proj.rest = proj.rest.to(torch.bfloat16)  # as the trainer does on this hardware
    scales = pooled_scales(supervised_counts(loss_mask, attn, TTT), TTT, 0.8)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(impl: str) -> float:
        started = time.perf_counter()
        if impl == "ours":
            loss, _ = model(ids, attn, loss_mask, aux, last, proj, scales)
        else:
            loss, _ = reference_loss(model, ids, attn, loss_mask, aux, last, lm_head, scales)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def measure_time(bsz: int, length: int, draft_vocab: int, rounds: int) -> dict:
    """Ours and naive alternate in one process, so background load hits both alike."""
    step = build(bsz, length, draft_vocab)
    step("ours"), step("naive")  # warm-up (allocator, oneDNN primitives)
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for _ in range(rounds):
        for impl in times:
            times[impl].append(step(impl))
    return {impl: min(ts) for impl, ts in times.items()} | {"times": times}


def measure_memory(impl: str, bsz: int, length: int, draft_vocab: int) -> dict:
    """Peak RSS of one step above what the model and batch already hold."""
    step = build(bsz, length, draft_vocab)
    step(impl)  # warm-up: optimizer state and allocator pools exist afterwards
    base = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    step(impl)
    return {"peak_mb": _rss_mb("VmHWM") - base}


def run_child(*args: object) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    import torch

    print(
        f"EAGLE-3 train step, CPU fp32, {torch.get_num_threads()} threads, TTT {TTT}, SmolLM2 "
        f"shapes, target vocab {TARGET_VOCAB}, draft vocab {DRAFT_VOCAB}, all tokens supervised; "
        "best of 3 alternating steps after warm-up"
    )
    print(
        f"{'shape':>9} {'ours s':>8} {'naive s':>8} {'speedup':>8} {'torchspec s':>12} "
        f"{'ours/torchspec':>15}"
    )
    ratios = []
    for bsz, length in SHAPES:
        t = run_child("time", bsz, length, DRAFT_VOCAB, 3)
        ratio = t["ours"] / TORCHSPEC_S[(bsz, length)]
        ratios.append(ratio)
        print(
            f"{bsz:>3}x{length:<5} {t['ours']:>8.2f} {t['naive']:>8.2f} "
            f"{t['naive'] / t['ours']:>7.2f}x {TORCHSPEC_S[(bsz, length)]:>12.2f} {ratio:>15.2f}"
        )

    print("\npeak step memory above model + batch (MB):")
    print(f"{'shape':>9} {'vocab':>6} {'ours':>7} {'naive':>7}")
    mem: dict[tuple, dict[str, float]] = {}
    for bsz, length in SHAPES:
        for vocab in (DRAFT_VOCAB, TARGET_VOCAB):
            mem[(bsz, length, vocab)] = {
                impl: run_child("memory", impl, bsz, length, vocab)["peak_mb"]
                for impl in ("ours", "naive")
            }
            m = mem[(bsz, length, vocab)]
            print(f"{bsz:>3}x{length:<5} {vocab:>6} {m['ours']:>7.0f} {m['naive']:>7.0f}")
    # What may grow with the vocab without any [B, T, V] tensor is the lm_head's own state (its
    # gradient, AdamW temporaries): measured directly at a tiny batch, where activations are
    # negligible. Ours passes if, at the real shapes, it adds less than ONE fp32 [B*T, dV] tensor
    # on top of that, i.e. it never materializes logits over batch x sequence x vocab.
    tiny = {
        v: run_child("memory", "ours", 1, 64, v)["peak_mb"] for v in (DRAFT_VOCAB, TARGET_VOCAB)
    }
    head_state_mb = tiny[TARGET_VOCAB] - tiny[DRAFT_VOCAB]
    print(
        f"1x64: vocab {DRAFT_VOCAB} -> {TARGET_VOCAB} adds {head_state_mb:.0f} MB (lm_head state)"
    )
    flat = True
    for b, n in SHAPES:
        ours, naive = (
            mem[(b, n, TARGET_VOCAB)][impl] - mem[(b, n, DRAFT_VOCAB)][impl]
            for impl in ("ours", "naive")
        )
        one_btv_mb = b * n * (TARGET_VOCAB - DRAFT_VOCAB) * 4 / 2**20
        flat &= ours <= head_state_mb + one_btv_mb
        print(
            f"{b}x{n}: adds {ours:.0f} MB to ours, {naive:.0f} MB to naive (bound: lm_head state "
            f"{head_state_mb:.0f} + one [B*T, dV] fp32 tensor {one_btv_mb:.0f} MB)"
        )
    worst = max(ratios)
    verdict = "PASS" if worst <= TARGET_RATIO and flat else "FAIL"
    print(f"RESULT train_step_vs_torchspec={worst:.2f} target<={TARGET_RATIO} {verdict}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "time":
            result = measure_time(*map(int, rest))
        else:
            result = measure_memory(rest[0], *map(int, rest[1:]))
        print(json.dumps(result))
    else:
        sys.exit(main())
