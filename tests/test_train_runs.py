"""End-to-end torchrun runs on the tiny target (gloo, loopback): exact resume, continual training,
pooled normalization across ranks, zero-supervision samples on 2 ranks, and launcher failures."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import launch_job, make_split, make_train_eval
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from spec_core.errors import SpecflowError
from spec_core.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow

BASE = [
    "training.micro_batch_size=1",
    "training.accumulation_steps=2",
    "training.seq_bucket=16",
    "training.learning_rate=3e-3",
    "training.warmup_ratio=0",
    "training.max_checkpoints=5",
    "training.eval_batches=2",
    "draft.ttt_length=3",
    "inference.batch_size=2",
]


run_job = functools.partial(launch_job, BASE, eval_data=False)


def model_weights(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "model"), str(out))
    return torch.load(out, weights_only=True)


def optimizer_state(ckpt: Path, tmp: Path) -> dict:
    out = tmp / f"{ckpt.parent.parent.name}-{ckpt.name}-optim.pt"
    dcp_to_torch_save(str(ckpt / "optimizer"), str(out))
    return torch.load(out, weights_only=False)  # our own file: param_groups hold plain Python


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_train_eval(tmp_path_factory.mktemp("train-data"), 30, 4)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, tiny_target_dir: Path, data: Path):
    tmp = tmp_path_factory.mktemp("runs")
    result = run_job(
        tmp,
        "six",
        tiny_target_dir,
        data,
        2,
        ["training.num_steps=6", "training.save_interval=3", "training.eval_interval=3"],
        eval_data=True,
    )
    return tmp, result


def test_two_rank_run_writes_metrics_checkpoints_and_pointers(six_steps):
    tmp, result = six_steps
    ckpts = result.run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000006"
    assert (ckpts / "best").read_text() in ("iter_0000003", "iter_0000006")
    assert result.summary["steps"] == 6 and result.summary["skipped_steps"] == 0
    train = read_metrics(result.metrics_path, "train")
    evals = read_metrics(result.metrics_path, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    first = train[0]
    for key in (
        "loss",
        "loss_k",
        "acc_k",
        "acc_in_vocab_k",
        "sim_acc_len",
        "tau_sim",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "samples",
        "data_wait_s",
        "compute_s",
        "skipped_steps",
    ):
        assert key in first, key
    assert len(first["acc_k"]) == 3 and first["samples"] == 4
    it6 = ckpts / "iter_0000006"
    for name in (
        "config.json",
        "trainer_state.json",
        "data_state_rank0.json",
        "data_state_rank1.json",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "manifest.json",
    ):
        assert (it6 / name).is_file(), name
    trainer_state = json.loads((it6 / "trainer_state.json").read_text())
    assert trainer_state["total_steps"] == 6 and len(trainer_state["dataset_fingerprint"]) == 64
    weights = model_weights(it6, tmp)
    assert "embed_tokens.weight" not in weights and "fc.weight" in weights
    assert weights["lm_head.weight"].shape == (49152, 64)
    draft_cfg = json.loads((it6 / "config.json").read_text())
    assert draft_cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    state = json.loads((it6 / "data_state_rank1.json").read_text())
    assert state["kind"] == "inprocess" and state["acked_total"] == 12  # 6 steps x 2 samples


def test_resume_is_bit_exact(six_steps, tiny_target_dir: Path, data: Path):
    tmp, full = six_steps
    it3 = full.run_dir / "checkpoints" / "iter_0000003"
    resumed = run_job(
        tmp,
        "resumed",
        tiny_target_dir,
        data,
        2,
        ["training.num_steps=6", "training.save_interval=3", "training.eval_interval=3"],
        eval_data=True,
        resume_from=str(it3),
    )
    assert resumed.summary["steps"] == 6
    a = model_weights(full.run_dir / "checkpoints" / "iter_0000006", tmp)
    b = model_weights(resumed.run_dir / "checkpoints" / "iter_0000006", tmp)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    curve = {r["step"]: r for r in read_metrics(full.metrics_path, "train")}
    for r in read_metrics(resumed.metrics_path, "train"):
        assert r["step"] in (4, 5, 6)
        for key in ("loss", "grad_norm", "lr", "acc_k", "loss_k"):
            assert r[key] == curve[r["step"]][key], (r["step"], key)
    oa = optimizer_state(full.run_dir / "checkpoints" / "iter_0000006", tmp)
    ob = optimizer_state(resumed.run_dir / "checkpoints" / "iter_0000006", tmp)
    for name, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][name][k]), (name, k)


def test_continual_loads_weights_only(six_steps, tiny_target_dir: Path, data: Path):
    tmp, full = six_steps
    it3 = full.run_dir / "checkpoints" / "iter_0000003"
    cont = run_job(
        tmp,
        "continual",
        tiny_target_dir,
        data,
        2,
        ["training.num_steps=1", "training.learning_rate=0"],
        continual_from=str(full.run_dir / "checkpoints" / "iter_0000003"),
    )
    it1 = cont.run_dir / "checkpoints" / "iter_0000001"
    assert cont.summary["steps"] == 1  # counting restarts: a fresh run, not a resume
    old, new = model_weights(it3, tmp), model_weights(it1, tmp)
    for key in old:  # lr 0: the loaded weights come through unchanged
        assert torch.equal(old[key], new[key]), key
    steps = {int(st["step"]) for st in optimizer_state(it1, tmp)["state"].values()}
    assert steps == {1}  # fresh AdamW state (the source checkpoint's is at step 3)
    first = read_metrics(cont.metrics_path, "train")[0]
    assert first["step"] == 1 and first["consumed_samples"] == 4


def test_pooled_normalization_across_ranks_matches_one_rank(six_steps, tiny_target_dir, data):
    """Same global batch (4 samples) as 1 rank x 2 micro x 2 accum vs 2 ranks x 1 micro x 2 accum:
    the first step's pooled loss and gradient norm agree."""
    tmp, two_ranks = six_steps
    one = run_job(
        tmp,
        "one-rank",
        tiny_target_dir,
        data,
        1,
        ["training.num_steps=1", "training.micro_batch_size=2", "training.save_interval=0"],
    )
    a = read_metrics(two_ranks.metrics_path, "train")[0]
    b = read_metrics(one.metrics_path, "train")[0]
    assert a["samples"] == b["samples"] == 4 and a["tokens"] == b["tokens"]
    assert a["supervised_k"] == b["supervised_k"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["loss_k"] == pytest.approx(a["loss_k"], rel=1e-5)


def test_zero_supervision_samples_do_not_hang_two_ranks(tmp_path: Path, tiny_target_dir: Path):
    data = tmp_path / "data"
    make_split(data / "train", 3, seed=2)
    zero = make_split(tmp_path / "zero", 5, seed=3, zero_mask=True)
    import datasets

    mixed = datasets.concatenate_datasets(
        [datasets.load_from_disk(str(data / "train")), datasets.load_from_disk(str(zero))]
    )
    mixed.save_to_disk(str(data / "train-mixed"))
    (data / "train").rename(data / "train-old")
    (data / "train-mixed").rename(data / "train")
    result = run_job(
        tmp_path,
        "zero",
        tiny_target_dir,
        data,
        2,
        [
            "training.micro_batch_size=1",
            "training.accumulation_steps=1",
            "training.num_epochs=1",
            "training.save_interval=0",
            "training.fsdp_strategy=replicate",
        ],
    )
    train = read_metrics(result.metrics_path, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 8 samples / 2 ranks, then data ends
    assert sum(r["samples"] for r in train) == 8
    # 3 supervised samples over 4 steps of 2: some step has none at all, and some step pairs a
    # supervised sample on one rank with a zero-mask sample on the other; both ran in lock-step
    assert any(r["supervised_k"][0] == 0 for r in train)
    assert sum(r["supervised_k"][0] > 0 for r in train) >= 2
    assert result.summary["consumed_samples"] == 8


def test_launcher_reports_the_worker_error_and_leaves_no_process(tmp_path: Path, data: Path):
    with pytest.raises(SpecflowError, match="cannot read the target config"):
        run_job(tmp_path, "bad", tmp_path / "no-such-target", data, 2, ["training.num_steps=1"])
    job_path = str(tmp_path / "bad" / "train_job.json")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert job_path not in cmdline, f"process {pid} survived: {cmdline}"


def test_specflow_train_cli_prepares_data_and_trains(tmp_path: Path, tiny_target_dir: Path, capsys):
    from spec_core.training.launcher import main

    rc = main(
        [
            f"target.path={tiny_target_dir}",
            "dataset.max_conversations=24",
            "dataset.eval_conversations=4",
            "dataset.max_seq_length=96",
            "dataset.num_proc=1",
            "vocab.draft_vocab_size=512",
            f"run.output_dir={tmp_path}",
            "run.run_id=cli",
            "training.nproc_per_node=2",
            "training.num_steps=2",
            "training.micro_batch_size=2",
            "training.eval_batches=1",
            "draft.ttt_length=2",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    out = json.loads(printed[printed.rindex("\n{\n") + 1 :])  # the summary the CLI prints last
    assert out["steps"] == 2 and out["final_eval"]["split"] == "eval"
    run_dir = tmp_path / "runs" / "cli"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    ckpt = Path(out["last_checkpoint"])
    assert (ckpt / "vocab_map.safetensors").is_file()
    draft_cfg = json.loads((ckpt / "config.json").read_text())
    assert draft_cfg["draft_vocab_size"] == 512 and draft_cfg["vocab_size"] == 49152
