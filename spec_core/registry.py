"""MLflow tracking and model registry for published drafts (all MLflow imports live here).

One MLflow run per pipeline run (found again by its ``specflow.run_id`` tag, so a retried task
reuses it): the resolved config as params, the training curves (per step, per TTT position), perf
metrics, the acceptance evaluation, and the artifacts: the HF draft dir (``draft/``, loadable by
SGLang/vLLM as downloaded), the resolved config, the evaluation JSON and plots.

Registry (MLflow 3: aliases, not stages). ``mlflow.register_model("runs:/<id>/draft")`` fails for
a plain directory in MLflow 3, so the version is created with ``MlflowClient.create_model_version``
on the run's ``draft`` artifact. Every new version gets the ``candidate`` alias; it takes
``champion`` only if its evaluation was lossless and its weighted-summary tau beats the current
champion's *on the same eval set* (same ``eval_set_hash``: every prompt set's tokens, names and
weights, the engine, target and decoding settings). A champion measured on other sets or by
another engine is not compared and keeps the alias; the version's ``gate`` tag says what was
compared, or which of the two differed.

Fetching a draft::

    from spec_core.registry import fetch
    local_dir = fetch("smollm2-chitchat-eagle3@champion", tracking_uri="sqlite:///outputs/mlflow.db")

    # or with MLflow alone
    import mlflow
    mlflow.set_tracking_uri("sqlite:///outputs/mlflow.db")
    local_dir = mlflow.artifacts.download_artifacts("models:/smollm2-chitchat-eagle3@champion")
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config, RegistryConfig
from spec_core.errors import ConfigError, ServiceError
from spec_core.paths import RunPaths
from spec_core.utils.redact import redact_text

log = logging.getLogger(__name__)

RUN_ID_TAG = "specflow.run_id"
DRAFT_ARTIFACT = "draft"
PARAM_VALUE_LIMIT = 6000  # MLflow 3 param value limit (characters)
BATCH_LIMIT = 100  # params per log_batch call (metrics: 1000)


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    artifact_location: str
    ui_url: Optional[str]


def tracking_settings(reg: RegistryConfig, output_dir: str | Path) -> TrackingSettings:
    """Tracking URI and artifact root: the config's, else a sqlite file and ``mlartifacts`` under
    the output dir (an explicit artifact root: with sqlite and none, MLflow writes ``./mlruns``
    relative to whatever the current directory is)."""
    layout = RunPaths(Path(output_dir).expanduser().resolve(), run_id="")
    uri = reg.tracking_uri or f"sqlite:///{layout.mlflow_db}"
    artifacts = reg.artifact_location or str(layout.mlflow_artifacts)
    ui = reg.ui_url or (uri if uri.startswith(("http://", "https://")) else None)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return TrackingSettings(uri, artifacts, ui.rstrip("/") if ui else None)


def settings_for(cfg: Config) -> TrackingSettings:
    return tracking_settings(cfg.registry, cfg.run.output_dir)


def _client(settings: TrackingSettings) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


# ----------------------------------------------------------------------------- run logging


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> dotted params; lists/None as JSON, long values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = text[:PARAM_VALUE_LIMIT]
    return out


def record_metrics(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """Numeric fields of one metrics record; per-position lists as ``<name>_<k>`` (k from 0)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("split", "step"):
            continue
        if isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{prefix}/{key}_{i}": float(v) for i, v in enumerate(value)})
    return out


def curve_metrics(metrics_file: Optional[str | Path]) -> list[tuple[str, float, int]]:
    """(key, value, step) of every train/eval record in the trainer's ``metrics.jsonl``."""
    if metrics_file is None or not Path(metrics_file).is_file():
        return []
    points = []
    for line in Path(metrics_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        split = {"train": "train", "eval": "val"}.get(record.get("split", ""), None)
        if split is None or "step" not in record:
            continue
        step = int(record["step"])
        points += [(k, v, step) for k, v in record_metrics(record, split).items()]
    return points


def acceptance_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The weighted summary under ``acceptance/``, each prompt set under ``acceptance/<set>/``."""
    out = _acceptance_record(evaluation, "acceptance")
    out.update(
        {
            "acceptance/wall_speedup": float(evaluation["wall_speedup"]),
            "acceptance/baseline_tokens_per_s": float(evaluation["baseline"]["tokens_per_s"]),
            "acceptance/spec_tokens_per_s": float(evaluation["speculative"]["tokens_per_s"]),
        }
    )
    for name, result in (evaluation.get("sets") or {}).items():
        out.update(_acceptance_record(result, f"acceptance/{name}"))
        out[f"acceptance/{name}/wall_speedup"] = float(result["wall_speedup"])
    return out


def _acceptance_record(result: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {
        f"{prefix}/tau": float(result["tau"]),
        f"{prefix}/acceptance_rate": float(result["acceptance_rate"]),
        f"{prefix}/lossless": float(bool(result["lossless"])),
        f"{prefix}/num_prompts": float(result["num_prompts"]),
    }
    for i, alpha in enumerate(result["alpha"], start=1):
        out[f"{prefix}/alpha_{i}"] = float(alpha)
    for c, at in (result.get("concurrency") or {}).items():  # served engines
        for key in ("tau", "speedup", "spec_tokens_per_s", "plain_tokens_per_s", "lossless"):
            out[f"{prefix}/c{c}/{key}"] = float(at[key])
    return out


def depth_points(evaluation: dict[str, Any]) -> list[tuple[str, float, int]]:
    """tau by drafting depth as metric histories (step = k): MLflow draws the k-sweep curve."""
    curves = [("acceptance", evaluation.get("depth"))]
    curves += [
        (f"acceptance/{n}", r.get("depth")) for n, r in (evaluation.get("sets") or {}).items()
    ]
    return [
        (f"{prefix}/tau_by_depth", float(tau), int(k))
        for prefix, curve in curves
        if curve
        for k, tau in zip(curve["k"], curve["tau"], strict=True)
    ]


def _log_acceptance_artifacts(client: Any, run_id: str, evaluation: dict[str, Any]) -> None:
    """The full JSON, the per-set table (an MLflow table: the UI's artifact view renders it) and
    the plots, under ``eval/``."""
    result_file = evaluation.get("result_path")
    if result_file and Path(result_file).is_file():  # the full JSON, per-prompt records included
        client.log_artifact(run_id, result_file, "eval")
    else:
        text = json.dumps(evaluation, indent=2, sort_keys=True)
        client.log_text(run_id, text, "eval/acceptance.json")
    table = evaluation.get("sets_table")
    if table:
        columns = list(dict.fromkeys(k for row in table for k in row))
        data = {c: [row.get(c) for row in table] for c in columns}
        client.log_table(run_id, data=data, artifact_file="eval/acceptance_sets.json")
    for key in ("plot_path", "depth_plot_path"):
        if evaluation.get(key) and Path(evaluation[key]).is_file():
            client.log_artifact(run_id, evaluation[key], "eval")


def _log_points(client: Any, run_id: str, points: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, s) for k, v, s in points]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in sorted(params.items()) if k not in existing]
    for start in range(0, len(fresh), BATCH_LIMIT):
        client.log_batch(run_id, params=fresh[start : start + BATCH_LIMIT])


def _experiment_id(client: Any, name: str, artifact_location: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _find_or_create_run(client: Any, experiment_id: str, run_name: str) -> str:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_ID_TAG: run_name})
    return run.info.run_id


# ----------------------------------------------------------------------------- gate


@dataclass
class GateDecision:
    promote: bool
    reason: str
    previous_version: Optional[str] = None
    previous_tau: Optional[float] = None


@dataclass(frozen=True)
class EvalIdentity:
    """What a tau was measured on: the eval-set hash (prompt tokens of every set, their names and
    weights, decoding settings, engine, target revision) and, for people, the sets and engine."""

    eval_set_hash: str
    prompt_sets: str  # "name(n prompts, weight w), ..."
    engine: str

    @classmethod
    def of(cls, evaluation: dict[str, Any]) -> EvalIdentity:
        sets = evaluation.get("prompt_sets") or [
            {"name": "held_out", "num_prompts": evaluation.get("num_prompts"), "weight": 1.0}
        ]
        described = ", ".join(
            f"{s['name']}({s['num_prompts']} prompts, weight {float(s['weight']):g})" for s in sets
        )
        engine = str(evaluation.get("engine") or evaluation["settings"].get("engine") or "hf")
        return cls(str(evaluation["eval_set_hash"]), described, engine)

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> EvalIdentity:
        return cls(
            tags.get("eval_set_hash", "?"),
            tags.get("prompt_sets", "unknown sets"),
            tags.get("eval_engine", "hf"),
        )

    def describe(self) -> str:
        return f"sets [{self.prompt_sets}] on engine {self.engine} (eval set {self.eval_set_hash})"


def champion_gate(
    client: Any,
    name: str,
    tau: float,
    identity: EvalIdentity,
    lossless: bool,
    champion_alias: str,
) -> GateDecision:
    """Should a new version with this evaluation take the champion alias? The reason says what
    was compared (weighted-summary tau, prompt sets, engine), or why nothing could be."""
    if not lossless:
        return GateDecision(False, "evaluation was not lossless: never champion")
    try:
        champion = client.get_model_version_by_alias(name, champion_alias)
    except Exception as exc:  # MlflowException: alias not set
        if _is_missing(exc) or "alias" in str(exc).lower():
            return GateDecision(
                True, f"no {champion_alias} yet (measured on {identity.describe()})"
            )
        raise
    prev_tau = champion.tags.get("tau")
    theirs = EvalIdentity.from_tags(champion.tags)
    previous = dict(previous_version=str(champion.version))
    if prev_tau is None or theirs.eval_set_hash != identity.eval_set_hash:
        return GateDecision(
            False,
            f"cannot compare with {champion_alias} v{champion.version}: it was measured on "
            f"{theirs.describe()}, this version on {identity.describe()}; {_what_differs(theirs, identity)}"
            f" - not comparable, {champion_alias} kept (re-evaluate v{champion.version} with this "
            "config's evaluation section to compare)",
            **previous,
        )
    prev = float(prev_tau)
    verdict = "beats" if tau > prev else "does not beat"
    reason = (
        f"weighted tau {tau:.4f} {verdict} {champion_alias} v{champion.version} ({prev:.4f}), "
        f"both on {identity.describe()}"
    )
    return GateDecision(tau > prev, reason, previous_tau=prev, **previous)


def _what_differs(theirs: EvalIdentity, ours: EvalIdentity) -> str:
    diffs = [
        label
        for label, a, b in (
            ("the prompt sets differ", theirs.prompt_sets, ours.prompt_sets),
            ("the engines differ", theirs.engine, ours.engine),
        )
        if a != b
    ]
    return " and ".join(diffs) or "the prompts' tokens, target or decoding settings differ"


# ----------------------------------------------------------------------------- publish


def version_tags(
    cfg: Config, hf_dir: Path, evaluation: dict[str, Any], run_id: str
) -> dict[str, str]:
    """What a registry user filters on: target, algorithm, layers, vocab, tau and data identity."""
    from spec_core.models import algorithm_of

    algorithm = algorithm_of(hf_dir)
    draft = algorithm.load_config(hf_dir)
    meta = draft.specflow
    identity = EvalIdentity.of(evaluation)
    per_set = {n: round(float(r["tau"]), 6) for n, r in (evaluation.get("sets") or {}).items()}
    return {
        "target_model": cfg.target.path,
        "target_revision": str(
            meta.get("target_revision") or evaluation["settings"].get("target_revision", "")
        ),
        "algorithm": algorithm.name,
        "capture_indices": json.dumps(list(draft.capture_indices)),
        "draft_vocab_size": str(draft.draft_vocab_size),
        "vocab_size": str(draft.vocab_size),
        "tau": f"{float(evaluation['tau']):.6f}",
        "alpha": json.dumps([round(float(a), 6) for a in evaluation["alpha"]]),
        "lossless": str(bool(evaluation["lossless"])).lower(),
        "eval_set_hash": identity.eval_set_hash,
        "prompt_sets": identity.prompt_sets,
        "eval_engine": identity.engine,
        "tau_per_set": json.dumps(per_set, sort_keys=True),
        "dataset_hash": str(evaluation.get("dataset_hash") or ""),
        "num_draft_tokens": str(evaluation["settings"]["num_draft_tokens"]),
        "max_new_tokens": str(evaluation["settings"]["max_new_tokens"]),
        "num_prompts": str(evaluation["num_prompts"]),
        "chat_template": str(cfg.dataset.chat_template or "tokenizer"),
        RUN_ID_TAG: run_id,
    }


def publish_run(
    cfg: Config,
    run_id: str,
    *,
    hf_dir: str | Path,
    evaluation: dict[str, Any],
    config_file: Optional[str | Path] = None,
    metrics_file: Optional[str | Path] = None,
    perf: Optional[dict[str, float]] = None,
    extra_artifacts: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """Log the pipeline run to MLflow, register its draft, and apply the champion gate.

    ``evaluation`` is the dict ``spec_core.evaluate.evaluate_draft`` returned (or its JSON).
    Returns a JSON-able summary: run and version ids, links, aliases and the gate's reason.
    """
    from spec_core.config import config_to_dict

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir} is not an exported draft dir (no config.json)")
    reg = cfg.registry
    settings = settings_for(cfg)
    client = _client(settings)
    try:
        experiment_id = _experiment_id(client, reg.experiment, settings.artifact_location)
    except Exception as exc:
        raise ServiceError(
            f"MLflow tracking at {redact_text(settings.tracking_uri)} is unusable: "
            f"{redact_text(str(exc).splitlines()[0])}; "
            "check 'registry.tracking_uri'"
        ) from None
    mlflow_run = _find_or_create_run(client, experiment_id, run_id)

    _log_params(client, mlflow_run, flatten(config_to_dict(cfg)))
    points = curve_metrics(metrics_file)
    final_step = max((s for _, _, s in points), default=0)
    points += [(k, v, final_step) for k, v in acceptance_metrics(evaluation).items()]
    points += depth_points(evaluation)
    points += [
        (f"perf/{k}", float(v), final_step)
        for k, v in (perf or {}).items()
        if isinstance(v, (int, float))
    ]
    _log_points(client, mlflow_run, points)

    client.log_artifacts(mlflow_run, str(hf_dir), DRAFT_ARTIFACT)
    for path in [config_file, metrics_file, *extra_artifacts]:
        if path is not None and Path(path).is_file():
            client.log_artifact(mlflow_run, str(path), "run")
    _log_acceptance_artifacts(client, mlflow_run, evaluation)

    tags = version_tags(cfg, hf_dir, evaluation, run_id)
    client.set_tag(mlflow_run, "tau", tags["tau"])
    version = _register_version(client, reg.model_name, mlflow_run, tags, settings, experiment_id)
    decision = champion_gate(
        client,
        reg.model_name,
        float(evaluation["tau"]),
        EvalIdentity.of(evaluation),
        bool(evaluation["lossless"]),
        reg.champion_alias,
    )
    client.set_registered_model_alias(reg.model_name, reg.candidate_alias, version)
    if decision.promote:
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
    client.set_model_version_tag(reg.model_name, version, "gate", decision.reason)
    client.set_model_version_tag(
        reg.model_name, version, "gate_promoted", str(decision.promote).lower()
    )
    client.set_terminated(mlflow_run, "FINISHED")
    aliases = [reg.candidate_alias] + ([reg.champion_alias] if decision.promote else [])
    log.info(
        "registered %s v%s (%s): %s", reg.model_name, version, ", ".join(aliases), decision.reason
    )
    return {
        "tracking_uri": redact_text(settings.tracking_uri),
        "experiment_id": experiment_id,
        "run_id": mlflow_run,
        "run_url": _run_url(settings, experiment_id, mlflow_run),
        "model_name": reg.model_name,
        "version": version,
        "model_uri": f"models:/{reg.model_name}/{version}",
        "version_url": _version_url(settings, reg.model_name, version),
        "aliases": aliases,
        "champion": decision.promote,
        "gate_reason": decision.reason,
        "previous_champion": decision.previous_version,
        "previous_champion_tau": decision.previous_tau,
        "tau": float(evaluation["tau"]),
        "ui_command": (
            f"mlflow ui --backend-store-uri {redact_text(settings.tracking_uri)} "
            f"--default-artifact-root {settings.artifact_location} --host 127.0.0.1"
        ),
    }


def _register_version(
    client: Any,
    name: str,
    run_id: str,
    tags: dict[str, str],
    settings: TrackingSettings,
    experiment_id: str,
) -> str:
    """The model version of this run (created once; a retried publish reuses it)."""
    try:
        client.get_registered_model(name)
    except Exception as exc:
        if not _is_missing(exc):
            raise
        client.create_registered_model(
            name, description="Draft models trained by specflow (HF dirs for SGLang/vLLM)"
        )
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        for key, value in tags.items():
            client.set_model_version_tag(name, existing.version, key, value)
        return str(existing.version)
    version = client.create_model_version(
        name,
        source=f"runs:/{run_id}/{DRAFT_ARTIFACT}",
        run_id=run_id,
        tags=tags,
        run_link=_run_url(settings, experiment_id, run_id),
        description=f"tau {tags['tau']} on eval set {tags['eval_set_hash']}",
    )
    return str(version.version)


def _run_url(settings: TrackingSettings, experiment_id: str, run_id: str) -> Optional[str]:
    if settings.ui_url is None:
        return None
    return f"{settings.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


def _version_url(settings: TrackingSettings, name: str, version: str) -> Optional[str]:
    if settings.ui_url is None:
        return None
    return f"{settings.ui_url}/#/models/{name}/versions/{version}"


# ----------------------------------------------------------------------------- fetch


def parse_model_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """``name@alias`` / ``name/3`` / ``models:/...`` -> (name, alias, version)."""
    body = spec[len("models:/") :] if spec.startswith("models:/") else spec
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"model {spec!r}: use NAME@ALIAS (e.g. NAME@champion) or NAME/VERSION")


def fetch(
    spec: str,
    dst: Optional[str | Path] = None,
    *,
    tracking_uri: Optional[str] = None,
    config: Optional[Config] = None,
) -> Path:
    """Download a registered draft (``name@champion``, ``name/3``) to a local dir and return it.

    The dir is the HF draft as exported (``config.json`` + ``model.safetensors``), ready for
    ``--speculative-draft-model-path`` (SGLang) or ``speculative_config.model`` (vLLM). The version
    is resolved with an explicit client (``models:/`` URIs in ``download_artifacts`` resolve
    against the *global* registry URI, whatever ``tracking_uri`` says).
    """
    import mlflow

    settings = settings_for(config or Config())
    uri = tracking_uri or settings.tracking_uri
    name, alias, version = parse_model_spec(spec)
    client = _client(TrackingSettings(uri, settings.artifact_location, None))
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        source = client.get_model_version_download_uri(name, version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source,
            dst_path=str(dst) if dst is not None else None,
            tracking_uri=uri,
        )
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot fetch {spec!r} from {uri}: {first}") from None
    path = Path(local)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{spec!r} downloaded to {path} but holds no config.json")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m spec_core.registry fetch NAME@ALIAS [--dst DIR] [--tracking-uri URI]``."""
    import argparse

    from spec_core.config import load_config

    parser = argparse.ArgumentParser(prog="specflow registry", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_p = sub.add_parser("fetch", help="download a registered draft dir")
    fetch_p.add_argument("model", help="NAME@ALIAS or NAME/VERSION")
    fetch_p.add_argument("--dst", default=None)
    fetch_p.add_argument("--tracking-uri", default=None)
    fetch_p.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    cfg = load_config(args.config) if args.config else None
    print(fetch(args.model, args.dst, tracking_uri=args.tracking_uri, config=cfg))
    return 0


if __name__ == "__main__":
    import sys

    from spec_core.utils.cli import run_main

    sys.exit(run_main(main))
