"""VLLMEngine and its KV-connector logic on CPU without vLLM, driven by a fake vLLM ``LLM``.

``FakeVLLM`` stands in for ``vllm.LLM`` where vLLM is not installed (the main venv; the real
engine is exercised by ``test_engine_vllm_real.py`` in the vLLM venv). It takes the engine
arguments our producer builds, and plays vLLM's part around the same functions the real connector
calls: a scheduler that chunks prefills under a token budget and hands out non-contiguous blocks
in two KV-cache groups (``CaptureBook.step`` on a ``SchedulerOutput``-shaped object), a cache-only
layer that writes the states of the requested layer ids into a ``[blocks, layers, block_size,
hidden]`` cache with vLLM's semantics (id L = the stream entering decoder layer L, id N = after the
last layer, before the norm; ids sorted and de-duplicated), the worker's ``save_pending`` after
each step, and ``request_finished`` params in the outputs. Freed blocks are scribbled over, so a
capture read from stale slots would fail.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
from helpers import assert_engine_refused_without, random_samples

from spec_core.contracts.capture import CaptureSpec
from spec_core.contracts.samples import TokenizedSample
from spec_core.engines import handoff
from spec_core.engines.conventions import vllm_extract_plan
from spec_core.engines.hf import HFEngine
from spec_core.engines.vllm import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    PARAMS_KEY,
    CaptureBook,
    VLLMEngine,
    captured_from_bundle,
    engine_args,
    gather_slots,
    load_final_norm,
    save_pending,
)
from spec_core.errors import ConfigError, ServiceError

BLOCK_SIZE = 4
HIDDEN_GROUP = 1  # group 0 = the target's attention layers, group 1 = the cache-only layer


@dataclass
class FakeNewRequestData:  # the fields of vllm.v1.core.sched.output.NewRequestData we read
    req_id: str
    prompt_token_ids: Optional[list[int]]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class FakeCachedRequestData:  # ... and of CachedRequestData
    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_block_ids: list[Optional[tuple[list[int], ...]]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


def scheduler_output(new=(), cached=None, scheduled=None) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached or FakeCachedRequestData(),
        num_scheduled_tokens=dict(scheduled or {}),
    )


class FakeVLLM:
    """FAKE ``vllm.LLM`` for CPU tests (see the module docstring); not vLLM."""

    def __init__(self, **kwargs: Any) -> None:
        from transformers import AutoModel

        assert kwargs["enable_prefix_caching"] is False
        spec_cfg = kwargs["speculative_config"]
        assert spec_cfg["method"] == "extract_hidden_states"
        assert spec_cfg["num_speculative_tokens"] == 1
        kv = kwargs["kv_transfer_config"]
        assert (kv["kv_connector"], kv["kv_connector_module_path"]) == (
            CONNECTOR_CLASS,
            CONNECTOR_MODULE,
        )
        self.handoff_dir = kv["kv_connector_extra_config"]["handoff_dir"]
        layer_ids = spec_cfg["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"]
        self.layer_ids = sorted(set(layer_ids))  # what vLLM does with the list
        self.budget = int(kwargs.get("max_num_batched_tokens", 8192))
        self.model = AutoModel.from_pretrained(kwargs["model"], dtype=torch.float32).eval()
        hidden = self.model.config.hidden_size
        self.cache = torch.full((96, len(self.layer_ids), BLOCK_SIZE, hidden), float("nan"))
        self.free = list(range(96))
        random.Random(0).shuffle(self.free)  # non-contiguous block tables
        self.book = CaptureBook(HIDDEN_GROUP)  # the connector's scheduler side
        self.counter = 0
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: None))

    def _states(self, ids: list[int]) -> torch.Tensor:
        """[T, len(layer_ids), H] with vLLM's semantics, recorded from the HF modules' inputs."""
        seen: dict[int, torch.Tensor] = {}
        modules = [*self.model.layers, self.model.norm]  # index L: the input of layer L / norm
        handles = [
            m.register_forward_pre_hook(
                lambda mod, args, kwargs, k=k: seen.__setitem__(
                    k, (args[0] if args else kwargs["hidden_states"])[0]
                ),
                with_kwargs=True,
            )
            for k, m in enumerate(modules)
            if k in self.layer_ids
        ]
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids]))
        for h in handles:
            h.remove()
        return torch.stack([seen[k] for k in self.layer_ids], dim=1)

    def generate(self, prompts: list[dict], sampling_params: Any, use_tqdm: bool) -> list:
        reqs = []
        for p in prompts:
            req_id = f"{self.counter}-{random.Random(self.counter).getrandbits(32):08x}"
            ids = list(p["prompt_token_ids"])
            reqs.append({"id": req_id, "ids": ids, "done": 0, "blocks": ([], []), "new": True})
            self.counter += 1
        outputs = {}
        while any(r["done"] < len(r["ids"]) for r in reqs):
            budget, new, cached, scheduled = self.budget, [], FakeCachedRequestData(), {}
            for r in reqs:
                todo = len(r["ids"]) - r["done"]
                if todo == 0 or budget == 0:
                    continue
                n = min(todo, budget)
                budget -= n
                need = -(-(r["done"] + n) // BLOCK_SIZE) - len(r["blocks"][1])
                fresh = (
                    [self.free.pop() for _ in range(need)],
                    [self.free.pop() for _ in range(need)],
                )
                for group in (0, 1):
                    r["blocks"][group].extend(fresh[group])
                if r["new"]:
                    new.append(FakeNewRequestData(r["id"], r["ids"], r["blocks"], r["done"]))
                    r["new"] = False
                else:
                    cached.req_ids.append(r["id"])
                    cached.new_block_ids.append(fresh if need else None)
                    cached.num_computed_tokens.append(r["done"])
                scheduled[r["id"]] = n
            pending = self.book.step(scheduler_output(new, cached, scheduled))
            for r in reqs:  # the forward: the cache-only layer writes this step's slots
                n = scheduled.get(r["id"], 0)
                if n:
                    states = self._states(r["ids"])
                    for t in range(r["done"], r["done"] + n):
                        block = r["blocks"][1][t // BLOCK_SIZE]
                        self.cache[block, :, t % BLOCK_SIZE] = states[t]
            save_pending(self.cache, pending, self.handoff_dir)  # worker: wait_for_save
            for r in reqs:
                r["done"] += scheduled.get(r["id"], 0)
                if r["id"] in scheduled and r["done"] == len(r["ids"]):
                    params = self.book.finished(r["id"])  # request_finished
                    outputs[r["id"]] = SimpleNamespace(kv_transfer_params=params)
                    for block in r["blocks"][1]:  # freed blocks get reused: scribble on them
                        self.cache[block] = -1.0
                    self.free += r["blocks"][0] + r["blocks"][1]  # popped (reused) first
        return [outputs[r["id"]] for r in reqs]


FAKE_RUNTIME = (FakeVLLM, None)


_samples = functools.partial(random_samples, lo=1, hi=23)


@pytest.mark.parametrize(
    ("capture", "budget"),
    [((0, 2, 3), 7), ((1, 3), 8192)],  # 7 tokens a step: most prompts span several steps
)
def test_fake_vllm_captures_equal_hf_engine(tiny_target_dir, tmp_path, capture, budget):
    """Layer ids, block tables, chunked prefill, slot reordering and the final norm together:
    an off-by-one in the conventions or a stale slot would fail this."""
    spec = CaptureSpec(capture, with_last_hidden=True)
    samples = _samples(6)
    with HFEngine(tiny_target_dir, spec, batch_size=4) as hf:
        expected = hf.capture(samples)
    extra = {"max_num_batched_tokens": budget}
    with VLLMEngine(
        tiny_target_dir, spec, runtime=FAKE_RUNTIME, extra_args=extra, handoff_root=str(tmp_path)
    ) as eng:
        got = eng.capture(samples)
        assert eng.vocab_size == 49152
        assert handoff.bundle_names(eng.handoff_dir) == []  # every bundle consumed
    for e, g in zip(expected, got, strict=True):
        assert g.sample_id == e.sample_id and torch.equal(g.input_ids, e.input_ids)
        assert torch.equal(g.loss_mask, e.loss_mask)
        torch.testing.assert_close(g.aux_hidden, e.aux_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.last_hidden, e.last_hidden, rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # handoff dir removed on close


def test_fake_vllm_without_last_hidden_sends_no_final_slot(tiny_target_dir, tmp_path):
    spec = CaptureSpec((1, 2), with_last_hidden=False, dtype=torch.bfloat16)
    with VLLMEngine(tiny_target_dir, spec, runtime=FAKE_RUNTIME, handoff_root=str(tmp_path)) as eng:
        assert eng.llm.layer_ids == [1, 2] and eng.norm is None
        (got,) = eng.capture(_samples(1, seed=2))
    assert got.last_hidden is None and got.aux_hidden.dtype == torch.bfloat16


def test_capture_book_tracks_chunks_groups_and_preemption():
    book = CaptureBook(group=1)
    ids = list(range(10))
    step = book.step(
        scheduler_output(
            [FakeNewRequestData("a", ids, ([7], [3, 9]), 0)], scheduled={"a": 6}
        )  # 6 of 10 tokens: not done
    )
    assert step == []
    cached = FakeCachedRequestData(["a"], set(), [([8], [4])], [6])
    (pending,) = book.step(scheduler_output(cached=cached, scheduled={"a": 4}))
    assert pending.block_ids == [3, 9, 4] and pending.token_ids == ids  # group 1 only
    assert book.finished("a") == {PARAMS_KEY: pending.bundle}
    assert book.finished("a") is None  # once
    # Preempted after its first chunk: the resumed block table replaces the old one.
    book.step(scheduler_output([FakeNewRequestData("b", ids, ([], [1, 2]), 0)], scheduled={"b": 5}))
    resumed = FakeCachedRequestData(["b"], {"b"}, [([], [5, 6, 7])], [0])
    (pending,) = book.step(scheduler_output(cached=resumed, scheduled={"b": 10}))
    assert pending.block_ids == [5, 6, 7]
    with pytest.raises(ConfigError, match="no prompt token ids"):
        book.step(scheduler_output([FakeNewRequestData("c", None, ([], []), 0)], scheduled={}))


def test_gather_slots_follows_the_block_table():
    cache = torch.arange(6 * 2 * 4 * 3, dtype=torch.float32).reshape(6, 2, 4, 3)
    got = gather_slots(cache, [5, 0, 2], 9)
    expected = torch.stack([cache[[5, 0, 2][t // 4], :, t % 4] for t in range(9)])
    assert torch.equal(got, expected) and got.shape == (9, 2, 3)
    with pytest.raises(ServiceError, match="blocks"):
        gather_slots(cache, [5], 9)


def test_engine_args_ask_for_capture_ids_plus_final_slot(tmp_path):
    plan = vllm_extract_plan((2, 15, 27), 30, with_last_hidden=True)
    args = engine_args(
        "/t", plan, tmp_path, model_dtype="bfloat16", tp_size=2, mem_fraction=0.25,
        max_model_len=513, extra_args={"max_num_seqs": 8},
    )  # fmt: skip
    hf_config = args["speculative_config"]["draft_model_config"]["hf_config"]
    assert hf_config["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27, 30]
    assert args["kv_transfer_config"]["kv_connector_extra_config"] == {"handoff_dir": str(tmp_path)}
    assert args["enable_prefix_caching"] is False and args["max_num_seqs"] == 8
    assert (args["tensor_parallel_size"], args["gpu_memory_utilization"]) == (2, 0.25)
    assert args["dtype"] == "bfloat16" and args["max_model_len"] == 513
    with pytest.raises(ConfigError, match="may not set"):
        engine_args(
            "/t", plan, tmp_path, model_dtype="float32", tp_size=1, mem_fraction=0.5,
            max_model_len=64, extra_args={"enable_prefix_caching": True},
        )  # fmt: skip


def test_bundle_conversion_refuses_other_tokens_and_shapes(tiny_target_dir):
    plan = vllm_extract_plan((1, 2), 4, with_last_hidden=False)
    sample = TokenizedSample("x", [5, 6, 7], [1, 1, 1])
    good = {"input_ids": torch.tensor([5, 6, 7]), "hidden": torch.zeros(3, 2, 8)}
    assert captured_from_bundle(good, sample, plan, None, torch.float32).aux_hidden.shape == (3, 16)
    with pytest.raises(ServiceError, match="other tokens"):
        captured_from_bundle(
            {**good, "input_ids": torch.tensor([5, 6, 8])}, sample, plan, None, torch.float32
        )
    with pytest.raises(ServiceError, match="shape"):
        captured_from_bundle(
            {**good, "hidden": torch.zeros(3, 3, 8)}, sample, plan, None, torch.float32
        )


def test_final_norm_turns_prenorm_into_hf_last_hidden(tiny_target_dir):
    from transformers import AutoModel

    from spec_core.models.common.target import read_target_config

    model = AutoModel.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    seen = {}
    model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("pre", args[0]))
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[5, 900, 31000, 7]]))
    norm = load_final_norm(
        tiny_target_dir, "model.norm.weight", read_target_config(tiny_target_dir)
    )
    torch.testing.assert_close(norm(seen["pre"]), out.last_hidden_state, rtol=1e-6, atol=1e-6)
    # Gemma's norm is x * (1 + w): the same stored weight, one added
    gemma = {"model_type": "gemma2", "rms_norm_eps": 1e-6}
    gemma_norm = load_final_norm(tiny_target_dir, "model.norm.weight", gemma)
    assert torch.equal(gemma_norm.weight, norm.weight + 1)


def test_missing_vllm_is_one_clear_error(tiny_target_dir, tmp_path):
    assert_engine_refused_without("vllm", VLLMEngine, "vLLM", tiny_target_dir, tmp_path)


# ---------------------------------------------------------------------------------------------
# The tmpfs handoff


def test_handoff_bundle_round_trip_and_checks(tmp_path):
    directory = handoff.make_handoff_dir(tmp_path)
    tensors = {
        "ids": torch.tensor([1, 2, 3]),
        "h": torch.randn(3, 2, 5).to(torch.bfloat16),
        "m": torch.tensor([1, 0, 1], dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
    }
    handoff.write_bundle(directory, "b1", tensors)
    assert handoff.bundle_names(directory) == ["b1"]
    got = handoff.read_bundle(directory, "b1")
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t)
    assert list(directory.iterdir()) == []  # read removes it
    handoff.write_bundle(directory, "b2", tensors)
    with open(directory / "b2.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ServiceError, match="holds 10 bytes"):
        handoff.read_bundle(directory, "b2")
    with pytest.raises(ServiceError, match="missing or unreadable"):
        handoff.read_bundle(directory, "nope")


def test_handoff_dirs_of_dead_producers_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"specflow-handoff-{dead_pid}-x"
    live = tmp_path / f"specflow-handoff-{os.getpid()}-y"
    stale.mkdir()
    live.mkdir()
    fresh = handoff.make_handoff_dir(tmp_path)
    assert not stale.exists() and live.exists() and fresh.exists()


def test_prefill_batch_check_names_the_sample_and_the_limit():
    from spec_core.engines.base import check_prefill_batch
    from spec_core.errors import DataError

    ok = TokenizedSample("a", [1, 2, 3], [0, 1, 1])
    check_prefill_batch([ok], 4, "vLLM", "max_model_len")  # 3 tokens fit a 4-token context
    with pytest.raises(
        DataError, match=r"sample 'a' has 3 tokens; the vLLM producer's max_model_len is 3"
    ):
        check_prefill_batch([ok], 3, "vLLM", "max_model_len")
    ragged = TokenizedSample("b", [1, 2], [1])
    with pytest.raises(DataError, match=r"sample 'b': input_ids \(2\) and loss_mask \(1\) must be"):
        check_prefill_batch([ok, ragged], 8, "SGLang", "context_length")
