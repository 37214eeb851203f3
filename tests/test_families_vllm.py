"""The vLLM lane per family (``make vllm-test``, under .venv-vllm): the tiny checkpoint of each
family (spec_core.families) captured by the real vLLM CPU build against the HF engine. A family
vLLM cannot run is recorded with vLLM's own error in docs/families.json (the README table)."""

from __future__ import annotations

import random

import pytest
from helpers import assert_columns_nearest_own_index, capture_neighbours

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import TokenizedSample
from spec_core.engines.hf import HFEngine
from spec_core.families import FAMILIES, tiny_family_target

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only (make vllm-test)")

CAPTURE = (1, 2)  # its neighbours (0..3) are what the HF reference captures
# vLLM's CPU gpt-oss path (attention sinks, its own MoE kernel) differs from HF's fp32 eager at
# the 1e-3 level (measured 1.09e-3 at capture 1); the nearest-index check still holds it to
# the right layer.
TOL = {"gpt-oss": 5e-3}
# vLLM runs these but its captures differ from HF beyond float noise; recorded, not hidden.
# The root cause vLLM's worker logs when engine start-up fails (the exception the client gets
# says only "see root cause above"), as vLLM 0.32.0's CPU build printed it for the family.
WORKER_ERROR = {
    "gemma3": "RuntimeError: Model does not support EAGLE3 interface but "
    "aux_hidden_state_outputs was requested",
}
KNOWN_MISMATCH = {"deepseek-v3": "MLA+MoE runs, but its layer outputs differ from HF's"}


def _prompts(n: int, seed: int = 0) -> list[TokenizedSample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(20, 60)
        ids = [rng.randrange(3, 49152) for _ in range(length)]
        out.append(TokenizedSample(f"p{i}", ids, [1] * length))
    return out


@pytest.mark.family_lane("vllm_capture", "capture parity vs HF (vLLM CPU, fp32)")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_capture_matches_hf(family, asset_cache, smollm2_dir, tmp_path, record_property):
    from spec_core.engines.vllm import VLLMEngine

    target_dir = tiny_family_target(asset_cache, smollm2_dir, family)
    samples = _prompts(3)
    with HFEngine(target_dir, CaptureSpec(capture_neighbours(CAPTURE), True), batch_size=3) as hf:
        reference = hf.capture(samples)
    try:
        engine = VLLMEngine(
            target_dir,
            CaptureSpec(CAPTURE, True),
            model_dtype="float32",
            mem_fraction=0.1,
            max_model_len=256,
            handoff_root=str(tmp_path),
        )
    except Exception as exc:  # noqa: BLE001 (whatever vLLM raises is the answer we record)
        line = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        line = WORKER_ERROR.get(family, line)
        record_property("family_ok", False)
        record_property("family_note", f"vLLM: {line[:200]}")
        pytest.xfail(f"vLLM cannot run {family}: {line[:200]}")
    try:
        got = engine.capture(samples)
    except Exception as exc:  # noqa: BLE001
        if not type(exc).__module__.startswith("vllm"):
            raise  # ours: a real failure
        record_property("family_ok", False)
        record_property("family_note", f"vLLM ({type(exc).__name__}) on the first forward")
        pytest.xfail(f"vLLM cannot run {family}: {type(exc).__name__}")
    finally:
        engine.close()
    try:
        assert_columns_nearest_own_index(got, reference, CAPTURE, 64, TOL.get(family, 1e-3))
    except AssertionError as exc:
        if family not in KNOWN_MISMATCH:
            raise
        errors = str(exc).splitlines()[0][:120]
        record_property("family_ok", False)
        record_property("family_note", f"{KNOWN_MISMATCH[family]} (rel. errors by index {errors})")
        pytest.xfail(f"{family}: {KNOWN_MISMATCH[family]}")
    if family in TOL:
        record_property("family_note", f"tolerance {TOL[family]:g} (vLLM CPU kernels)")
