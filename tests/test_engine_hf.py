"""HFEngine: capture convention, batching invariance, dtype, and the real SmolLM2 target."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import random_samples

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import TokenizedSample
from spec_core.engines.hf import HFEngine
from spec_core.errors import ConfigError, DataError

_samples = functools.partial(random_samples, lo=3, hi=40)


@pytest.fixture(scope="module")
def engine(tiny_target_dir):
    spec = CaptureSpec(capture_indices=(0, 2, 3), with_last_hidden=True)
    with HFEngine(tiny_target_dir, spec, batch_size=3) as eng:
        yield eng


def test_batched_equals_single_sample_forward(engine):
    samples = _samples(7)
    batched = engine.capture(samples)
    assert [c.sample_id for c in batched] == [s.sample_id for s in samples]
    for s, c in zip(samples, batched, strict=True):
        (single,) = engine.capture([s])
        t = len(s.input_ids)
        assert c.aux_hidden.shape == (t, 3 * 64) and c.last_hidden.shape == (t, 64)
        assert c.input_ids.dtype == torch.int64 and c.input_ids.tolist() == s.input_ids
        assert c.loss_mask.dtype == torch.uint8 and c.loss_mask.tolist() == s.loss_mask
        torch.testing.assert_close(c.aux_hidden, single.aux_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.last_hidden, single.last_hidden, rtol=1e-5, atol=1e-5)


def test_capture_index_convention_matches_manual_hooks(engine, tiny_target_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    layer_inputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, k=k: layer_inputs.__setitem__(
                k, args[0] if args else kwargs["hidden_states"]
            ),
            with_kwargs=True,
        )
        for k, layer in enumerate(model.model.layers)
    ]
    norm_out: list[torch.Tensor] = []
    handles.append(model.model.norm.register_forward_hook(lambda m, i, o: norm_out.append(o)))
    (sample,) = _samples(1, seed=5, lo=17, hi=17)
    ids = torch.tensor([sample.input_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
        embeds = model.model.embed_tokens(ids)[0]
    for h in handles:
        h.remove()
    (captured,) = engine.capture([sample])
    h = 64
    expected = {0: embeds, 2: layer_inputs[2][0], 3: layer_inputs[3][0]}
    for slot, k in enumerate((0, 2, 3)):
        torch.testing.assert_close(captured.aux_hidden[:, slot * h : (slot + 1) * h], expected[k])
    # last_hidden is the final-norm output, i.e. exactly what lm_head sees.
    torch.testing.assert_close(captured.last_hidden, norm_out[0][0])
    torch.testing.assert_close(model.lm_head(captured.last_hidden), logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(captured.last_hidden, layer_inputs[3][0], atol=1e-3)


def test_dtype_and_without_last_hidden(tiny_target_dir):
    spec = CaptureSpec(capture_indices=(1,), with_last_hidden=False, dtype=torch.bfloat16)
    eng = HFEngine(tiny_target_dir, spec, batch_size=2)
    out = eng.capture(_samples(3, seed=2))
    assert all(c.aux_hidden.dtype == torch.bfloat16 and c.last_hidden is None for c in out)
    assert eng.aux_dim == 64


def test_bad_capture_index_and_bad_sample(tiny_target_dir):
    with pytest.raises(ConfigError, match="capture_indices"):
        HFEngine(tiny_target_dir, CaptureSpec(capture_indices=(0, 4), with_last_hidden=False))
    eng = HFEngine(tiny_target_dir, CaptureSpec(capture_indices=(1,), with_last_hidden=False))
    with pytest.raises(DataError, match="same length"):
        eng.capture([TokenizedSample("bad", [5, 6, 7], [1, 0])])


@pytest.mark.slow
def test_real_smollm2_capture(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    spec = CaptureSpec(capture_indices=(2, 15, 27), with_last_hidden=True)
    eng = HFEngine(smollm2_dir, spec, batch_size=2)
    texts = ["Hello, how are you today?", "Tell me a joke about cats, please.", "Hi"]
    samples = [
        TokenizedSample(
            f"t{i}", smollm2_tokenizer(t)["input_ids"], [1] * len(smollm2_tokenizer(t)["input_ids"])
        )
        for i, t in enumerate(texts)
    ]
    out = eng.capture(samples)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for s, c in zip(samples, out, strict=True):
        assert c.aux_hidden.shape == (len(s.input_ids), 3 * 576)
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([s.input_ids]), output_hidden_states=True)
        torch.testing.assert_close(
            c.aux_hidden[:, 576:1152], ref.hidden_states[15][0], rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            model.lm_head(c.last_hidden), ref.logits[0], rtol=1e-3, atol=1e-3
        )
