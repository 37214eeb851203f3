"""Capture-index translation (one place, shared by producers and export) and engine config checks.

The conventions are pinned against what the engines' ids *mean* in terms of HF modules: a vLLM id
L is the hidden state entering decoder layer L (its input), an SGLang post-layer id i is the output
of decoder layer i. Both must equal HF ``output_hidden_states[k]`` for our capture index k, so a
+1/-1 slip (TorchSpec's #87/#89) fails here, not in a served draft.
"""

from __future__ import annotations

import pytest
import torch

from spec_core.config import load_config
from spec_core.contracts.capture import (
    capture_indices_from_hf,
    check_capture_indices,
    sglang_layer_ids,
    vllm_layer_ids,
)
from spec_core.engines.conventions import sglang_hook_targets, vllm_extract_plan
from spec_core.errors import ConfigError


def test_smollm2_default_ids_per_engine():
    capture = (2, 15, 27)  # EAGLE-3 default (2, N//2, N-3) for SmolLM2's 30 layers
    assert vllm_layer_ids(capture) == [2, 15, 27]
    assert sglang_layer_ids(capture) == [1, 14, 26]
    for config in (
        {"eagle_aux_hidden_state_layer_ids": [2, 15, 27]},
        {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 14, 26]}},
        {"specflow": {"capture_indices": [2, 15, 27]}, "eagle_aux_hidden_state_layer_ids": [9]},
    ):
        assert capture_indices_from_hf(config) == [2, 15, 27]
    with pytest.raises(ConfigError, match="embedding output"):
        sglang_layer_ids((0, 15))
    with pytest.raises(ConfigError, match="strictly increasing"):
        vllm_layer_ids((15, 2))
    with pytest.raises(ConfigError, match="no aux-layer ids"):
        capture_indices_from_hf({})


def test_engine_ids_mean_the_hf_hidden_state_of_the_capture_index(tiny_target_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.__setitem__(
                i, args[0] if args else kwargs["hidden_states"]
            ),
            with_kwargs=True,
        )
        layer.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
    with torch.inference_mode():
        hf = model(input_ids=torch.tensor([[5, 77, 4000, 12, 9]]), output_hidden_states=True)
    n = model.config.num_hidden_layers
    for k in range(1, n):
        (vllm_id,) = vllm_layer_ids([k])
        (sglang_id,) = sglang_layer_ids([k])
        torch.testing.assert_close(inputs[vllm_id], hf.hidden_states[k], rtol=0, atol=0)
        torch.testing.assert_close(outputs[sglang_id], hf.hidden_states[k], rtol=0, atol=0)
        # and not the neighbours: the layers really change the stream
        assert not torch.allclose(outputs[sglang_id], hf.hidden_states[k - 1], atol=1e-4)
    torch.testing.assert_close(inputs[vllm_layer_ids([0])[0]], hf.hidden_states[0])  # embeddings
    # vLLM id N (after the last layer) is the final norm's input: pre-norm, not last_hidden_state.
    plan = vllm_extract_plan((1, 2), n, with_last_hidden=True)
    assert plan.layer_ids[plan.last_slot] == n
    torch.testing.assert_close(model.norm(outputs[n - 1]), hf.last_hidden_state)


def test_extract_plan_sorts_appends_and_maps_slots():
    plan = vllm_extract_plan((2, 15, 27), 30, with_last_hidden=True)
    assert plan.layer_ids == (2, 15, 27, 30) and plan.aux_slots == (0, 1, 2) and plan.last_slot == 3
    plan = vllm_extract_plan((0, 5), 30, with_last_hidden=False)
    assert plan.layer_ids == (0, 5) and plan.last_slot is None
    for bad, match in [((), "empty"), ((2, 30), r"\[0, 29\]"), ((-1, 2), r"\[0, 29\]")]:
        with pytest.raises(ConfigError, match=match):
            check_capture_indices(bad, 30)
    with pytest.raises(ConfigError, match="strictly increasing"):
        check_capture_indices((5, 5), 30)


def test_sglang_hook_targets_follow_post_layer_ids():
    targets = sglang_hook_targets((0, 2, 27), 30, with_last_hidden=False)
    modules = [(t.module, t.role, t.slot) for t in targets]
    assert modules == [
        ("model.embed_tokens", "ids", 0),
        ("model.embed_tokens", "aux", 0),
        (f"model.layers.{sglang_layer_ids([2])[0]}", "aux", 1),
        (f"model.layers.{sglang_layer_ids([27])[0]}", "aux", 2),
        ("model.norm", "end", 0),
    ]


def test_export_uses_the_same_translation():
    from spec_core.models.common.hf import ExportError
    from spec_core.models.common.hf import sglang_layer_ids as export_sglang
    from spec_core.models.common.hf import vllm_layer_ids as export_vllm

    assert export_vllm((2, 15, 27)) == vllm_layer_ids((2, 15, 27))
    assert export_sglang((2, 15, 27)) == sglang_layer_ids((2, 15, 27))
    with pytest.raises(ExportError, match="strictly increasing"):
        export_vllm((27, 2))


# ---------------------------------------------------------------------------------------------
# inference.* validation


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["inference.engine=sglang", "inference.device=cpu"], "CUDA GPUs only"),
        (["inference.engine=vllm", "draft.last_hidden_prenorm=true"], "post-norm"),
        (["inference.tp_size=2"], "apply to sglang/vllm"),
        (["inference.extra_args={max_num_seqs: 4}"], "apply to sglang/vllm"),
        (["inference.engine=vllm", "inference.tp_size=0"], "tp_size"),
        (["inference.engine=vllm", "inference.mem_fraction=1.5"], "mem_fraction"),
        (["draft.capture_indices=[15,2,27]"], "strictly increasing"),
        (["inference.engine=trt"], "valid choices"),
    ],
)
def test_engine_config_errors_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_engine_configs_that_are_valid():
    cfg = load_config(
        None,
        [
            "inference.engine=vllm",
            "inference.device=cpu",  # vLLM's CPU build
            "inference.mem_fraction=0.25",
            "inference.python=.venv-vllm/bin/python",
            "inference.extra_args={max_num_batched_tokens: 2048}",
        ],
    )
    assert cfg.inference.extra_args == {"max_num_batched_tokens": 2048}
    assert cfg.inference.python == ".venv-vllm/bin/python"
    cfg = load_config("configs/qwen3-8b-eagle3.yaml", ["inference.tp_size=4"])
    assert cfg.inference.engine == "sglang" and cfg.inference.tp_size == 4
