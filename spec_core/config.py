"""Typed configuration: one YAML file plus dotted overrides, validated once at the edge.

Every component receives the section it needs as a plain dataclass; nothing reads environment
variables for behaviour. Unknown keys and wrong types fail with one line naming the key and the
valid choices, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from spec_core.contracts.capture import check_capture_indices
from spec_core.errors import ConfigError
from spec_core.utils.files import atomic_write_text
from spec_core.utils.redact import has_secret, redact

BUILTIN_PREFIX = "builtin:"


@dataclass
class RegenerateConfig:
    """On-policy data: replace assistant turns with the target's own responses."""

    enabled: bool = False
    turns: str = "last"  # last | all
    max_conversations: Optional[int] = None  # regenerate only the first N (None = all)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    engine: str = "hf"  # hf | openai
    endpoint: Optional[str] = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model_name: Optional[str] = None  # served model name at the endpoint
    batch_size: int = 16  # HF engine: conversations per generate() call
    # wait for another process regenerating the same cache entry at most this long (12 h)
    lock_timeout_s: float = 43200.0
    concurrency: int = 4  # endpoint engine: requests in flight
    request_timeout_s: float = 120.0
    max_retries: int = 3
    # keep the first N messages (after any system) before regenerating; None = all
    max_turns: Optional[int] = None
    # hf engine: torch threads while generating; 0 = torch's default (all cores)
    num_threads: int = 0


@dataclass
class DatasetConfig:
    path: str = "builtin:chitchat"  # builtin:chitchat or a local file/dir
    messages_key: Optional[str] = None  # None = auto (conversations | messages)
    chat_template: Optional[str] = None  # registry name; None = tokenizer's own template
    last_turn_loss_only: str = "false"  # false | true | auto
    max_seq_length: int = 2048
    min_loss_tokens: int = 1
    max_conversations: Optional[int] = None  # cap after loading (None = all)
    eval_conversations: int = 32  # held out for eval metrics and acceptance prompts
    min_turns: int = 2  # builtin:chitchat only: drop shorter chats
    num_proc: int = 2
    seed: int = 0
    # a record (one JSON line / array element / row) larger than this is skipped and counted
    # (record_too_large) without being held in memory; files themselves are streamed
    max_record_bytes: int = 16 * 1024 * 1024
    regenerate: RegenerateConfig = field(default_factory=RegenerateConfig)


@dataclass
class TargetConfig:
    path: str = "builtin:smollm2-135m-instruct"  # builtin name or a local HF dir
    dtype: str = "float32"  # float32 | bfloat16 | float16
    embedding_key: str = "model.embed_tokens.weight"
    lm_head_key: Optional[str] = None  # None = lm_head.weight, or the embedding when tied
    norm_key: str = "model.norm.weight"
    trust_remote_code: bool = False


@dataclass
class DraftConfig:
    algorithm: str = "eagle3"  # eagle3 | dflash | dspark
    config_path: Optional[str] = None  # draft config JSON; None = derived from the target
    capture_indices: Optional[list[int]] = None  # None = the algorithm's default for the target
    num_layers: int = 1  # eagle3 must be 1; dflash/dspark default 5 via presets
    intermediate_size: Optional[int] = None  # None = target's
    ttt_length: int = 7  # eagle3 unroll depth
    step_weight_decay: float = 0.8  # eagle3: weight of TTT step k is decay**k
    attention_backend: str = "auto"  # auto | sdpa | flex
    block_size: int = 16  # dflash/dspark
    num_anchors: int = 512  # dflash/dspark
    num_capture_layers: int = 5  # dflash/dspark: target layers fused when capture_indices is null
    loss_decay_gamma: Optional[float] = None  # None = 7.0 (dflash) / 4.0 (dspark)
    mask_token_id: Optional[int] = None  # None = derived from the tokenizer
    markov_rank: int = 256  # dspark
    markov_head_type: str = "vanilla"  # vanilla | gated | rnn
    enable_confidence_head: bool = True  # dspark
    confidence_head_with_markov: bool = True  # dspark
    ce_weight: float = 0.1  # dspark loss weights
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    last_hidden_prenorm: bool = False  # engine delivers pre-norm last hidden states
    init_from_target: bool = False  # eagle3: lm_head/final norm from the target (no gain measured)


@dataclass
class VocabConfig:
    draft_vocab_size: Optional[int] = None  # None = full target vocab (no pruning)
    coverage_sizes: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32000, 48000, 64000]
    )


@dataclass
class InferenceConfig:
    engine: str = "hf"  # hf | sglang | vllm
    replicas: int = 1  # producer processes / deployment runs
    batch_size: int = 4  # samples per engine forward
    dtype: str = "float32"  # dtype of the tensors put on the wire
    device: str = "auto"  # auto | cpu | cuda
    tp_size: int = 1
    mem_fraction: float = 0.8
    extra_args: dict[str, Any] = field(default_factory=dict)
    # interpreter for producer processes (a vLLM/SGLang venv); None = ours
    python: Optional[str] = None
    # tmpfs dir for engine-worker -> producer captures; None = /dev/shm
    handoff_dir: Optional[str] = None
    cpu_threads: Optional[int] = None  # torch threads in a producer (CPU); None = torch's default
    # hf engine: spread a target that does not fit one GPU over the visible ones
    # (transformers' device_map: "auto" | "balanced" | "sequential"); None = one device
    device_map: Optional[str] = None


@dataclass
class TransferConfig:
    host: str = "127.0.0.1"  # address our servers bind and advertise
    master_address: Optional[str] = None  # external mooncake master host:port (None = start one)
    metadata_server: Optional[str] = None  # external metadata URL (None = start one)
    queue_address: Optional[str] = None  # external key-queue TCPStore host:port (None = start one)
    protocol: str = "tcp"  # tcp | rdma
    device_name: str = ""  # RDMA NICs
    global_segment_mb: int = 2048  # memory each producer contributes to the store
    local_buffer_mb: int = 512  # client staging buffer
    byte_budget_mb: int = 1024  # bytes resident in the store before producers wait
    claim_lease_s: float = 60.0  # a producer whose heartbeat stops this long is reaped
    # a producer whose main loop makes no progress this long is reaped even if it beats (a hung
    # engine); it must exceed the slowest engine batch (first CUDA-graph capture included)
    progress_timeout_s: float = 900.0
    # a producer waiting for the byte budget fails after this long (no trainer acks any more)
    budget_wait_timeout_s: float = 1800.0
    # a producer with nothing left to claim fails once no sample finished for this long
    linger_timeout_s: float = 1800.0
    put_timeout_s: float = 120.0  # bounded wait when the store is full
    pop_timeout_s: float = 600.0  # trainer wait for the next sample before failing
    connect_timeout_s: float = 30.0
    holder_address: Optional[str] = None  # external holder Mooncake endpoint (None = start one)
    client_mode: str = "auto"  # auto | shm (same host as the holder) | tcp
    client_segment_mb: int = 0  # memory a tcp-mode client mounts (stores without a holder)
    # a client's close() waits this long for its lock (held by a prefetch thread mid-read)
    close_timeout_s: float = 30.0


@dataclass
class TrainingConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: Optional[str] = None  # host:port of node 0; None: node 0 publishes it
    rdzv_advertise: Optional[str] = None  # address node 0 publishes (None: its route to the queue)
    rdzv_timeout_s: float = 600.0  # how long nodes > 0 wait for node 0 to publish its address
    micro_batch_size: int = 2
    accumulation_steps: int = 1
    num_steps: Optional[int] = None  # None = num_epochs over the data
    num_epochs: int = 1
    learning_rate: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_ratio: float = 0.015
    lr_schedule: str = "cosine"  # cosine | linear | constant | wsd
    wsd_decay_ratio: float = 0.2
    max_grad_norm: float = 0.5
    dtype: str = "float32"  # param dtype; bf16 keeps fp32 master weights
    fsdp_strategy: str = "full_shard"  # full_shard | replicate
    backend: str = "auto"  # auto | gloo | nccl
    seed: int = 0
    seq_bucket: int = 64  # pad batches to a multiple of this
    loss_chunk_size: int = 1024  # positions per chunk in the vocab projection
    prefetch_depth: int = 2
    eval_interval: int = 50  # steps; 0 = only at the end
    eval_batches: int = 8
    save_interval: int = 100  # steps; 0 = only at the end
    max_checkpoints: int = 3
    resume_from: Optional[str] = None  # checkpoint dir (or run dir) to resume exactly
    continual_from: Optional[str] = None  # checkpoint to load weights from, fresh optimizer
    # resume even though the checkpoint was trained on other data or planned another step count
    # (its dataset fingerprint / total steps differ from this run's); off = refuse with one line
    resume_accept_mismatch: bool = False
    log_interval: int = 1  # steps between metrics.jsonl records (and live MLflow points)
    print_interval: int = 50  # steps between console lines (with rate and ETA); evals always print
    cpu_threads: Optional[int] = None  # torch threads per trainer process (CPU); None = default
    # torchrun restarts all ranks this often after a rank dies (crash, OOM kill) and they resume
    # from the run's latest checkpoint; a user error (exit 2) is not retried. Single-node,
    # in-process source only: a streamed run fails and is resumed by its flow
    # (docs/architecture.md §processes)
    max_restarts: int = 1
    timeout_s: float = 604800.0  # torchrun wall-clock deadline (7 days); stopped and failed after


# Where an evaluation prompt set comes from (spec_core/data/prompt_sets.py says how each is cut).
PROMPT_SOURCES = ("held_out", "first_turns", "mid_conversation", "humaneval", "mt_bench", "file")
EVAL_ENGINES = ("hf", "vllm", "sglang")


@dataclass
class PromptSetConfig:
    """One evaluation prompt set; results are reported per set and as a weighted summary."""

    # held_out: the context before the last assistant turn of each held-out conversation;
    # first_turns: before the first one; mid_conversation: before a later one (held-out ids only);
    # humaneval / mt_bench: standard sets shipped in PyPI packages; file: 'path' below
    source: str = "held_out"
    path: Optional[str] = None  # source 'file': JSONL/JSON/parquet of prompts or conversations
    name: Optional[str] = None  # label in results and MLflow; None = the source name
    num_prompts: Optional[int] = None  # None = evaluation.num_prompts
    weight: float = 1.0  # the set's share of the weighted summary (normalized over the sets)


@dataclass
class EvaluationConfig:
    enabled: bool = True
    # the prompt sets; [] = one held_out set (the default)
    prompts: list[PromptSetConfig] = field(default_factory=list)
    # who decodes: hf (in process; also the depth sweep) | vllm | sglang (the serving engine with
    # the exported draft; spec_core/acceptance/served.py)
    engine: str = "hf"
    # vllm/sglang: requests in flight for the throughput comparison (concurrency 1 is always run)
    concurrency: int = 8
    # vllm/sglang: the engine venv's interpreter; None = inference.python, else ours
    python: Optional[str] = None
    # vllm/sglang: extra engine arguments (LLM(...) / sglang.Engine(...))
    engine_args: dict[str, Any] = field(default_factory=dict)
    # vllm/sglang: the engine's memory share (vLLM CPU: of the node's memory for the KV cache)
    mem_fraction: float = 0.25
    num_prompts: int = 16
    max_new_tokens: int = 64
    num_draft_tokens: int = 3
    max_prompt_tokens: int = 512
    ignore_eos: bool = False  # decode max_new_tokens even past the stop token
    # torch threads while decoding (0 = torch's default); batch-1 decode is latency-bound
    num_threads: int = 1
    # hf: processes decoding prompts in parallel, num_threads each (evaluation runs after
    # training, so on a 2-core machine 2 halves its wall time)
    workers: int = 1
    # DSpark: end a drafted block after the first slot whose predicted acceptance (its confidence
    # head) is below this; 0 drafts whole blocks
    min_confidence: float = 0.0
    # tau for every drafting depth k = 1..this from one extra pass per prompt (a k-sweep plot in
    # the eval dir; spec_core/acceptance/depth.py); 0 = no sweep
    sweep_depth: int = 6


@dataclass
class RegistryConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None = sqlite file under run.output_dir
    artifact_location: Optional[str] = None  # None = run.output_dir/mlartifacts
    experiment: str = "specflow"
    model_name: str = "smollm2-chitchat-eagle3"
    champion_alias: str = "champion"
    candidate_alias: str = "candidate"
    ui_url: Optional[str] = None  # MLflow UI base for links; None = tracking URI if http(s)


@dataclass
class OrchestrationConfig:
    mode: str = "local"  # local | deployments
    generation_deployment: str = "hidden-state-generation/hidden-state-generation"
    training_deployment: str = "draft-training/draft-training"
    publish_deployment: str = "publish/publish"
    poll_interval_s: float = 2.0  # parent: progress updates and failure checks
    # deployments mode: a child run no worker has started by then fails the parent, naming it
    child_start_timeout_s: float = 600.0
    child_timeout_s: float = 604800.0  # deployments mode: a child run's whole-run deadline
    publish: bool = True  # convert + evaluate + register after training


@dataclass
class RunConfig:
    name: str = "specflow"
    run_id: Optional[str] = None  # None = name + timestamp
    output_dir: str = "outputs"  # runs, content-addressed work dir, MLflow store
    cache_dir: str = "~/.cache/specflow"  # materialized offline assets
    log_level: str = "INFO"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    # Filled by the loader, not by users: dotted key -> the ``${oc.env:...}`` text its value came
    # from. Saved and passed-on forms carry that text instead of the value, so a secret read from
    # the environment is resolved again where it is used and never written down.
    env_refs: dict[str, str] = field(default_factory=dict)


# Fields with a closed set of values: dotted key -> choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset.last_turn_loss_only": ("false", "true", "auto"),
    "dataset.regenerate.turns": ("last", "all"),
    "dataset.regenerate.engine": ("hf", "openai"),
    "target.dtype": ("float32", "bfloat16", "float16"),
    "draft.algorithm": ("eagle3", "dflash", "dspark"),
    "draft.attention_backend": ("auto", "sdpa", "flex"),
    "draft.markov_head_type": ("vanilla", "gated", "rnn"),
    "inference.engine": ("hf", "sglang", "vllm"),
    "inference.dtype": ("float32", "bfloat16", "float16"),
    "inference.device": ("auto", "cpu", "cuda"),
    "transfer.protocol": ("tcp", "rdma"),
    "transfer.client_mode": ("auto", "shm", "tcp"),
    "training.lr_schedule": ("cosine", "linear", "constant", "wsd"),
    "training.dtype": ("float32", "bfloat16"),
    "training.fsdp_strategy": ("full_shard", "replicate"),
    "training.backend": ("auto", "gloo", "nccl"),
    "orchestration.mode": ("local", "deployments"),
}

_BOOL_STRINGS = {"true": "true", "false": "false", "1": "true", "0": "false"}


def _section_fields(dotted: str) -> list[str]:
    """Valid keys at a dotted path of the schema ('' = top level)."""
    node: Any = Config
    for part in [p for p in dotted.split(".") if p]:
        types = {f.name: f.type for f in dataclasses.fields(node)}
        sub = _resolve_type(types.get(part))
        if sub is None or not dataclasses.is_dataclass(sub):
            return []
        node = sub
    return [f.name for f in dataclasses.fields(node)]


def _resolve_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return globals().get(annotation)
    return annotation


def _key_error(exc: ConfigKeyError, source: str) -> ConfigError:
    full_key = str(getattr(exc, "full_key", "") or getattr(exc, "key", ""))
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    leaf = full_key.rsplit(".", 1)[-1]
    valid = _section_fields(parent)
    hint = difflib.get_close_matches(leaf, valid, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    where = f"section '{parent}'" if parent else "the top level"
    return ConfigError(
        f"{source}: unknown config key '{full_key}'{did_you_mean}; valid keys in {where}: "
        + ", ".join(valid)
    )


def _validation_error(exc: ValidationError, source: str) -> ConfigError:
    full_key = str(getattr(exc, "full_key", "") or "?")
    first = str(exc).splitlines()[0]
    return ConfigError(f"{source}: bad value for '{full_key}': {first}")


def _normalize_choices(cfg: Config) -> None:
    """Lower-case choice fields, map YAML booleans, and reject values outside the choices."""
    for dotted, choices in CHOICES.items():
        *parents, leaf = dotted.split(".")
        node: Any = cfg
        for p in parents:
            node = getattr(node, p)
        value = str(getattr(node, leaf)).strip().lower()
        if dotted == "dataset.last_turn_loss_only":
            value = _BOOL_STRINGS.get(value, value)
        if value not in choices:
            raise ConfigError(
                f"bad value '{getattr(node, leaf)}' for '{dotted}'; valid choices: "
                + ", ".join(choices)
            )
        setattr(node, leaf, value)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules that would otherwise fail late, deep inside a worker."""
    d, t, v = cfg.draft, cfg.training, cfg.vocab
    positive = {
        "training.micro_batch_size": t.micro_batch_size,
        "training.accumulation_steps": t.accumulation_steps,
        "training.nproc_per_node": t.nproc_per_node,
        "training.nnodes": t.nnodes,
        "inference.batch_size": cfg.inference.batch_size,
        "inference.replicas": cfg.inference.replicas,
        "dataset.max_seq_length": cfg.dataset.max_seq_length,
        "dataset.max_record_bytes": cfg.dataset.max_record_bytes,
        "transfer.byte_budget_mb": cfg.transfer.byte_budget_mb,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be a positive integer, got {value}")
    if t.num_steps is not None and t.num_steps <= 0:
        raise ConfigError(f"'training.num_steps' must be positive or null, got {t.num_steps}")
    threads = {
        "training.cpu_threads": t.cpu_threads,
        "inference.cpu_threads": cfg.inference.cpu_threads,
    }
    for key, value in threads.items():
        if value is not None and value <= 0:
            raise ConfigError(f"'{key}' must be positive or null, got {value}")
    if not 0 <= t.node_rank < t.nnodes:
        raise ConfigError(f"'training.node_rank' must be in [0, {t.nnodes}), got {t.node_rank}")
    if d.algorithm == "eagle3" and d.num_layers != 1:
        raise ConfigError("'draft.num_layers' must be 1 for eagle3 (engines load one midlayer)")
    if d.algorithm == "eagle3" and d.ttt_length < 1:
        raise ConfigError(f"'draft.ttt_length' must be >= 1, got {d.ttt_length}")
    if d.algorithm in ("dflash", "dspark"):
        if v.draft_vocab_size is not None:
            raise ConfigError(
                f"vocab pruning is not supported for {d.algorithm} (it reuses the target "
                "lm_head); set 'vocab.draft_vocab_size: null'"
            )
        if d.block_size < 2:
            raise ConfigError(f"'draft.block_size' must be >= 2, got {d.block_size}")
        _check_block_draft(d)
    if v.draft_vocab_size is not None and v.draft_vocab_size <= 0:
        raise ConfigError(
            f"'vocab.draft_vocab_size' must be positive or null, got {v.draft_vocab_size}"
        )
    if cfg.transfer.byte_budget_mb > cfg.transfer.global_segment_mb * 0.8:
        raise ConfigError(
            f"'transfer.byte_budget_mb' ({cfg.transfer.byte_budget_mb}) must stay under 80% of "
            f"'transfer.global_segment_mb' ({cfg.transfer.global_segment_mb}): Mooncake evicts "
            "silently near 90% full"
        )
    _check_inference(cfg)
    _check_run_id(cfg)
    _check_evaluation(cfg.evaluation)
    if cfg.dataset.regenerate.enabled and cfg.dataset.regenerate.engine == "openai":
        if not cfg.dataset.regenerate.endpoint:
            raise ConfigError(
                "'dataset.regenerate.endpoint' is required when 'dataset.regenerate.engine' is openai"
            )


# A run id (or run name) becomes one directory under output_dir/runs: one safe path component.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_run_id(cfg: Config) -> None:
    # the name only becomes a path (name-timestamp) when no run_id is given
    key, value = ("run.run_id", cfg.run.run_id) if cfg.run.run_id else ("run.name", cfg.run.name)
    if not _RUN_ID.fullmatch(str(value)) or ".." in str(value):
        raise ConfigError(
            f"'{key}' {value!r} must be one path component of letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit, no '..')"
        )


def _check_secrets(cfg: Config) -> None:
    """A credential written literally into the config would be saved with it: refuse it."""
    flat = _flatten(config_to_dict(cfg, keep_secrets=True))
    for key, value in flat.items():
        if key in cfg.env_refs:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if has_secret({leaf: value}):
            raise ConfigError(
                f"'{key}' holds a credential written into the config; write it as "
                "'${oc.env:VAR}' so it is read from the environment where it is used and never "
                "saved (README §security)"
            )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _env_refs(merged: Any) -> dict[str, str]:
    """Dotted keys whose (unresolved) value reads an environment variable."""
    raw = OmegaConf.to_container(merged, resolve=False)
    return {
        key: value
        for key, value in _flatten(raw).items()
        if isinstance(value, str) and "${oc.env:" in value and not key.startswith("env_refs")
    }


def _check_inference(cfg: Config) -> None:
    """Engine settings (``inference.engine``: hf | sglang | vllm) that could only fail later."""
    inf, d = cfg.inference, cfg.draft
    if inf.tp_size < 1:
        raise ConfigError(f"'inference.tp_size' must be >= 1, got {inf.tp_size}")
    if not 0 < inf.mem_fraction <= 1:
        raise ConfigError(f"'inference.mem_fraction' must be in (0, 1], got {inf.mem_fraction}")
    if inf.engine == "hf" and (inf.tp_size != 1 or inf.extra_args):
        raise ConfigError(
            "'inference.tp_size' and 'inference.extra_args' apply to sglang/vllm; the hf engine "
            "runs on one device (set inference.engine or drop them)"
        )
    if inf.engine == "sglang" and inf.device == "cpu":
        raise ConfigError(
            "inference.engine sglang runs on CUDA GPUs only; use device auto/cuda, or engine vllm "
            "(vLLM's CPU build) or hf on CPU"
        )
    if inf.engine == "vllm" and d.last_hidden_prenorm:
        raise ConfigError(
            "'draft.last_hidden_prenorm' must be false with inference.engine vllm: the vLLM "
            "producer applies the target's final norm, so the wire carries post-norm states"
        )
    if d.capture_indices:  # null or [] = the algorithm's default for the target
        check_capture_indices(d.capture_indices)


def _check_evaluation(ev: EvaluationConfig) -> None:
    """Prompt sets and engine: closed choices, a path where one is needed, distinct names."""
    if ev.engine not in EVAL_ENGINES:
        raise ConfigError(
            f"bad value '{ev.engine}' for 'evaluation.engine'; valid choices: "
            + ", ".join(EVAL_ENGINES)
        )
    if ev.workers < 1:
        raise ConfigError(f"'evaluation.workers' must be >= 1, got {ev.workers}")
    if ev.concurrency < 1 or not 0 < ev.mem_fraction <= 1:
        raise ConfigError(
            "'evaluation.concurrency' must be >= 1 and 'evaluation.mem_fraction' in (0, 1]"
        )
    if ev.engine == "sglang" and ev.engine_args.get("device") == "cpu":
        raise ConfigError("evaluation.engine sglang runs on CUDA GPUs only; use vllm or hf on CPU")
    if ev.sweep_depth < 0:
        raise ConfigError(f"'evaluation.sweep_depth' must be >= 0, got {ev.sweep_depth}")
    if ev.num_prompts < 1 or ev.max_new_tokens < 1:
        raise ConfigError("'evaluation.num_prompts' and 'evaluation.max_new_tokens' must be >= 1")
    names = set()
    for i, ps in enumerate(ev.prompts):
        key = f"evaluation.prompts[{i}]"
        if ps.source not in PROMPT_SOURCES:
            raise ConfigError(
                f"bad value '{ps.source}' for '{key}.source'; valid choices: "
                + ", ".join(PROMPT_SOURCES)
            )
        if (ps.source == "file") != bool(ps.path):
            raise ConfigError(f"'{key}.path' is required for source 'file' and only for it")
        if ps.num_prompts is not None and ps.num_prompts < 1:
            raise ConfigError(f"'{key}.num_prompts' must be >= 1 or null, got {ps.num_prompts}")
        if ps.weight < 0:
            raise ConfigError(f"'{key}.weight' must be >= 0, got {ps.weight}")
        name = prompt_set_name(ps)
        if name in names:
            raise ConfigError(f"'{key}': a second prompt set named '{name}'; give it a 'name'")
        names.add(name)
    if ev.prompts and sum(ps.weight for ps in ev.prompts) <= 0:
        raise ConfigError("'evaluation.prompts': the weights sum to 0; give one set a weight")


def prompt_sets(ev: EvaluationConfig) -> list[PromptSetConfig]:
    """The configured prompt sets; none configured = the held-out split alone."""
    return list(ev.prompts) or [PromptSetConfig()]


def prompt_set_name(ps: PromptSetConfig) -> str:
    """A set's label: its ``name``, else its source (a file: the file's stem)."""
    if ps.name:
        return ps.name
    return Path(ps.path).stem if ps.source == "file" and ps.path else ps.source


def _check_block_draft(d: DraftConfig) -> None:
    """DFlash/DSpark settings that cannot train (checked before any model is built)."""
    for key in ("num_layers", "num_anchors", "num_capture_layers"):
        if getattr(d, key) < 1:
            raise ConfigError(f"'draft.{key}' must be >= 1, got {getattr(d, key)}")
    if d.loss_decay_gamma is not None and d.loss_decay_gamma <= 0:
        raise ConfigError(
            f"'draft.loss_decay_gamma' must be positive or null, got {d.loss_decay_gamma}"
        )
    if d.algorithm != "dspark":
        return
    weights = {
        "ce_weight": d.ce_weight,
        "l1_weight": d.l1_weight,
        "confidence_weight": d.confidence_weight,
    }
    for key, value in weights.items():
        if value < 0:
            raise ConfigError(f"'draft.{key}' must be >= 0, got {value}")
    confidence = d.enable_confidence_head and d.confidence_weight > 0
    if d.ce_weight == 0 and d.l1_weight == 0 and not confidence:
        raise ConfigError(
            "dspark needs a positive 'draft.ce_weight', 'draft.l1_weight' or (with "
            "'draft.enable_confidence_head') 'draft.confidence_weight'"
        )
    if d.markov_rank < 0:
        raise ConfigError(
            f"'draft.markov_rank' must be >= 0 (0 = no Markov head), got {d.markov_rank}"
        )
    if d.enable_confidence_head and d.confidence_head_with_markov and d.markov_rank == 0:
        raise ConfigError(
            "'draft.confidence_head_with_markov' needs a Markov head ('draft.markov_rank' > 0); "
            "set one of them"
        )


def _merge(base: Any, layer: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as exc:
        raise _key_error(exc, source) from None
    except ValidationError as exc:
        raise _validation_error(exc, source) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset, apply ``section.key=value`` overrides, validate, and return typed config."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors carry line numbers in their first line
            raise ConfigError(f"{path}: cannot parse YAML: {str(exc).splitlines()[0]}") from None
        merged = _merge(merged, layer, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {str(exc).splitlines()[0]}") from None
        merged = _merge(merged, layer, f"override '{item}'")
    return _typed(merged, str(path) if path is not None else "overrides")


def _typed(merged: Any, source: str) -> Config:
    """Resolve and validate a merged config; remember which values came from the environment."""
    refs = _env_refs(merged)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:  # e.g. ${oc.env:VAR} with VAR unset
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    cfg.env_refs = refs
    _normalize_choices(cfg)
    _check_consistency(cfg)
    _check_secrets(cfg)
    return cfg


def field_descriptions(section: type) -> dict[str, str]:
    """Each field's comment in this file (trailing, or the comment lines right above it): the one
    description of a config key, which the Prefect run form shows next to the field."""
    import inspect
    import io
    import tokenize

    source = inspect.getsource(section)
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(section)}
    out = {}
    for number, line in enumerate(lines, start=1):
        head = line.strip().split(":", 1)[0]
        if head not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        above = []
        previous = number - 1
        while previous in comments and comments[previous][1]:
            above.insert(0, comments[previous][0])
            previous -= 1
        trailing = comments.get(number, ("", True))
        text = " ".join(above + ([trailing[0]] if not trailing[1] else []))
        if text:
            out[head] = text
    return out


def config_to_dict(cfg: Config, keep_secrets: bool = False) -> dict[str, Any]:
    """The config as plain data, in the form that is saved and passed on (flow parameters, jobs):
    values read from the environment appear as their ``${oc.env:...}`` text (resolved again by
    ``config_from_dict`` where they are used) and anything else secret is masked.
    ``keep_secrets`` returns the resolved values, for checks in this process only."""
    data = dataclasses.asdict(cfg)
    data.pop("env_refs", None)
    if keep_secrets:
        return data
    for dotted, text in cfg.env_refs.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == _resolve_text(text):
            node[leaf] = text  # unchanged since load: pass the reference, not the value
    return redact(data)


def _resolve_text(text: str) -> Any:
    try:
        return OmegaConf.create({"v": text}).v
    except OmegaConfBaseException:
        return None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``config_to_dict`` output (e.g. passed as flow parameters)."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "config dict")
    return _typed(merged, "config dict")


def to_yaml(cfg: Config) -> str:
    """The saved form (``config_to_dict``): environment references unresolved, secrets masked."""
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config next to a run's outputs (atomically)."""
    return atomic_write_text(path, to_yaml(cfg))
