"""Every target family end to end on the HF lane: a tiny random-weight checkpoint of each
architecture (spec_core.families) is captured by the HF engine and checked against manual forward
hooks, a draft trains a few steps on it with the real trainer (in-process capture), is exported,
passes the export validator, and drafts for real speculative decoding that must be lossless.

Each family is its own test id; the results also feed the README's family table
(the ``family_lane`` marker: conftest.py writes each outcome to docs/families.json).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_train_eval, random_samples

from spec_core.config import TargetConfig
from spec_core.contracts.capture import CaptureSpec
from spec_core.engines.hf import HFEngine, decoder_modules
from spec_core.families import FAMILIES, embedding_scale, tiny_family_target
from spec_core.models.common.target import (
    TargetProjection,
    load_target_head,
    read_embedding,
    read_target_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTURE = (0, 1, 2, 3)
H = 64
TRAIN = [
    "draft.capture_indices=[1,2,3]",
    "draft.ttt_length=2",
    "training.num_steps=3",
    "training.micro_batch_size=1",
    "training.accumulation_steps=1",
    "training.seq_bucket=16",
    "training.learning_rate=3e-3",
    "training.warmup_ratio=0",
    "training.save_interval=3",
    "training.eval_interval=0",
    "inference.batch_size=2",
]


@pytest.fixture(scope="module")
def family_dirs(asset_cache: Path, smollm2_dir: Path) -> dict[str, Path]:
    return {name: tiny_family_target(asset_cache, smollm2_dir, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    return make_train_eval(tmp_path_factory.mktemp("family-data"), 8, 2)


def manual_capture(target_dir: Path, ids: list[int]) -> dict:
    """The reference: hooks on the causal LM's own modules (found by ``decoder_modules``, not by
    name): embedding output, every decoder layer's input, the final norm's output, the logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    embed, layers, norm = decoder_modules(model)
    seen: dict = {}
    handles = [embed.register_forward_hook(lambda m, i, o: seen.__setitem__(0, o))]
    for k, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, args, kwargs, k=k: seen.__setitem__(
                    k, args[0] if args else kwargs["hidden_states"]
                ),
                with_kwargs=True,
            )
        )
    handles.append(norm.register_forward_hook(lambda m, i, o: seen.update(norm=o, prenorm=i[0])))
    with torch.inference_mode():
        seen["logits"] = model(input_ids=torch.tensor([ids])).logits
    for h in handles:
        h.remove()
    seen["lm_head"] = model.get_output_embeddings()
    return seen


@pytest.mark.family_lane("hf_capture", "capture parity vs manual hooks")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_capture_matches_manual_hooks(family, family_dirs):
    target_dir = family_dirs[family]
    samples = random_samples(3, lo=20, hi=40, seed=7)  # longer than the sliding windows (24)
    spec = CaptureSpec(CAPTURE, with_last_hidden=True)
    with HFEngine(target_dir, spec, batch_size=3) as engine:  # one right-padded batch
        captured = engine.capture(samples)
    for sample, got in zip(samples, captured, strict=True):
        ref = manual_capture(target_dir, sample.input_ids)
        for slot, k in enumerate(CAPTURE):
            torch.testing.assert_close(
                got.aux_hidden[:, slot * H : (slot + 1) * H], ref[k][0], rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(got.last_hidden, ref["norm"][0], rtol=1e-4, atol=1e-4)
        logits = ref["lm_head"](got.last_hidden)
        torch.testing.assert_close(logits, ref["logits"][0], rtol=1e-3, atol=1e-3)
        # the trainer's copy of the final norm (pre-norm engines) is the family's own norm
        head = load_target_head(target_dir, TargetConfig())
        proj = TargetProjection.build(head.lm_head, None, head.norm_weight, head.norm_eps)
        torch.testing.assert_close(proj.prepare(ref["prenorm"][0]), ref["norm"][0])
        torch.testing.assert_close(proj.weight, ref["lm_head"].weight)  # tied or untied
    # capture 0 is what the draft's frozen embedding holds (scaled where the family scales it)
    table = read_embedding(target_dir, "model.embed_tokens.weight")
    ids = captured[0].input_ids
    torch.testing.assert_close(captured[0].aux_hidden[:, :H], table[ids])
    scale = embedding_scale(read_target_config(target_dir))
    assert (scale != 1.0) == (family == "gemma3")


@pytest.mark.family_lane("hf_e2e", "3 train steps, export, validator, lossless decoding")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_export_and_lossless_decoding(
    family, family_dirs, train_data, tmp_path, process_group
):
    from spec_core.config import load_config
    from spec_core.evaluate import EvalPrompt, load_proposer, load_target, run_evaluation
    from spec_core.export import export_draft, validate_export
    from spec_core.training.fsdp import DistInfo
    from spec_core.training.job import TrainJob
    from spec_core.training.metrics_log import read_metrics
    from spec_core.training.worker import run

    target_dir = family_dirs[family]
    cfg = load_config(None, TRAIN)
    job = TrainJob.create(
        cfg,
        run_dir=str(tmp_path / "run"),
        target_dir=str(target_dir),
        train_data=str(train_data / "train"),
    )
    summary = run(job, DistInfo(0, 1, 0, torch.device("cpu")))  # the torchrun worker's body
    rows = [r for r in read_metrics(job.metrics_file) if r.get("split") == "train"]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert summary["last_checkpoint"]

    hf_dir = export_draft(tmp_path / "run" / "checkpoints", tmp_path / "hf").out_dir
    assert "embedding_is_target" not in validate_export(hf_dir, target_dir)
    validate_export(hf_dir, target_dir)

    target = load_target(target_dir)
    proposer = load_proposer(hf_dir, target, target_dir)
    gen = torch.Generator().manual_seed(3)
    prompts = [
        EvalPrompt(f"p{i}", torch.randint(3, 49152, (16,), generator=gen).tolist())
        for i in range(2)
    ]
    result = run_evaluation(
        target, proposer, prompts, num_draft_tokens=3, max_new_tokens=16, stop_ids=set()
    )
    assert result["lossless"] and result["mismatched_prompts"] == []
    assert result["num_steps"] > 0 and result["tau"] >= 1.0


# What SGLang's model code names the modules our hooks need (spec_core.engines.sglang hooks
# ``model.embed_tokens``, ``model.layers.{i}`` returning (hidden, residual), ``model.norm``), read
# from sgl-project/sglang python/sglang/srt/models/<file>. SGLang needs CUDA, so this is the
# reading, checked against the hook plan we would install; the README table shows it per family.
SGLANG_MODELS = {
    "llama3": ("llama.py", "LlamaModel: embed_tokens, layers -> (hidden, residual), norm", ""),
    "qwen3": ("qwen3.py", "Qwen3Model (Qwen2Model): embed_tokens, layers, norm", ""),
    "qwen3-moe": ("qwen3_moe.py", "Qwen3MoeModel: embed_tokens, layers, norm", ""),
    "gpt-oss": (
        "gpt_oss.py",
        "GptOssModel: embed_tokens, layers, norm",
        "with TP all-reduce fusion a layer returns its output before the all-reduce",
    ),
    "deepseek-v3": ("deepseek_v2.py", "DeepseekV2Model: embed_tokens, layers, norm", ""),
    "gemma3": (
        "gemma3_causal.py",
        "Gemma3TextModel: embed_tokens scales inside forward (capture 0 = scaled rows), layers, norm",
        "get_embed() hands a draft the unscaled table: export with --embed",
    ),
    "mistral": ("mistral.py", "MistralForCausalLM subclasses LlamaForCausalLM", ""),
}
SGLANG_NAMES = {"model.embed_tokens", "model.norm", *(f"model.layers.{i}" for i in range(4))}


@pytest.mark.family_lane("sglang_hooks", "hook names found in SGLang's model code")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sglang_hook_plan_names_modules_sglang_has(family, record_property):
    from spec_core.engines.conventions import sglang_hook_targets

    source, modules, caveat = SGLANG_MODELS[family]
    plan = sglang_hook_targets((0, 1, 2, 3), 4, with_last_hidden=True)
    assert {t.module for t in plan} <= SGLANG_NAMES
    assert "embed_tokens" in modules or "LlamaForCausalLM" in modules, source
    record_property(
        "family_note", f"{source}: {modules}" + (f"; caveat: {caveat}" if caveat else "")
    )


def test_head_loader_finds_the_text_model_in_a_wrapped_checkpoint(family_dirs, tmp_path):
    """A checkpoint that nests the text model (``model.language_model.*``, as VLM wrappers do)
    needs no key settings: the default keys are found by their last name parts."""
    from safetensors.torch import load_file, save_file

    source = family_dirs["gemma3"]
    tensors = load_file(str(source / "model.safetensors"))
    save_file(
        {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    ref, got = load_target_head(source, TargetConfig()), load_target_head(tmp_path, TargetConfig())
    assert torch.equal(ref.lm_head, got.lm_head) and torch.equal(ref.norm_weight, got.norm_weight)
    assert torch.equal(ref.load_embedding(), got.load_embedding())
    assert not torch.equal(got.load_embedding(), got.lm_head)  # scaled rows vs the tied table
