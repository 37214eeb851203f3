"""The Prefect and MLflow UIs in a real browser (opt-in: ``make browser-test``).

A short pipeline runs in deployments mode on the local stack (``deployments/local_stack.py``:
Prefect server, three process pools with a worker each, the deployments of ``prefect.yaml``) with
an MLflow server on the run's sqlite store. Headless Chromium (Debian's ``chromium``, driven by
Playwright) then checks what a user sees: the MLflow run's training curves while training is still
running, the Prefect flow run page with its generation and training children and the artifacts,
the pipeline deployment's typed "Run" form, and the registered model with its ``@champion``
alias. Screenshots land in ``<run dir>/screenshots`` (and in ``$SPECFLOW_SCREENSHOT_DIR`` when set:
the make target's ``DOCS=1`` refreshes ``docs/screenshots``).

Skipped unless ``SPECFLOW_BROWSER_TEST=1`` (the make target sets it): it takes a few minutes and
needs Chromium, so it is not part of ``make test``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_flow_local import BASE_CONFIG, wait_no_processes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SPECFLOW_BROWSER_TEST") != "1", reason="opt-in: make browser-test"
    ),
]

CHROMIUM = os.environ.get("SPECFLOW_CHROMIUM", "/usr/bin/chromium")
RUN_ID = "browser"
STEPS = 400  # long enough that the curves are read while training still runs, even on a quiet box
MODEL = "tiny-browser-eagle3"
PAGE_TIMEOUT_MS = 90_000


def wait_for(what: str, check, timeout_s: float = 600, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def start_mlflow_server(out: Path, port: int, log: Path):
    """``mlflow server`` on the run's sqlite store, bound to 127.0.0.1, in its own group."""
    from spec_core.utils.procs import ProcessGroup

    out.mkdir(parents=True, exist_ok=True)
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{out / 'mlflow.db'}",
        "--default-artifact-root",
        str(out / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as fh:
        return ProcessGroup.start(argv, stdout=fh, stderr=subprocess.STDOUT)


def run_async(read):
    """``read()`` to completion on a thread of its own: Playwright's sync API keeps an event loop
    running in the test's thread, where ``asyncio.run`` refuses to start another. The thread gets
    this context, so Prefect's temporary settings (the stack's API URL) hold there too, instead
    of Prefect starting an ephemeral server of its own."""
    context = contextvars.copy_context()
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(context.run, asyncio.run, read()).result()


def flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run_id)

    return run_async(read)


def children_and_artifacts():
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(), await client.read_artifacts()

    return run_async(read)


@pytest.mark.timeout(2400)
def test_prefect_and_mlflow_uis_show_the_live_run(tmp_path, tiny_target_dir, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from deployments.local_stack import start_stack
    from spec_core.utils.net import free_port

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: apt-get install -y chromium"
    out = tmp_path / "out"
    run_dir = out / "runs" / RUN_ID
    shots = run_dir / "screenshots"
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    config = tmp_path / "tiny.yaml"
    config.write_text(BASE_CONFIG.format(out=out, target=tiny_target_dir))
    mlflow_port = free_port("127.0.0.1")
    mlflow_ui = f"http://127.0.0.1:{mlflow_port}"
    tracking = MlflowClient(tracking_uri=mlflow_ui, registry_uri=mlflow_ui)
    mlflow_server = start_mlflow_server(out, mlflow_port, tmp_path / "mlflow-server.log")
    try:  # the MLflow server outlives the stack: the checks after the run still read it
        stack = None
        try:
            wait_for("the MLflow server", lambda: http_ok(f"{mlflow_ui}/health"), 180)
            stack = start_stack(tmp_path / "stack", port=free_port("127.0.0.1"), worker_poll_s=1)
            with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_HOME: str(home)}):
                parent = run_deployment(
                    "speculative-training/speculative-training",
                    parameters={
                        "config_path": str(config),
                        "overrides": [
                            f"run.run_id={RUN_ID}",
                            f"training.num_steps={STEPS}",
                            "training.print_interval=40",
                            "inference.replicas=1",
                            "orchestration.publish=true",
                            "evaluation.num_prompts=2",
                            "evaluation.max_new_tokens=12",
                            f"registry.model_name={MODEL}",
                            f"registry.ui_url={mlflow_ui}",
                        ],
                    },
                    timeout=0,
                )
                with sync_api.sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                    page = browser.new_page(viewport={"width": 1440, "height": 1000})
                    page.set_default_timeout(PAGE_TIMEOUT_MS)
                    live = check_mlflow_curves_during_training(page, tracking, run_dir, shots)
                    final = wait_for(
                        "the parent run to end",
                        lambda: finished(parent.id),
                        timeout_s=900,
                        every_s=3,
                    )
                    assert final.state.is_completed(), final.state.message
                    check_prefect_run_page(page, stack.ui_url, parent.id, shots)
                    check_prefect_run_form(page, stack.ui_url, parent.deployment_id, shots)
                    check_mlflow_model_page(page, mlflow_ui, shots)
                    browser.close()
                runs, artifacts = children_and_artifacts()
        finally:
            if stack is not None:
                stack.stop()
        # the screenshot of the curves was taken while the run was RUNNING, before the last step
        assert live["status"] == "RUNNING" and 0 < live["points"] < STEPS
        history = tracking.get_metric_history(live["run_id"], "train/loss")
        assert [m.step for m in history] == list(range(1, STEPS + 1))
        assert tracking.get_run(live["run_id"]).info.status == "FINISHED"
        by_name = {r.name: r for r in runs}
        assert by_name["producer-0"].work_pool_name == "gpu-inference"
        assert by_name["trainer-node-0"].work_pool_name == "gpu-training"
        assert {"training-metrics", "run-summary", "mlflow-registration"} <= {
            a.key for a in artifacts
        }
        version = tracking.get_model_version_by_alias(MODEL, "champion")
        assert version.run_id == live["run_id"]
    finally:
        mlflow_server.stop()
    assert wait_no_processes(tmp_path) == []
    copy = os.environ.get("SPECFLOW_SCREENSHOT_DIR")
    if copy:
        Path(copy).mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy2(shot, Path(copy) / shot.name)


def wait_text(page, *texts: str, shot: Path) -> None:
    """Wait until the rendered page (``innerText``: visible text only) holds every text, case
    aside; on a timeout keep a screenshot of what the page showed (``shot``) and fail."""
    wanted = [t.lower() for t in texts]
    try:
        page.wait_for_function(
            "(wanted) => wanted.every(t => document.body.innerText.toLowerCase().includes(t))",
            arg=wanted,
            timeout=PAGE_TIMEOUT_MS * 2,
        )
    except Exception:
        page.screenshot(path=str(shot.with_name(shot.stem + "-FAILED.png")), full_page=True)
        raise AssertionError(f"{page.url} never showed {texts}") from None


def finished(flow_run_id):
    run = flow_run(flow_run_id)
    return run if run.state is not None and run.state.is_final() else None


def check_mlflow_curves_during_training(page, tracking, run_dir: Path, shots: Path) -> dict:
    """Wait for live points, open the run's metrics tab, screenshot it while training runs."""
    state_file = run_dir / "mlflow_run.json"
    run_id = wait_for(
        "the pipeline's MLflow run",
        lambda: state_file.is_file() and json.loads(state_file.read_text())["mlflow_run_id"],
    )

    def points() -> int:
        return len(tracking.get_metric_history(run_id, "train/loss"))

    wait_for("live training points in MLflow", lambda: points() >= 10, every_s=0.5)
    experiment = tracking.get_run(run_id).info.experiment_id
    view = "?workflowType=machine_learning"  # MLflow's model-training view (see registry.py)
    url = f"{page_base(tracking)}/#/experiments/{experiment}/runs/{run_id}/model-metrics{view}"
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "mlflow-training-curves.png"
    page.goto(url)
    # the page draws only the charts in view (23 of them): filter to the loss curves first
    page.get_by_placeholder("Search metric charts").fill("loss", timeout=PAGE_TIMEOUT_MS * 2)
    wait_text(page, "(train/loss)", shot=shot)  # the chart's legend
    close_assistant(page)
    page.wait_for_timeout(3000)  # let the charts draw
    page.screenshot(path=str(shot))
    return {"run_id": run_id, "points": points(), "status": tracking.get_run(run_id).info.status}


def close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page; close it for the screenshot."""
    try:
        panel = page.get_by_text("MLflow Assistant", exact=True)
        if panel.count():
            header = panel.first.locator("xpath=ancestor::div[.//button][1]")
            header.get_by_role("button").last.click(timeout=5000)
            page.wait_for_timeout(500)
    except Exception:  # cosmetic: the screenshot is still taken
        pass


def page_base(tracking) -> str:
    return tracking.tracking_uri.rstrip("/")


def check_prefect_run_page(page, ui: str, flow_run_id, shots: Path) -> None:
    """The parent's page: its run graph (children and artifacts on a canvas), then the
    generation/training/publish children and the artifacts in their tabs."""
    shot = shots / "prefect-run-graph.png"
    page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
    wait_text(page, RUN_ID, "completed", "subflow runs", shot=shot)
    page.wait_for_timeout(5000)  # the run graph draws on a canvas
    page.screenshot(path=str(shot))
    shot = shots / "prefect-run-children.png"
    page.get_by_text("Subflow Runs", exact=True).first.click()
    wait_text(page, "producer-0", "trainer-node-0", "publish", shot=shot)
    page.screenshot(path=str(shot), full_page=True)
    shot = shots / "prefect-run-artifacts.png"
    page.get_by_text("Artifacts", exact=True).first.click()
    wait_text(page, "run-summary", "pipeline-throughput", "generation-progress", shot=shot)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(shot), full_page=True)


def check_prefect_run_form(page, ui: str, deployment_id, shots: Path) -> None:
    """The pipeline deployment's custom run form shows the config sections as typed fields."""
    shot = shots / "prefect-run-form.png"
    page.goto(f"{ui}/deployments/deployment/{deployment_id}/run")
    wait_text(page, "config_path", "overrides", "settings", "training", shot=shot)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(shot), full_page=True)


def check_mlflow_model_page(page, mlflow_ui: str, shots: Path) -> None:
    shot = shots / "mlflow-model-champion.png"
    page.goto(f"{mlflow_ui}/#/models/{MODEL}?workflowType=machine_learning")
    wait_text(page, MODEL, "champion", shot=shot)
    close_assistant(page)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(shot), full_page=True)
