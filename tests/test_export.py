"""HF export: round trip from a trainer checkpoint, per-engine layer ids, post-pruning, the
validator's refusals, embedding copy, speculators format and the CLI.

Checkpoints are written the trainer's way: ``build_draft`` + FSDP2 (``parallelize``, gloo, one
rank) + ``Checkpointer.save``; export then reads them with no process group.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from test_train_units import ListSource

from spec_core.config import load_config
from spec_core.errors import ConfigError
from spec_core.export import export_draft, main, validate_export
from spec_core.models import get_algorithm
from spec_core.models.common.hf import (
    ExportError,
    capture_indices_from_hf,
    sglang_layer_ids,
    vllm_layer_ids,
)
from spec_core.models.common.target import read_tensors
from spec_core.models.eagle3.config import Eagle3Config
from spec_core.models.eagle3.model import Eagle3Draft
from spec_core.vocab import load_vocab_map, save_vocab_map

EMB = "model.embed_tokens.weight"
CAPTURE = [1, 2, 3]


def kept_ids(n: int, vocab: int = 49152, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(vocab, generator=gen)[:n].numpy())


def trainer_checkpoint(
    run_dir: Path, target_dir: Path, vocab_map: Path | None = None, seed: int = 1
) -> tuple[Path, Eagle3Draft]:
    """Save a checkpoint with the trainer's own pieces; returns (run_dir, unsharded copy).

    The weights are perturbed away from the seeded init, so an exporter that rebuilt the model
    from the config instead of reading the checkpoint would not match.
    """
    from spec_core.models.common.target import load_target_head
    from spec_core.training.checkpoint import Checkpointer
    from spec_core.training.fsdp import DistInfo, build_mesh, parallelize
    from spec_core.training.job import TrainJob
    from spec_core.training.optim import build_optimizer
    from spec_core.training.schedule import build_scheduler
    from spec_core.training.worker import build_draft, draft_config_for
    from spec_core.utils.net import free_port

    cfg = load_config(None, [f"draft.capture_indices={CAPTURE}"])
    job = TrainJob.create(cfg, run_dir=str(run_dir), target_dir=str(target_dir))
    vmap = load_vocab_map(vocab_map) if vocab_map else None
    dcfg = draft_config_for(job, cfg, vmap.draft_vocab_size if vmap else None)
    config_file = dcfg.save(run_dir / "draft_config.json")
    job.save(run_dir / "train_job.json")
    head = load_target_head(target_dir, cfg.target)
    model = build_draft(dcfg, cfg, head, vmap, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "embed_tokens.weight":
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    reference = copy.deepcopy(model).eval()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        info = DistInfo(0, 1, 0, torch.device("cpu"))
        parallelize(model, build_mesh(info), cfg.training, {model.embed_tokens.weight})
        optimizer = build_optimizer(model, cfg.training)
        Checkpointer(run_dir / "checkpoints", 0, 1, 3).save(
            7,
            model,
            optimizer,
            build_scheduler(optimizer, cfg.training, 10),
            ListSource([]),
            {"best_score": None},
            config_file,
            vocab_map,
        )
    finally:
        dist.destroy_process_group()
    return run_dir, reference


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory, tiny_target_dir) -> tuple[Path, Eagle3Draft]:
    return trainer_checkpoint(tmp_path_factory.mktemp("full-run"), tiny_target_dir)


@pytest.fixture(scope="module")
def vocab_map_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vmap") / "vocab_map.safetensors"
    save_vocab_map(path, kept_ids(512), 49152)
    return path


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory, tiny_target_dir, vocab_map_file) -> tuple[Path, Eagle3Draft]:
    return trainer_checkpoint(
        tmp_path_factory.mktemp("pruned-run"), tiny_target_dir, vocab_map_file
    )


def plain_load(hf_dir: Path, target_dir: Path) -> tuple[dict, dict, Eagle3Draft]:
    """What an engine does: json + safetensors only, the target's embedding shared."""
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    model = Eagle3Draft(Eagle3Config.from_hf_dict(config))
    weights = dict(tensors)
    weights.setdefault("embed_tokens.weight", read_tensors(target_dir, [EMB])[EMB])
    model.load_state_dict(weights, strict=True)
    return config, tensors, model.eval()


def draft_outputs(model: Eagle3Draft, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Draft forward on fixed inputs: step 0 over 9 positions, then one chained step."""
    gen = torch.Generator().manual_seed(seed)
    aux = torch.randn(1, 9, model.config.aux_dim, generator=gen)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=gen)
    with torch.no_grad():
        h0, cache = model.decode(ids[:, 1:], model.project_features(aux), torch.arange(9)[None])
        h1, _ = model.decode(ids[:, -1:], h0[:, -1:], torch.tensor([[9]]), cache)
        return h0, h1, model.logits(h0), model.logits(h1)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("which", ["full", "pruned"])
def test_round_trip_matches_the_trainer_module(
    which, full_ckpt, pruned_ckpt, tiny_target_dir, vocab_map_file, tmp_path
):
    run_dir, reference = full_ckpt if which == "full" else pruned_ckpt
    result = export_draft(run_dir, tmp_path / "hf", target_dir=tiny_target_dir)
    config, tensors, model = plain_load(tmp_path / "hf", tiny_target_dir)

    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["tie_word_embeddings"] is False and config["num_hidden_layers"] == 1
    assert config["target_hidden_size"] == 64 and config["vocab_size"] == 49152
    assert config["rope_theta"] == 100000.0  # the tiny target's, not the default 10000
    assert config["torch_dtype"] == "float32"
    assert config["specflow"]["capture_indices"] == CAPTURE and config["specflow"]["step"] == 7
    sidecar = json.loads((tmp_path / "hf" / "specflow_export.json").read_text())
    assert sidecar["capture_indices"] == CAPTURE and sidecar["target_revision"]
    assert "embed_tokens.weight" not in tensors
    assert not any(k.startswith(("draft_model.", "module.", "layers.")) for k in tensors)
    if which == "full":
        assert config["draft_vocab_size"] == 49152
        assert "d2t" not in tensors and "t2d" not in tensors  # vLLM refuses d2t here
    else:
        vmap = load_vocab_map(vocab_map_file)
        assert config["draft_vocab_size"] == 512 and result.pruned and not result.post_pruned
        assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
        assert torch.equal(tensors["d2t"], vmap.d2t) and torch.equal(tensors["t2d"], vmap.t2d)
    for name, value in reference.state_dict().items():
        if name != "embed_tokens.weight":
            assert torch.equal(tensors[name], value), name
    for got, want in zip(draft_outputs(model), draft_outputs(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(
        draft_outputs(get_algorithm("eagle3").load_export(tmp_path / "hf", tiny_target_dir)),
        draft_outputs(reference),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "rope_from_target" in result.checks and "shapes" in result.checks


def test_bf16_export_casts_weights_and_records_dtype(full_ckpt, tiny_target_dir, tmp_path):
    run_dir, reference = full_ckpt
    export_draft(run_dir, tmp_path / "hf", target_dir=tiny_target_dir, dtype="bfloat16")
    config, tensors, _ = plain_load(tmp_path / "hf", tiny_target_dir)
    assert config["torch_dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    assert torch.equal(tensors["fc.weight"], reference.fc.weight.detach().to(torch.bfloat16))


# ----------------------------------------------------------------------------- layer ids


def test_layer_ids_per_engine_convention(full_ckpt, tiny_target_dir, tmp_path):
    # SmolLM2 (30 layers): capture indices (2, 15, 27) = post-layer (1, 14, 26).
    assert vllm_layer_ids((2, 15, 27)) == [2, 15, 27]
    assert sglang_layer_ids((2, 15, 27)) == [1, 14, 26]
    with pytest.raises(ExportError, match="embedding output"):
        sglang_layer_ids((0, 15, 27))

    export_draft(full_ckpt[0], tmp_path / "hf", target_dir=tiny_target_dir)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == CAPTURE  # vLLM reads this first
    assert config["eagle_config"] == {
        "use_aux_hidden_state": True,
        "eagle_aux_hidden_state_layer_ids": [0, 1, 2],  # SGLang adds +1 itself
    }
    # Reading back from any one convention recovers the capture indices.
    assert capture_indices_from_hf(config) == CAPTURE
    vllm_only = {"eagle_aux_hidden_state_layer_ids": [2, 15, 27]}
    sglang_only = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 14, 26]}}
    assert capture_indices_from_hf(vllm_only) == [2, 15, 27]
    assert capture_indices_from_hf(sglang_only) == [2, 15, 27]


# ----------------------------------------------------------------------------- post-pruning


def test_post_pruning_keeps_exactly_the_mapped_rows(
    full_ckpt, vocab_map_file, tiny_target_dir, tmp_path
):
    run_dir, reference = full_ckpt
    result = export_draft(
        run_dir, tmp_path / "hf", target_dir=tiny_target_dir, vocab_map=vocab_map_file
    )
    config, tensors, pruned = plain_load(tmp_path / "hf", tiny_target_dir)
    kept = [int(i) for i in kept_ids(512)]
    full_head = reference.lm_head.weight.detach()
    by_hand = torch.stack([full_head[i] for i in kept])  # row by row, not via t2d
    assert result.post_pruned and config["draft_vocab_size"] == 512
    assert torch.equal(tensors["lm_head.weight"], by_hand)
    assert tensors["d2t"].tolist() == [t - i for i, t in enumerate(kept)]
    assert int(tensors["t2d"].sum()) == 512 and tensors["t2d"].nonzero().squeeze(1).tolist() == kept
    assert config["specflow"]["post_pruned"] is True
    # Same draft, same inputs: pruned logit i == full logit at target id kept[i], and the
    # draft's argmax maps back to the best kept target token.
    *_, full_logits, _ = draft_outputs(reference)
    *_, pruned_logits, _ = draft_outputs(pruned)
    torch.testing.assert_close(pruned_logits, full_logits[..., kept])
    best = pruned.draft_to_target(pruned_logits.argmax(-1))
    assert torch.equal(best, torch.tensor(kept)[full_logits[..., kept].argmax(-1)])


def test_re_pruning_a_pruned_head_is_refused(pruned_ckpt, vocab_map_file, tmp_path):
    with pytest.raises(ExportError, match="re-pruning is refused"):
        export_draft(pruned_ckpt[0], tmp_path / "hf", vocab_map=vocab_map_file)
    assert not (tmp_path / "hf").exists()


def test_vocab_map_for_another_vocab_is_refused(full_ckpt, tmp_path):
    other = tmp_path / "vocab_map.safetensors"
    save_vocab_map(other, np.arange(10), 1000)
    with pytest.raises(ExportError, match="covers 1000 target tokens"):
        export_draft(full_ckpt[0], tmp_path / "hf", vocab_map=other)


# ----------------------------------------------------------------------------- refusals


def test_output_dir_is_not_silently_replaced(full_ckpt, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        export_draft(full_ckpt[0], out)
    assert (out / "keep.txt").is_file()
    export_draft(full_ckpt[0], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_bad_sources_fail_with_one_line(full_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint at"):
        export_draft(tmp_path / "nothing", tmp_path / "hf")
    with pytest.raises(ConfigError, match="needs the target dir"):
        export_draft(full_ckpt[0], tmp_path / "hf", include_embedding=True)
    with pytest.raises(ConfigError, match="export dtype"):
        export_draft(full_ckpt[0], tmp_path / "hf", dtype="int8")


def _tamper(hf_dir: Path, edit_config=None, edit_tensors=None) -> None:
    if edit_config is not None:
        path = hf_dir / "config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    if edit_tensors is not None:
        tensors = load_file(str(hf_dir / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(hf_dir / "model.safetensors"))


def _rename(old: str, new: str):
    return lambda t: t.__setitem__(new, t.pop(old))


def _swap_d2t(t):
    d2t = t["d2t"].clone()
    d2t[[3, 4]] = torch.stack([d2t[4] + 1, d2t[3] - 1])  # target ids of draft 3 and 4 swap
    t["d2t"] = d2t


def _extra_t2d(t):
    t2d = t["t2d"].clone()
    t2d[(~t2d).nonzero()[0]] = True
    t["t2d"] = t2d


TAMPERS = {
    "trainer prefix": ("full", None, _rename("fc.weight", "draft_model.fc.weight"), "prefixes"),
    "vllm layer names": (
        "full",
        None,
        _rename("midlayer.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"),
        "prefixes",
    ),
    "d2t on full vocab": (
        "full",
        None,
        lambda t: t.__setitem__("d2t", torch.zeros(49152, dtype=torch.long)),
        "must not carry d2t",
    ),
    "missing norm": ("full", None, lambda t: t.pop("norm.weight"), "missing tensors"),
    "wrong head rows": (
        "full",
        lambda c: c.__setitem__("draft_vocab_size", 1000),
        None,
        "lm_head.weight has shape",
    ),
    "mixed dtype": (
        "full",
        None,
        lambda t: t.__setitem__("fc.weight", t["fc.weight"].half()),
        "are not float32",
    ),
    "nan": ("full", None, lambda t: t["norm.weight"].__setitem__(0, float("nan")), "NaN"),
    "tied": (
        "full",
        lambda c: c.__setitem__("tie_word_embeddings", True),
        None,
        "tie_word_embeddings",
    ),
    "sglang ids unshifted": (
        "full",
        lambda c: c["eagle_config"].__setitem__("eagle_aux_hidden_state_layer_ids", CAPTURE),
        None,
        "capture - 1",
    ),
    "vllm ids shifted": (
        "full",
        lambda c: c.__setitem__("eagle_aux_hidden_state_layer_ids", [0, 1, 2]),
        None,
        "top-level",
    ),
    "rope differs": (
        "full",
        lambda c: c["rope_parameters"].__setitem__("rope_theta", 1e4),
        None,
        "RoPE",
    ),
    "random embedding": (
        "full",
        None,
        lambda t: t.__setitem__("embed_tokens.weight", torch.randn(49152, 64)),
        "not the target's embedding",
    ),
    "d2t not monotone": ("pruned", None, _swap_d2t, "not strictly ascending"),
    "t2d sum": ("pruned", None, _extra_t2d, "t2d marks 513"),
    "d2t int32": ("pruned", None, lambda t: t.__setitem__("d2t", t["d2t"].int()), "int64"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_validator_rejects_broken_exports(case, full_ckpt, pruned_ckpt, tiny_target_dir, tmp_path):
    which, edit_config, edit_tensors, message = TAMPERS[case]
    run_dir = (full_ckpt if which == "full" else pruned_ckpt)[0]
    hf_dir = tmp_path / "hf"
    export_draft(run_dir, hf_dir, target_dir=tiny_target_dir)
    assert validate_export(hf_dir, tiny_target_dir)  # intact: passes
    _tamper(hf_dir, edit_config, edit_tensors)
    with pytest.raises(ExportError, match=message):
        validate_export(hf_dir, tiny_target_dir)


# ----------------------------------------------------------------------------- extras


def test_embedding_is_copied_from_the_target(full_ckpt, tiny_target_dir, tmp_path):
    result = export_draft(
        full_ckpt[0], tmp_path / "hf", target_dir=tiny_target_dir, include_embedding=True
    )
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(tensors["embed_tokens.weight"], read_tensors(tiny_target_dir, [EMB])[EMB])
    assert "embedding_is_target" in result.checks


def test_speculators_dir_remaps_names_and_is_explicit(full_ckpt, tiny_target_dir, tmp_path):
    result = export_draft(
        full_ckpt[0],
        tmp_path / "hf",
        target_dir=tiny_target_dir,
        speculators_dir=tmp_path / "spec",
        provenance={"target_dir": str(tiny_target_dir)},
    )
    native = load_file(str(tmp_path / "hf" / "model.safetensors"))
    spec = load_file(str(result.speculators_dir / "model.safetensors"))
    assert set(spec) == {k.replace("midlayer.", "layers.0.") for k in native}
    assert torch.equal(
        spec["layers.0.self_attn.q_proj.weight"], native["midlayer.self_attn.q_proj.weight"]
    )
    config = json.loads((result.speculators_dir / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert config["architectures"] == ["Eagle3Speculator"]
    assert config["norm_before_residual"] is False  # the adapter's default would be true
    assert config["eagle_aux_hidden_state_layer_ids"] == CAPTURE
    assert config["transformer_layer_config"]["vocab_size"] == 49152
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(tiny_target_dir)
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3


def test_cli_exports_and_reports_errors_in_one_line(full_ckpt, tmp_path, capsys):
    from spec_core.cli import main as specflow

    run_dir = full_ckpt[0]
    assert main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0
    report = json.loads(capsys.readouterr().out)
    # The target dir comes from the run's train_job.json: its checks ran.
    assert "target_vocab" in report["checks"] and report["capture_indices"] == CAPTURE
    shutil.rmtree(tmp_path / "hf")
    assert (
        specflow(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoint at") and "\n" not in err
