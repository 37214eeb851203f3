"""Hidden states from SGLang, patch-free: ``sgl.Engine`` plus forward hooks it installs for us.

SGLang (>= 0.5.9) has a documented ``forward_hooks`` server argument: a list of
``{"name", "target_modules", "hook_factory": "module:function", "config"}`` specs; every model
runner imports the factory, calls it with ``config`` and registers the returned function as a
PyTorch forward hook on the matching modules (after CUDA-graph capture, so hooks fire on the eager
path, which is where prefills run with CUDA graphs off). That is all we need; nothing in SGLang is
patched or monkey-patched.

The hooks (``capture_hook``, running inside SGLang's scheduler process, TP rank 0 only) see SGLang's
flattened ``[num_tokens, hidden]`` batches:
- ``model.embed_tokens``: its input is the forward's token ids (and its output capture index 0);
- ``model.layers.{k-1}``: returns ``(hidden, residual)``; their sum is the stream entering layer k,
  i.e. capture index k (``conventions.sglang_hook_targets``);
- ``model.norm``: the post-norm last hidden state; it runs last, so it also closes the forward and
  writes one tmpfs bundle (``handoff.py``) with the forward's ids, aux and last states.

The producer side (``SGLangEngine``) submits a batch of prompts in one ``generate`` call with
``max_new_tokens=1``, radix cache off (a prefix hit would skip the tokens' forward) and FCFS
scheduling, then concatenates the forwards' bundles in order and cuts them at the prompts'
lengths. The concatenated token ids must equal the prompts' ids back to back: if SGLang ever
reorders, drops or interleaves (a decode step, a stray forward) the check fails with a clear error
instead of mixing samples up. A prompt split over two forwards (chunked prefill) still cuts
correctly because the chunks are consecutive.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import CapturedSample, TokenizedSample
from spec_core.engines.base import ServedEngine, check_prefill_batch
from spec_core.engines.conventions import sglang_hook_targets
from spec_core.engines.handoff import bundle_names, make_handoff_dir, read_bundle, write_bundle
from spec_core.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)

HOOK_FACTORY = "spec_core.engines.sglang:capture_hook"
MIN_VERSION = "0.5.9"  # first release with the ``forward_hooks`` server argument
# Server arguments we set ourselves; extra_args may not override them.
PROTECTED_ARGS = (
    "model_path",
    "tp_size",
    "mem_fraction_static",
    "dtype",
    "forward_hooks",
    "skip_tokenizer_init",
    "disable_radix_cache",
    "schedule_policy",
)
# Dropped with a log line when this SGLang's ServerArgs lacks them (older or newer releases).
OPTIONAL_ARGS = ("disable_piecewise_cuda_graph", "enable_piecewise_cuda_graph")

Runtime = tuple[Callable[..., Any], set[str]]  # (Engine class, ServerArgs field names)


# ---------------------------------------------------------------------------------------------
# Inside SGLang's scheduler process


class ForwardRecorder:
    """Collects one forward's pieces from the hooks and writes them as one bundle at the end."""

    def __init__(self, directory: str, num_aux: int) -> None:
        self.directory = directory
        self.num_aux = num_aux
        self.sequence = itertools.count()
        self._reset()

    def _reset(self) -> None:
        self.ids: Optional[torch.Tensor] = None
        self.aux: dict[int, torch.Tensor] = {}

    def on_ids(self, input_ids: torch.Tensor) -> None:
        self._reset()  # the embedding runs first: a new forward begins
        self.ids = input_ids.detach().reshape(-1).to("cpu", torch.int64)

    def on_aux(self, slot: int, stream: torch.Tensor) -> None:
        self.aux[slot] = stream.detach().to("cpu")

    def on_end(self, last: Optional[torch.Tensor]) -> None:
        if self.ids is None:
            return  # not a forward we saw start (cannot happen with the embedding hooked)
        missing = [j for j in range(self.num_aux) if j not in self.aux]
        tensors = {"input_ids": self.ids}
        if missing:  # a model whose module names differ: make the producer fail loudly
            tensors["missing_aux"] = torch.tensor(missing, dtype=torch.int64)
        else:
            tensors["aux"] = torch.cat([self.aux[j] for j in range(self.num_aux)], dim=-1)
        if last is not None:
            tensors["last"] = last.detach().to("cpu")
        write_bundle(self.directory, f"{next(self.sequence):012d}", tensors)
        self._reset()


_RECORDERS: dict[str, ForwardRecorder] = {}


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def residual_stream(output: Any) -> torch.Tensor:
    """A decoder layer's output as the residual stream: SGLang layers return ``(hidden,
    residual)`` with the residual add deferred to the next layer's fused norm."""
    if isinstance(output, (tuple, list)):
        hidden, residual = output[0], output[1] if len(output) > 1 else None
        return hidden if residual is None else hidden + residual
    return output


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def capture_hook(config: dict[str, Any]) -> Optional[Callable[..., None]]:
    """The ``hook_factory`` SGLang calls once per hook spec; returns a PyTorch forward hook.

    ``config``: ``handoff_dir``, ``num_aux``, ``role`` (ids | aux | last | end), ``slot``. Only
    TP rank 0 records (every rank holds the full, all-reduced hidden states)."""
    if not _is_rank_zero():
        return None
    directory = str(config["handoff_dir"])
    recorder = _RECORDERS.setdefault(directory, ForwardRecorder(directory, int(config["num_aux"])))
    role, slot = str(config["role"]), int(config.get("slot", 0))

    def hook(module: Any, inputs: tuple, output: Any) -> None:
        if role == "ids":
            recorder.on_ids(inputs[0])
        elif role == "aux":
            recorder.on_aux(slot, residual_stream(output))
        elif role == "last":
            recorder.on_end(_first_tensor(output))
        else:
            recorder.on_end(None)

    return hook


def forward_hook_specs(spec: CaptureSpec, num_layers: int, handoff_dir: str) -> list[dict]:
    """The ``forward_hooks`` server argument for our captures (JSON-able)."""
    targets = sglang_hook_targets(spec.capture_indices, num_layers, spec.with_last_hidden)
    return [
        {
            "name": f"specflow-{t.role}-{t.slot}",
            "target_modules": [t.module],
            "hook_factory": HOOK_FACTORY,
            "config": {
                "handoff_dir": handoff_dir,
                "num_aux": len(spec.capture_indices),
                "role": t.role,
                "slot": t.slot,
            },
        }
        for t in targets
    ]


# ---------------------------------------------------------------------------------------------
# Producer side


def sglang_runtime() -> Runtime:
    try:
        import sglang
        from sglang.srt.server_args import ServerArgs
    except ImportError:
        raise ConfigError(
            "inference.engine is sglang but SGLang is not installed in this Python; install "
            f"sglang>={MIN_VERSION} in the producer's venv and set inference.python "
            "(deployments/gpu_engines.md)"
        ) from None
    return sglang.Engine, {f.name for f in dataclasses.fields(ServerArgs)}


def server_args(
    target_dir: str | Path,
    spec: CaptureSpec,
    num_layers: int,
    handoff_dir: str | Path,
    supported: set[str],
    *,
    model_dtype: str,
    tp_size: int,
    mem_fraction: float,
    max_model_len: int,
    extra_args: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Keyword arguments for ``sgl.Engine``: our capture settings plus the user's passthrough."""
    if "forward_hooks" not in supported:
        raise ConfigError(
            f"this SGLang has no 'forward_hooks' server argument; the SGLang producer needs "
            f"sglang>={MIN_VERSION}"
        )
    extra = dict(extra_args or {})
    clash = sorted(set(extra) & set(PROTECTED_ARGS))
    if clash:
        raise ConfigError(
            f"'inference.extra_args' may not set {clash}: the SGLang producer sets them (use "
            "inference.tp_size / inference.mem_fraction / target.dtype)"
        )
    unknown = sorted(set(extra) - supported)
    if unknown:
        raise ConfigError(f"'inference.extra_args' {unknown} are not SGLang server arguments")
    args: dict[str, Any] = {
        "chunked_prefill_size": -1,  # whole prompts per forward (chunks would still cut right)
        "disable_cuda_graph": True,  # prefill only: graphs help decode, and skip Python hooks
        "disable_piecewise_cuda_graph": True,
        "context_length": max_model_len,
        "random_seed": 0,
        "log_level": "warning",
    }
    args.update(extra)
    args.update(
        model_path=str(target_dir),
        tp_size=tp_size,
        mem_fraction_static=mem_fraction,
        dtype=model_dtype,
        skip_tokenizer_init=True,  # we send token ids
        disable_radix_cache=True,  # a prefix hit would skip the forward that carries the states
        schedule_policy="fcfs",  # forwards follow submission order
        forward_hooks=forward_hook_specs(spec, num_layers, str(handoff_dir)),
    )
    for name in [n for n in args if n not in supported]:
        if name not in OPTIONAL_ARGS:
            raise ConfigError(f"this SGLang has no server argument {name!r}; see {MIN_VERSION}+")
        log.info("SGLang has no server argument %s; not set", name)
        del args[name]
    return args


def split_forwards(
    bundles: Sequence[dict[str, torch.Tensor]],
    samples: Sequence[TokenizedSample],
    with_last: bool,
    dtype: torch.dtype,
) -> list[CapturedSample]:
    """Cut the forwards' concatenated captures at the samples' lengths, checking the token ids."""
    if not bundles:
        raise ServiceError(
            "SGLang ran no forward our hooks saw; are the forward_hooks installed (engine log)?"
        )
    for b in bundles:
        if "missing_aux" in b:
            raise ServiceError(
                f"SGLang forward lacked aux slots {b['missing_aux'].tolist()}: the target's "
                "module names differ from model.layers.<i> / model.norm"
            )
    ids = torch.cat([b["input_ids"] for b in bundles])
    expected = torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.int64)
    if not torch.equal(ids, expected):
        raise ServiceError(
            f"SGLang forwards carried {len(ids)} tokens that are not the {len(samples)} prompts "
            f"({len(expected)} tokens) back to back; it reordered or mixed requests (keep "
            "schedule_policy fcfs and the radix cache off, and run no other requests on this engine)"
        )
    aux = torch.cat([b["aux"] for b in bundles])
    last = torch.cat([b["last"] for b in bundles]) if with_last else None
    captured, start = [], 0
    for s in samples:
        end = start + len(s.input_ids)
        captured.append(
            CapturedSample(
                sample_id=s.sample_id,
                input_ids=ids[start:end].clone(),
                loss_mask=torch.tensor(s.loss_mask, dtype=torch.uint8),
                aux_hidden=aux[start:end].to(dtype),
                last_hidden=None if last is None else last[start:end].to(dtype),
            )
        )
        start = end
    return captured


class SGLangEngine(ServedEngine):
    """Runs the target in ``sgl.Engine`` (CUDA) with our forward hooks."""

    runtime_name = "SGLang"

    def __init__(
        self,
        target_dir: str | Path,
        spec: CaptureSpec,
        *,
        model_dtype: str = "bfloat16",
        tp_size: int = 1,
        mem_fraction: float = 0.8,
        max_model_len: int = 2048,
        extra_args: Optional[dict[str, Any]] = None,
        handoff_root: Optional[str] = None,
        runtime: Optional[Runtime] = None,
    ) -> None:
        self._read_target(target_dir, spec, max_model_len)
        self.runtime: Any = None
        self.handoff_dir = make_handoff_dir(handoff_root)
        try:
            factory, supported = runtime or sglang_runtime()
            args = server_args(
                target_dir,
                spec,
                self.num_layers,
                self.handoff_dir,
                supported,
                model_dtype=model_dtype,
                tp_size=tp_size,
                mem_fraction=mem_fraction,
                max_model_len=max_model_len,
                extra_args=extra_args,
            )
            self.runtime = factory(**args)
            self._drain()  # anything SGLang ran at start-up is not ours
        except BaseException:
            self.close()
            raise

    def _drain(self) -> list[dict[str, torch.Tensor]]:
        return [read_bundle(self.handoff_dir, name) for name in bundle_names(self.handoff_dir)]

    def capture(self, samples: Sequence[TokenizedSample]) -> list[CapturedSample]:
        check_prefill_batch(samples, self.max_model_len, "SGLang", "context_length")
        stray = self._drain()
        if stray:
            log.warning("dropped %d SGLang forward(s) that ran between our batches", len(stray))
        self.runtime.generate(
            input_ids=[list(s.input_ids) for s in samples],
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
        )
        return split_forwards(self._drain(), samples, self.spec.with_last_hidden, self.spec.dtype)

    def _shutdown_runtime(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.shutdown()
