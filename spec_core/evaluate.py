"""Real speculative decoding with the HF target and an exported draft: tau, alpha_k, losslessness.

The draft is loaded back from its HF export dir (what the engines load), never from trainer
objects, by its algorithm (``algorithm_of`` the dir), which also supplies the ``Proposer`` that
drafts (EAGLE-3: chain drafting, k tokens; DFlash/DSpark: one block of up to k tokens, which a
DSpark confidence head may end early). Greedy verification, batch size 1, fp32 on CPU:

* prefill: the target runs the prompt x_0..x_{P-1} and emits x_P (greedy);
* round: the proposer drafts d_1..d_k from the tokens so far and the target hidden states it has
  not seen; the target verifies [x_last, d_1..d_k] in one forward with its KV cache and
  ``output_hidden_states``; the longest prefix of drafts equal to the target's argmax is
  accepted, plus the target's own next token (the bonus). The target cache is cropped to the
  accepted length and the proposer gets the hidden states of the accepted positions only.

tau = 1 + accepted drafts / verify steps (vLLM's "mean acceptance length"; a step that hits the
stop token or ``max_new_tokens`` still counts what the target accepted, as vLLM does). alpha_k is
the conditional acceptance of position k given positions < k were accepted. Every prompt is also
decoded by a plain greedy loop over the same target; the run is lossless iff the tokens match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.acceptance.depth import acceptance_profile, depth_curve, plot_depth
from spec_core.acceptance.stats import (  # noqa: F401  (acceptance_stats: re-exported)
    acceptance_stats,
    set_table,
    weighted_summary,
)
from spec_core.config import Config, EvaluationConfig, prompt_sets
from spec_core.data.prompt_sets import (  # noqa: F401  (re-exported: the evaluator's prompts)
    NO_ASSISTANT_TURN,
    PROMPT_TOO_LONG,
    EvalPrompt,
    PromptSet,
    PromptSources,
    build_prompt_sets,
    eval_prompt_ids,
    generation_prompt_ids,
    load_prompts,
)
from spec_core.errors import ConfigError
from spec_core.models import algorithm_of
from spec_core.models.algorithm import Proposer
from spec_core.utils.cli import config_parser, parse_config_args, run_main
from spec_core.utils.files import atomic_write_json

log = logging.getLogger(__name__)

RESULT_FILE = "acceptance.json"
PLOT_FILE = "acceptance.png"
DEPTH_PLOT_FILE = "depth_sweep.png"
SETS_TABLE_FILE = "acceptance_sets.json"


# ----------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    tokens: list[int]  # new tokens, stop token included
    wall_s: float
    accepted: list[int] = field(default_factory=list)  # per verify step (speculative only)
    tail: list[int] = field(default_factory=list)  # greedy tokens after the end (baseline only)


def crop_cache(cache: Any, keep: int) -> None:
    """Keep the first ``keep`` positions of an HF cache (``crop``'s argument changed meaning in
    transformers 5: a negative count of tokens to remove, where 4.x took the length to keep)."""
    remove = cache.get_seq_length() - keep
    if remove <= 0:
        return
    if "tokens_to_remove" in inspect.signature(cache.crop).parameters:
        cache.crop(-remove)
    else:
        cache.crop(keep)


def _finish(tokens: list[int], new: list[int], max_new: int, stop_ids: set[int]) -> bool:
    """Append ``new`` to ``tokens`` up to the stop token / budget; True when decoding is done."""
    for tok in new:
        tokens.append(tok)
        if tok in stop_ids or len(tokens) >= max_new:
            return True
    return False


@torch.inference_mode()
def greedy_decode(
    target: Any, prompt: list[int], max_new: int, stop_ids: set[int], tail: int = 0
) -> Decoded:
    """Plain greedy decoding with a KV cache: one target forward per token (the baseline).

    ``tail`` more tokens are decoded after the output ends (past a stop token too, untimed): the
    target's continuation a depth sweep compares the last round's drafts with."""
    from transformers import DynamicCache

    started = time.perf_counter()
    cache = DynamicCache(config=target.config)
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    while True:
        out = target(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        if _finish(tokens, [tok], max_new, stop_ids):
            break
        ids = torch.tensor([[tok]])
    decoded = Decoded(tokens, time.perf_counter() - started)
    ids = torch.tensor([[tokens[-1]]])
    for _ in range(tail):
        out = target(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        decoded.tail.append(int(out.logits[0, -1].argmax()))
        ids = torch.tensor([[decoded.tail[-1]]])
    return decoded


class SpeculativeDecoder:
    """Greedy verification by the HF target of the tokens its draft's ``Proposer`` drafts."""

    def __init__(self, target: Any, proposer: Proposer, num_draft_tokens: int) -> None:
        if num_draft_tokens < 1:
            raise ConfigError(f"'evaluation.num_draft_tokens' must be >= 1, got {num_draft_tokens}")
        self.target = target
        self.proposer = proposer
        self.k = num_draft_tokens

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new: int, stop_ids: set[int]) -> Decoded:
        from transformers import DynamicCache

        started = time.perf_counter()
        self.proposer.reset()
        cache = DynamicCache(config=self.target.config)
        if hasattr(cache, "activate_past_recording"):  # sliding-window layers must crop back
            cache.activate_past_recording()  # past their window (gpt-oss, Gemma-3, Mistral)
        out = self.target(
            input_ids=torch.tensor([prompt]),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        seq = list(prompt)  # every token known so far: x_0 .. x_{n+1}
        first = int(out.logits[0, -1].argmax())
        seq.append(first)
        tokens: list[int] = []
        accepted: list[int] = []
        done = _finish(tokens, [first], max_new, stop_ids)
        verified = out.hidden_states  # target states the proposer has not seen yet
        while not done:
            drafts = self.proposer.propose(seq, verified, self.k)
            out = self.target(
                input_ids=torch.tensor([[seq[-1], *drafts]]),
                past_key_values=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            preds = out.logits[0].argmax(-1).tolist()  # len(drafts) + 1 greedy target tokens
            a = 0
            while a < len(drafts) and drafts[a] == preds[a]:
                a += 1
            accepted.append(a)
            new = [*drafts[:a], preds[a]]
            crop_cache(cache, len(seq) + a)  # keeps x_0 .. x_{n+1+a}
            verified = tuple(h[:, : a + 1] for h in out.hidden_states)
            seq.extend(new)
            done = _finish(tokens, new, max_new, stop_ids)
        return Decoded(tokens, time.perf_counter() - started, accepted)


def load_proposer(
    hf_dir: str | Path,
    target: Any,
    target_dir: str | Path,
    embedding_key: str = "model.embed_tokens.weight",
    evaluation: Optional[EvaluationConfig] = None,
) -> Proposer:
    """The exported draft, loaded back as the engines see it, in its algorithm's proposer."""
    algorithm = algorithm_of(hf_dir)
    draft = algorithm.load_export(hf_dir, target_dir, embedding_key)
    return algorithm.proposer(draft, target, evaluation)


# ----------------------------------------------------------------------------- metrics


def eval_set_hash(sets: list[PromptSet], settings: dict[str, Any]) -> str:
    """What makes two tau values comparable: the same prompt sets (names, weights, prompt tokens),
    target, engine and decoding settings."""
    blob = json.dumps(
        {
            "sets": [[s.name, s.weight, [p.input_ids for p in s.prompts]] for s in sets],
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- evaluation


def stop_token_ids(target_dir: Path, tokenizer: Any) -> set[int]:
    """The target's eos ids (generation config, then model config) plus the tokenizer's eos."""
    stops: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(target_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            stops.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
            if stops:
                break
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return {int(s) for s in stops}


def load_target(target_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    return model.eval()


def decode_prompt(
    decoder: SpeculativeDecoder,
    p: EvalPrompt,
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    sweep_depth: int = 0,
) -> dict[str, Any]:
    """One prompt decoded speculatively and plainly (and its depth profile): its record."""
    spec = decoder.generate(p.input_ids, max_new_tokens, stop_ids)
    base = greedy_decode(decoder.target, p.input_ids, max_new_tokens, stop_ids, tail=sweep_depth)
    same = spec.tokens == base.tokens
    if not same:
        diverge = next(
            (i for i, (a, b) in enumerate(zip(spec.tokens, base.tokens, strict=False)) if a != b),
            min(len(spec.tokens), len(base.tokens)),
        )
        log.warning("prompt %s: speculative output diverges at token %d", p.id, diverge)
    record = {
        "id": p.id,
        "prompt_tokens": len(p.input_ids),
        "prompt_ids": p.input_ids,
        "new_tokens": len(spec.tokens),
        "steps": len(spec.accepted),
        "tau": 1.0 + sum(spec.accepted) / max(1, len(spec.accepted)),
        "accepted": spec.accepted,
        "lossless": same,
        "tokens": spec.tokens,
        "spec_wall_s": spec.wall_s,
        "base_wall_s": base.wall_s,
        "base_tokens": len(base.tokens),
    }
    if sweep_depth > 0:
        record["depth_profile"] = acceptance_profile(
            decoder.target, decoder.proposer, p.input_ids, base.tokens, base.tail, sweep_depth
        )
    return record


def aggregate_records(
    records: list[dict[str, Any]], num_draft_tokens: int, sweep_depth: int = 0
) -> dict[str, Any]:
    """A set's result from its prompts' records: tau and alpha_k over all verify steps, wall
    times summed, the depth curve over all profiles."""
    spec_s = sum(r["spec_wall_s"] for r in records)
    base_s = sum(r["base_wall_s"] for r in records)
    spec_tokens = sum(r["new_tokens"] for r in records)
    base_tokens = sum(r["base_tokens"] for r in records)
    result = {
        **acceptance_stats([a for r in records for a in r["accepted"]], num_draft_tokens),
        "lossless": all(r["lossless"] for r in records),
        "mismatched_prompts": [r["id"] for r in records if not r["lossless"]],
        "num_prompts": len(records),
        "generated_tokens": spec_tokens,
        "speculative": {"wall_s": spec_s, "tokens_per_s": spec_tokens / max(spec_s, 1e-9)},
        "baseline": {
            "tau": 1.0,  # plain greedy: one token per target forward
            "wall_s": base_s,
            "tokens_per_s": base_tokens / max(base_s, 1e-9),
        },
        "wall_speedup": base_s / max(spec_s, 1e-9),
        "prompts": records,
    }
    if sweep_depth > 0:
        result["depth"] = depth_curve([r["depth_profile"] for r in records], sweep_depth)
    return result


def run_evaluation(
    target: Any,
    proposer: Proposer,
    prompts: list[EvalPrompt],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    stop_ids: set[int],
    sweep_depth: int = 0,
) -> dict[str, Any]:
    """Decode every prompt speculatively and plainly; per-prompt records plus the aggregate, and
    with ``sweep_depth`` > 0 tau for k = 1..sweep_depth (``spec_core.acceptance.depth``)."""
    decoder = SpeculativeDecoder(target, proposer, num_draft_tokens)
    records = [
        decode_prompt(
            decoder, p, max_new_tokens=max_new_tokens, stop_ids=stop_ids, sweep_depth=sweep_depth
        )
        for p in prompts
    ]
    return aggregate_records(records, num_draft_tokens, sweep_depth)


@dataclass
class EvalSettings:
    num_draft_tokens: int
    max_new_tokens: int
    max_prompt_tokens: int
    ignore_eos: bool
    stop_ids: list[int]
    target_revision: str
    engine: str = "hf"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_prompts(
    ev: EvaluationConfig,
    hf_dir: str | Path,
    target_dir: str | Path,
    prompts: list[EvalPrompt] | list[PromptSet],
    embedding_key: str = "model.embed_tokens.weight",
) -> dict[str, Any]:
    """Load the target and the exported draft, decode every prompt set both ways, and return the
    per-set results under ``sets`` with their weighted summary at top level, tagged with the
    eval-set hash (sets + decoding settings + engine + target revision). A plain prompt list is
    one set named ``prompts``."""
    from transformers import AutoTokenizer

    from spec_core.utils.fingerprint import target_fingerprint

    sets = [p for p in prompts if isinstance(p, PromptSet)]
    if len(sets) != len(prompts):
        sets = [PromptSet(list(prompts), {}, len(prompts), name="prompts", source="given")]
    target_dir = Path(target_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    stop_ids = set() if ev.ignore_eos else stop_token_ids(target_dir, tokenizer)
    settings = EvalSettings(
        ev.num_draft_tokens,
        ev.max_new_tokens,
        ev.max_prompt_tokens,
        ev.ignore_eos,
        sorted(stop_ids),
        target_fingerprint(target_dir)[:16],
        ev.engine,
    )
    per_set = _decode_sets(ev, hf_dir, target_dir, sets, embedding_key, stop_ids)
    result = weighted_summary(per_set, {s.name: s.weight for s in sets})
    for s in sets:
        per_set[s.name]["prompt_set"] = s.describe()
    result.update(
        {
            "sets": per_set,
            "prompt_sets": [s.describe() for s in sets],
            "engine": ev.engine,
            "eval_set_hash": eval_set_hash(sets, settings.to_dict()),
            "settings": settings.to_dict(),
            "hf_dir": str(hf_dir),
            "target_dir": str(target_dir),
        }
    )
    return result


def _decode_sets(
    ev: EvaluationConfig,
    hf_dir: str | Path,
    target_dir: Path,
    sets: list[PromptSet],
    embedding_key: str,
    stop_ids: set[int],
) -> dict[str, dict[str, Any]]:
    """Per-set results from the configured engine: HF in process here, a served engine else."""
    if ev.engine != "hf":
        from spec_core.acceptance.served import evaluate_served

        return evaluate_served(ev, hf_dir, target_dir, sets, stop_ids)
    if ev.workers > 1:
        return _decode_in_workers(ev, hf_dir, target_dir, sets, embedding_key, stop_ids)
    target = load_target(target_dir)
    proposer = load_proposer(hf_dir, target, target_dir, embedding_key, ev)
    threads = torch.get_num_threads()
    if ev.num_threads > 0:
        torch.set_num_threads(ev.num_threads)
    try:
        per_set = {}
        for s in sets:
            log.info("evaluating %s on prompt set %s (%d prompts)", hf_dir, s.name, len(s.prompts))
            per_set[s.name] = run_evaluation(
                target,
                proposer,
                s.prompts,
                num_draft_tokens=ev.num_draft_tokens,
                max_new_tokens=ev.max_new_tokens,
                stop_ids=stop_ids,
                sweep_depth=ev.sweep_depth,
            )
    finally:
        torch.set_num_threads(threads)
    return per_set


# One worker process's decoder (set by the pool's initializer; each process has its own).
_WORKER: dict[str, Any] = {}


def _worker_init(
    hf_dir: str, target_dir: Path, embedding_key: str, ev: EvaluationConfig, stop_ids: set[int]
) -> None:
    torch.set_num_threads(max(1, ev.num_threads))
    target = load_target(target_dir)
    proposer = load_proposer(hf_dir, target, target_dir, embedding_key, ev)
    decoder = SpeculativeDecoder(target, proposer, ev.num_draft_tokens)
    _WORKER.update(decoder=decoder, ev=ev, stop_ids=stop_ids)


def _worker_decode(p: EvalPrompt) -> dict[str, Any]:
    ev = _WORKER["ev"]
    return decode_prompt(
        _WORKER["decoder"],
        p,
        max_new_tokens=ev.max_new_tokens,
        stop_ids=_WORKER["stop_ids"],
        sweep_depth=ev.sweep_depth,
    )


def _decode_in_workers(
    ev: EvaluationConfig,
    hf_dir: str | Path,
    target_dir: Path,
    sets: list[PromptSet],
    embedding_key: str,
    stop_ids: set[int],
) -> dict[str, dict[str, Any]]:
    """``evaluation.workers`` processes, each with its own target and draft, decode the prompts
    of every set in parallel; each prompt's record (and wall times) comes from one process, and
    the sets are aggregated here exactly as in process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    prompts = [p for s in sets for p in s.prompts]
    log.info("evaluating %s: %d prompts in %d processes", hf_dir, len(prompts), ev.workers)
    with ProcessPoolExecutor(
        ev.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(str(hf_dir), target_dir, embedding_key, ev, stop_ids),
    ) as pool:
        records = iter(pool.map(_worker_decode, prompts))
        grouped = {s.name: [next(records) for _ in s.prompts] for s in sets}
    return {
        name: aggregate_records(recs, ev.num_draft_tokens, ev.sweep_depth)
        for name, recs in grouped.items()
    }


def evaluate_draft(
    cfg: Config,
    hf_dir: str | Path,
    target_dir: str | Path,
    eval_path: str | Path,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Evaluate an exported draft on the configured prompt sets; write the JSON, the per-set
    table and the plots into ``out_dir``."""
    from transformers import AutoTokenizer

    from spec_core.assets import resolve_dataset
    from spec_core.data.render import ConversationRenderer

    ev = cfg.evaluation
    if ev.engine != "hf" and ev.python is None:  # the producers' engine venv serves it too
        ev = dataclasses.replace(ev, python=cfg.inference.python)
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    renderer = ConversationRenderer(tokenizer, cfg.dataset.chat_template)
    # mid_conversation looks up held-out ids in the source dataset (regeneration may cut them)
    needs_source = any(ps.source == "mid_conversation" for ps in prompt_sets(ev))
    source = resolve_dataset(cfg) if needs_source else None
    sources = PromptSources(renderer, ev, Path(eval_path), cfg.dataset, source)
    sets = build_prompt_sets(sources)
    result = evaluate_prompts(ev, hf_dir, target_dir, sets, cfg.target.embedding_key)
    result.update(
        {
            "dataset_hash": _dataset_hash(Path(eval_path)),
            "eval_path": str(eval_path),
            "skipped": {s.name: s.skipped for s in sets},
        }
    )
    return write_results(result, out_dir)


def write_results(result: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``acceptance.json`` (everything, per-prompt records included), the per-set table and the
    plots; their paths are added to ``result``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULT_FILE
    atomic_write_json(result_path, result, sort_keys=True)
    table = set_table(result["sets"], result)
    atomic_write_json(out_dir / SETS_TABLE_FILE, table)
    result["sets_table"] = table
    result["result_path"] = str(result_path)
    result["sets_table_path"] = str(out_dir / SETS_TABLE_FILE)
    result["plot_path"] = str(plot_acceptance(result, out_dir / PLOT_FILE))
    if "depth" in result:
        curves = {name: r["depth"] for name, r in result["sets"].items() if "depth" in r}
        result["depth_plot_path"] = str(
            plot_depth(curves, result["depth"], out_dir / DEPTH_PLOT_FILE)
        )
    return result


def summary_only(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without its per-prompt records (what flows pass between tasks)."""
    out = {k: v for k, v in result.items() if k != "prompts"}
    out["sets"] = {
        name: {k: v for k, v in r.items() if k != "prompts"}
        for name, r in result.get("sets", {}).items()
    }
    return out


def _dataset_hash(eval_path: Path) -> Optional[str]:
    """The tokenized data's cache key (``prepared.json`` next to the split), when there is one."""
    manifest = eval_path.parent / "prepared.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("cache_key")
    return None


def plot_acceptance(result: dict[str, Any], path: Path) -> Path:
    """Per-position alpha and the distribution of tokens emitted per target step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(result["alpha"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    positions = list(range(1, k + 1))
    left.bar(positions, result["alpha"], color="#4c72b0", label="conditional α_k")
    left.plot(
        positions, result["accept_rate_per_position"], "o-", color="#dd8452", label="unconditional"
    )
    left.set(
        xlabel="draft position k",
        ylabel="acceptance",
        ylim=(0, 1),
        xticks=positions,
        title="per-position acceptance",
    )
    left.legend(fontsize=8)
    hist = result["accept_length_histogram"]
    right.bar(list(range(1, k + 2)), hist, color="#55a868")
    right.set(
        xlabel="tokens per target step",
        ylabel="steps",
        xticks=list(range(1, k + 2)),
        title=f"τ = {result['tau']:.3f} ({result['num_prompts']} prompts)",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_line(result: dict[str, Any]) -> str:
    """The weighted summary and each set's tau on one line."""
    alpha = " ".join(f"{a:.3f}" for a in result["alpha"])
    sets = result.get("sets") or {}
    per_set = ", ".join(f"{name} {r['tau']:.3f}" for name, r in sets.items())
    depth = result.get("depth")
    by_k = " ".join(f"{t:.2f}" for t in depth["tau"]) if depth else ""
    return (
        f"tau {result['tau']:.3f}  alpha_k {alpha}  lossless {result['lossless']}  "
        f"prompts {result['num_prompts']}  steps {result['num_steps']}  "
        f"wall speedup {result['wall_speedup']:.2f}x"
        + (f"  per set: {per_set}" if len(sets) > 1 else "")
        + (f"  tau by k=1..{len(depth['tau'])}: {by_k}" if depth else "")
    )


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    """``specflow evaluate --draft HF_DIR [--config C] [overrides]``: tau on held-out prompts."""
    from spec_core.assets import resolve_target
    from spec_core.data.tokenize import prepare_run_dataset
    from spec_core.paths import RunPaths

    parser = config_parser("specflow evaluate", main.__doc__)
    parser.add_argument("--draft", required=True, help="exported HF draft dir")
    parser.add_argument("--eval-data", default=None, help="tokenized eval split (default: cached)")
    parser.add_argument("--out", default=None, help="output dir (default: <run>/eval)")
    args, cfg = parse_config_args(parser, argv)
    paths = RunPaths.from_config(cfg)
    target_dir = resolve_target(cfg)
    eval_path = args.eval_data
    if eval_path is None:
        eval_path = prepare_run_dataset(cfg, target_dir).eval_path
    if not Path(args.draft, "config.json").is_file():
        raise ConfigError(f"--draft {args.draft}: not an exported draft dir (no config.json)")
    result = evaluate_draft(cfg, args.draft, target_dir, eval_path, args.out or paths.eval_dir)
    print(summary_line(result))
    print(f"results: {result['result_path']}  plot: {result['plot_path']}")
    return 0 if result["lossless"] else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
