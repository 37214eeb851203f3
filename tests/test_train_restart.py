"""A trainer rank SIGKILLed mid-run: torchrun restarts the ranks, they resume from the last
checkpoint, and the run ends on its own with every planned sample trained exactly once
(docs/architecture.md §processes). Real torchrun, 2 gloo ranks, the tiny target."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import launch_job, make_train_eval
from test_train_runs import BASE, model_weights

from spec_core.errors import SpecflowError
from spec_core.training.metrics_log import read_metrics
from spec_core.training.trainer import KILL_AFTER_STEP_ENV

pytestmark = pytest.mark.slow

N_TRAIN = 32  # 8 steps of 2 ranks x 2 samples, one epoch
RUN = ["training.num_epochs=1", "training.save_interval=3", "training.eval_interval=0"]
run_job = functools.partial(launch_job, BASE, eval_data=False)


def acked(ckpt: Path) -> list[str]:
    """Every rank's acked ids in ``ckpt``, in the order each rank trained them."""
    ids = []
    for rank in (0, 1):
        ids += json.loads((ckpt / f"data_state_rank{rank}.json").read_text())["acked"]
    return ids


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_train_eval(tmp_path_factory.mktemp("restart-data"), N_TRAIN, 2)


def test_rank_killed_after_its_step_before_its_ack_restarts_and_trains_each_sample_once(
    tmp_path, tiny_target_dir, data, monkeypatch
):
    monkeypatch.setenv(KILL_AFTER_STEP_ENV, "1:5")  # rank 1, after step 5, before its ack
    killed = run_job(tmp_path, "killed", tiny_target_dir, data, 2, RUN, timeout_s=480)
    monkeypatch.delenv(KILL_AFTER_STEP_ENV)

    log = killed.log_path.read_text()
    assert "fault injection: SIGKILL of rank 1 after step 5" in log
    assert "resuming from" in log and "iter_0000003" in log
    assert killed.summary["steps"] == 8
    steps = [r["step"] for r in read_metrics(killed.metrics_path, "train")]
    restart_at = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart_at:] == [4, 5, 6, 7, 8]  # the restarted ranks went on from iter 3

    ckpts = killed.run_dir / "checkpoints"
    before, final = acked(ckpts / "iter_0000003"), acked(ckpts / "iter_0000008")
    planned = [f"s0-{i}" for i in range(N_TRAIN)]
    assert sorted(final) == sorted(planned)  # each planned sample once: none lost, none twice
    assert len(before) == 12 and set(before) < set(final)

    # The updates of steps 4-5 that died with the first incarnation are not counted: the result
    # is bit-identical to a run that was never interrupted.
    clean = run_job(tmp_path, "clean", tiny_target_dir, data, 2, RUN, timeout_s=480)
    assert acked(clean.run_dir / "checkpoints" / "iter_0000008") == final
    a = model_weights(ckpts / "iter_0000008", tmp_path)
    b = model_weights(clean.run_dir / "checkpoints" / "iter_0000008", tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_user_error_is_not_retried_and_the_deadline_names_itself(tmp_path, tiny_target_dir, data):
    with pytest.raises(SpecflowError, match="cannot read the target config"):
        run_job(tmp_path, "bad", tmp_path / "no-such-target", data, 2, ["training.num_steps=1"])
    log = (tmp_path / "bad" / "logs" / "train.log").read_text()
    assert "resuming from" not in log and "starting over" not in log  # ended without a retry
    with pytest.raises(SpecflowError, match=r"within 1s and was stopped \('training.timeout_s'\)"):
        run_job(tmp_path, "slow", tiny_target_dir, data, 2, RUN, timeout_s=1)
