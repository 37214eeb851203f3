"""The Prefect task on a real (temporary) Prefect server: cached on spec_core's key, a changed
setting runs again, and the progress artifact reaches 100 %."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_regen_core import make_cfg, write_dataset

from spec_core.config import config_to_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_regenerate_task_is_cached_and_reports_progress(tmp_path, untied_target_dir):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from tasks.regenerate import PROGRESS_KEY, regenerate_responses

    target = untied_target_dir
    data = write_dataset(tmp_path / "chats.jsonl")
    out = f"run.output_dir={tmp_path / 'out'}"
    config = config_to_dict(make_cfg(target, data, out))
    changed = config_to_dict(make_cfg(target, data, out, "dataset.regenerate.max_new_tokens=5"))

    @flow
    def three_calls() -> list:
        task = regenerate_responses.with_options(result_storage=tmp_path / "results")
        states = [
            task(config, str(target), return_state=True),
            task(config, str(target), return_state=True),
            task(changed, str(target), return_state=True),
        ]
        return [(s.name, s.result()) for s in states]

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_KEY]))
            )

    with prefect_test_harness(server_startup_timeout=120):
        (first, r1), (second, r2), (third, r3) = three_calls()
        import asyncio

        progress = asyncio.run(artifacts())
    assert (first, second, third) == ("Completed", "Cached", "Completed")
    assert r1 == r2 and not r1["cached"]
    assert r3["cache_key"] != r1["cache_key"]
    assert Path(r1["output_path"]).is_file() and Path(r3["output_path"]).is_file()
    assert progress and all(a.data == 100.0 for a in progress)
