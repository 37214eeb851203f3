"""The real vLLM through ``VLLMEngine`` (its CPU build on these machines), against HF.

Runs only where vLLM is importable, i.e. under the vLLM venv: ``make vllm-test`` (or
``.venv-vllm/bin/python -m pytest tests/test_engine_vllm_real.py`` inside ``unshare -n``). In the
main venv it is skipped. Prompts are longer than ``max_num_batched_tokens`` so vLLM chunks their
prefill and the connector has to put each request together from several steps.
"""

from __future__ import annotations

import random

import pytest
import torch

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import TokenizedSample
from spec_core.engines.hf import HFEngine

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only (make vllm-test)")

CAPTURE = (2, 15, 27)  # SmolLM2's EAGLE-3 defaults


def _prompts(n: int, seed: int = 0) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(70, 150) if i else 5
        ids = [rng.randrange(3, 49152) for _ in range(length)]
        out.append(TokenizedSample(f"p{i}", ids, [1] * length))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_real_vllm_matches_hf_with_chunked_prefill(smollm2_dir, tmp_path):
    from spec_core.engines.vllm import VLLMEngine

    samples = _prompts(6)
    neighbours = sorted({kk for k in CAPTURE for kk in (k - 1, k, k + 1)})
    with HFEngine(smollm2_dir, CaptureSpec(tuple(neighbours), True), batch_size=3) as hf:
        reference = hf.capture(samples)
    engine = VLLMEngine(
        smollm2_dir,
        CaptureSpec(CAPTURE, True),
        model_dtype="float32",
        mem_fraction=0.25,  # on CPU: the share of the NUMA node vLLM reserves
        max_model_len=513,
        extra_args={"max_num_batched_tokens": 64, "enable_chunked_prefill": True},
        handoff_root=str(tmp_path),
    )
    try:
        scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
        assert scheduler.max_num_batched_tokens == 64 < max(len(s.input_ids) for s in samples)
        first = engine.capture(samples[:4])
        second = engine.capture(samples[4:])  # the engine is reused across batches
    finally:
        engine.close()
    hidden = 576
    for got, ref in zip(first + second, reference, strict=True):
        assert got.sample_id == ref.sample_id and torch.equal(got.input_ids, ref.input_ids)
        for j, k in enumerate(CAPTURE):
            col = got.aux_hidden[:, j * hidden : (j + 1) * hidden]
            errors = {
                kk: _rel(col, ref.aux_hidden[:, i * hidden : (i + 1) * hidden])
                for i, kk in enumerate(neighbours)
                if abs(kk - k) <= 1
            }
            assert min(errors, key=errors.get) == k, errors  # no off-by-one
            assert errors[k] < 1e-4, errors
        assert _rel(got.last_hidden, ref.last_hidden) < 1e-4  # post-norm, like HF
    assert list(tmp_path.iterdir()) == []
