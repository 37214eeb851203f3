"""Response generators for on-policy regeneration: the target, embedded (HF transformers) or behind
an OpenAI-compatible endpoint (vLLM, SGLang), behind one small interface.

Both take prompts as *token ids* rendered by specflow's own chat template, so the reply is generated
in exactly the context the draft is later trained on (a server-side chat template could differ
from ``dataset.chat_template``), and both stop at the template's end-of-turn token, which is left
out of the returned text.

``HFGenerator`` decodes a whole batch at once: left-padded prompts, one prefill, then one token per
step for every unfinished row through a shared KV cache; rows that hit a stop token leave the
batch (their cache rows are dropped), so a long reply does not keep short ones computing.
``OpenAIGenerator`` sends one ``/v1/completions`` request per prompt; the caller runs several
generators' calls in parallel threads (``parallelism``), retries are bounded and end in a
``ServiceError`` naming the endpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Optional

import torch

from spec_core.errors import ConfigError, ServiceError
from spec_core.utils.redact import redact_text

log = logging.getLogger(__name__)

STOP = "stop"  # finish reasons, as in the OpenAI API
LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    text: str  # without the stop token
    num_tokens: int  # tokens generated, the stop token included
    finish_reason: str  # STOP (end of turn) | LENGTH (max_new_tokens)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from anything printable: the same parts always give the same seed."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Generator:
    """Turns prompts (token ids) into completions. ``batch_size`` prompts go into one call and
    ``parallelism`` calls may run at once in threads (only where the generator is thread-safe)."""

    batch_size: int = 1
    parallelism: int = 1

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int
    ) -> list[Completion]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What identifies this generator in a manifest."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the generator holds (model memory, connections)."""


class HFGenerator(Generator):
    """Batched decoding with HF transformers on the local target: the embedded default."""

    def __init__(
        self,
        target_dir: Path | str,
        tokenizer: Any,
        stop_token_ids: Sequence[int],
        batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModelForCausalLM

        if batch_size <= 0:
            raise ConfigError(f"'dataset.regenerate.batch_size' must be positive, got {batch_size}")
        if not stop_token_ids:
            raise ConfigError("no end-of-turn token to stop at; check 'dataset.chat_template'")
        self.target_dir = Path(target_dir)
        self.tokenizer = tokenizer
        self.stop_token_ids = sorted(set(int(t) for t in stop_token_ids))
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype)
        self.model.to(self.device).eval()
        pad = self.model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_token_ids[0])
        self._stop = torch.tensor(self.stop_token_ids, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"engine": "hf", "target": str(self.target_dir), "batch_size": self.batch_size}

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int
    ) -> list[Completion]:
        from transformers import DynamicCache

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        rows = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every row ends at the same column
            input_ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            attention[i, width - len(prompt) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        next_position = attention.sum(-1)
        rng = torch.Generator(device=self.device).manual_seed(seed)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        active = torch.arange(rows, device=self.device)  # original row of each batch row
        tokens: list[list[int]] = [[] for _ in range(rows)]
        finish = [LENGTH] * rows
        for step in range(params.max_new_tokens):
            picked = self._pick(logits, params, rng)
            stopped = torch.isin(picked, self._stop)
            for row, token, stop in zip(
                active.tolist(), picked.tolist(), stopped.tolist(), strict=True
            ):
                tokens[row].append(token)
                if stop:
                    finish[row] = STOP
            if step == params.max_new_tokens - 1 or bool(stopped.all()):
                break
            if bool(stopped.any()):
                keep = (~stopped).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, picked = active[keep], picked[keep]
                attention, next_position = attention[keep], next_position[keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
            logits = self.model(
                input_ids=picked[:, None],
                attention_mask=attention,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_position = next_position + 1
        return [self._completion(t, f) for t, f in zip(tokens, finish, strict=True)]

    def _pick(
        self, logits: torch.Tensor, params: SamplingParams, rng: torch.Generator
    ) -> torch.Tensor:
        logits = logits.float()
        if params.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better tokens
            sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=rng).squeeze(1)

    def _completion(self, tokens: list[int], finish: str) -> Completion:
        body = tokens[:-1] if finish == STOP else tokens
        text = self.tokenizer.decode(
            body, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return Completion(text, len(tokens), finish)

    def close(self) -> None:
        del self.model


# Failures worth another attempt: the server is starting, overloaded or briefly gone.
_RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)


class OpenAIGenerator(Generator):
    """``/v1/completions`` on an OpenAI-compatible server, with the prompt sent as token ids.

    ``stop_token_ids`` and ``skip_special_tokens`` are vLLM/SGLang extensions (both accept them):
    the first stops at end-of-turn tokens that are not the model's eos, the second keeps special
    tokens the model emits mid-reply in the text, as the HF path does.
    """

    def __init__(
        self,
        endpoint: str,
        stop_strings: Sequence[str],
        stop_token_ids: Sequence[int],
        model_name: Optional[str] = None,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        if concurrency <= 0:
            raise ConfigError(
                f"'dataset.regenerate.concurrency' must be positive, got {concurrency}"
            )
        if max_retries < 0:
            raise ConfigError(f"'dataset.regenerate.max_retries' must be >= 0, got {max_retries}")
        self.base_url = normalize_endpoint(endpoint)
        self.stop_strings = list(stop_strings)
        self.stop_token_ids = sorted(set(int(t) for t in stop_token_ids))
        self.parallelism = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.model_name = model_name or self._served_model()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "openai",
            "endpoint": redact_text(self.base_url),
            "model_name": self.model_name,
        }

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int
    ) -> list[Completion]:
        return [
            self._complete(list(p), params, derive_seed(seed, i)) for i, p in enumerate(prompts)
        ]

    def _complete(self, prompt: list[int], params: SamplingParams, seed: int) -> Completion:
        body = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": max(params.temperature, 0.0),
            "top_p": params.top_p,
            "seed": seed % (2**31),
            "stop": self.stop_strings,
            "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": False,
            "n": 1,
        }
        reply = self._request("POST", "/completions", body)
        try:
            choice = reply["choices"][0]
            text = choice["text"]
            finish = choice.get("finish_reason") or LENGTH
            num_tokens = int(reply.get("usage", {}).get("completion_tokens", 0))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ServiceError(
                f"endpoint {redact_text(self.base_url)}/completions returned an unexpected body: "
                f"{json.dumps(reply)[:200]}"
            ) from None
        for end in self.stop_strings:  # servers that include the stop string in the text
            if text.endswith(end):
                text, finish = text[: -len(end)], STOP
        return Completion(text, num_tokens, STOP if finish == STOP else LENGTH)

    def _served_model(self) -> str:
        reply = self._request("GET", "/models", None)
        try:
            return str(reply["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ServiceError(
                f"endpoint {redact_text(self.base_url)}/models lists no model; set dataset.regenerate.model_name"
            ) from None

    def _request(self, method: str, path: str, body: Optional[dict]) -> dict:
        url = self.base_url + path
        shown = redact_text(url)  # what errors and retry warnings may print
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            request = urllib.request.Request(
                url, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code not in _RETRY_STATUS:
                    raise ServiceError(
                        f"endpoint {shown} rejected the request: HTTP {exc.code} {detail}; check "
                        "dataset.regenerate.model_name and that the server serves the target"
                    ) from None
                last = f"HTTP {exc.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = (
                    f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                )
            except ValueError as exc:  # not JSON
                last = f"invalid JSON in the reply ({exc})"
            log.warning("endpoint %s: attempt %d failed: %s", shown, attempt + 1, redact_text(last))
        raise ServiceError(
            f"endpoint {shown} failed {self.max_retries + 1} times (last: {redact_text(last)}); is the server "
            "running and reachable? check dataset.regenerate.endpoint (rerun to resume: finished "
            "conversations are kept)"
        )


def normalize_endpoint(endpoint: str) -> str:
    """The API base URL: 'http://host:port' becomes 'http://host:port/v1'."""
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(
            f"'dataset.regenerate.endpoint' {redact_text(endpoint)!r} is not an http(s) URL, e.g. "
            "http://127.0.0.1:8000/v1"
        )
    path = parsed.path.rstrip("/")
    return f"{parsed.scheme}://{parsed.netloc}{path if path else '/v1'}"


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        message = json.loads(body).get("error", body)
        if isinstance(message, dict):
            message = message.get("message", message)
    except (ValueError, AttributeError):
        message = body
    return str(message).replace("\n", " ")[:200]
