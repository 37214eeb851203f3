"""The pipeline deployment's typed parameters: the schema Prefect's "Run" form is drawn from holds
every config section with types, choices, defaults and descriptions; a real Prefect server refuses
a run whose override names no config key or whose form value has the wrong type, when the run is
created (before any worker); the form, the preset and the overrides combine in that order."""

from __future__ import annotations

import asyncio

import pytest

from flows.params import ConfigForm, config_for_parameters, form_overrides
from flows.pipeline import speculative_training


def schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(speculative_training).model_dump_for_openapi()


def test_parameter_schema_has_the_config_sections_types_and_descriptions():
    s = schema()
    props, defs = s["properties"], s["definitions"]
    assert set(props) == {"config_path", "overrides", "mode", "settings"}
    assert props["config_path"]["default"] == "configs/smollm2-chitchat.yaml"
    pattern = props["overrides"]["anyOf"][0]["items"]["pattern"]
    assert "training\\.num_steps" in pattern and "dataset\\.regenerate\\.enabled" in pattern
    assert props["mode"]["anyOf"][0]["enum"] == ["local", "deployments"]
    form = defs["ConfigForm"]["properties"]
    assert {"run", "dataset", "training", "evaluation", "registry", "orchestration"} <= set(form)
    training = defs["TrainingForm"]["properties"]
    steps = training["num_steps"]
    assert {"type": "integer"} in steps["anyOf"] and "num_epochs" in steps["description"]
    assert training["print_interval"]["description"].endswith("built-in default 50")
    schedule = training["lr_schedule"]["anyOf"][0]
    assert schedule["enum"] == ["cosine", "linear", "constant", "wsd"]
    regen = defs["DatasetRegenerateForm"]["properties"]
    assert "greedy" in regen["temperature"]["description"]


def test_form_then_overrides_then_mode_make_the_config(tmp_path):
    form = ConfigForm(training={"num_steps": 7, "lr_schedule": "linear"}, dataset={"seed": 3})
    assert sorted(form_overrides(form)) == [
        "dataset.seed=3",
        'training.lr_schedule="linear"',
        "training.num_steps=7",
    ]
    cfg = config_for_parameters(
        {
            "config_path": "configs/smollm2-chitchat.yaml",
            "settings": form.model_dump(),
            "overrides": ["training.num_steps=9"],
            "mode": "deployments",
        }
    )
    assert cfg.training.num_steps == 9 and cfg.training.lr_schedule == "linear"
    assert cfg.dataset.seed == 3 and cfg.orchestration.mode == "deployments"
    assert cfg.vocab.draft_vocab_size == 4096  # the preset's value where the form is empty


@pytest.mark.slow
def test_server_rejects_bad_parameters_when_the_run_is_created(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    async def create(deployment_id, parameters) -> str:
        async with get_client() as client:
            try:
                run = await client.create_flow_run_from_deployment(
                    deployment_id, parameters=parameters
                )
            except PrefectHTTPStatusError as exc:
                return f"refused {exc.response.status_code}: {exc.response.text}"
            await client.delete_flow_run(run.id)
            return "created"

    async def check() -> dict[str, str]:
        deployment = await speculative_training.ato_deployment(name="form-test")
        deployment_id = await deployment.apply()
        return {
            "good": await create(
                deployment_id,
                {"overrides": ["training.num_steps=3"], "settings": {"training": {"seed": 1}}},
            ),
            "typo": await create(deployment_id, {"overrides": ["training.num_stepz=3"]}),
            "type": await create(deployment_id, {"settings": {"training": {"num_steps": "x"}}}),
            "choice": await create(deployment_id, {"mode": "cluster"}),
        }

    with temporary_settings(
        {PREFECT_HOME: str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    ):
        with prefect_test_harness(server_startup_timeout=180):
            got = asyncio.run(check())
    assert got["good"] == "created"
    for case in ("typo", "type", "choice"):
        assert got[case].startswith("refused 409"), (case, got[case])
    assert "num_stepz" in got["typo"]
