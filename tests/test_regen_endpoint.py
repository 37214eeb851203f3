"""The endpoint generator against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/
openai_server.py, answered by transformers' own ``generate`` on the tiny model): same dataset as
the embedded engine, bounded retries, clear errors, and resume after the server failed mid-run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from openai_server import ServerBehaviour, start_openai_server
from test_regen_core import RECORDS, make_cfg, write_dataset

from spec_core.data import regenerate as rg
from spec_core.data.load import load_conversations
from spec_core.errors import ServiceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MANY = [
    {
        "id": f"c{i:02d}",
        "messages": [
            {"role": "user", "content": f"question number {i}: " + "why? " * (i % 5)},
            {"role": "assistant", "content": f"answer {i}"},
            {"role": "user", "content": "and then?"},
            {"role": "assistant", "content": "the end"},
        ],
    }
    for i in range(12)
]


@pytest.fixture()
def server(untied_target_dir: Path):
    handle = start_openai_server(untied_target_dir, name="tiny")
    yield handle
    handle.stop()


def endpoint_cfg(target_dir: Path, data: Path, url: str, *overrides: str):
    return make_cfg(
        target_dir,
        data,
        "dataset.regenerate.engine=openai",
        f"dataset.regenerate.endpoint={url}",
        "dataset.regenerate.concurrency=3",
        *overrides,
    )


def test_endpoint_dataset_equals_embedded_engine(tmp_path, untied_target_dir, server):
    data = write_dataset(tmp_path / "chats.jsonl")
    hf = rg.regenerate_dataset(
        make_cfg(untied_target_dir, data, "dataset.regenerate.turns=all"),
        data,
        untied_target_dir,
        tmp_path / "hf",
    )
    cfg = endpoint_cfg(untied_target_dir, data, server.url, "dataset.regenerate.turns=all")
    api = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "api")
    assert api.cache_key != hf.cache_key
    assert api.output_path.read_bytes() == hf.output_path.read_bytes()
    m = api.manifest
    assert m["engine"]["engine"] == "openai" and m["engine"]["endpoint"] == server.url
    assert m["counts"]["turns_regenerated"] == hf.manifest["counts"]["turns_regenerated"]
    assert m["tokens_generated"] == hf.manifest["tokens_generated"]
    # one request per regenerated turn, prompts sent as token ids of our own template
    assert server.behaviour.requests == m["counts"]["turns_regenerated"]
    assert all(
        isinstance(p, list) and all(isinstance(t, int) for t in p) for p in server.behaviour.prompts
    )
    assert load_conversations(api.output_path).report.num_skipped == 0


def test_transient_server_errors_are_retried(tmp_path, untied_target_dir, target_server_flaky):
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = endpoint_cfg(
        untied_target_dir,
        data,
        target_server_flaky.url,
        "dataset.regenerate.model_name=tiny",
        "dataset.regenerate.max_retries=3",
    )
    result = rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    assert result.manifest["counts"]["written"] == len(RECORDS)
    assert target_server_flaky.behaviour.failed == 2
    assert target_server_flaky.behaviour.requests == len(RECORDS) + 2


@pytest.fixture()
def target_server_flaky(untied_target_dir: Path):
    handle = start_openai_server(
        untied_target_dir, name="tiny", behaviour=ServerBehaviour(fail_first=2)
    )
    yield handle
    handle.stop()


def test_endpoint_down_fails_naming_it(tmp_path, untied_target_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = endpoint_cfg(
        untied_target_dir,
        data,
        url,
        "dataset.regenerate.max_retries=1",
        "dataset.regenerate.model_name=x",
    )
    with pytest.raises(ServiceError, match=f"endpoint {url}/completions failed 2 times") as info:
        rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    assert "dataset.regenerate.endpoint" in str(info.value) and "\n" not in str(info.value)


def test_slow_endpoint_times_out_with_a_clear_error(tmp_path, untied_target_dir):
    handle = start_openai_server(
        untied_target_dir, name="tiny", behaviour=ServerBehaviour(delay_s=3.0)
    )
    try:
        data = write_dataset(tmp_path / "chats.jsonl", RECORDS[:1])
        cfg = endpoint_cfg(
            untied_target_dir,
            data,
            handle.url,
            "dataset.regenerate.model_name=tiny",
            "dataset.regenerate.request_timeout_s=0.5",
            "dataset.regenerate.max_retries=1",
        )
        with pytest.raises(ServiceError, match=f"endpoint {handle.url}/completions .*[Tt]ime"):
            rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    finally:
        handle.stop()


def test_wrong_model_name_is_rejected_without_retries(tmp_path, untied_target_dir, server):
    data = write_dataset(tmp_path / "chats.jsonl")
    cfg = endpoint_cfg(untied_target_dir, data, server.url, "dataset.regenerate.model_name=nope")
    with pytest.raises(ServiceError, match="HTTP 404 model 'nope' not found"):
        rg.regenerate_dataset(cfg, data, untied_target_dir, tmp_path / "work")
    assert server.behaviour.requests <= 3  # one per worker at most, no retries


def test_server_failing_mid_run_keeps_partial_output_and_resumes(tmp_path, untied_target_dir):
    data = write_dataset(tmp_path / "many.jsonl", MANY)
    reference = rg.regenerate_dataset(
        make_cfg(untied_target_dir, data, "dataset.regenerate.turns=all"),
        data,
        untied_target_dir,
        tmp_path / "hf",
    )
    handle = start_openai_server(
        untied_target_dir, name="tiny", behaviour=ServerBehaviour(fail_after=9)
    )
    try:
        cfg = endpoint_cfg(
            untied_target_dir,
            data,
            handle.url,
            "dataset.regenerate.turns=all",
            "dataset.regenerate.max_retries=1",
        )
        work = tmp_path / "api"
        with pytest.raises(ServiceError, match=handle.url):
            rg.regenerate_dataset(cfg, data, untied_target_dir, work)
        key = rg.regen_cache_key(cfg, data, untied_target_dir)
        partial = rg._read_partial(work / "regenerated" / key / rg.PARTIAL)
        assert 0 < len(partial) < len(MANY)  # finished conversations were kept
        assert not (work / "regenerated" / key / rg.MANIFEST).exists()
        handle.behaviour.fail_after = None  # the server is back
        requests_before = handle.behaviour.requests
        resumed = rg.regenerate_dataset(cfg, data, untied_target_dir, work)
    finally:
        handle.stop()
    assert resumed.manifest["counts"]["resumed"] == len(partial)
    assert resumed.output_path.read_bytes() == reference.output_path.read_bytes()
    # only the missing conversations were asked for again (two turns each)
    assert handle.behaviour.requests - requests_before == 2 * (len(MANY) - len(partial))
