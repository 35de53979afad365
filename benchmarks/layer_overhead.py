"""Our engine's host-side time per decoder layer at decode, the figure `offload plan` uses as its per-layer overhead.

    OMP_NUM_THREADS=1 python benchmarks/layer_overhead.py --threads 1 --runs 5 --new-tokens 64

Decodes greedily on the demo model (hidden 256, FFN 448: every matmul takes microseconds, so a layer's wall time
is Python, torch's dispatch and the cache's bookkeeping) and times each decoder layer's forward, for three set-ups:
every expert resident; offloaded with K = E slots through the expert cache, every expert a hit (the GPU path's
bookkeeping, no copy); and offloaded at K = 4 over a local link with every miss copied (host compute never).
Prints the median over layers and tokens of each run, and the median over runs. On a GPU a layer's host-side
time is this, less the demo's tiny CPU matmuls (so this is an upper bound), and the GPU kernels it launches run
behind it until the layer's one synchronisation (the router's choice).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETUPS = {
    "resident": None,
    "cache, every expert a hit (K = E)": {"experts_per_layer": 8, "host_compute": "never"},
    "cache, K = 4, misses copied": {"experts_per_layer": 4, "host_compute": "never"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offload/demo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from offload.generate import SamplingParams, generate_ids
    from offload.loading import OffloadOptions, load_model

    torch.set_num_threads(args.threads)
    models = {
        name: load_model(
            args.model,
            dtype="float32",
            offload=None if options is None else OffloadOptions(prefetch=2, link="local", **options),
        )
        for name, options in SETUPS.items()
    }
    layer_seconds: list[float] = []

    def timed(forward):
        def wrapper(*a, **k):
            started = time.perf_counter()
            out = forward(*a, **k)
            layer_seconds.append(time.perf_counter() - started)
            return out

        return wrapper

    for model in models.values():
        for layer in model.model.layers:
            layer.forward = timed(layer.forward)
    config = next(iter(models.values())).config
    prompt = torch.randint(
        3, config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)
    )
    greedy = SamplingParams(temperature=0.0)
    medians: dict[str, list[float]] = {name: [] for name in models}
    token_ms: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            generate_ids(model, prompt.tolist(), max_new_tokens=4, sampling=greedy)
        for _ in range(args.runs):
            for name, model in models.items():  # interleaved, so a change in load slows every set-up alike
                layer_seconds.clear()
                started = time.perf_counter()
                generate_ids(
                    model, prompt.tolist(), max_new_tokens=args.new_tokens, sampling=greedy, stop_ids=[]
                )
                elapsed = time.perf_counter() - started
                decode = layer_seconds[config.num_hidden_layers :]  # the prefill's layers left out
                medians[name].append(statistics.median(decode))
                token_ms[name].append(elapsed / args.new_tokens * 1e3)
    result = {
        name: {
            "layer_ms_median": statistics.median(values) * 1e3,
            "layer_ms_runs": [round(v * 1e3, 4) for v in values],
            "token_ms_median": statistics.median(token_ms[name]),
        }
        for name, values in medians.items()
    }
    with open("/proc/loadavg") as handle:
        result["loadavg"] = handle.read().split()[:3]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
