"""Where decode time goes: cProfile of greedy decoding, with the same settings `offload generate` takes.

    python benchmarks/profile_decode.py --model offload/demo -k 2 --prefetch 2 --new-tokens 32
    python benchmarks/profile_decode.py --model M --device cuda -k 4 --new-tokens 32   # host time on a GPU

One warm-up run fills the cache; the second run is profiled. Prints decode ms per token, the cache
counters of the profiled run, and the functions with the most own time and the most time below them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offload/demo")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--experts-per-layer", "-k", default=None)
    parser.add_argument("--prefetch", type=int, default=None)
    parser.add_argument("--link", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import torch

    from offload.config import ModelConfig
    from offload.generate import SamplingParams, generate_ids
    from offload.loading import load_model
    from offload.settings.flags import LoadFlags
    from offload.settings.resolve import resolve_settings

    config = ModelConfig.from_file(Path(args.model) / "config.json")
    flags = dict(device=args.device, dtype=args.dtype, experts_per_layer=args.experts_per_layer)
    flags.update(prefetch=args.prefetch, link=args.link)
    settings = resolve_settings(config, LoadFlags(**flags))
    model = load_model(
        args.model,
        device=settings.device,
        dtype=settings.dtype,
        quant=settings.quant,
        offload=settings.offload,
    )
    prompt = torch.randint(
        3, config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)
    )

    def decode() -> float:
        started = time.perf_counter()
        generate_ids(
            model,
            prompt.tolist(),
            max_new_tokens=args.new_tokens,
            sampling=SamplingParams(temperature=0),
            stop_ids=(),
        )
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - started

    decode()  # warm-up: fills the cache, compiles nothing, allocates the KV cache once
    source = model.expert_source
    source.reset_stats()
    profiler = cProfile.Profile()
    seconds = profiler.runcall(decode)
    print(
        f"{args.model} on {model.device} ({model.dtype}, experts {model.quant_scheme.expert_spec(0)}), "
        f"K={settings.offload.experts_per_layer}, prefetch {settings.offload.prefetch}, link {settings.offload.link}: "
        f"{args.prompt_tokens} + {args.new_tokens} tokens in {seconds * 1e3:.1f} ms under the profiler"
    )
    if source.stats is not None:
        total = source.stats.total()
        print(
            f"cache: {total.accesses} accesses, {total.hits} hits, {total.loads} loads "
            f"({total.prefetch_loads} prefetched), {total.wait_seconds * 1e3:.1f} ms blocked on the link"
        )
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.top)
        print(f"\n== by {order}\n" + text.getvalue().split("\n\n", 2)[-1])


if __name__ == "__main__":
    main()
