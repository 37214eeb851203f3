"""A small, real OpenAI-compatible server for tests: ``/v1/models`` and ``/v1/completions`` over
HTTP on 127.0.0.1, answered by an HF causal LM through transformers' own ``generate`` (so it is an
independent implementation of what ``HFGenerator`` does).

It accepts what specflow sends (prompt as token ids or text, ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, ``stop_token_ids``, ``skip_special_tokens``) and can misbehave on
purpose, as real servers do: answer the first N completions with HTTP 503, fail every completion
after N answers (a server that went down mid-run), or stall before answering. Start it with ``start_openai_server(model_dir)``; the handle's ``stop()`` shuts it down.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional


@dataclass
class ServerBehaviour:
    fail_first: int = 0  # completions answered with HTTP 503 before real answers
    fail_after: Optional[int] = None  # after this many answers, every completion gets HTTP 503
    delay_s: float = 0.0  # stall before answering each completion
    requests: int = 0  # completions received (answered or not)
    failed: int = 0
    prompts: list = field(default_factory=list)  # token-id prompts received, in order


class _Model:
    def __init__(self, model_dir: Path, name: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.lock = threading.Lock()  # one generate at a time; requests still arrive concurrently

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        stops = self.eos | set(body.get("stop_token_ids") or [])
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        with self.lock, torch.inference_mode():
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=int(body.get("max_tokens", 16)),
                eos_token_id=sorted(stops),
                pad_token_id=sorted(stops)[0],
                **kwargs,
            )[0, len(prompt) :].tolist()
        finish = "stop" if out and out[-1] in stops else "length"
        body_ids = out[:-1] if finish == "stop" else out
        text = self.tokenizer.decode(
            body_ids,
            skip_special_tokens=bool(body.get("skip_special_tokens", True)),
            clean_up_tokenization_spaces=False,
        )
        for s in body.get("stop") or []:  # stop strings end the text where they appear
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return {
            "id": f"cmpl-{time.monotonic_ns()}",
            "object": "text_completion",
            "model": self.name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(out),
                "total_tokens": len(prompt) + len(out),
            },
        }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model.name}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        behaviour = self.server.behaviour
        with self.server.counter_lock:
            behaviour.requests += 1
            answered = behaviour.requests - 1 - behaviour.failed
            fail = behaviour.failed < behaviour.fail_first or (
                behaviour.fail_after is not None and answered >= behaviour.fail_after
            )
            behaviour.failed += fail
        if behaviour.delay_s:
            time.sleep(behaviour.delay_s)
        if fail:
            self._send(503, {"error": {"message": "server is warming up"}})
            return
        if body.get("model") != self.server.model.name:
            self._send(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
            return
        behaviour.prompts.append(body["prompt"])
        self._send(200, self.server.model.complete(body))

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    model: _Model
    behaviour: ServerBehaviour
    counter_lock: threading.Lock


@dataclass
class OpenAIServerHandle:
    url: str  # base URL, e.g. http://127.0.0.1:PORT/v1
    behaviour: ServerBehaviour
    _server: _Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def start_openai_server(
    model_dir: Path,
    name: str = "target",
    behaviour: Optional[ServerBehaviour] = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> OpenAIServerHandle:
    """Serve ``model_dir`` on ``host:port`` (0 = any free port) from a background thread."""
    server = _Server((host, port), _Handler)
    server.model = _Model(Path(model_dir), name)
    server.behaviour = behaviour or ServerBehaviour()
    server.counter_lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, name="openai-test-server", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    return OpenAIServerHandle(
        f"http://{bound_host}:{bound_port}/v1", server.behaviour, server, thread
    )
