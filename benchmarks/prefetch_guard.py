"""Experiment: a prefetch that may not evict the experts the previous token used at that layer.

``OffloadedExperts`` lets a guess evict any least recently used expert outside the batch of guesses.
With prefetch = K (or close to it) the guesses evict the experts the last token used, which are the
likeliest to be used again, so the cache stops working. ``GuardedPrefetch`` (here, not in the engine:
it overrides a private method, for measuring) protects them too and skips a guess that finds no slot.
Rows: resident, full, full-guarded, no-prefetch; same link, interleaved runs, medians; every row must
give the resident tokens.

    python benchmarks/prefetch_guard.py --model offload/demo -k 2 --copy-ratio 5 --runs 5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.expert_source import Expert
from offload.offloaded import OffloadedExperts


class GuardedPrefetch(OffloadedExperts):
    """OffloadedExperts whose guesses never evict an expert the previous step used at the same layer."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._last_used: dict[int, set[int]] = {}

    def experts_for(self, layer: int, needed: list[int], guesses: list[int]) -> Iterator[tuple[int, Expert]]:
        yield from super().experts_for(layer, needed, guesses)
        self._last_used[layer] = set(needed)

    def _prefetch(self, layer: int, guesses: list[int]) -> None:
        keep = set(guesses) | self._last_used.get(layer, set())
        for expert in guesses:
            if not self.cache.contains(layer, expert) and not self.cache.load(
                layer, expert, protected=keep, prefetch=True
            ):
                return  # every slot holds a guess or a recently used expert: skip the rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offload/demo")
    parser.add_argument("--experts-per-layer", "-k", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--copy-ratio", type=float, default=5.0)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from offload.ablation import build_source, materializers
    from offload.bench import torch_threads
    from offload.bench_measure import RowResult, measure_rows
    from offload.bench_prompt import bench_prompt
    from offload.expert_cache import ExpertCache
    from offload.link import EmulatedLink
    from offload.loading import OffloadOptions, load_model

    with torch_threads(args.threads):
        model = load_model(
            args.model, dtype=args.dtype, offload=OffloadOptions(experts_per_layer=1, prefetch=0)
        )
        store, k = model.expert_source.cache.store, args.experts_per_layer
        prompt, source = bench_prompt(Path(args.model), model.config.vocab_size, args.prompt_tokens)
        resident = build_source("resident", model, store, None, k, 0)
        calibration = RowResult("calibration", "", None, 0)
        measure_rows([(calibration, resident)], model, prompt, args.new_tokens, args.runs)
        layer_seconds = 1 / calibration.median("decode_tokens_per_second") / model.config.num_hidden_layers
        expert_bytes = max(store.layout(i).nbytes for i in range(store.num_layers))
        link = EmulatedLink(expert_bytes / (args.copy_ratio * layer_seconds) / 1e9)
        gates = [layer.block_sparse_moe.gate for layer in model.model.layers]
        guarded_cache = ExpertCache(store, k, link, materializers(model), device=model.device)
        rows = [
            (RowResult("resident", "", None, 0), resident),
            (
                RowResult("full", "", k, args.prefetch),
                build_source("full", model, store, link, k, args.prefetch),
            ),
            (
                RowResult("full-guarded", "", k, args.prefetch),
                GuardedPrefetch(guarded_cache, gates, args.prefetch),
            ),
            (RowResult("no-prefetch", "", k, 0), build_source("no-prefetch", model, store, link, k, 0)),
        ]
        with link:
            results = measure_rows(rows, model, prompt, args.new_tokens, args.runs)
        assert all(r.tokens == results[0].tokens for r in results), "a row changed the output"
        full = results[1].median("decode_tokens_per_second")
        print("| row | decode tok/s | / full | hit rate | recall | loads/token | wait ms/token |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            speed, tokens = r.median("decode_tokens_per_second"), r.decoded_tokens
            hit = "–" if r.decode.hit_rate is None else f"{r.decode.hit_rate:.0%}"
            recall = "–" if r.decode.prefetch_recall is None else f"{r.decode.prefetch_recall:.0%}"
            print(
                f"| {r.name} | {speed:.1f} | {speed / full:.2f} | {hit} | {recall} "
                f"| {r.decode.loads / tokens:.2f} | {r.decode.wait_seconds / tokens * 1e3:.2f} |"
            )
        print(
            f"\n{args.model}, {str(model.dtype).removeprefix('torch.')}, K={k}, prefetch {args.prefetch}, prompt "
            f"{len(prompt)} ({source}), {args.new_tokens} new tokens, medians of {args.runs} interleaved runs; "
            f"one expert copy = {args.copy_ratio:g} x one layer ({layer_seconds * 1e3:.2f} ms); "
            f"{torch.get_num_threads()} threads; same tokens in every row"
        )


if __name__ == "__main__":
    main()
