"""Draft vocabulary: counting under the loss mask, selection, d2t/t2d invariants, cache, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spec_core import vocab as vb
from spec_core.errors import ConfigError, DataError


def save_split(path: Path, rows: list[tuple[list[int], list[int]]], data_key: str = "k1") -> Path:
    """A tokenized train split (like prepare_dataset writes) plus its manifest."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "sample_id": [f"s{i}" for i in range(len(rows))],
            "input_ids": [ids for ids, _ in rows],
            "loss_mask": [mask for _, mask in rows],
            "num_tokens": [len(ids) for ids, _ in rows],
            "num_loss_tokens": [sum(mask) for _, mask in rows],
        },
        features=datasets.Features(
            {
                "sample_id": datasets.Value("string"),
                "input_ids": datasets.List(datasets.Value("int32")),
                "loss_mask": datasets.List(datasets.Value("uint8")),
                "num_tokens": datasets.Value("int32"),
                "num_loss_tokens": datasets.Value("int32"),
            }
        ),
    )
    ds.save_to_disk(str(path / "train"))
    (path / "prepared.json").write_text(json.dumps({"cache_key": data_key}))
    return path / "train"


# Supervised counts: 7 -> 4, 3 -> 3, 9 -> 2, 1 -> 2, 5 -> 1; unsupervised only: 0 (x3), 2 (x1).
ROWS = [
    ([0, 0, 7, 7, 3, 9], [0, 0, 1, 1, 1, 1]),
    ([0, 2, 7, 7, 3, 3, 1, 1, 9, 5], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]),
]


def check_invariants(vm: vb.VocabMap, draft: int, target: int) -> None:
    assert vm.d2t.dtype == torch.int64 and vm.t2d.dtype == torch.bool
    assert vm.d2t.shape == (draft,) and vm.t2d.shape == (target,)
    assert int(vm.t2d.sum()) == draft
    kept = vm.d2t + torch.arange(draft)
    assert bool((kept[1:] > kept[:-1]).all())  # d2t[i] + i strictly increasing
    assert torch.equal(torch.nonzero(vm.t2d).flatten(), kept)
    assert torch.equal(
        vm.target_to_draft(vm.draft_to_target(torch.arange(draft))), torch.arange(draft)
    )
    assert torch.equal(vm.draft_to_target(vm.target_to_draft(kept)), kept)
    missing = torch.nonzero(~vm.t2d).flatten()
    assert bool((vm.target_to_draft(missing) == -1).all())


def test_selection_counts_only_supervised_tokens(tmp_path):
    train = save_split(tmp_path, ROWS)
    result = vb.build_vocab_map(train, 16, 3, tmp_path / "vocab", [1, 2, 4])
    vm = vb.load_vocab_map(result.vocab_map_path)
    check_invariants(vm, 3, 16)
    # top 3 supervised: 7 (4), 3 (3), then 1 vs 9 (2 each; tie -> lower id) -> 1; 0 is frequent
    # but never supervised, so it loses
    assert vm.kept_ids.tolist() == [1, 3, 7]
    assert vm.d2t.tolist() == [1, 2, 5]
    report = json.loads(result.coverage_path.read_text())
    assert report["supervised_tokens"] == 12 and report["unique_supervised_tokens"] == 5
    assert result.coverage == pytest.approx(9 / 12) == report["selected_coverage"]
    coverage = {p["size"]: p["coverage"] for p in report["coverage"]}
    assert coverage == pytest.approx({1: 4 / 12, 2: 7 / 12, 3: 9 / 12, 4: 11 / 12, 5: 1.0, 16: 1.0})
    assert report["filled_from_unsupervised"] == 0 and report["filled_unseen"] == 0


def test_fewer_unique_tokens_than_the_draft_vocab_are_filled_explicitly(tmp_path):
    train = save_split(tmp_path, ROWS)
    result = vb.build_vocab_map(train, 16, 9, tmp_path / "vocab", [])
    vm = vb.load_vocab_map(result.vocab_map_path.parent)
    check_invariants(vm, 9, 16)
    # all 5 supervised ids, then prompt-only ids by frequency (0, then 2), then lowest unseen
    assert vm.kept_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    report = json.loads(result.coverage_path.read_text())
    assert report["filled_from_unsupervised"] == 2 and report["filled_unseen"] == 2
    assert result.coverage == 1.0


def test_full_vocab_map_is_the_identity(tmp_path):
    train = save_split(tmp_path, ROWS)
    vm = vb.load_vocab_map(vb.build_vocab_map(train, 16, 16, tmp_path / "v", []).vocab_map_path)
    check_invariants(vm, 16, 16)
    assert int(vm.d2t.abs().sum()) == 0


def test_cache_key_and_reuse(tmp_path):
    train = save_split(tmp_path / "a", ROWS, data_key="k1")
    first = vb.build_vocab_map(train, 16, 3, tmp_path / "vocab", [1, 2])
    again = vb.build_vocab_map(train, 16, 3, tmp_path / "vocab", [2, 1])
    assert not first.cached and again.cached and again.cache_key == first.cache_key
    assert first.cache_key == vb.vocab_cache_key(train, 16, 3, [1, 2])
    assert first.vocab_map_path == tmp_path / "vocab" / first.cache_key / vb.VOCAB_MAP_FILE
    other_data = save_split(tmp_path / "b", ROWS, data_key="k2")
    keys = {
        vb.vocab_cache_key(other_data, 16, 3, [1, 2]),
        vb.vocab_cache_key(train, 17, 3, [1, 2]),
        vb.vocab_cache_key(train, 16, 4, [1, 2]),
        vb.vocab_cache_key(train, 16, 3, [1, 2, 8]),
    }
    assert len(keys) == 4 and first.cache_key not in keys
    assert vb.VocabResult.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def test_bad_sizes_and_foreign_ids_are_reported(tmp_path):
    train = save_split(tmp_path, ROWS)
    with pytest.raises(ConfigError, match="must be in \\[1, 16\\]"):
        vb.build_vocab_map(train, 16, 17, tmp_path / "v", [])
    with pytest.raises(DataError, match="outside the target vocab \\(8\\)"):
        vb.build_vocab_map(train, 8, 4, tmp_path / "v", [])
    quiet = save_split(tmp_path / "q", [([1, 2, 3], [0, 0, 0])])
    with pytest.raises(DataError, match="no supervised tokens"):
        vb.build_vocab_map(quiet, 16, 4, tmp_path / "v", [])


def test_load_vocab_map_rejects_inconsistent_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vm.safetensors"
    t2d = torch.zeros(8, dtype=torch.bool)
    t2d[[1, 4]] = True
    save_file({"d2t": torch.tensor([1, 2]), "t2d": t2d}, str(path))  # 1+0, 1+2=3 != 4
    with pytest.raises(DataError, match="d2t and t2d disagree"):
        vb.load_vocab_map(path)
    save_file({"d2t": torch.tensor([1, 3]), "t2d": t2d}, str(path))
    assert vb.load_vocab_map(path).kept_ids.tolist() == [1, 4]
    with pytest.raises(DataError, match="not found"):
        vb.load_vocab_map(tmp_path / "missing")


def test_target_to_draft_works_on_batches():
    vm = vb.VocabMap(torch.tensor([1, 2, 5]), torch.zeros(10, dtype=torch.bool), 3, 10)
    vm.t2d[[1, 3, 7]] = True
    ids = torch.tensor([[1, 2, 3], [7, 7, 9]])
    assert vm.target_to_draft(ids).tolist() == [[0, -1, 1], [2, 2, -1]]
    assert vm.draft_to_target(torch.tensor([[2, 0]])).tolist() == [[7, 1]]


def test_cli_builds_map_from_real_chitchat(tmp_path, asset_cache, capsys):
    args = [
        "--quiet",
        f"run.output_dir={tmp_path}",
        f"run.cache_dir={asset_cache}",
        "dataset.max_conversations=30",
        "dataset.eval_conversations=4",
        "dataset.num_proc=1",
        "dataset.max_seq_length=256",
        "vocab.draft_vocab_size=512",
    ]
    assert vb.main(args) == 0
    out = capsys.readouterr().out
    assert "draft vocab 512 of 49152" in out
    map_path = Path(
        next(x for x in out.splitlines() if x.startswith("vocab map:")).split(": ", 1)[1]
    )
    vm = vb.load_vocab_map(map_path)
    check_invariants(vm, 512, 49152)
    # the kept ids are the most frequent supervised ids of the real tokenized data
    from spec_core.data.tokenize import load_tokenized

    train = load_tokenized(next((tmp_path / "work" / "tokenized").iterdir()) / "train")
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in train["input_ids"]])
    mask = np.concatenate([np.asarray(r, dtype=bool) for r in train["loss_mask"]])
    counts = np.bincount(ids[mask], minlength=49152)
    assert counts[vm.kept_ids.numpy()].min() >= np.sort(counts)[-512]
    assert counts[2] > 0 and bool(vm.t2d[2])  # <|im_end|> is supervised and kept
    assert vb.main(args) == 0 and "(cached)" in capsys.readouterr().out
