"""Cache policies on demo-model traces: LRU, LRFU, LFU and Belady hit rates and loads, as markdown.

Records the traces of docs/BENCHMARKS.md, "Cache policy", with the engine itself (the same as
`offload trace record`), then replays them (the same as `offload trace replay`):
- ``demo``: the first 1,500 characters of held-out prose document 0 as a chat message, then 128
  greedy tokens with 2 prefetch guesses per layer (docs/DEMO_MODEL.md's trace);
- ``0``, ``1``, ``2``: the first 400 characters of held-out prose documents 0, 7 and 14, then up to
  600 tokens sampled at temperature 0.7 with seeds 0, 1 and 2, as raw completions, no guesses.
The held-out documents come from `scripts/build_demo_corpus.py` (offline, deterministic).

    python benchmarks/cache_policy.py --corpus-cache /tmp/offload-demo/corpus.json -k 3-5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

POLICIES = ("lru", "lrfu", "lfu", "belady")


def record(
    model: str, text: str, chat: bool, new_tokens: int, prefetch: int, temperature: float, seed: int
) -> Any:
    """The routing trace of one reply to ``text`` (``chat``: in the chat template; else a raw completion)."""
    from offload.config import ModelConfig
    from offload.engine import Engine
    from offload.settings.flags import LoadFlags
    from offload.trace.recorder import TraceRecorder

    experts = ModelConfig.from_file(Path(model) / "config.json").num_local_experts
    # A cache with a slot for every expert, so that the prefetcher runs and records its guesses.
    engine = Engine.load(model, LoadFlags(experts_per_layer=experts, prefetch=prefetch))
    prompt_ids = engine.prompt_ids(text, chat=chat)
    sampling = engine.sampling(temperature=temperature, seed=seed)
    with TraceRecorder(engine.model, model_name="demo") as recorder:
        for _ in engine.stream(prompt_ids, max_new_tokens=new_tokens, sampling=sampling):
            pass
    return recorder.trace()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "offload" / "demo"))
    parser.add_argument("--corpus-cache", type=Path, default=None, help="corpus JSON (built when missing)")
    parser.add_argument("-k", "--experts-per-layer", default="3-5", help="a range such as 3-5")
    args = parser.parse_args()
    import build_demo_corpus

    from offload.trace.replay import replay

    docs = build_demo_corpus.load_or_build(args.corpus_cache)["eval"]["docs"]
    low, _, high = args.experts_per_layer.partition("-")
    ks = range(int(low), int(high or low) + 1)
    traces = {"demo": record(args.model, docs[0]["text"][:1500], True, 128, 2, 0.0, 0)}
    for seed, doc in enumerate((0, 7, 14)):
        traces[str(seed)] = record(args.model, docs[doc]["text"][:400], False, 600, 0, 0.7, seed)
    print("| trace (steps) | K | LRU | LRFU | LFU | Belady | loads / Belady: LRU | LRFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, trace in traces.items():
        for k in ks:
            results = {policy: replay(trace, policy, k) for policy in POLICIES}
            belady = results["belady"].loads
            label = f"{name} ({trace.steps})" if k == ks[0] else name
            rates = " | ".join(f"{results[policy].hit_rate:.1%}" for policy in POLICIES)
            print(
                f"| {label} | {k} | {rates} | {results['lru'].loads / belady:.2f} "
                f"| {results['lrfu'].loads / belady:.2f} |"
            )


if __name__ == "__main__":
    main()
