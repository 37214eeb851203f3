"""Secrets stay out of everything specflow saves or logs: the run's config.yaml, the config passed
as Prefect parameters and training jobs, MLflow params, the regeneration manifest's engine entry and
endpoint retry warnings. A value read with ``${oc.env:VAR}`` travels as that reference and is
resolved again where it is used; a credential written literally into the config is refused."""

from __future__ import annotations

import logging

import pytest

from spec_core.config import config_from_dict, config_to_dict, load_config, save_config
from spec_core.data.generators import OpenAIGenerator
from spec_core.errors import ConfigError, ServiceError
from spec_core.registry import _log_params, flatten
from spec_core.training.job import TrainJob
from spec_core.utils.net import free_port
from spec_core.utils.redact import MASK, is_secret_key, redact, redact_text

PASSWORD = "hunter2-s3cret"
TRACKING = f"https://alice:{PASSWORD}@mlflow.example.com:5000"
ENDPOINT = f"http://bob:{PASSWORD}@127.0.0.1:9/v1"


def test_redact_masks_credentials_and_secret_keys_only():
    assert redact_text(TRACKING) == "https://***@mlflow.example.com:5000"
    assert redact_text("postgresql://u:p@db/mlflow") == "postgresql://***@db/mlflow"
    assert redact_text("http://h/v1?x=1&api_key=abc&max_tokens=3") == (
        "http://h/v1?x=1&api_key=***&max_tokens=3"
    )
    assert redact_text("Authorization: Bearer sk-abcdef123") == "Authorization: Bearer ***"
    assert redact_text("http://127.0.0.1:8000/v1 user@example.com") == (
        "http://127.0.0.1:8000/v1 user@example.com"
    )
    data = {"api_key": "k", "X-Auth-Token": "t", "hfToken": "h", "password": 5, "token": None}
    assert redact(data) == {
        "api_key": MASK,
        "X-Auth-Token": MASK,
        "hfToken": MASK,
        "password": MASK,
        "token": None,
    }
    for harmless in ("max_new_tokens", "tokenizer", "author", "num_tokens", "messages_key"):
        assert not is_secret_key(harmless), harmless
    assert redact({"nested": [{"url": TRACKING}]}) == {
        "nested": [{"url": "https://***@mlflow.example.com:5000"}]
    }


@pytest.fixture()
def env_secrets(monkeypatch):
    monkeypatch.setenv("SPECFLOW_TEST_TRACKING", TRACKING)
    monkeypatch.setenv("SPECFLOW_TEST_ENDPOINT", ENDPOINT)


def secret_cfg(tmp_path):
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "registry.tracking_uri=${oc.env:SPECFLOW_TEST_TRACKING}",
            "dataset.regenerate.endpoint=${oc.env:SPECFLOW_TEST_ENDPOINT}",
            "dataset.regenerate.engine=openai",
        ],
    )


def test_env_secrets_are_saved_and_passed_as_references(tmp_path, env_secrets, monkeypatch):
    cfg = secret_cfg(tmp_path)
    assert cfg.registry.tracking_uri == TRACKING  # the process that uses it sees the value
    saved = save_config(cfg, tmp_path / "config.yaml").read_text()
    assert PASSWORD not in saved and "${oc.env:SPECFLOW_TEST_TRACKING}" in saved
    params = config_to_dict(cfg)  # what flows pass as Prefect parameters
    assert PASSWORD not in repr(params)
    assert params["dataset"]["regenerate"]["endpoint"] == "${oc.env:SPECFLOW_TEST_ENDPOINT}"
    job = TrainJob.create(cfg, run_dir=str(tmp_path), target_dir=str(tmp_path))
    assert PASSWORD not in job.save(tmp_path / "job.json").read_text()
    # the receiver resolves the reference from its own environment, at use
    monkeypatch.setenv("SPECFLOW_TEST_TRACKING", "sqlite:///elsewhere.db")
    assert config_from_dict(params).registry.tracking_uri == "sqlite:///elsewhere.db"
    assert load_config(tmp_path / "config.yaml").registry.tracking_uri == "sqlite:///elsewhere.db"
    monkeypatch.delenv("SPECFLOW_TEST_TRACKING")
    with pytest.raises(ConfigError, match="SPECFLOW_TEST_TRACKING"):
        config_from_dict(params)


def test_mlflow_params_hold_no_secret(tmp_path, env_secrets):
    """The params ``publish_run`` logs (``flatten(config_to_dict(cfg))``), on a real store."""
    from mlflow import MlflowClient

    cfg = secret_cfg(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("secrets", artifact_location=str(tmp_path / "art"))
    run = client.create_run(experiment).info.run_id
    _log_params(client, run, flatten(config_to_dict(cfg)))
    logged = client.get_run(run).data.params
    assert logged["registry.tracking_uri"] == "${oc.env:SPECFLOW_TEST_TRACKING}"
    assert not [k for k, v in logged.items() if PASSWORD in v]


@pytest.mark.parametrize(
    "override",
    [
        f"registry.tracking_uri={TRACKING}",
        f"dataset.regenerate.endpoint={ENDPOINT}",
        "run.name=x?token=abc",
        "inference.extra_args={api_key: abc}",
    ],
)
def test_a_literal_credential_in_the_config_is_refused(override):
    with pytest.raises(ConfigError, match=r"credential|one path component|extra_args") as err:
        load_config(None, [override, "inference.engine=vllm"])
    assert PASSWORD not in str(err.value) and "abc" not in str(err.value).split("'")[-1]


def test_endpoint_retry_warnings_and_errors_hide_credentials(caplog):
    url = f"http://bob:{PASSWORD}@127.0.0.1:{free_port()}/v1?api_key={PASSWORD}"
    generator = OpenAIGenerator(url, [], [], model_name="m", max_retries=1, backoff_s=0.01)
    assert PASSWORD not in repr(generator.describe())  # what the regeneration manifest records
    with caplog.at_level(logging.WARNING), pytest.raises(ServiceError) as err:
        generator._request("GET", "/models", None)
    assert "attempt 1 failed" in caplog.text
    assert PASSWORD not in caplog.text and PASSWORD not in str(err.value)


def test_vocabulary_token_keys_are_not_secrets_and_every_preset_loads():
    from pathlib import Path

    from spec_core.config import load_config
    from spec_core.utils.redact import is_secret_key

    for key in ("mask_token_id", "draft.mask_token_id", "pad_token", "bos_token_id", "max_tokens"):
        assert not is_secret_key(key), key
    for key in ("token", "hf_token", "access_token", "x-token", "api_key", "authToken"):
        assert is_secret_key(key), key
    presets = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert presets
    for preset in presets:  # a preset's own fields are never taken for credentials
        load_config(str(preset), [])
