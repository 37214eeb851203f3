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
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from spec_core.config import Config, RegistryConfig
from spec_core.errors import ConfigError, ServiceError
from spec_core.metrics import plot_training, read_records
from spec_core.paths import RunPaths
from spec_core.utils.files import atomic_write_json
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
    return curve_points(Path(metrics_file).read_text(encoding="utf-8").splitlines())


def curve_points(lines: Iterable[str]) -> list[tuple[str, float, int]]:
    """(key, value, step) of the train/eval records among ``metrics.jsonl`` lines."""
    points = []
    for line in lines:
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


# ----------------------------------------------------------------------------- live run

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 UI: which view an experiment opens in
EXPERIMENT_KIND = "custom_model_development"  # the classic model-training view (not GenAI)
# MLflow 3.17's UI picks GenAI or model training per user (a sidebar toggle, default GenAI); this
# query on our links opens the model-training view whatever the toggle says.
UI_VIEW = "?workflowType=machine_learning"
FLOW_RUN_TAG = "specflow.flow_run_id"


def _paths(cfg: Config, run_id: str) -> RunPaths:
    return RunPaths(Path(cfg.run.output_dir).expanduser().resolve(), run_id)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _experiment(client: Any, settings: TrackingSettings, name: str) -> str:
    try:
        experiment_id = _experiment_id(client, name, settings.artifact_location)
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except Exception as exc:
        raise ServiceError(
            f"MLflow tracking at {redact_text(settings.tracking_uri)} is unusable: "
            f"{redact_text(str(exc).splitlines()[0])}; check 'registry.tracking_uri'"
        ) from None
    return experiment_id


def open_run(cfg: Config, run_id: str, flow_run_id: Optional[str] = None) -> dict[str, Any]:
    """Open the pipeline's MLflow run when the pipeline starts, or find it again on resume.

    The run's id is kept in the run dir (``mlflow_run.json``), so a resumed pipeline (same
    ``run.run_id``) continues the same MLflow run and its curves. The resolved config (redacted)
    goes in as params and ``run/config.yaml`` now, so a run that fails is still documented.
    """
    from spec_core.config import config_to_dict

    settings = settings_for(cfg)
    client = _client(settings)
    experiment_id = _experiment(client, settings, cfg.registry.experiment)
    state_file = _paths(cfg, run_id).mlflow_run_file
    state = _read_state(state_file)
    mlflow_run = state.get("mlflow_run_id")
    try:
        if mlflow_run and client.get_run(mlflow_run).info.lifecycle_stage != "active":
            mlflow_run = None
    except Exception as exc:
        if not _is_missing(exc):
            raise
        mlflow_run = None
    if not mlflow_run:
        mlflow_run = _find_or_create_run(client, experiment_id, run_id)
        state = {"mlflow_run_id": mlflow_run, "metrics_offset": 0}
    client.update_run(mlflow_run, status="RUNNING")
    if flow_run_id:
        client.set_tag(mlflow_run, FLOW_RUN_TAG, flow_run_id)
    redacted = config_to_dict(cfg)  # secrets stay ${oc.env:...} references or are masked
    _log_params(client, mlflow_run, flatten(redacted))
    client.log_text(mlflow_run, _yaml(redacted), "run/config.yaml")
    state.update(experiment_id=experiment_id, tracking_uri=redact_text(settings.tracking_uri))
    atomic_write_json(state_file, state, indent=2, sort_keys=True)
    log.info("MLflow run %s (%s)", mlflow_run, redact_text(settings.tracking_uri))
    return {
        "run_id": mlflow_run,
        "experiment_id": experiment_id,
        "run_url": _run_url(settings, experiment_id, mlflow_run),
        "tracking_uri": redact_text(settings.tracking_uri),
    }


def _yaml(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def live_run_id(cfg: Config, run_id: str) -> Optional[str]:
    """The MLflow run ``open_run`` opened for this pipeline run (None: not tracked live)."""
    return _read_state(_paths(cfg, run_id).mlflow_run_file).get("mlflow_run_id")


def close_run(
    cfg: Config, run_id: str, status: str, scalars: Optional[dict[str, float]] = None
) -> Optional[str]:
    """End the live run with ``status`` (FINISHED | FAILED | KILLED); ``scalars`` (one value per
    run: pipeline throughput, ...) become tags. Returns the MLflow run id, None if untracked."""
    mlflow_run = live_run_id(cfg, run_id)
    if mlflow_run is None:
        return None
    client = _client(settings_for(cfg))
    if scalars:
        _log_scalars(client, mlflow_run, scalars)
    client.set_terminated(mlflow_run, status)
    return mlflow_run


def close_runs_of_flow_run(cfg: Config, flow_run_id: str, status: str) -> list[str]:
    """End every still-running MLflow run a Prefect flow run opened (its failure/cancel hook
    knows the flow run, not the specflow run id)."""
    settings = settings_for(cfg)
    client = _client(settings)
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in runs]


def _log_scalars(client: Any, mlflow_run: str, scalars: dict[str, float]) -> None:
    """One value per run (acceptance, throughput) as tags ``<group>.<name>``: the run page shows
    them with the run, not as single-point charts among the training curves."""
    for key, value in scalars.items():
        client.set_tag(mlflow_run, key.replace("/", "."), f"{float(value):.6g}")


class MetricsFollower:
    """Sends a run's metrics to its MLflow run from a background thread, never from a step.

    The trainer's ``metrics.jsonl`` (rank 0, one flushed line per record) is the buffer: each
    round reads from the offset MLflow last accepted and sends the new records in batches; while
    the tracking server is away the rounds fail and the points wait in the file. The offset lives
    in the run dir, so a resumed run continues the curves instead of sending them twice. ``log``
    queues extra points (producer and pipeline figures) the same way, in memory.
    """

    def __init__(
        self,
        cfg: Config,
        run_id: str,
        mlflow_run: str,
        metrics_file: Optional[str | Path] = None,
        interval_s: float = 5.0,
    ) -> None:
        self.settings = settings_for(cfg)
        self.mlflow_run = mlflow_run
        self.metrics_file = Path(metrics_file) if metrics_file is not None else None
        self.state_file = _paths(cfg, run_id).mlflow_run_file
        self.interval_s = interval_s
        self.failures = 0
        self._pending: list[tuple[str, float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client: Any = None

    def start(self) -> MetricsFollower:
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()
        return self

    def log(self, values: dict[str, float], step: int) -> None:
        with self._lock:
            self._pending += [(k, float(v), int(step)) for k, v in values.items()]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush_once()

    def flush_once(self, strict: bool = False) -> int:
        """One round: queued points and the file's new records to MLflow; how many were sent
        (0 also when the server was away: nothing is lost, the next round retries; ``strict``
        raises instead)."""
        with self._lock:
            queued, self._pending = self._pending, []
        state = _read_state(self.state_file)
        offset = int(state.get("metrics_offset", 0))
        points, new_offset = self._file_points(offset)
        try:
            if self._client is None:
                self._client = _client(self.settings)
            _log_points(self._client, self.mlflow_run, queued + points)
        except Exception as exc:  # tracking server away: keep everything for the next round
            self.failures += 1
            with self._lock:
                self._pending = queued + self._pending
            if strict:
                raise
            log.debug("MLflow metrics deferred (%s)", str(exc).splitlines()[0] if str(exc) else exc)
            return 0
        if new_offset != offset:
            state["metrics_offset"] = new_offset
            atomic_write_json(self.state_file, state, indent=2, sort_keys=True)
        return len(queued) + len(points)

    def _file_points(self, offset: int) -> tuple[list[tuple[str, float, int]], int]:
        if self.metrics_file is None or not self.metrics_file.is_file():
            return [], offset
        with self.metrics_file.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # complete lines only; a half-written one waits
        points = curve_points(data[:end].decode("utf-8", errors="replace").splitlines())
        return points, offset + end

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the thread and send what is left (one last try)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.flush_once()


def follow_metrics(
    cfg: Config, run_id: str, metrics_file: Optional[str | Path] = None, interval_s: float = 5.0
) -> Optional[MetricsFollower]:
    """A started follower for the live MLflow run of ``run_id``; None when it is not tracked."""
    mlflow_run = live_run_id(cfg, run_id) if cfg.registry.enabled else None
    if mlflow_run is None:
        return None
    return MetricsFollower(cfg, run_id, mlflow_run, metrics_file, interval_s).start()


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
    experiment_id = _experiment(client, settings, reg.experiment)
    live = live_run_id(cfg, run_id)  # opened when the pipeline started: it owns the status
    mlflow_run = live or _find_or_create_run(client, experiment_id, run_id)
    if live is None:
        state_file = _paths(cfg, run_id).mlflow_run_file
        atomic_write_json(state_file, {"mlflow_run_id": mlflow_run, "metrics_offset": 0})

    _log_params(client, mlflow_run, flatten(config_to_dict(cfg)))
    # the curves MLflow does not have yet (all of them when nothing followed the run live)
    MetricsFollower(cfg, run_id, mlflow_run, metrics_file).flush_once(strict=True)
    scalars = acceptance_metrics(evaluation)
    scalars.update(
        {f"perf/{k}": float(v) for k, v in (perf or {}).items() if isinstance(v, (int, float))}
    )
    _log_scalars(client, mlflow_run, scalars)
    _log_points(client, mlflow_run, depth_points(evaluation))  # tau by drafting depth, step = k
    if metrics_file is not None and Path(metrics_file).is_file():
        for plot in plot_training(read_records(metrics_file), _paths(cfg, run_id).plot_dir):
            client.log_artifact(mlflow_run, str(plot), "plots")

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
    if live is None:
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
    return f"{settings.ui_url}/#/experiments/{experiment_id}/runs/{run_id}{UI_VIEW}"


def _version_url(settings: TrackingSettings, name: str, version: str) -> Optional[str]:
    if settings.ui_url is None:
        return None
    return f"{settings.ui_url}/#/models/{name}/versions/{version}{UI_VIEW}"


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
