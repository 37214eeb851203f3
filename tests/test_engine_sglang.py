"""SGLangEngine glue on CPU, driven by a fake SGLang runtime; the real engine runs only on a GPU.

``FakeSGLangRuntime`` stands in for ``sgl.Engine`` (which needs CUDA): it takes the same server
arguments, installs ``forward_hooks`` the way SGLang documents it (import ``module:function``, call
it with ``config``, ``register_forward_hook`` on every ``fnmatch`` match of ``named_modules()``),
and runs FCFS prefill forwards over a real (tiny, random) Llama arranged like an SGLang model:
flattened ``[num_tokens, hidden]`` batches, decoder layers returning ``(hidden, residual)`` with
the residual add deferred, a fused final norm, and the model called via ``.forward`` (so hooks on
the root never fire). So the hooks, the bundle handoff and the stream cutting run the exact code
the real engine runs; only the model execution is ours.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
from typing import Any

import pytest
import torch
from helpers import (
    assert_columns_nearest_own_index,
    assert_engine_refused_without,
    capture_neighbours,
    random_samples,
)
from torch import nn

from spec_core.contracts.capture import CaptureSpec
from spec_core.engines import sglang as sglang_engine
from spec_core.engines.hf import HFEngine
from spec_core.engines.sglang import SGLangEngine, forward_hook_specs, server_args
from spec_core.errors import ConfigError, ServiceError

# ServerArgs fields the fake accepts (a subset of SGLang's; enough for what we set).
FAKE_SERVER_ARGS = {
    "model_path",
    "tp_size",
    "mem_fraction_static",
    "dtype",
    "skip_tokenizer_init",
    "disable_radix_cache",
    "schedule_policy",
    "chunked_prefill_size",
    "disable_cuda_graph",
    "disable_piecewise_cuda_graph",
    "context_length",
    "random_seed",
    "log_level",
    "forward_hooks",
    "max_prefill_tokens",
}


class _FakeLayer(nn.Module):
    """An HF Llama decoder layer behind SGLang's layer interface and output convention."""

    def __init__(self, hf_layer: nn.Module, rotary: nn.Module, config: Any) -> None:
        super().__init__()
        self.hf_layer, self.config = hf_layer, config
        self._rotary = [rotary]  # not a submodule: keeps named_modules() SGLang-shaped

    def forward(self, positions, hidden_states, forward_batch, residual):
        from transformers.masking_utils import create_causal_mask

        stream = hidden_states if residual is None else hidden_states + residual
        out = []
        for start, length in forward_batch["segments"]:
            x = stream[start : start + length][None]
            pos = positions[start : start + length][None]
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=x,
                attention_mask=None,
                past_key_values=None,
                position_ids=pos,
            )
            emb = self._rotary[0](x, position_ids=pos)
            out.append(
                self.hf_layer(x, attention_mask=mask, position_embeddings=emb, position_ids=pos)[0]
            )
        layer_out = torch.cat(out)
        return layer_out - stream, stream  # (hidden, residual): the add happens in the next norm


class _FakeFusedNorm(nn.Module):
    def __init__(self, hf_norm: nn.Module) -> None:
        super().__init__()
        self.hf_norm = hf_norm

    def forward(self, hidden_states, residual):
        total = hidden_states + residual
        return self.hf_norm(total), total


class _FakeSGLangModel(nn.Module):
    def __init__(self, target_dir: str) -> None:
        super().__init__()
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(target_dir, dtype=torch.float32, attn_implementation="sdpa")
        hf.eval()
        self.model = nn.Module()
        self.model.embed_tokens = hf.embed_tokens
        self.model.layers = nn.ModuleList(
            _FakeLayer(layer, hf.rotary_emb, hf.config) for layer in hf.layers
        )
        self.model.norm = _FakeFusedNorm(hf.norm)

    def forward(self, input_ids, positions, forward_batch):
        hidden, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, forward_batch, residual)
        normed, _ = self.model.norm(hidden, residual)
        return normed


class FakeSGLangRuntime:
    """FAKE ``sgl.Engine`` for CPU tests (see the module docstring); not SGLang."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - FAKE_SERVER_ARGS
        if unknown:
            raise TypeError(f"unexpected server args {unknown}")  # what ServerArgs(**kw) does
        self.kwargs = kwargs
        self.max_prefill_tokens = int(kwargs.get("max_prefill_tokens", 1 << 30))
        self.reverse = kwargs["schedule_policy"] != "fcfs"  # e.g. "lpm" would reorder
        self.extra_forward = False  # a forward not asked for (tests the stream check)
        self.model = _FakeSGLangModel(kwargs["model_path"])
        self.shut = False
        for spec in kwargs["forward_hooks"]:
            module_name, fn_name = spec["hook_factory"].split(":")
            hook = getattr(importlib.import_module(module_name), fn_name)(spec["config"])
            for name, module in self.model.named_modules():
                if any(fnmatch.fnmatch(name, p) for p in spec["target_modules"]):
                    module.register_forward_hook(hook)

    def _forward(self, pieces: list[list[int]]) -> None:
        ids = torch.tensor([t for p in pieces for t in p], dtype=torch.long)
        positions = torch.cat([torch.arange(len(p)) for p in pieces])
        segments, start = [], 0
        for p in pieces:
            segments.append((start, len(p)))
            start += len(p)
        with torch.inference_mode():
            self.model.forward(ids, positions, {"segments": segments})  # .forward, like SGLang

    def generate(self, input_ids: list[list[int]], sampling_params: dict) -> list[dict]:
        assert sampling_params["max_new_tokens"] == 1
        order = list(reversed(input_ids)) if self.reverse else list(input_ids)
        batch, budget = [], self.max_prefill_tokens
        for prompt in order:
            if batch and len(prompt) > budget:
                self._forward(batch)
                batch, budget = [], self.max_prefill_tokens
            batch.append(prompt)
            budget -= len(prompt)
        if batch:
            self._forward(batch)
        if self.extra_forward:
            self._forward([[5]])
        return [{"meta_info": {"prompt_tokens": len(p)}} for p in input_ids]

    def shutdown(self) -> None:
        self.shut = True


FAKE_RUNTIME = (FakeSGLangRuntime, FAKE_SERVER_ARGS)


_samples = functools.partial(random_samples, lo=2, hi=30)


@pytest.fixture(autouse=True)
def _fresh_recorders():
    sglang_engine._RECORDERS.clear()
    yield
    sglang_engine._RECORDERS.clear()


@pytest.mark.parametrize("capture", [(0, 2, 3), (1, 3)])
def test_fake_sglang_captures_equal_hf_engine(tiny_target_dir, tmp_path, capture):
    """Hooks on model.layers.{k-1} / embed_tokens / norm give HF's hidden_states[k] and
    last_hidden_state: an off-by-one in the conventions would fail this."""
    spec = CaptureSpec(capture, with_last_hidden=True)
    samples = _samples(7)
    with HFEngine(tiny_target_dir, spec, batch_size=4) as hf:
        expected = hf.capture(samples)
    extra = {"max_prefill_tokens": 40}  # several forwards per generate
    with SGLangEngine(
        tiny_target_dir, spec, runtime=FAKE_RUNTIME, extra_args=extra, handoff_root=str(tmp_path)
    ) as eng:
        got = eng.capture(samples)
        assert (
            eng.runtime.kwargs["disable_radix_cache"]
            and eng.runtime.kwargs["max_prefill_tokens"] == 40
        )
    for e, g in zip(expected, got, strict=True):
        assert g.sample_id == e.sample_id and torch.equal(g.input_ids, e.input_ids)
        assert torch.equal(g.loss_mask, e.loss_mask)
        torch.testing.assert_close(g.aux_hidden, e.aux_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.last_hidden, e.last_hidden, rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # handoff dir removed on close, nothing left in tmpfs


def test_fake_sglang_without_last_hidden_and_bf16_wire(tiny_target_dir, tmp_path):
    spec = CaptureSpec((2,), with_last_hidden=False, dtype=torch.bfloat16)
    with SGLangEngine(
        tiny_target_dir, spec, runtime=FAKE_RUNTIME, handoff_root=str(tmp_path)
    ) as eng:
        (got,) = eng.capture(_samples(1, seed=3))
    assert got.last_hidden is None and got.aux_hidden.dtype == torch.bfloat16
    assert got.aux_hidden.shape == (len(got.input_ids), 64)


def test_stream_check_refuses_reordered_or_extra_forwards(tiny_target_dir, tmp_path):
    spec = CaptureSpec((1, 3), with_last_hidden=True)
    samples = _samples(3, seed=1)
    with SGLangEngine(
        tiny_target_dir, spec, runtime=FAKE_RUNTIME, handoff_root=str(tmp_path)
    ) as eng:
        eng.runtime.reverse = True  # as if SGLang scheduled longest-prefix-first
        with pytest.raises(ServiceError, match="reordered or mixed"):
            eng.capture(samples)
        eng.runtime.reverse = False
        eng.runtime.extra_forward = True  # a forward that is not one of our prompts
        with pytest.raises(ServiceError, match="reordered or mixed"):
            eng.capture(samples)
        eng.runtime.extra_forward = False
        assert len(eng.capture(samples)) == 3  # nothing stale left behind by the failures


def test_split_forwards_cuts_across_chunked_and_packed_forwards(tiny_target_dir):
    """Forwards may pack several prompts and split one (chunked prefill): cutting the
    concatenated stream at the prompts' lengths still gives each sample its own rows."""
    spec = CaptureSpec((1, 2), with_last_hidden=True)
    samples = _samples(3, seed=4, lo=5, hi=12)
    with HFEngine(tiny_target_dir, spec) as hf:
        expected = hf.capture(samples)
    stream = {
        "input_ids": torch.cat([e.input_ids for e in expected]),
        "aux": torch.cat([e.aux_hidden for e in expected]),
        "last": torch.cat([e.last_hidden for e in expected]),
    }
    total = len(stream["input_ids"])
    cuts = [0, 3, len(samples[0].input_ids) + 2, total]  # every cut inside a prompt
    bundles = [{k: v[a:b] for k, v in stream.items()} for a, b in zip(cuts, cuts[1:], strict=False)]
    got = sglang_engine.split_forwards(bundles, samples, True, torch.float32)
    for e, g in zip(expected, got, strict=True):
        assert g.sample_id == e.sample_id and torch.equal(g.input_ids, e.input_ids)
        assert torch.equal(g.aux_hidden, e.aux_hidden) and torch.equal(g.last_hidden, e.last_hidden)
    with pytest.raises(ServiceError, match="no forward"):
        sglang_engine.split_forwards([], samples, True, torch.float32)
    lacking = [{"input_ids": stream["input_ids"], "missing_aux": torch.tensor([1])}]
    with pytest.raises(ServiceError, match="module names differ"):
        sglang_engine.split_forwards(lacking, samples, True, torch.float32)


def test_hook_specs_name_the_right_modules():
    spec = CaptureSpec((0, 2, 27), with_last_hidden=True)
    specs = forward_hook_specs(spec, 30, "/dev/shm/x")
    targets = [(s["target_modules"], s["config"]["role"], s["config"]["slot"]) for s in specs]
    assert targets == [
        (["model.embed_tokens"], "ids", 0),
        (["model.embed_tokens"], "aux", 0),  # capture 0 = embedding output
        (["model.layers.1"], "aux", 1),  # capture 2 = output of layer 1
        (["model.layers.26"], "aux", 2),  # capture 27 = output of layer 26
        (["model.norm"], "last", 0),
    ]
    assert all(s["hook_factory"] == "spec_core.engines.sglang:capture_hook" for s in specs)
    assert all(s["config"]["num_aux"] == 3 for s in specs)


def test_server_args_protect_our_settings_and_check_the_version(tiny_target_dir, tmp_path):
    spec = CaptureSpec((1, 2), with_last_hidden=True)
    common = dict(model_dtype="bfloat16", tp_size=2, mem_fraction=0.7, max_model_len=513)
    args = server_args(tiny_target_dir, spec, 4, tmp_path, FAKE_SERVER_ARGS, **common)
    assert args["tp_size"] == 2 and args["mem_fraction_static"] == 0.7
    assert args["disable_radix_cache"] and args["schedule_policy"] == "fcfs"
    assert args["context_length"] == 513 and args["skip_tokenizer_init"]
    with pytest.raises(ConfigError, match="may not set"):
        server_args(
            tiny_target_dir, spec, 4, tmp_path, FAKE_SERVER_ARGS, **common,
            extra_args={"disable_radix_cache": False},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not SGLang server arguments"):
        server_args(
            tiny_target_dir, spec, 4, tmp_path, FAKE_SERVER_ARGS, **common,
            extra_args={"no_such_flag": 1},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="0.5.9"):
        server_args(
            tiny_target_dir, spec, 4, tmp_path, FAKE_SERVER_ARGS - {"forward_hooks"}, **common
        )
    older = FAKE_SERVER_ARGS - {"disable_piecewise_cuda_graph"}
    assert "disable_piecewise_cuda_graph" not in server_args(
        tiny_target_dir, spec, 4, tmp_path, older, **common
    )


def test_missing_sglang_is_one_clear_error(tiny_target_dir, tmp_path):
    assert_engine_refused_without("sglang", SGLangEngine, "SGLang", tiny_target_dir, tmp_path)


@pytest.mark.gpu
def test_real_sglang_matches_hf_on_gpu(smollm2_dir, tmp_path):
    """On a CUDA machine with SGLang installed: the real engine (bf16) against HF fp32; every
    column must be closest to its own HF index (no off-by-one) and within bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("sglang", reason="install sglang>=0.5.9 (deployments/gpu_engines.md)")
    capture, hidden = (2, 15, 27), 576
    samples = _samples(8, seed=5, lo=16, hi=200)
    with HFEngine(smollm2_dir, CaptureSpec(capture_neighbours(capture), True), device="cuda") as hf:
        reference = hf.capture(samples)
    with SGLangEngine(
        smollm2_dir,
        CaptureSpec(capture, True),
        model_dtype="bfloat16",
        mem_fraction=0.3,
        handoff_root=str(tmp_path),
    ) as eng:
        got = eng.capture(samples)

    assert_columns_nearest_own_index(got, reference, capture, hidden, 3e-2)
