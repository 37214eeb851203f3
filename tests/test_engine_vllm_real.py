"""The real vLLM through ``VLLMEngine`` (its CPU build on these machines), against HF.

Runs only where vLLM is importable, i.e. under the vLLM venv: ``make vllm-test`` (or
``.venv-vllm/bin/python -m pytest tests/test_engine_vllm_real.py`` inside ``unshare -n``). In the
main venv it is skipped. Prompts are longer than ``max_num_batched_tokens`` so vLLM chunks their
prefill and the connector has to put each request together from several steps.
"""

from __future__ import annotations

import random

import pytest
from helpers import assert_columns_nearest_own_index, capture_neighbours

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


def test_real_vllm_matches_hf_with_chunked_prefill(smollm2_dir, tmp_path):
    from spec_core.engines.vllm import VLLMEngine

    samples = _prompts(6)
    with HFEngine(smollm2_dir, CaptureSpec(capture_neighbours(CAPTURE), True), batch_size=3) as hf:
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
    # post-norm last hidden, like HF
    assert_columns_nearest_own_index(first + second, reference, CAPTURE, 576, 1e-4)
    assert list(tmp_path.iterdir()) == []
