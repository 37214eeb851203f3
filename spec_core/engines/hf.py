"""Hidden-state capture with plain HF transformers: the CPU/tests engine and the reference the
SGLang/vLLM engines are checked against.

We run the *base* model (``AutoModel``: decoder stack + final norm, no ``lm_head``), so full logits
are never computed: on SmolLM2 shapes they would cost more than the whole forward and a GB of RAM.
Capture index k is ``output_hidden_states[k]`` (0 = embedding output, k in 1..N-1 = input of layer
k). The last hidden state is taken from ``last_hidden_state`` of the base model, which is the
final-norm output by construction, rather than from ``hidden_states[-1]``: whether that last
element is pre- or post-norm differs between transformers versions (5.x ties it to the post-norm
state, 4.x before the output recorder did not always), while ``last_hidden_state`` never changed.

Batches are formed from length-sorted samples and right-padded: with right padding the default
position ids of real tokens are 0..T-1 and the causal+padding mask hides the pad tail, so a sample's
captures do not depend on what it was batched with (up to kernel-level float noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.contracts.capture import CaptureSpec, check_capture_indices
from spec_core.contracts.samples import CapturedSample, TokenizedSample
from spec_core.engines.base import HiddenStateEngine
from spec_core.errors import ConfigError, DataError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class HFEngine(HiddenStateEngine):
    """Runs an HF causal LM's base model and returns captures in specflow's convention."""

    def __init__(
        self,
        target_dir: Path | str,
        spec: CaptureSpec,
        device: str = "cpu",
        batch_size: int = 4,
        model_dtype: torch.dtype = torch.float32,
        device_map: Optional[str] = None,
    ) -> None:
        from transformers import AutoModel

        if batch_size <= 0:
            raise ConfigError(f"'inference.batch_size' must be positive, got {batch_size}")
        self.spec = spec
        self.device = torch.device(resolve_device(device))
        self.batch_size = batch_size
        if device_map is None:
            self.model = AutoModel.from_pretrained(str(target_dir), dtype=model_dtype)
            self.model.to(self.device)
        else:  # layers spread over the GPUs (accelerate's hooks move activations between them)
            self.model = AutoModel.from_pretrained(
                str(target_dir), dtype=model_dtype, device_map=device_map
            )
            self.device = self.model.get_input_embeddings().weight.device
        self.model.eval()
        num_layers = int(self.model.config.num_hidden_layers)
        check_capture_indices(spec.capture_indices, num_layers)
        self.hidden_size = int(self.model.config.hidden_size)
        self.num_layers = num_layers
        self.pad_id = int(self.model.config.pad_token_id or 0)

    @property
    def aux_dim(self) -> int:
        return len(self.spec.capture_indices) * self.hidden_size

    def capture(self, samples: Sequence[TokenizedSample]) -> list[CapturedSample]:
        for s in samples:
            if not s.input_ids or len(s.input_ids) != len(s.loss_mask):
                raise DataError(
                    f"sample {s.sample_id!r}: input_ids ({len(s.input_ids)}) and loss_mask "
                    f"({len(s.loss_mask)}) must be non-empty and the same length"
                )
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids), reverse=True)
        results: list[CapturedSample | None] = [None] * len(samples)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, captured in zip(chunk, self._forward([samples[i] for i in chunk]), strict=True):
                results[i] = captured
        return [r for r in results if r is not None]

    def _forward(self, batch: list[TokenizedSample]) -> list[CapturedSample]:
        lengths = [len(s.input_ids) for s in batch]
        width = max(lengths)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            input_ids[row, : lengths[row]] = torch.tensor(s.input_ids, dtype=torch.long)
            attention_mask[row, : lengths[row]] = 1
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                output_hidden_states=True,
                use_cache=False,
            )
            layers = [out.hidden_states[k] for k in self.spec.capture_indices]
            aux = torch.cat(layers, dim=-1).to(self.spec.dtype).cpu()
            last = (
                out.last_hidden_state.to(self.spec.dtype).cpu()
                if self.spec.with_last_hidden
                else None
            )
        captured = []
        for row, s in enumerate(batch):
            n = lengths[row]
            captured.append(
                CapturedSample(
                    sample_id=s.sample_id,
                    input_ids=input_ids[row, :n].clone(),
                    loss_mask=torch.tensor(s.loss_mask, dtype=torch.uint8),
                    aux_hidden=aux[row, :n].clone(),
                    last_hidden=None if last is None else last[row, :n].clone(),
                )
            )
        return captured

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def decoder_modules(model: Any) -> tuple[Any, Any, Any]:
    """(embedding, decoder layers, final norm) of an HF causal LM or base model, found through
    the model's own accessors rather than by the ``model.layers``/``model.norm`` names: the base
    model is ``model.base_model`` (Gemma-3's text model, a VLM's language model), its layers are
    the one ``ModuleList`` whose length is ``num_hidden_layers``, its final norm the last
    top-level child named like a norm. Manual hooks (tests, engines' hook plans) use this."""
    from torch import nn

    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    text = getattr(model.config, "text_config", None) or model.config
    count = int(text.num_hidden_layers)
    lists = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == count]
    norms = [m for name, m in base.named_children() if "norm" in name.lower()]
    if len(lists) != 1 or not norms:
        raise ConfigError(
            f"{type(model).__name__}: cannot find its {count} decoder layers and final norm; "
            "this architecture is not supported by the HF engine's hooks"
        )
    return base.get_input_embeddings(), lists[0], norms[-1]
