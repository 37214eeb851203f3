"""``SpecflowHiddenStatesConnector``: the KV connector vLLM loads by module path (no patch).

A thin adapter: vLLM's connector interface on one side, ``CaptureBook`` / ``save_pending`` from
``spec_core.engines.vllm`` on the other (where the logic lives and is tested without vLLM). It is
store-only and synchronous: the worker saves a request in ``wait_for_save`` of the step that
completes its prefill, which vLLM calls after the cache-only layer has written and before the
step's output leaves the worker, so nothing needs delayed block freeing or a lock. Unlike vLLM's
``ExampleHiddenStatesConnector`` it uses no CUDA streams or pinned memory, so it also runs on
vLLM's CPU build. Imported only inside vLLM's processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer
from vllm.v1.kv_cache_interface import HiddenStateCacheSpec, UniformTypeKVCacheSpecs

from spec_core.engines.vllm import CaptureBook, PendingCapture, save_pending


@dataclass
class SpecflowCaptureMetadata(KVConnectorMetadata):
    pending: list[PendingCapture] = field(default_factory=list)


def hidden_state_group(kv_cache_config: Any) -> int:
    """Index of the KV-cache group holding the cache-only layer (0 when there is one group)."""
    if kv_cache_config is None:
        return 0
    groups = kv_cache_config.kv_cache_groups

    def holds_hidden_states(spec: Any) -> bool:
        if isinstance(spec, HiddenStateCacheSpec):
            return True
        if isinstance(spec, UniformTypeKVCacheSpecs):
            return any(isinstance(s, HiddenStateCacheSpec) for s in spec.kv_cache_specs.values())
        return False

    found = [i for i, g in enumerate(groups) if holds_hidden_states(g.kv_cache_spec)]
    if len(found) == 1:
        return found[0]
    if not found and len(groups) == 1:
        return 0
    raise ValueError(
        f"cannot tell which of {len(groups)} KV-cache groups holds the extracted hidden states"
    )


class SpecflowHiddenStatesConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(
        self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._handoff_dir = str(self._kv_transfer_config.get_from_extra_config("handoff_dir", ""))
        if not self._handoff_dir:
            raise ValueError("kv_connector_extra_config.handoff_dir is required")
        self._book = CaptureBook(hidden_state_group(kv_cache_config))
        self._cache: Optional[torch.Tensor] = None
        self._rank_zero = True

    # --- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        return 0, False  # store-only: never loads

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return SpecflowCaptureMetadata(pending=self._book.step(scheduler_output))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict]]:
        return False, self._book.finished(request.request_id)

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, Optional[dict]]:
        return False, self._book.finished(request.request_id)

    # --- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._rank_zero = get_tensor_model_parallel_rank() == 0
        layers = get_layers_from_vllm_config(
            self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches.keys())
        )
        if len(layers) != 1:
            raise ValueError(f"expected one cache-only hidden-state layer, found {len(layers)}")
        self._cache = kv_caches[next(iter(layers))]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kw: Any) -> None:
        pass  # the states are read in wait_for_save, once the cache-only layer has written

    def wait_for_save(self) -> None:
        if not self._rank_zero or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if isinstance(meta, SpecflowCaptureMetadata) and meta.pending:
            if self._cache is None:
                raise RuntimeError("hidden-state cache not registered")
            save_pending(self._cache, meta.pending, self._handoff_dir)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> Optional[str]:
        return "LBNHC"  # [blocks, layers, block_size, hidden]: a token's states stay together
