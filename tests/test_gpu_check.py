"""The prepared GPU check (checks/gpu_check.py) in its CPU mode: every CUDA check is skipped with a
reason, the report schema is complete, a failing check does not stop later ones, a hanging one is
killed at its timeout, and the docs are generated from a report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "checks" / "gpu_check.py"
RESULT_FIELDS = {"name", "status", "reason", "figures", "seconds", "cuda", "summary"}
REPORT_FIELDS = {
    "schema",
    "mode",
    "self_test",
    "date",
    "versions",
    "device",
    "git_commit",
    "budget_s",
    "seconds",
    "installed_from_bundle",
    "counts",
    "checks",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--self-test",
            "--cpu",
            "--out",
            str(out),
            "--bundle",
            str(out / "no-bundle"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "summary.txt").read_text().startswith("specflow GPU check")
    data = json.loads((out / "report.json").read_text())
    data["_out"] = out
    return data


def by_name(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["checks"]}


def test_report_schema_is_complete(report):
    assert REPORT_FIELDS <= set(report) and report["schema"] == 1 and report["mode"] == "cpu"
    assert {"python", "torch", "transformers", "cuda"} <= set(report["versions"])
    for result in report["checks"]:
        assert set(result) == RESULT_FIELDS, result["name"]
        assert result["status"] in ("pass", "fail", "skipped") and result["summary"]
    counts = {s: sum(r["status"] == s for r in report["checks"]) for s in report["counts"]}
    assert counts == report["counts"]


def test_every_cuda_check_is_skipped_with_its_reason(report):
    cuda = [r for r in report["checks"] if r["cuda"]]
    assert len(cuda) >= 8
    for result in cuda:
        assert result["status"] == "skipped" and "no CUDA device" in result["reason"], result
    checks = by_name(report)
    assert (
        checks["bundle"]["status"] == "skipped" and "make gpu-check" in checks["bundle"]["reason"]
    )


def test_cpu_checks_run_through_the_spec_core_adapter(report):
    attention = by_name(report)["attention_cpu"]
    assert attention["status"] == "pass", attention["reason"]
    assert max(attention["figures"]["fused_fp64"].values()) < 1e-10


def test_a_failure_or_a_hang_does_not_hide_the_rest(report):
    checks = by_name(report)
    assert checks["selftest_pass"]["figures"] == {"answer": 42}
    assert checks["selftest_fail"]["status"] == "fail"
    assert "deliberate failure" in checks["selftest_fail"]["reason"]
    hang = checks["selftest_hang"]
    assert hang["status"] == "fail" and "timed out" in hang["reason"]
    assert hang["seconds"] < 30  # killed at its 3 s timeout, not waited for
    names = [r["name"] for r in report["checks"]]
    assert names.index("selftest_after") > names.index("selftest_hang")
    assert checks["selftest_after"]["status"] == "pass"


def test_docs_are_rendered_from_a_report(report, tmp_path: Path):
    for rel in ("deployments/gpu_engines.md", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(
            "before\n<!-- gpu-check:begin -->\nOLD-CONTENT\n<!-- gpu-check:end -->\nafter\n"
        )
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    gpu_check.render_docs(report["_out"] / "report.json", tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("before\n<!-- gpu-check:begin -->\n") and text.endswith("after\n")
    assert "Never run on a GPU yet" in text and "OLD-CONTENT" not in text
    assert "`train_eagle3_cuda` | skipped" in text and "selftest" not in text
    assert (tmp_path / "docs" / "gpu-check" / "latest.json").is_file()
