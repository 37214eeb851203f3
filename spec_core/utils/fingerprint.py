"""Fingerprints for content-addressed work: every cache key under ``output_dir/work`` is built here.

A cache key must change whenever anything that changes the cached output changes, and must not
change otherwise. The pieces are defined once so the caches cannot drift apart:

- ``TOKENIZER_FILES``: every file that can define a tokenizer (vocabulary, merges, special tokens,
  chat template); a cache that depends on the tokenizer hashes all of those present.
- ``target_fingerprint``: the target's config, generation config and tokenizer in full, its
  weights sampled.
- ``code_version(modules)`` with the per-cache module lists ``TOKENIZED_CODE``,
  ``REGENERATED_CODE`` and ``VOCAB_CODE``: the sources whose behaviour decides each cache's bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spec_core.errors import ConfigError

_SPEC_CORE = Path(__file__).resolve().parent.parent
_CHUNK = 1 << 20

# Files that define a tokenizer's vocabulary, merges, special tokens and chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
# The target's model files other than weights and tokenizer.
TARGET_CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

# Sources (relative to spec_core/) that decide each cache's content. Reading conversations
# (conversation, load, report), rendering them (templates, render) and the step itself.
_READ_AND_RENDER = (
    "data/conversation.py",
    "data/load.py",
    "data/report.py",
    "data/templates.py",
    "data/render.py",
)
TOKENIZED_CODE = (*_READ_AND_RENDER, "data/tokenize.py")
REGENERATED_CODE = (*_READ_AND_RENDER, "data/generators.py", "data/regenerate.py")
VOCAB_CODE = ("vocab.py",)


def source_bytes(module: str) -> bytes:
    """The source of ``module`` (a path relative to spec_core/): what ``code_version`` hashes."""
    return (_SPEC_CORE / module).read_bytes()


def code_version(modules: Sequence[str]) -> str:
    """Hash of the sources of ``modules``: a code change there invalidates the cache."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + source_bytes(name) + b"\0")
    return h.hexdigest()[:16]


def update_with_file(h: Any, name: str, path: Path) -> None:
    """Feed ``name`` and the bytes of ``path`` to hash ``h`` (streamed, multi-GB safe)."""
    h.update(str(name).encode() + b"\0")
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    h.update(b"\0")


def file_sha256(path: Path) -> str:
    """Plain sha256 of one file's bytes (streamed), as ``sha256sum`` prints it."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over ``(name, path)`` pairs, in the order given: names and full bytes."""
    h = hashlib.sha256()
    for name, path in files:
        update_with_file(h, name, path)
    return h.hexdigest()


def tree_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` (or ``root`` itself), named relative to it, sorted."""
    root = Path(root)
    if root.is_file():
        return [(root.name, root)]
    return [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if p.is_file()]


def tokenizer_files(tokenizer_dir: Path) -> list[tuple[str, Path]]:
    """The ``TOKENIZER_FILES`` present in ``tokenizer_dir``; at least one must be."""
    present = _present(tokenizer_dir, TOKENIZER_FILES)
    if not present:
        raise ConfigError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {tokenizer_dir}"
        )
    return present


def _present(directory: Path, names: Sequence[str]) -> list[tuple[str, Path]]:
    return [(n, Path(directory) / n) for n in names if (Path(directory) / n).is_file()]


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    return files_digest(tokenizer_files(tokenizer_dir))


def target_fingerprint(target_dir: Path) -> str:
    """Config and tokenizer files in full; weight files by size plus 16 evenly spaced 1 MiB
    samples, which is cheap on a multi-GB checkpoint and still changes with any retraining."""
    target_dir = Path(target_dir)
    h = hashlib.sha256()
    for name, path in _present(target_dir, TARGET_CONFIG_FILES + TOKENIZER_FILES):
        update_with_file(h, name, path)
    weights = sorted(p for p in target_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for path in weights:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(_CHUNK))
    return h.hexdigest()


def cache_key(components: Any) -> str:
    """The key a cache entry is stored under: a short hash of its JSON-able components."""
    blob = json.dumps(components, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
