"""Checkpoints are untrusted input: the manifest is checked before DCP unpickles anything, resume
refuses another dataset or plan, rotation orders by step number, pointers and run ids cannot
name paths outside the run (docs/architecture.md §checkpoint-layout)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from spec_core.config import load_config
from spec_core.errors import ConfigError
from spec_core.export.checkpoint import read_checkpoint, resolve_export_source
from spec_core.training.checkpoint import (
    MANIFEST,
    Checkpointer,
    load_model_weights,
    resolve_checkpoint,
    run_identity,
)
from spec_core.training.sources import SampleSource

IDENTITY = {"dataset_fingerprint": "a" * 64, "total_steps": 10}


class CursorSource(SampleSource):
    """A real SampleSource whose whole state is a cursor (what a checkpoint must restore)."""

    def __init__(self, cursor: int = 0) -> None:
        self.cursor = cursor

    def next_step(self):
        raise NotImplementedError("never stepped in these tests")

    def ack(self, sample_ids: list[str]) -> None:
        pass

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def save(root: Path, step: int, identity=IDENTITY, max_checkpoints: int = 3, **kw) -> Path:
    model, optimizer, scheduler = parts()
    config = root.parent / "draft_config.json"
    config.write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    ckpts = Checkpointer(root, 0, 1, max_checkpoints, identity=identity)
    return ckpts.save(step, model, optimizer, scheduler, CursorSource(step), {}, config, None, **kw)


def load(ckpt: Path, identity=IDENTITY, accept: bool = False) -> tuple[dict, CursorSource]:
    model, optimizer, scheduler = parts(seed=1)
    source = CursorSource()
    checkpointer = Checkpointer(ckpt.parent, 0, 1, 3, identity=identity, accept_mismatch=accept)
    return checkpointer.load(ckpt, model, optimizer, scheduler, source), source


class Payload:
    """Unpickling this creates ``marker``: the visible side effect of reaching pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_metadata_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    ckpt = save(tmp_path / "checkpoints", 5)
    state, source = load(ckpt)  # the untouched checkpoint loads and restores its cursor
    assert state["step"] == 5 and source.cursor == 5
    marker = tmp_path / "unpickled"
    metadata = ckpt / "model" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    reads = []
    original = FileSystemReader.read_metadata
    monkeypatch.setattr(
        FileSystemReader, "read_metadata", lambda self, *a, **k: reads.append(1) or original(self)
    )
    loaders = {
        "resume": lambda: load(ckpt),
        "continual_from": lambda: load_model_weights(parts()[0], ckpt),
        "export": lambda: read_checkpoint(tmp_path),
    }
    for name, loader in loaders.items():
        with pytest.raises(ConfigError) as err:
            loader()
        message = str(err.value)
        assert "model/.metadata" in message and "changed after saving" in message, name
        assert "\n" not in message
    assert not marker.exists() and reads == []  # torch's metadata reader was never reached
    # control: the planted file is a live payload, so refusing it before pickle.load mattered
    with pytest.raises(AttributeError):  # Path.touch returned None, not a Metadata
        original(FileSystemReader(str(ckpt / "model")))
    assert marker.exists()


@pytest.mark.parametrize("change", ["unknown", "missing", "no_manifest", "bad_manifest"])
def test_unknown_missing_or_unlisted_files_are_refused(tmp_path, change):
    ckpt = save(tmp_path / "checkpoints", 3)
    if change == "unknown":
        (ckpt / "model" / "__extra.distcp").write_bytes(b"x")
        expected = "unknown file"
    elif change == "missing":
        (ckpt / "rng_rank0.pt").unlink()
        expected = "missing"
    elif change == "no_manifest":
        (ckpt / MANIFEST).unlink()
        expected = f"no {MANIFEST}"
    else:
        (ckpt / MANIFEST).write_text("{not json")
        expected = "unreadable checkpoint manifest"
    with pytest.raises(ConfigError, match=expected):
        load(ckpt)


def test_resume_refuses_another_dataset_or_plan_unless_accepted(tmp_path, caplog):
    ckpt = save(tmp_path / "checkpoints", 4)
    other_data = dict(IDENTITY, dataset_fingerprint="b" * 64)
    with pytest.raises(ConfigError, match="dataset_fingerprint .*resume_accept_mismatch"):
        load(ckpt, identity=other_data)
    with pytest.raises(ConfigError, match="total_steps 10.*this run 20"):
        load(ckpt, identity=dict(IDENTITY, total_steps=20))
    state, source = load(ckpt, identity=other_data, accept=True)
    assert state["dataset_fingerprint"] == "a" * 64 and source.cursor == 4
    assert "accepted by training.resume_accept_mismatch" in caplog.text


def test_run_identity_changes_with_the_split_content(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    (split / "data-00000-of-00001.arrow").write_bytes(b"ids a,b")
    (split / "state.json").write_text("{}")
    first = run_identity(split, 10)
    (split / "state.json").write_text('{"_fingerprint": "other"}')  # bookkeeping only
    assert run_identity(split, 10) == first
    (split / "data-00000-of-00001.arrow").write_bytes(b"ids a,c")
    assert run_identity(split, 10)["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert run_identity(split, 11)["total_steps"] == 11


def test_rotation_orders_by_step_number_and_keeps_latest(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 9_000_000, max_checkpoints=1)
    save(root, 10_000_000, max_checkpoints=1)  # 'iter_10000000' sorts before 'iter_9000000'
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_10000000"]
    # a reused run dir holding a higher step of an older run: the new latest must survive
    save(root, 20, max_checkpoints=1)
    ckpts = Checkpointer(root, 0, 1, 1)
    assert ckpts.latest.name == "iter_0000020" and ckpts.latest.is_dir()
    assert resolve_checkpoint(tmp_path) == root / "iter_0000020"


@pytest.mark.parametrize("content", ["../../elsewhere", "iter_0000099", "/etc", "iter_1/../x"])
def test_pointer_files_must_name_an_existing_sibling_checkpoint(tmp_path, content):
    root = tmp_path / "checkpoints"
    save(root, 2, is_best=True)
    (tmp_path / "elsewhere").mkdir()
    for pointer, resolve in (
        ("latest", lambda: resolve_checkpoint(tmp_path)),
        ("best", lambda: resolve_export_source(tmp_path, "best")),
    ):
        (root / pointer).write_text(content)
        with pytest.raises(ConfigError, match=f"{pointer} names .*not an iter_\\* checkpoint"):
            resolve()
        (root / pointer).write_text("iter_0000002")


@pytest.mark.parametrize("run_id", ["../x", "a/b", "..", ".hidden", "a b", "x" * 200, "é"])
def test_run_id_must_be_one_safe_path_component(run_id):
    with pytest.raises(ConfigError, match="'run.run_id' .* one path component"):
        load_config(None, [f"run.run_id={run_id}"])
    assert load_config(None, ["run.run_id=smollm2-chitchat_2.v1"]).run.run_id
