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

import hashlib
import inspect
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.config import Config, EvaluationConfig
from spec_core.data.conversation import Conversation, Message
from spec_core.errors import ConfigError, DataError
from spec_core.models import algorithm_of
from spec_core.models.algorithm import Proposer
from spec_core.utils.cli import config_parser, parse_config_args, run_main
from spec_core.utils.files import atomic_write_json

log = logging.getLogger(__name__)

RESULT_FILE = "acceptance.json"
PLOT_FILE = "acceptance.png"
NO_ASSISTANT_TURN = "no_assistant_turn"
PROMPT_TOO_LONG = "prompt_too_long"


# ----------------------------------------------------------------------------- prompts


@dataclass
class EvalPrompt:
    id: str
    input_ids: list[int]


@dataclass
class PromptSet:
    prompts: list[EvalPrompt]
    skipped: dict[str, int]
    considered: int


def generation_prompt_ids(renderer: Any, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` rendered as a prompt for the next assistant turn.

    Rendered with a placeholder assistant turn and cut at its content start: the exact context
    regeneration generates from and the draft is trained on (equal to ``add_generation_prompt``
    on ChatML templates, and right for templates whose generation prompt differs from their
    rendered history, such as reasoning templates).
    """
    from spec_core.data.render import assistant_spans

    text = renderer.render(Conversation("prompt", [*messages, Message("assistant", "x")]))
    spans = assistant_spans(text, renderer.template)
    if not spans:
        raise DataError(
            f"chat template '{renderer.template_name}' rendered no assistant header; check "
            "'dataset.chat_template'"
        )
    prefix = text[: spans[-1].content_start]
    return list(renderer.tokenizer(prefix, add_special_tokens=False)["input_ids"])


def eval_prompt_ids(
    conv: Conversation, renderer: Any, max_prompt_tokens: int
) -> tuple[Optional[list[int]], Optional[str]]:
    """The prompt of a held-out conversation: everything before its last assistant turn.

    Too long: drop the earliest turns (never the system turn) until it fits, keeping a user turn
    first. Returns (ids, None) or (None, skip reason).
    """
    last = max((i for i, m in enumerate(conv.messages) if m.role == "assistant"), default=None)
    if last is None:
        return None, NO_ASSISTANT_TURN
    context = conv.messages[:last]
    system = context[:1] if context and context[0].role == "system" else []
    turns = context[len(system) :]
    while turns:
        ids = generation_prompt_ids(renderer, system + turns)
        if len(ids) <= max_prompt_tokens:
            return ids, None
        turns = turns[1:]
        while turns and turns[0].role != "user":
            turns = turns[1:]
    return None, PROMPT_TOO_LONG if context else NO_ASSISTANT_TURN


def load_prompts(
    eval_path: str | Path, renderer: Any, num_prompts: int, max_prompt_tokens: int
) -> PromptSet:
    """The first ``num_prompts`` usable held-out conversations of an eval split, in split order."""
    from spec_core.data.tokenize import load_eval_conversations

    prompts: list[EvalPrompt] = []
    skipped: Counter = Counter()
    considered = 0
    for conv in load_eval_conversations(Path(eval_path)):
        if len(prompts) >= num_prompts:
            break
        considered += 1
        ids, reason = eval_prompt_ids(conv, renderer, max_prompt_tokens)
        if ids is None:
            skipped[reason] += 1
        else:
            prompts.append(EvalPrompt(conv.id, ids))
    if not prompts:
        raise DataError(
            f"{eval_path}: no usable evaluation prompt among {considered} held-out conversations "
            f"(skipped: {dict(skipped)}); raise 'evaluation.max_prompt_tokens' or "
            "'dataset.eval_conversations'"
        )
    return PromptSet(prompts, dict(skipped), considered)


# ----------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    tokens: list[int]  # new tokens, stop token included
    wall_s: float
    accepted: list[int] = field(default_factory=list)  # per verify step (speculative only)


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
def greedy_decode(target: Any, prompt: list[int], max_new: int, stop_ids: set[int]) -> Decoded:
    """Plain greedy decoding with a KV cache: one target forward per token (the baseline)."""
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
    return Decoded(tokens, time.perf_counter() - started)


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


def acceptance_stats(accepted: list[int], k: int) -> dict[str, Any]:
    """tau, per-position conditional (alpha) and unconditional acceptance from accepted counts."""
    steps = len(accepted)
    per_pos = [sum(1 for a in accepted if a > i) for i in range(k)]
    reached = [steps, *per_pos[:-1]]
    histogram = [sum(1 for a in accepted if a == i) for i in range(k + 1)]
    total = sum(accepted)
    return {
        "tau": 1.0 + total / steps if steps else 1.0,
        "alpha": [p / r if r else 0.0 for p, r in zip(per_pos, reached, strict=True)],
        "accept_rate_per_position": [p / steps if steps else 0.0 for p in per_pos],
        "acceptance_rate": total / (steps * k) if steps else 0.0,
        "num_steps": steps,
        "num_draft_tokens": steps * k,
        "num_accepted_tokens": total,
        "accepted_per_position": per_pos,
        "accept_length_histogram": histogram,
    }


def eval_set_hash(prompts: list[EvalPrompt], settings: dict[str, Any]) -> str:
    """What makes two tau values comparable: the same prompt tokens, target and decoding settings."""
    blob = json.dumps(
        {"prompts": [p.input_ids for p in prompts], "settings": settings}, sort_keys=True
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


def run_evaluation(
    target: Any,
    proposer: Proposer,
    prompts: list[EvalPrompt],
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    stop_ids: set[int],
) -> dict[str, Any]:
    """Decode every prompt speculatively and plainly; per-prompt records plus the aggregate."""
    decoder = SpeculativeDecoder(target, proposer, num_draft_tokens)
    records, all_accepted = [], []
    spec_s = base_s = 0.0
    spec_tokens = base_tokens = 0
    for p in prompts:
        spec = decoder.generate(p.input_ids, max_new_tokens, stop_ids)
        base = greedy_decode(target, p.input_ids, max_new_tokens, stop_ids)
        same = spec.tokens == base.tokens
        if not same:
            diverge = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(spec.tokens, base.tokens, strict=False))
                    if a != b
                ),
                min(len(spec.tokens), len(base.tokens)),
            )
            log.warning("prompt %s: speculative output diverges at token %d", p.id, diverge)
        all_accepted += spec.accepted
        spec_s, base_s = spec_s + spec.wall_s, base_s + base.wall_s
        spec_tokens, base_tokens = spec_tokens + len(spec.tokens), base_tokens + len(base.tokens)
        records.append(
            {
                "id": p.id,
                "prompt_tokens": len(p.input_ids),
                "prompt_ids": p.input_ids,
                "new_tokens": len(spec.tokens),
                "steps": len(spec.accepted),
                "tau": 1.0 + sum(spec.accepted) / max(1, len(spec.accepted)),
                "accepted": spec.accepted,
                "lossless": same,
                "tokens": spec.tokens,
            }
        )
    stats = acceptance_stats(all_accepted, num_draft_tokens)
    return {
        **stats,
        "lossless": all(r["lossless"] for r in records),
        "mismatched_prompts": [r["id"] for r in records if not r["lossless"]],
        "num_prompts": len(prompts),
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


@dataclass
class EvalSettings:
    num_draft_tokens: int
    max_new_tokens: int
    max_prompt_tokens: int
    ignore_eos: bool
    stop_ids: list[int]
    target_revision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_prompts(
    ev: EvaluationConfig,
    hf_dir: str | Path,
    target_dir: str | Path,
    prompts: list[EvalPrompt],
    embedding_key: str = "model.embed_tokens.weight",
) -> dict[str, Any]:
    """Load the target and the exported draft, decode ``prompts`` both ways, and tag the result
    with the eval-set hash (prompts + decoding settings + target revision)."""
    from transformers import AutoTokenizer

    from spec_core.utils.fingerprint import target_fingerprint

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
    )
    target = load_target(target_dir)
    proposer = load_proposer(hf_dir, target, target_dir, embedding_key, ev)
    log.info("evaluating %s on %d prompts", hf_dir, len(prompts))
    threads = torch.get_num_threads()
    if ev.num_threads > 0:
        torch.set_num_threads(ev.num_threads)
    try:
        result = run_evaluation(
            target,
            proposer,
            prompts,
            num_draft_tokens=ev.num_draft_tokens,
            max_new_tokens=ev.max_new_tokens,
            stop_ids=stop_ids,
        )
    finally:
        torch.set_num_threads(threads)
    result.update(
        {
            "eval_set_hash": eval_set_hash(prompts, settings.to_dict()),
            "settings": settings.to_dict(),
            "hf_dir": str(hf_dir),
            "target_dir": str(target_dir),
        }
    )
    return result


def evaluate_draft(
    cfg: Config,
    hf_dir: str | Path,
    target_dir: str | Path,
    eval_path: str | Path,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Evaluate an exported draft on the held-out prompts; write the JSON and the plot."""
    from transformers import AutoTokenizer

    from spec_core.data.render import ConversationRenderer

    ev = cfg.evaluation
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    renderer = ConversationRenderer(tokenizer, cfg.dataset.chat_template)
    prompt_set = load_prompts(eval_path, renderer, ev.num_prompts, ev.max_prompt_tokens)
    result = evaluate_prompts(ev, hf_dir, target_dir, prompt_set.prompts, cfg.target.embedding_key)
    result.update(
        {
            "dataset_hash": _dataset_hash(Path(eval_path)),
            "eval_path": str(eval_path),
            "skipped": prompt_set.skipped,
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULT_FILE
    atomic_write_json(result_path, result, sort_keys=True)
    result["result_path"] = str(result_path)
    result["plot_path"] = str(plot_acceptance(result, out_dir / PLOT_FILE))
    return result


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
    alpha = " ".join(f"{a:.3f}" for a in result["alpha"])
    return (
        f"tau {result['tau']:.3f}  alpha_k {alpha}  lossless {result['lossless']}  "
        f"prompts {result['num_prompts']}  steps {result['num_steps']}  "
        f"wall speedup {result['wall_speedup']:.2f}x"
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
