"""Shared fixtures: the real SmolLM2 assets (materialized once into the user cache) and tiny
random Llamas that use the real SmolLM2 tokenizer (spec_core.assets.build_tiny_target), for fast
unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def asset_cache() -> Path:
    return Path(os.environ.get("SPECFLOW_TEST_CACHE", "~/.cache/specflow")).expanduser()


@pytest.fixture(scope="session")
def smollm2_dir(asset_cache: Path) -> Path:
    from spec_core.assets import resolve_target_path

    return resolve_target_path("builtin:smollm2-135m-instruct", asset_cache)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def chitchat_path(asset_cache: Path) -> Path:
    from spec_core.assets import resolve_dataset_path

    return resolve_dataset_path("builtin:chitchat", asset_cache)


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    from spec_core.assets import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("tiny-target"), smollm2_dir)


@pytest.fixture(scope="session")
def untied_target_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    """The tiny Llama, untied: a tied random model just repeats its input token (whitespace
    after a chat header), an untied one produces varied text (what regeneration tests need)."""
    from spec_core.assets import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("untied"), smollm2_dir, tie=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models' ops are too small to split; on a busy 2-core box two OpenMP threads
    make every op wait for a time slice (measured 20-50x slower), so modules that generate text
    use one (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def process_group():
    """A one-rank gloo process group in this process (the trainer's pieces in-process)."""
    import torch.distributed as dist

    from spec_core.utils.net import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.fixture()
def queue_address():
    """A fresh key-queue TCPStore on 127.0.0.1 (tests using it run in a private network
    namespace)."""
    from spec_core.transfer.queue import start_queue_server

    store, port = start_queue_server("127.0.0.1")
    yield f"127.0.0.1:{port}"
    del store


# ----------------------------------------------------------------------------- family lanes
# Tests marked ``family_lane(lane, what)`` and parametrized by ``family`` record their outcome in
# docs/families.json; scripts/families_table.py renders it into the README's family table, so the
# table says what the last run showed rather than what someone typed.
FAMILY_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "families.json"
_family_outcomes: dict[str, dict[str, dict]] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "family_lane(lane, what): record this family test's outcome in the README table"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("family_lane")
    family = getattr(getattr(item, "callspec", None), "params", {}).get("family")
    if marker is None or family is None or not (report.when == "call" or not report.passed):
        return report
    lane, what = marker.args
    props = dict(item.user_properties)  # a test may state its own outcome (family_ok/_note)
    note = props.get("family_note")
    if props.get("family_ok") is False:
        outcome = {"ok": False, "reason": note or "not supported"}
    elif report.passed:
        outcome = {"ok": True, "reason": f"{what}; {note}" if note else what}
    elif report.skipped:
        why = getattr(report, "wasxfail", None) or (
            report.longrepr[-1] if isinstance(report.longrepr, tuple) else "skipped"
        )
        outcome = {"ok": False, "reason": f"skipped: {why}"}
    else:
        lines = [ln for ln in str(report.longrepr).splitlines() if ln.startswith("E ")]
        outcome = {"ok": False, "reason": (lines[0][1:].strip() if lines else "failed")[:160]}
    _family_outcomes.setdefault(family, {})[lane] = outcome
    return report


def pytest_sessionfinish(session):
    if not _family_outcomes:
        return
    import json

    from spec_core.utils.files import atomic_write_text

    old = json.loads(FAMILY_RESULTS.read_text()) if FAMILY_RESULTS.is_file() else {}
    for family, lanes in _family_outcomes.items():
        old.setdefault(family, {}).update(lanes)
    atomic_write_text(FAMILY_RESULTS, json.dumps(old, indent=1, sort_keys=True) + "\n")
