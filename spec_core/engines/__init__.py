"""Hidden-state engines behind one interface (``HiddenStateEngine``); ``build_engine`` picks one.

``inference.engine``: ``hf`` (embedded default, any device), ``vllm`` (its own
``extract_hidden_states`` method + our KV connector; GPU, or vLLM's CPU build), ``sglang``
(``sgl.Engine`` + forward hooks from its ``forward_hooks`` server argument; GPU). vLLM and SGLang
are imported only when chosen, so this package imports without them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spec_core.config import Config
from spec_core.contracts.capture import CaptureSpec
from spec_core.engines.base import HiddenStateEngine

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def max_model_len(cfg: Config) -> int:
    """Longest prompt a producer sends (dataset.max_seq_length) plus the one sampled token."""
    return int(cfg.dataset.max_seq_length) + 1


def build_engine(cfg: Config, target_dir: str | Path, spec: CaptureSpec) -> HiddenStateEngine:
    inf = cfg.inference
    if inf.engine in ("vllm", "sglang"):
        served = {
            "model_dtype": cfg.target.dtype,
            "tp_size": inf.tp_size,
            "mem_fraction": inf.mem_fraction,
            "max_model_len": max_model_len(cfg),
            "extra_args": inf.extra_args,
            "handoff_root": inf.handoff_dir,
        }
        if inf.engine == "vllm":
            from spec_core.engines.vllm import VLLMEngine

            return VLLMEngine(target_dir, spec, norm_key=cfg.target.norm_key, **served)
        from spec_core.engines.sglang import SGLangEngine

        return SGLangEngine(target_dir, spec, **served)
    from spec_core.engines.hf import HFEngine

    return HFEngine(
        target_dir,
        spec,
        device=inf.device,
        batch_size=inf.batch_size,
        model_dtype=MODEL_DTYPES[cfg.target.dtype],
        device_map=inf.device_map,
    )
