"""What the router tells the host tier beyond its top-k (issue 17): each gate's full probabilities, and the later
layers' gates applied to this layer's input (cross-layer lookahead), as predictors of the tier's next requests,
and as bonuses on cyclic's worth, on disk_tier_replay.py's traces. Markdown on stdout.

For each prompt it loads the model once (every expert resident, as `offload trace record`), generates greedily
and records the trace and, per token and layer l, softmax(gate_l'(x_l)) for every layer l' (x_l: layer l's MoE
input): l' = l is the router's own distribution, l' > l a guess for a later layer of the same token. Then:

- how well each signal ranks the experts the next visit of a layer asks for (AUC: the chance that an expert
  asked for outranks one not asked for; 0.5 is chance), on single-token steps;
- disk reads over Belady's at K = 0 (every access reaches the tier, so requests are the routing), H x L slots,
  with cyclic's worth plus b x the lookahead probability of a later layer's expert and g x the router's last
  probability of an expert's layer (b = g = 0: cyclic itself).

    python benchmarks/host_policy_signals.py --out /tmp/offload-signals [--model DIR] [--held-out]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.disk_tier_replay import HELD_OUT_PROMPTS, PROMPTS  # noqa: E402

BONUSES = ((0, 0), (1, 0), (3, 0), (10, 0), (0, 1), (0, 3), (0, 10), (3, 3))  # (b, g)


def record(out: Path, model: str | None, prompts: tuple) -> list[tuple[object, object]]:
    """(trace, probabilities (S, L, L', E): each step's largest over its tokens) per prompt, recorded unless in ``out``."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.numpy import load_file, save_file

    from cli.trace_cmd import _with_guesses
    from offload.engine import Engine, resolve_model
    from offload.trace.format import load_trace, save_trace
    from offload.trace.recorder import TraceRecorder

    engine = None
    found = []
    for name, prompt, chat, tokens in prompts:
        trace_path, probs_path = out / f"{name}.trace", out / f"{name}.probs.safetensors"
        if not probs_path.exists():
            if engine is None:
                torch.set_num_threads(1)
                engine = Engine.load(_with_guesses(resolve_model(model)))
            layers = engine.model.model.layers
            gates = [layer.block_sparse_moe.gate.weight.float() for layer in layers]
            rows: list[list[np.ndarray]] = [[] for _ in layers]
            with TraceRecorder(engine.model, model_name=name) as recorder:

                def hook(
                    layer: int, module: object, args: tuple, output: object, rows=rows, gates=gates
                ) -> None:
                    if recorder._pending is None or any(w.speculating for w in recorder._wrappers):
                        return  # the prefetcher's own gate call, not routing
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    probs = torch.stack([torch.softmax(F.linear(x, g), -1) for g in gates], 1)
                    rows[layer].append(probs.numpy())

                hooks = [layer.block_sparse_moe.gate.register_forward_hook(partial(hook, i))
                         for i, layer in enumerate(layers)]  # fmt: skip
                ids = engine.prompt_ids(prompt, chat=chat)
                for _ in engine.stream(ids, max_new_tokens=tokens, sampling=engine.sampling(temperature=0)):
                    pass
                for handle in hooks:
                    handle.remove()
            trace = recorder.trace()
            per_token = np.stack([np.concatenate(r) for r in rows], 1)  # (N, L, L', E)
            ends = np.cumsum(trace.step_tokens)
            per_step = np.stack(
                [per_token[e - n : e].max(0) for e, n in zip(ends, trace.step_tokens, strict=True)]
            )
            save_trace(trace, trace_path)
            save_file({"probs": np.ascontiguousarray(per_step, dtype=np.float32)}, str(probs_path))
        found.append((load_trace(trace_path), load_file(str(probs_path))["probs"]))
    return found


def auc(scores: list[float], labels: list[bool]) -> float:
    """The chance that a positive outranks a negative (ties half), by ranks."""
    import numpy as np

    values = np.asarray(scores, dtype=float)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties share their average rank
    labels_ = np.asarray(labels, bool)
    positives = int(labels_.sum())
    negatives = len(labels_) - positives
    return float((ranks[labels_].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def signals(found: list) -> dict[str, float]:
    """Each predictor's AUC for the experts a layer's next visit asks for."""
    import numpy as np

    pairs: dict[str, tuple[list, list]] = {}
    for trace, probs in found:
        used, layers = trace.used, trace.num_layers
        recent = np.zeros((layers, trace.num_experts))  # requests decayed by 0.9 per visit
        counts = np.zeros((layers, trace.num_experts))  # since the prompt began
        for step in range(trace.steps - 1):
            single = trace.step_tokens[step] == 1 and trace.step_tokens[step + 1] == 1
            for layer in range(layers):
                if single:
                    nxt = used[step + 1, layer]
                    for name, score in (("its own last request (the token before)", used[step, layer]),
                                        ("its router probability at the token before", probs[step, layer, layer]),
                                        ("its requests since the prompt began", counts[layer]),
                                        ("its requests, decayed by 0.9 a visit", recent[layer])):  # fmt: skip
                        pairs.setdefault(f"next token: {name}", ([], []))[0].extend(score)
                        pairs[f"next token: {name}"][1].extend(nxt)
                    for later in range(layer + 1, layers):
                        name = (
                            f"this token, {later - layer} layer(s) on: the later gate on this layer's input"
                        )
                        pairs.setdefault(name, ([], []))[0].extend(probs[step, layer, later])
                        pairs[name][1].extend(used[step, later])
                recent[layer] = 0.9 * recent[layer] + used[step, layer]
                counts[layer] += used[step, layer]
    return {name: auc(scores, labels) for name, (scores, labels) in pairs.items()}


def bonus_reads(trace, probs, slots: int, b: float, g: float) -> int:
    """K = 0: cyclic's worth + b x lookahead probability (later layers) + g x the router's last probability."""
    from offload.experts.policy import CYCLIC_DECAY, age_uses, cyclic_worth, starts_prompt

    layers, experts = trace.num_layers, trace.num_experts
    counts = [[0.0] * experts for _ in range(layers)]
    last = [[0.0] * experts for _ in range(layers)]  # the router's probabilities at the layer's last visit
    held: dict[tuple[int, int], int] = {}
    reads = tick = 0
    for step in range(trace.steps):
        for now in range(layers):
            asked = trace.needed_by_layer[now][step]
            keys = [(now, e) for e in asked]

            def worth(key: tuple[int, int], step: int = step, now: int = now) -> float:
                layer, expert = key
                ahead = probs[step, now, layer, expert] if layer > now else 0.0
                return cyclic_worth(key, counts, now, layers) + b * ahead + g * last[layer][expert]

            for key in [key for key in keys if key not in held]:
                reads += 1
                if len(held) >= slots:
                    candidates = sorted((o for o in held if o not in keys), key=held.__getitem__)
                    if not candidates:
                        continue
                    del held[min(candidates, key=worth)]
                held[key] = 0
            for key in keys:
                if key in held:
                    tick += 1
                    held[key] = tick
            if starts_prompt(now, asked, trace.top_k):
                for row in counts:
                    row[:] = [0.0] * experts
            age_uses(counts[now], asked, CYCLIC_DECAY)
            last[now] = list(probs[step, now, now])
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/offload-signals"), help="traces and probabilities"
    )
    parser.add_argument("--model", help="default: the demo model")
    parser.add_argument("--host-experts", type=int, default=4, help="H: the host tier holds H x L experts")
    parser.add_argument("--held-out", action="store_true", help="disk_tier_replay.py's HELD_OUT_PROMPTS")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from offload.trace.replay_tiers import replay_two_level

    found = record(args.out, args.model, HELD_OUT_PROMPTS if args.held_out else PROMPTS)
    print("| predictor of a layer's next requests | AUC |\n|---|---|")
    for name, value in signals(found).items():
        print(f"| {name} | {value:.3f} |")
    slots = args.host_experts * found[0][0].num_layers
    optimum = sum(replay_two_level(t, "lru", 0, "belady", slots).host_misses for t, _ in found)
    print(
        "\n| K | b (lookahead) | g (last probability) | disk reads | reads / Belady |\n|---|---|---|---|---|"
    )
    for b, g in BONUSES:
        reads = sum(bonus_reads(t, p, slots, b, g) for t, p in found)
        print(f"| 0 | {b} | {g} | {reads} | {reads / optimum:.3f} |")


if __name__ == "__main__":
    main()
