"""Decode speed through `offload serve` against the engine called directly, on the same checkpoint.

Direct: `Engine.stream` in this process, as `offload generate` runs it. Served: one `offload serve`
process, read by a streaming client here. Both use the same thread count and alternate greedy runs
of the same raw prompt (the demo model loops on it, so every run decodes all ``--tokens``), so a
change in machine load hits both alike. Reported: the engine's own decode tok/s both ways, and the
decode tok/s a client sees (first streamed token to last); medians over ``--pairs``.

    python benchmarks/serve_overhead.py --pairs 10 --tokens 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from offload.engine import Engine, resolve_model  # noqa: E402
from offload.settings.flags import LoadFlags  # noqa: E402
from tests.serve_helpers import LiveServer  # noqa: E402

PROMPT = "def main("


def direct(engine: Engine, tokens: int) -> tuple[str, float]:
    """(text, the engine's decode tok/s) of one greedy run in this process."""
    prompt_ids = engine.prompt_ids(PROMPT, chat=False)
    sampling = engine.sampling(temperature=0.0)
    pieces, last = [], None
    for last in engine.stream(prompt_ids, max_new_tokens=tokens, sampling=sampling):
        pieces.append(last.text)
    return "".join(pieces), last.timings.decode_tokens_per_second


def served(url: str, tokens: int) -> tuple[str, float, float]:
    """(text, the server's decode tok/s, the client's decode tok/s) of one streamed greedy run."""
    body = {
        "prompt": PROMPT,
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pieces, arrivals, figures, usage = [], [], {}, {}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            usage = chunk.get("usage") or usage
            if not chunk["choices"]:
                continue
            text = chunk["choices"][0]["text"]
            if text:
                pieces.append(text)
                arrivals.append(time.perf_counter())
            figures = chunk.get("offload", figures)
    # From the first text to the last: the tokens after the first, as the prefill makes the first.
    client = (usage["completion_tokens"] - 1) / (arrivals[-1] - arrivals[0])
    return "".join(pieces), figures["decode_tokens_per_second"], client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    engine = Engine.load(resolve_model(None, LoadFlags(threads=args.threads)))
    threads = str(args.threads)
    server = LiveServer(Path(tempfile.mkdtemp()), "--threads", threads, env={"OMP_NUM_THREADS": threads})
    try:
        direct_rates, server_rates, client_rates = [], [], []
        for _ in range(args.pairs):
            text_direct, rate_direct = direct(engine, args.tokens)
            text_served, rate_server, rate_client = served(server.url, args.tokens)
            if text_direct != text_served:
                raise SystemExit("the served text differs from the direct one")
            direct_rates.append(rate_direct)
            server_rates.append(rate_server)
            client_rates.append(rate_client)
    finally:
        server.stop()
    median = statistics.median
    print(f"pairs {args.pairs}, {args.tokens} tokens each, --threads {args.threads}")
    print(f"direct (Engine.stream, as generate): {median(direct_rates):.1f} tok/s")
    print(f"served, engine's figure:             {median(server_rates):.1f} tok/s")
    print(f"served, as the client sees it:       {median(client_rates):.1f} tok/s (first text to last)")
    for name, rates in (("engine's figure", server_rates), ("client's figure", client_rates)):
        ratios = [s / d for s, d in zip(rates, direct_rates, strict=True)]
        print(f"served / direct, {name}, median of pairs: {median(ratios):.3f}")


if __name__ == "__main__":
    main()
