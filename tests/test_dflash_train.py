"""DFlash / DSpark through the real trainer (torchrun, FSDP2, DCP checkpoints) and the export.

Tiny random 4-layer target with SmolLM2's tokenizer; a few steps each.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import launch_job, make_train_eval
from safetensors.torch import load_file
from test_train_runs import model_weights

from spec_core.export import export_draft
from spec_core.models import get_algorithm
from spec_core.models.block.config import BlockDraftConfig
from spec_core.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow

BASE = [
    "training.micro_batch_size=2",
    "training.seq_bucket=16",
    "training.learning_rate=3e-3",
    "training.warmup_ratio=0",
    "training.max_checkpoints=5",
    "training.eval_batches=1",
    "draft.num_layers=2",
    "draft.capture_indices=[1,2,3]",
    "draft.num_anchors=4",
    "vocab.draft_vocab_size=null",
    "evaluation.enabled=false",
    "inference.batch_size=2",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_train_eval(tmp_path_factory.mktemp("block-data"), 16, 2)


run = functools.partial(launch_job, BASE, timeout_s=300)


def test_dflash_trains_checkpoints_and_exports(tmp_path: Path, tiny_target_dir: Path, data: Path):
    result = run(
        tmp_path,
        "dflash",
        tiny_target_dir,
        data,
        1,
        ["draft.algorithm=dflash", "draft.block_size=4", "training.num_steps=3"],
    )
    records = read_metrics(result.metrics_path)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and evals and evals[-1]["step"] == 3
    assert all(len(r["acc_k"]) == 3 and r["block_slot_k"] == [1, 2, 3] for r in train)
    assert all(r["loss"] > 0 and r["supervised_k"][0] > 0 for r in train)
    assert "l1_loss" not in train[0]  # DFlash: CE only
    ckpt = Path(result.last_checkpoint)
    dcfg = BlockDraftConfig.load(ckpt / "config.json")
    assert dcfg.algorithm == "dflash" and dcfg.capture_indices == [1, 2, 3]
    assert dcfg.mask_token_id == 16  # SmolLM2's tokenizer: <empty_output>

    out = tmp_path / "hf"
    export = export_draft(ckpt, out, target_dir=tiny_target_dir)
    assert {"architecture", "target_layer_ids", "shapes", "dtypes", "target_layers"} <= set(
        export.checks
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 4
    assert config["dflash_config"]["target_layer_ids"] == [0, 1, 2]
    assert config["dflash_config"]["mask_token_id"] == 16 and config["num_target_layers"] == 4
    tensors = load_file(str(out / "model.safetensors"))
    assert "embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors
    trained = model_weights(ckpt, tmp_path)
    assert set(tensors) == set(trained)
    assert all(torch.equal(tensors[k], trained[k]) for k in tensors)
    model = get_algorithm("dflash").load_export(out, tiny_target_dir)
    assert torch.equal(model.fc.weight, trained["fc.weight"])


def test_dspark_two_ranks_resume_is_exact(tmp_path: Path, tiny_target_dir: Path, data: Path):
    """Anchors come from the checkpointed RNG: a resumed run redraws exactly the same blocks."""
    dspark = [
        "draft.algorithm=dspark",
        "draft.block_size=3",
        "draft.markov_rank=8",
        "training.accumulation_steps=2",
        "training.num_steps=4",
        "training.save_interval=2",
        "training.eval_interval=0",
    ]
    full = run(tmp_path, "full", tiny_target_dir, data, 2, dspark)
    records = [r for r in read_metrics(full.metrics_path) if r["split"] == "train"]
    assert len(records) == 4 and all(len(r["accept_rate_k"]) == 3 for r in records)
    assert all(r["tau_prob"] >= 1.0 and "confidence_loss" in r for r in records)
    ckpts = full.run_dir / "checkpoints"
    resumed = run(
        tmp_path,
        "resumed",
        tiny_target_dir,
        data,
        2,
        dspark,
        resume_from=str(ckpts / "iter_0000002"),
    )
    a = model_weights(ckpts / "iter_0000004", tmp_path)
    b = model_weights(Path(resumed.last_checkpoint), tmp_path)
    assert "markov_head.markov_w2.weight" in a and "confidence_head.proj.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = [r for r in read_metrics(resumed.metrics_path) if r["split"] == "train"]
    assert [r["loss"] for r in again] == [r["loss"] for r in records[2:]]
