"""One prepared GPU check: specflow's CUDA paths proven in one short run (issue 23).

A GPU machine is lent to us only now and then, for minutes, without network. So everything the
check needs beyond the GPU image (Python 3.12, torch + CUDA, transformers, triton, pytest,
accelerate, safetensors) travels with it in one small bundle, built on a development machine by
``make gpu-check`` (``--prepare-bundle DIR``, default ``.gpu-check/``, git-ignored, ~4 MB):

* ``tokenizer/``: SmolLM2's real tokenizer files (tokenizer.json, tokenizer_config.json,
  chat_template.jinja); the targets are tiny random-weight Llamas built on the GPU from a config,
  since the real SmolLM2 (98 MB GGUF) and chitchat (39 MB) exceed the 64 MiB carry limit;
* ``data/``: a slice of chitchat tokenized once by specflow's own data pipeline:
  ``train.jsonl`` (sample_id, input_ids, loss_mask), ``eval_prompts.jsonl`` (evaluator prompt ids)
  and ``conversations.jsonl`` (the held-out conversations those prompts come from, for reading);
* ``wheels/``: pure-Python packages spec_core imports that the image lacks (omegaconf); they are
  installed with ``pip --no-index --find-links`` into ``<work>/site`` only if missing there.

The trainer reads the JSONL split through a small reader patched over ``TokenizedSplit.load`` (the
``datasets`` package and its 50 MB of pyarrow would not fit; the data layer is not a CUDA path).

Run: ``python checks/gpu_check.py --out DIR`` from the repo root. On the lent device:
``run(command="python checks/gpu_check.py --out $OUT", carry=[".gpu-check"])``. Each check runs
in its own process group with its own timeout, under an overall budget (8 minutes by default), so
a failure or a hang is reported and the next check still runs. Without CUDA every CUDA check is
``skipped`` with its reason and only the cheap CPU checks run; ``--self-test`` adds a passing, a
failing and a hanging dummy check to prove the runner itself (tests/test_gpu_check.py).
Output: ``DIR/report.json`` (schema below, ``REPORT_SCHEMA``), ``DIR/summary.txt``, ``DIR/logs/``.
``--render-docs REPORT`` fills the GPU status sections of deployments/gpu_engines.md and README.md
from a report (and keeps it as docs/gpu-check/latest.json); those sections are never edited by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REPORT_SCHEMA = 1
DEFAULT_BUNDLE = ROOT / ".gpu-check"
DEFAULT_BUDGET_S = 480.0  # the 8 minutes on one H100
STATUSES = ("pass", "fail", "skipped")
# import name -> pip requirement, for what spec_core needs and the GPU image may lack
CARRIED_PACKAGES = {"omegaconf": "omegaconf==2.4.0"}
SLICE = {"conversations": 48, "eval_conversations": 8, "max_seq_length": 256}
EAGLE3_STEPS = 12  # the bf16 run; resumed from its middle checkpoint
DOCS_BEGIN, DOCS_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
DOCS_REPORT = ROOT / "docs" / "gpu-check" / "latest.json"


# =============================================================================================
# spec_core adapter: the ONLY place this script names spec_core; re-point imports here.
# =============================================================================================


# The name this script uses -> "module" (same attribute name) or "module:attribute".
SPEC_CORE = {
    "ttt_attention_explicit": "spec_core.models.eagle3.attention",
    "row_segments": "spec_core.models.eagle3.attention",
    "ttt_attention_flex": "spec_core.models.eagle3.attention",
    "ttt_attention_sdpa": "spec_core.models.eagle3.attention",
    "Eagle3Config": "spec_core.models.eagle3.config",
    "Eagle3Draft": "spec_core.models.eagle3.model",
    "TargetProjection": "spec_core.models.common.target",
    "pooled_scales": "spec_core.models.eagle3.losses",
    "supervised_counts": "spec_core.models.eagle3.losses",
    "reference_loss": "spec_core.models.eagle3.reference",
    "load_config": "spec_core.config",
    "TrainJob": "spec_core.training.job",
    "TokenizedSplit": "spec_core.training.inprocess",
    "worker_main": "spec_core.training.worker:main",
    "CaptureSpec": "spec_core.contracts.capture",
    "TokenizedSample": "spec_core.contracts.samples",
    "HFEngine": "spec_core.engines.hf",
    "EvalPrompt": "spec_core.evaluate",
    "load_target": "spec_core.evaluate",
    "run_evaluation": "spec_core.evaluate",
    "export_draft": "spec_core.export",
    "algorithm_of": "spec_core.models",
    "TOKENIZER_FILES": "spec_core.assets",
    "TINY_TARGET_VOCAB": "spec_core.assets",
    "build_tiny_target": "spec_core.assets",
    # development machine only (needs datasets, the SmolLM2 and chitchat packages)
    "resolve_target_path": "spec_core.assets",
    "ConversationRenderer": "spec_core.data.render",
    "load_tokenized": "spec_core.data.tokenize",
    "prepare_dataset": "spec_core.data.tokenize",
    "load_prompts": "spec_core.evaluate",
    "cache_dir": "spec_core.paths",
}


class SpecCore:
    """``sc.<name>``: the spec_core object named in ``SPEC_CORE``, imported on first use, so a
    cheap check imports only what it touches (and no torch)."""

    def __getattr__(self, name: str) -> Any:
        module, _, attribute = SPEC_CORE[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)


sc = SpecCore()


# =============================================================================================
# results, checks, registry
# =============================================================================================


@dataclass
class CheckResult:
    name: str
    status: str  # pass | fail | skipped
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    cuda: bool = False  # whether the check needs a CUDA device
    summary: str = ""  # what the check proves, one line


class SkipCheck(Exception):
    """The check cannot run here (no CUDA, no bundle, a prerequisite failed)."""


class CheckFailed(Exception):
    def __init__(self, reason: str, figures: Optional[dict[str, Any]] = None) -> None:
        super().__init__(reason)
        self.figures = figures or {}


def expect(ok: bool, reason: str, figures: dict[str, Any]) -> None:
    if not ok:
        raise CheckFailed(reason, figures)


@dataclass
class Context:
    bundle: Path
    work: Path
    out: Path
    cuda: bool

    @property
    def data(self) -> Path:
        return self.bundle / "data"

    @property
    def tokenizer(self) -> Path:
        return self.bundle / "tokenizer"


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], dict[str, Any]]
    summary: str
    cuda: bool = True
    timeout_s: float = 120.0
    requires: tuple[str, ...] = ()


REGISTRY: dict[str, Check] = {}
SELF_TEST: dict[str, Check] = {}


def check(
    summary: str, *, cuda: bool = True, timeout_s: float = 120.0, requires=(), self_test=False
):
    def register(fn: Callable[[Context], dict[str, Any]]):
        name = fn.__name__.removeprefix("check_")
        table = SELF_TEST if self_test else REGISTRY
        table[name] = Check(name, fn, summary, cuda, timeout_s, tuple(requires))
        return fn

    return register


# ----------------------------------------------------------------------------- helpers


def rel_err(got: Any, want: Any) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def need_bundle(ctx: Context) -> None:
    if not (ctx.bundle / "bundle.json").is_file():
        raise SkipCheck(f"no bundle at {ctx.bundle} (`make gpu-check` prepares it)")


def tiny_target(ctx: Context, hidden: int = 256, layers: int = 4) -> Path:
    """spec_core's tiny random target with the bundle's real tokenizer, built once per work dir."""
    out = ctx.work / f"tiny-target-h{hidden}-l{layers}"
    if (out / "config.json").is_file():
        return out
    return sc.build_tiny_target(out, ctx.tokenizer, num_layers=layers, hidden=hidden)


class JsonlSplit:
    """The slice of ``datasets.Dataset`` that ``TokenizedSplit`` uses, over a JSONL file."""

    def __init__(self, path: str) -> None:
        self.rows = read_jsonl(Path(path))
        self.column_names = list(self.rows[0]) if self.rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self.rows[i] for i in indices]


# ----------------------------------------------------------------------------- training runs

TRAIN_BASE = [
    "training.micro_batch_size=2",
    "training.accumulation_steps=2",
    "training.seq_bucket=64",
    "training.learning_rate=3e-3",
    "training.warmup_ratio=0",
    "training.max_checkpoints=5",
    "training.dtype=bfloat16",
    "training.backend=nccl",
    "target.dtype=bfloat16",
    "inference.dtype=bfloat16",
    "inference.batch_size=4",
    "draft.attention_backend=auto",
]


@dataclass
class TrainRun:
    run_dir: Path
    returncode: int
    log: Path
    train: list[dict[str, Any]]

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.train]

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"iter_{step:07d}"

    def log_tail(self, lines: int = 6) -> str:
        text = (
            self.log.read_text(errors="replace").strip().splitlines() if self.log.is_file() else []
        )
        return " | ".join(text[-lines:])


def train(
    ctx: Context,
    name: str,
    overrides: list[str],
    world: int = 1,
    share_gpu: bool = False,
    timeout_s: float = 240.0,
    **job_fields: Any,
) -> TrainRun:
    """A real torchrun run of spec_core's worker on the in-process source (HF target on the GPU)."""
    run_dir = ctx.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = sc.load_config(None, TRAIN_BASE + [f"training.nproc_per_node={world}", *overrides])
    job = sc.TrainJob.create(
        cfg,
        run_dir=str(run_dir),
        target_dir=str(tiny_target(ctx)),
        train_data=str(ctx.data / "train.jsonl"),
        **job_fields,
    )
    job_path = job.save(run_dir / "train_job.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world}",
        "--monitor-interval=1",
        str(Path(__file__).resolve()),
        "--train-worker",
        str(job_path),
    ] + (["--share-gpu"] if share_gpu else [])
    log = ctx.out / "logs" / f"train-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks on SIGTERM
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise CheckFailed(f"torchrun run {name!r} timed out after {timeout_s:.0f} s") from None
    metrics = run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.is_file() else []
    return TrainRun(
        run_dir, proc.returncode, log, [r for r in records if r.get("split") == "train"]
    )


def train_worker(job_path: str, share_gpu: bool) -> int:
    """Entry point under torchrun: spec_core's worker, reading the bundle's JSONL split."""
    split_cls = sc.TokenizedSplit
    original = split_cls.load.__func__

    def load(cls, path: str):
        return (
            cls(JsonlSplit(path), name=str(path))
            if str(path).endswith(".jsonl")
            else original(cls, path)
        )

    split_cls.load = classmethod(load)
    parent_death_kills_me()
    if share_gpu:  # every rank on device 0: does NCCL allow two ranks on one GPU?
        os.environ["LOCAL_RANK"] = "0"
    return sc.worker_main(["--job", job_path])


def parent_death_kills_me() -> None:
    """torchrun starts each rank in its own session: if torchrun itself is killed, the rank must
    not outlive it (PR_SET_PDEATHSIG; Linux only, a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def checkpoint_weights(ckpt: Path, scratch: Path) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "model"), str(out))
    return torch.load(out, weights_only=True)


# =============================================================================================
# the checks (registry order = run order)
# =============================================================================================


@check("the carried bundle: real tokenizer loads and renders, the data slice is sane", cuda=False)
def check_bundle(ctx: Context) -> dict[str, Any]:
    from transformers import AutoTokenizer

    need_bundle(ctx)
    tok = AutoTokenizer.from_pretrained(str(ctx.tokenizer))
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    rows = read_jsonl(ctx.data / "train.jsonl")
    prompts = read_jsonl(ctx.data / "eval_prompts.jsonl")
    lengths = [len(r["input_ids"]) for r in rows]
    figures = {
        "vocab": len(tok),
        "train_samples": len(rows),
        "eval_prompts": len(prompts),
        "tokens": sum(lengths),
        "supervised_tokens": sum(sum(r["loss_mask"]) for r in rows),
        "max_len": max(lengths, default=0),
    }
    expect(len(tok) == sc.TINY_TARGET_VOCAB, f"tokenizer has {len(tok)} tokens", figures)
    expect("hi" in rendered, "chat template did not render the message", figures)
    expect(rows and prompts, "empty data slice", figures)
    for r in rows:
        expect(
            len(r["input_ids"]) == len(r["loss_mask"]), f"{r['sample_id']}: mask length", figures
        )
        expect(
            max(r["input_ids"]) < sc.TINY_TARGET_VOCAB,
            f"{r['sample_id']}: token id >= vocab",
            figures,
        )
    return figures


def packed_ttt_inputs(device: str, dtype: Any, steps: int = 3, seed: int = 0):
    """Packed TTT rows as the draft builds them: queries at positions that still lead to labels."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    bsz, length, hq, hkv, d = 3, 96, 8, 2, 64
    need = torch.rand(bsz, length, generator=gen) < 0.6
    rows = need.reshape(-1).nonzero().squeeze(1)
    q_batch, q_pos = rows // length, rows % length
    n = rows.numel()
    tensors = [
        torch.randn(n, hq, d, generator=gen),
        torch.randn(bsz, length, hkv, d, generator=gen),
        torch.randn(bsz, length, hkv, d, generator=gen),
        torch.randn(n, steps, hkv, d, generator=gen),
        torch.randn(n, steps, hkv, d, generator=gen),
    ]
    segments = sc.row_segments(q_batch, bsz)
    tensors = [t.to(device, dtype) for t in tensors]
    grad = torch.randn(n, hq, d, generator=gen).to(device, dtype)
    return tensors, q_pos.to(device), q_batch.to(device), segments, grad


def attention_errors(fn: Callable, device: str, dtype: Any) -> dict[str, float]:
    """Forward and input-gradient relative errors of ``fn`` against the explicit fp64 reference."""
    import torch

    tensors, q_pos, q_batch, segments, grad = packed_ttt_inputs(device, dtype)
    inputs = [t.clone().requires_grad_() for t in tensors]
    out = fn(inputs, q_pos, q_batch, segments)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [t.double().requires_grad_() for t in tensors]
    ref = sc.ttt_attention_explicit(*ref_inputs, q_pos, segments)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    names = ("q", "k0", "v0", "diag_k", "diag_v")
    errors = {"forward": rel_err(out, ref)}
    errors |= {f"grad_{n}": rel_err(g, r) for n, g, r in zip(names, grads, ref_grads, strict=True)}
    return errors


@check(
    "TTT attention on CPU: fused SDPA path and flex forward vs the explicit fp64 reference",
    cuda=False,
)
def check_attention_cpu(ctx: Context) -> dict[str, Any]:
    import torch

    fused = attention_errors(
        lambda x, pos, _b, seg: sc.ttt_attention_sdpa(*x, pos, seg), "cpu", torch.float64
    )
    tensors, q_pos, q_batch, segments, _ = packed_ttt_inputs("cpu", torch.float32)
    flex_fwd = rel_err(
        sc.ttt_attention_flex(*tensors, q_pos, q_batch),
        sc.ttt_attention_explicit(*tensors, q_pos, segments),
    )
    figures = {"fused_fp64": fused, "flex_forward_fp32": flex_fwd}
    expect(max(fused.values()) < 1e-10, "fused path differs from the explicit reference", figures)
    expect(flex_fwd < 1e-5, "flex forward differs from the explicit reference", figures)
    return figures


@check(
    "TTT attention on CUDA: flex fwd/bwd (fp32, bf16), fused path, model sdpa vs flex",
    timeout_s=150,
)
def check_attention_cuda(ctx: Context) -> dict[str, Any]:
    import torch

    tolerance = {"float32": 1e-4, "bfloat16": 3e-2}
    figures: dict[str, Any] = {"tolerance": tolerance}
    for dtype_name, tol in tolerance.items():
        dtype = getattr(torch, dtype_name)
        flex = attention_errors(
            lambda x, pos, b, _s: sc.ttt_attention_flex(*x, pos, b), "cuda", dtype
        )
        # the sdpa backend on CUDA is the explicit path (the fused kernel is CPU-only)
        fused = attention_errors(
            lambda x, pos, _b, seg: sc.ttt_attention_sdpa(*x, pos, seg), "cuda", dtype
        )
        figures[f"flex_{dtype_name}"] = flex
        figures[f"sdpa_{dtype_name}"] = fused
        expect(max(flex.values()) < tol, f"flex {dtype_name} beyond {tol}", figures)
        expect(max(fused.values()) < tol, f"sdpa path {dtype_name} beyond {tol}", figures)
    figures["model_sdpa_vs_flex"] = model_backends_agree()
    worst = max(figures["model_sdpa_vs_flex"].values())
    expect(worst < 1e-3, "EAGLE-3 model: sdpa and flex backends disagree", figures)
    return figures


def model_backends_agree() -> dict[str, float]:
    """A small EAGLE-3 draft in fp32 on CUDA: loss and every gradient, sdpa vs flex backend."""
    import torch

    vocab, hidden, ttt = 512, 64, 4
    config = sc.Eagle3Config(
        hidden_size=hidden,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab,
        draft_vocab_size=vocab,
        target_hidden_size=hidden,
        rope_theta=10000.0,
        specflow={"capture_indices": [1, 2, 3], "ttt_length": ttt},
    )
    gen = torch.Generator().manual_seed(0)
    model = sc.Eagle3Draft(config)
    model.init_weights(gen, std=0.2)
    model = model.cuda()
    lengths = torch.tensor([40, 23, 9])
    length = int(lengths.max())
    ids = torch.randint(0, vocab, (3, length), generator=gen).cuda()
    attn = (torch.arange(length)[None] < lengths[:, None]).cuda()
    loss_mask = ((torch.rand(3, length, generator=gen) < 0.6).cuda() & attn).to(torch.uint8)
    aux = torch.randn(3, length, 3 * hidden, generator=gen).cuda()
    last = torch.randn(3, length, hidden, generator=gen).cuda()
    proj = sc.TargetProjection.build(torch.randn(vocab, hidden, generator=gen).cuda(), None)
    scales = sc.pooled_scales(sc.supervised_counts(loss_mask, attn, ttt), ttt, 0.8).cuda()
    results = {}
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        loss, _ = model(ids, attn, loss_mask, aux, last, proj, scales)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results[backend] = (loss.detach(), grads)
    (ref_loss, ref_grads), (loss, grads) = results["sdpa"], results["flex"]
    errors = {"loss": rel_err(loss, ref_loss)}
    errors |= {f"grad:{n}": rel_err(grads[n], g) for n, g in ref_grads.items()}
    return errors


@check("HF engine on CUDA (bf16 and fp32) vs fp32 CPU captures: relative error per column")
def check_hf_capture_cuda(ctx: Context) -> dict[str, Any]:
    import torch

    need_bundle(ctx)
    target = tiny_target(ctx)
    capture = (1, 2, 3)
    samples = [
        sc.TokenizedSample(r["sample_id"], r["input_ids"], r["loss_mask"])
        for r in read_jsonl(ctx.data / "train.jsonl")[:8]
    ]

    def captures(device: str, dtype: Any) -> list[Any]:
        spec = sc.CaptureSpec(capture, with_last_hidden=True, dtype=torch.float32)
        engine = sc.HFEngine(target, spec, device=device, batch_size=4, model_dtype=dtype)
        try:
            return [
                (s.aux_hidden.float().cpu(), s.last_hidden.float().cpu())
                for s in engine.capture(samples)
            ]
        finally:
            engine.close()

    reference = captures("cpu", torch.float32)
    hidden = reference[0][1].shape[-1]
    aux_ref = torch.cat([a for a, _ in reference]).split(hidden, dim=-1)
    last_ref = torch.cat([b for _, b in reference])
    limits = {"bfloat16": 3e-2, "float32": 1e-4}
    figures: dict[str, Any] = {"limits": limits, "tokens": int(last_ref.shape[0])}
    for name, limit in limits.items():
        got = captures("cuda", getattr(torch, name))
        aux = torch.cat([a for a, _ in got]).split(hidden, dim=-1)
        last = torch.cat([b for _, b in got])
        cols = [rel_err(a, r) for a, r in zip(aux, aux_ref, strict=True)]
        # each captured column must be nearest its own CPU index (no shifted layer)
        nearest = [min(range(len(aux_ref)), key=lambda j, a=a: rel_err(a, aux_ref[j])) for a in aux]
        figures[name] = {
            "aux_rel_err": cols,
            "last_rel_err": rel_err(last, last_ref),
            "nearest": nearest,
        }
        expect(
            nearest == list(range(len(capture))), f"{name}: a capture column is shifted", figures
        )
        expect(
            max(cols + [figures[name]["last_rel_err"]]) < limit, f"{name}: beyond {limit}", figures
        )
    return figures


@check(
    "EAGLE-3 training on CUDA, bf16, FSDP2/NCCL world 1: loss down, checkpoint, exact resume",
    timeout_s=300,
)
def check_train_eagle3_cuda(ctx: Context) -> dict[str, Any]:
    need_bundle(ctx)
    steps, half = EAGLE3_STEPS, EAGLE3_STEPS // 2
    overrides = [
        "draft.ttt_length=3",
        f"training.num_steps={steps}",
        f"training.save_interval={half}",
    ]
    full = train(ctx, "eagle3", overrides)
    figures: dict[str, Any] = {"loss_curve": full.losses, "returncode": full.returncode}
    expect(
        full.returncode == 0 and len(full.train) == steps, f"run failed: {full.log_tail()}", figures
    )
    first, last = sum(full.losses[:3]) / 3, sum(full.losses[-3:]) / 3
    figures |= {
        "loss_first3": first,
        "loss_last3": last,
        "tokens_per_s": [r.get("tokens_per_s") for r in full.train],
        "tau_sim_last": full.train[-1].get("tau_sim"),
    }
    expect(last < first, "loss did not go down", figures)
    expect(full.checkpoint(steps).is_dir(), f"no checkpoint at step {steps}", figures)
    resumed = train(ctx, "eagle3-resumed", overrides, resume_from=str(full.checkpoint(half)))
    figures["resumed_returncode"] = resumed.returncode
    expect(resumed.returncode == 0, f"resume failed: {resumed.log_tail()}", figures)
    a = checkpoint_weights(full.checkpoint(steps), ctx.work)
    b = checkpoint_weights(resumed.checkpoint(steps), ctx.work)
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
    figures["resume_max_weight_diff"] = max(diffs.values())
    figures["resume_losses_equal"] = resumed.losses == full.losses[half:]
    figures["resumed_loss_curve"] = resumed.losses
    expect(a.keys() == b.keys() and max(diffs.values()) == 0.0, "resume is not bit-exact", figures)
    expect(figures["resume_losses_equal"], "resumed losses differ from the full run", figures)
    return figures


@check(
    "speculative decoding on CUDA with the draft trained above: lossless",
    requires=("train_eagle3_cuda",),
)
def check_evaluator_cuda(ctx: Context) -> dict[str, Any]:
    import torch

    target_dir = tiny_target(ctx)
    hf_dir = ctx.work / "eagle3-hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    sc.export_draft(ctx.work / "runs" / "eagle3" / "checkpoints", hf_dir, target_dir=target_dir)
    prompts = [
        sc.EvalPrompt(p["id"], p["input_ids"]) for p in read_jsonl(ctx.data / "eval_prompts.jsonl")
    ]
    torch.backends.cuda.matmul.allow_tf32 = False
    target = sc.load_target(target_dir).cuda()
    draft = sc.algorithm_of(hf_dir).load_export(hf_dir, target_dir).cuda()
    # the evaluator makes its tensors with torch.tensor(...): the default device puts them on CUDA
    torch.set_default_device("cuda")
    try:
        result = sc.run_evaluation(
            target,
            sc.algorithm_of(hf_dir).proposer(draft, target),
            prompts,
            num_draft_tokens=3,
            max_new_tokens=32,
            stop_ids=set(),
        )
    finally:
        torch.set_default_device("cpu")
    figures = {
        k: result[k]
        for k in ("tau", "alpha", "lossless", "mismatched_prompts", "num_prompts", "wall_speedup")
    }
    figures["speculative_tokens_per_s"] = result["speculative"]["tokens_per_s"]
    expect(result["lossless"], "speculative output differs from greedy", figures)
    return figures


def block_draft_run(ctx: Context, name: str, overrides: list[str]) -> dict[str, Any]:
    need_bundle(ctx)
    run = train(
        ctx,
        name,
        [
            "draft.num_layers=2",
            "draft.capture_indices=[1,2,3]",
            "draft.num_anchors=4",
            "vocab.draft_vocab_size=null",
            "training.num_steps=4",
            "training.save_interval=4",
            *overrides,
        ],
    )
    figures: dict[str, Any] = {"loss_curve": run.losses, "returncode": run.returncode}
    expect(run.returncode == 0 and len(run.train) == 4, f"run failed: {run.log_tail()}", figures)
    expect(all(math.isfinite(x) and x > 0 for x in run.losses), "non-finite loss", figures)
    expect(run.checkpoint(4).is_dir(), "no checkpoint at step 4", figures)
    figures["tokens_per_s"] = [r.get("tokens_per_s") for r in run.train]
    return figures


@check("DFlash training steps on CUDA (bf16, NCCL world 1) and its checkpoint", timeout_s=180)
def check_dflash_train_cuda(ctx: Context) -> dict[str, Any]:
    return block_draft_run(ctx, "dflash", ["draft.algorithm=dflash", "draft.block_size=4"])


@check("DSpark training steps on CUDA (bf16, NCCL world 1) and its checkpoint", timeout_s=180)
def check_dspark_train_cuda(ctx: Context) -> dict[str, Any]:
    return block_draft_run(
        ctx, "dspark", ["draft.algorithm=dspark", "draft.block_size=3", "draft.markov_rank=8"]
    )


def bench_shapes() -> ModuleType:
    """benchmarks/train_step.py as a module: its own shapes and draft builder (one fact in one
    place)."""
    spec = importlib.util.spec_from_file_location(
        "bench_train_step", ROOT / "benchmarks" / "train_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LLAMA3_8B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def gpu_step(
    target: dict, ttt: int, draft_vocab: int, bsz: int, length: int, dtype: Any, rounds: int = 3
) -> dict:
    """Ours vs the naive full-vocabulary step (spec_core.models.reference) on the GPU: best
    seconds of ``rounds`` after a warm-up, and peak allocated memory of one step each."""
    import torch

    vocab, hidden = target["vocab_size"], target["hidden_size"]
    model, t2d = bench_shapes().random_draft(target, ttt, draft_vocab)
    model = model.to("cuda", dtype)
    model.attention_backend = "flex"
    ids = torch.randint(0, vocab, (bsz, length), device="cuda")
    attn = torch.ones(bsz, length, dtype=torch.bool, device="cuda")
    loss_mask = torch.ones(bsz, length, dtype=torch.uint8, device="cuda")
    aux = torch.randn(bsz, length, 3 * hidden, device="cuda", dtype=dtype)
    last = torch.nn.functional.rms_norm(
        torch.randn(bsz, length, hidden, device="cuda"), (hidden,)
    ).to(dtype)
    lm_head = (torch.randn(vocab, hidden, device="cuda") * 0.05).to(dtype)
    proj = sc.TargetProjection.build(lm_head, None if t2d is None else t2d.cuda())
    scales = sc.pooled_scales(sc.supervised_counts(loss_mask, attn, ttt), ttt, 0.8).cuda()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(impl: str) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        if impl == "ours":
            loss, _ = model(ids, attn, loss_mask, aux, last, proj, scales)
        else:
            loss, _ = sc.reference_loss(model, ids, attn, loss_mask, aux, last, lm_head, scales)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    out: dict[str, Any] = {
        "shape": f"{bsz}x{length}",
        "dtype": str(dtype).removeprefix("torch."),
        "draft_vocab": draft_vocab,
        "target_vocab": vocab,
        "hidden": hidden,
    }
    for impl in ("ours", "naive"):
        try:
            step(impl)  # warm-up: compile, optimizer state, allocator pools
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = [step(impl) for _ in range(rounds)]
            out[f"{impl}_s"] = min(times)
            out[f"{impl}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except torch.cuda.OutOfMemoryError:
            out[f"{impl}_s"] = out[f"{impl}_peak_mb"] = "OOM"
            optim.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if isinstance(out["ours_s"], float) and isinstance(out["naive_s"], float):
        out["speedup"] = out["naive_s"] / out["ours_s"]
    return out


@check(
    "benchmarks/train_step.py shapes on the GPU: ours vs naive full-vocab step, and a Llama-3-8B-size draft",
    timeout_s=200,
)
def check_train_step_bench_cuda(ctx: Context) -> dict[str, Any]:
    import torch

    bench = bench_shapes()
    bsz, length = bench.SHAPES[0]
    small = gpu_step(bench.SMOLLM2, bench.TTT, bench.DRAFT_VOCAB, bsz, length, torch.float32)
    real = gpu_step(LLAMA3_8B, bench.TTT, 32000, 1, 2048, torch.bfloat16)
    figures = {
        "smollm2_fp32": small,
        "llama3_8b_bf16": real,
        "device_total_mb": torch.cuda.get_device_properties(0).total_memory / 2**20,
    }
    for name, result in (("smollm2_fp32", small), ("llama3_8b_bf16", real)):
        expect(
            isinstance(result["ours_s"], float),
            f"{name}: our step did not run ({result['ours_s']})",
            figures,
        )
    naive_mem = real["naive_peak_mb"]
    expect(
        naive_mem == "OOM" or real["ours_peak_mb"] < naive_mem,
        "ours needs more memory than naive",
        figures,
    )
    return figures


@check(
    "2 ranks on 1 GPU over NCCL (informational: skipped if NCCL refuses a shared device)",
    timeout_s=120,
)
def check_two_ranks_one_gpu(ctx: Context) -> dict[str, Any]:
    need_bundle(ctx)
    run = train(
        ctx,
        "two-ranks",
        ["draft.ttt_length=2", "training.num_steps=2", "training.save_interval=0"],
        world=2,
        share_gpu=True,
        timeout_s=100,
    )
    figures = {"returncode": run.returncode, "loss_curve": run.losses}
    if run.returncode != 0:
        text = run.log.read_text(errors="replace")
        if "Duplicate GPU" in text or "duplicate GPU" in text:
            raise SkipCheck("NCCL refuses two ranks on one GPU (Duplicate GPU detected)")
    expect(run.returncode == 0 and len(run.train) == 2, f"run failed: {run.log_tail()}", figures)
    return figures


# ----------------------------------------------------------------------------- self-test dummies


@check("self-test: a passing dummy", cuda=False, timeout_s=30, self_test=True)
def check_selftest_pass(ctx: Context) -> dict[str, Any]:
    return {"answer": 42}


@check("self-test: a dummy that raises", cuda=False, timeout_s=30, self_test=True)
def check_selftest_fail(ctx: Context) -> dict[str, Any]:
    raise RuntimeError("deliberate failure")


@check("self-test: a dummy that hangs past its timeout", cuda=False, timeout_s=3, self_test=True)
def check_selftest_hang(ctx: Context) -> dict[str, Any]:
    time.sleep(3600)
    return {}


@check("self-test: a check after the failures still runs", cuda=False, timeout_s=30, self_test=True)
def check_selftest_after(ctx: Context) -> dict[str, Any]:
    return {"ran": True}


# =============================================================================================
# runner
# =============================================================================================


def checks_for(self_test: bool) -> list[Check]:
    return list(REGISTRY.values()) + (list(SELF_TEST.values()) if self_test else [])


def skip_reason(check_: Check, ctx: Context, done: dict[str, CheckResult]) -> Optional[str]:
    if check_.cuda and not ctx.cuda:
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    for name in check_.requires:
        if name not in done or done[name].status != "pass":
            status = done[name].status if name in done else "not run"
            return f"needs {name} to pass ({status})"
    return None


def run_isolated(
    check_: Check, ctx: Context, timeout_s: float, argv_tail: list[str]
) -> CheckResult:
    """The check in its own process group: a crash, a hang or a CUDA fault stays its own."""
    result_file = ctx.work / "results" / f"{check_.name}.json"
    result_file.unlink(missing_ok=True)
    log = ctx.out / "logs" / f"{check_.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-one",
        check_.name,
        "--result",
        str(result_file),
        *argv_tail,
    ]
    started = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return CheckResult(
                check_.name,
                "fail",
                f"timed out after {timeout_s:.0f} s (killed)",
                {"log": str(log)},
                time.monotonic() - started,
            )
    stop_group(proc)  # leftovers of a finished check (a rank it did not reap) go too
    if result_file.is_file():
        return CheckResult(**json.loads(result_file.read_text()))
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return CheckResult(
        check_.name,
        "fail",
        f"exited {proc.returncode} without a result: {' | '.join(tail)}",
        {"log": str(log)},
        time.monotonic() - started,
    )


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the check's process group (torchrun passes it to its ranks), SIGKILL what is left
    after ``grace_s``; a no-op once the group is gone."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_one(name: str, ctx: Context, result_file: Path) -> int:
    """Child side: run one check, write its CheckResult."""
    check_ = REGISTRY.get(name) or SELF_TEST[name]
    started = time.monotonic()
    status, reason, figures = "pass", "", {}
    try:
        figures = check_.run(ctx)
    except SkipCheck as exc:
        status, reason = "skipped", str(exc)
    except CheckFailed as exc:
        status, reason, figures = "fail", str(exc), exc.figures
    except Exception as exc:  # noqa: BLE001 - any error is this check's failure, reported
        traceback.print_exc()
        status, reason = "fail", f"{type(exc).__name__}: {exc}"
    result = CheckResult(
        name, status, reason, figures, time.monotonic() - started, check_.cuda, check_.summary
    )
    write_json(result_file, dataclasses.asdict(result))
    return 0


def ensure_packages(ctx: Context) -> list[str]:
    """Install carried wheels for missing imports into ``<work>/site``; children see it too."""
    site = ctx.work / "site"
    paths = [str(ROOT)] + ([str(site)] if site.is_dir() else [])
    missing = [mod for mod in CARRIED_PACKAGES if importlib.util.find_spec(mod) is None]
    wheels = ctx.bundle / "wheels"
    installed = []
    if missing and wheels.is_dir():
        reqs = [CARRIED_PACKAGES[m] for m in missing]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                str(wheels),
                "--target",
                str(site),
                *reqs,
            ],
            check=False,
        )
        paths.append(str(site))
        installed = reqs
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(paths + os.environ.get("PYTHONPATH", "").split(os.pathsep)).keys()
    ).strip(os.pathsep)
    return installed


def environment(ctx: Context) -> dict[str, Any]:
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    device = (
        torch.cuda.get_device_name(0)
        if ctx.cuda
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    return {"versions": versions, "device": device, "git_commit": git_commit(ctx)}


def git_commit(ctx: Context) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        bundle = ctx.bundle / "bundle.json"
        return (
            json.loads(bundle.read_text()).get("git_commit", "unknown")
            if bundle.is_file()
            else "unknown"
        )


def run_all(
    ctx: Context, self_test: bool, budget_s: float, only: Optional[list[str]]
) -> dict[str, Any]:
    started = time.monotonic()
    installed = ensure_packages(ctx)
    env = environment(ctx)
    deadline = started + budget_s
    argv_tail = ["--bundle", str(ctx.bundle), "--work", str(ctx.work), "--out", str(ctx.out)]
    argv_tail += ["--child-cuda"] if ctx.cuda else []
    done: dict[str, CheckResult] = {}
    for check_ in checks_for(self_test):
        if only and check_.name not in only:
            continue
        reason = skip_reason(check_, ctx, done)
        remaining = deadline - time.monotonic()
        if reason is None and remaining < 5:
            reason = f"overall budget of {budget_s:.0f} s spent"
        if reason:
            result = CheckResult(
                check_.name, "skipped", reason, cuda=check_.cuda, summary=check_.summary
            )
        else:
            result = run_isolated(check_, ctx, min(check_.timeout_s, remaining), argv_tail)
            result.cuda, result.summary = check_.cuda, check_.summary
        done[check_.name] = result
        print(
            f"{result.status.upper():7} {result.name} ({result.seconds:.1f} s) {result.reason}",
            flush=True,
        )
    counts = {s: sum(r.status == s for r in done.values()) for s in STATUSES}
    return {
        "schema": REPORT_SCHEMA,
        "mode": "cuda" if ctx.cuda else "cpu",
        "self_test": self_test,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **env,
        "budget_s": budget_s,
        "seconds": time.monotonic() - started,
        "installed_from_bundle": installed,
        "counts": counts,
        "checks": [dataclasses.asdict(r) for r in done.values()],
    }


def summary_text(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"specflow GPU check, {report['date']}, {report['mode']} mode on {report['device']}",
        f"commit {report['git_commit']}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"{c['pass']} pass, {c['fail']} fail, {c['skipped']} skipped in {report['seconds']:.0f} s",
        "",
    ]
    for r in report["checks"]:
        lines.append(f"{r['status'].upper():7} {r['name']:24} {r['seconds']:6.1f} s  {r['reason']}")
    return "\n".join(lines) + "\n"


# =============================================================================================
# bundle preparation (development machine) and docs rendering
# =============================================================================================


def prepare_bundle(bundle: Path) -> Path:
    """Tokenizer files, a tokenized chitchat slice and the carried wheels, once."""
    manifest = bundle / "bundle.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("slice") == SLICE:
        print(f"bundle up to date: {bundle}")
        return bundle
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = sc.load_config(
        None,
        [
            f"dataset.max_conversations={SLICE['conversations']}",
            f"dataset.eval_conversations={SLICE['eval_conversations']}",
            f"dataset.max_seq_length={SLICE['max_seq_length']}",
            "dataset.num_proc=1",
        ],
    )
    smollm2 = sc.resolve_target_path("builtin:smollm2-135m-instruct", sc.cache_dir(cfg))
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    for name in sc.TOKENIZER_FILES:
        shutil.copy(smollm2 / name, tmp / "tokenizer" / name)
    prepared = sc.prepare_dataset(
        cfg.dataset, smollm2, tmp / "scratch", sc.cache_dir(cfg), progress=False
    )
    data = tmp / "data"
    data.mkdir()
    train_rows = sc.load_tokenized(prepared.train_path)
    write_jsonl(
        data / "train.jsonl",
        ({k: r[k] for k in ("sample_id", "input_ids", "loss_mask")} for r in train_rows),
    )
    eval_rows = sc.load_tokenized(prepared.eval_path)
    write_jsonl(
        data / "conversations.jsonl",
        ({"id": r["sample_id"], "messages": json.loads(r["messages"])} for r in eval_rows),
    )
    from transformers import AutoTokenizer

    renderer = sc.ConversationRenderer(
        AutoTokenizer.from_pretrained(str(smollm2)), cfg.dataset.chat_template
    )
    prompts = sc.load_prompts(prepared.eval_path, renderer, SLICE["eval_conversations"], 128)
    write_jsonl(
        data / "eval_prompts.jsonl",
        ({"id": p.id, "input_ids": p.input_ids} for p in prompts.prompts),
    )
    shutil.rmtree(tmp / "scratch")
    wheels = tmp / "wheels"
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "-d",
            str(wheels),
            *CARRIED_PACKAGES.values(),
        ],
        check=False,
    )
    if got.returncode != 0:
        print("warning: could not download the carried wheels; the GPU image must have them")
    write_json(
        tmp / "bundle.json",
        {
            "slice": SLICE,
            "packages": list(CARRIED_PACKAGES.values()),
            "git_commit": git_commit(Context(tmp, tmp, tmp, False)),
            "dataset_cache_key": prepared.cache_key,
        },
    )
    shutil.rmtree(bundle, ignore_errors=True)
    tmp.rename(bundle)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle ready: {bundle} ({size / 2**20:.1f} MiB; carry it with the run)")
    return bundle


def write_jsonl(path: Path, rows: Any) -> None:
    with path.open("w") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")


def status_markdown(report: dict[str, Any], commit: str) -> str:
    """The generated GPU status block (same text in both documents)."""
    date = report["date"][:10]
    cuda_checks = [r for r in report["checks"] if r["cuda"]]
    ran = [r for r in cuda_checks if r["status"] != "skipped"]
    head = f"_Generated by `python checks/gpu_check.py --render-docs docs/gpu-check/latest.json` (commit {commit[:12]}); do not edit by hand._\n\n"
    if not ran:
        lines = [
            head
            + f"**Never run on a GPU yet** (last report: {report['mode'].upper()} mode, {date}, "
            f"{report['device']}). The check is ready: `make gpu-check` here prepares the bundle; "
            "on a GPU machine `python checks/gpu_check.py --out DIR` with `.gpu-check/` carried.",
            "",
            "| check | status | what it proves |",
            "|---|---|---|",
        ]
    else:
        c = report["counts"]
        lines = [
            head
            + f"Last GPU run: {date} on **{report['device']}** (torch {report['versions']['torch']}, "
            f"CUDA {report['versions']['cuda']}): {c['pass']} pass, {c['fail']} fail, {c['skipped']} skipped.",
            "",
            "| check | status | what it proves |",
            "|---|---|---|",
        ]
    for r in report["checks"]:
        if r["name"].startswith("selftest_"):
            continue
        status = r["status"] if r["status"] != "skipped" else f"skipped: {r['reason']}"
        lines.append(f"| `{r['name']}` | {status} | {r['summary']} |")
    return "\n".join(lines) + "\n"


def render_docs(report_path: Path, root: Path = ROOT) -> list[Path]:
    report = json.loads(Path(report_path).read_text())
    keep = root / DOCS_REPORT.relative_to(ROOT)
    if Path(report_path).resolve() != keep.resolve():
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(report_path, keep)
    block = status_markdown(report, report["git_commit"])
    written = []
    for doc in (root / "deployments" / "gpu_engines.md", root / "README.md"):
        text = doc.read_text()
        start, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
        if start < 0 or end < start:
            raise SystemExit(f"{doc}: no {DOCS_BEGIN} ... {DOCS_END} markers")
        doc.write_text(text[: start + len(DOCS_BEGIN)] + "\n" + block + text[end:])
        written.append(doc)
    return written


# =============================================================================================
# CLI
# =============================================================================================


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="report directory")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--work", type=Path, help="scratch directory (default: OUT/work)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--only", nargs="*", help="run only these checks")
    parser.add_argument("--self-test", action="store_true", help="add the dummy checks")
    parser.add_argument("--cpu", action="store_true", help="skip the CUDA checks even with a GPU")
    parser.add_argument("--prepare-bundle", type=Path, metavar="DIR")
    parser.add_argument("--render-docs", type=Path, metavar="REPORT")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    parser.add_argument("--share-gpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for resume
    if args.train_worker:
        return train_worker(args.train_worker, args.share_gpu)
    if args.prepare_bundle:
        prepare_bundle(args.prepare_bundle.resolve())
        return 0
    if args.render_docs:
        for doc in render_docs(args.render_docs):
            print(f"rendered {doc}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    if args.run_one:  # the parent decided about CUDA: no torch import for cheap checks
        ctx = Context(args.bundle.resolve(), work, out, args.child_cuda)
        return run_one(args.run_one, ctx, args.result)
    import torch

    shutil.rmtree(work / "results", ignore_errors=True)
    ctx = Context(args.bundle.resolve(), work, out, torch.cuda.is_available() and not args.cpu)
    report = run_all(ctx, args.self_test, args.budget_s, args.only)
    write_json(out / "report.json", report)
    (out / "summary.txt").write_text(summary_text(report))
    print(f"\nreport: {out / 'report.json'}  summary: {out / 'summary.txt'}")
    return 1 if report["counts"]["fail"] and not args.self_test else 0


if __name__ == "__main__":
    sys.exit(main())
