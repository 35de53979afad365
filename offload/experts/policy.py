"""Which expert a full layer of the device cache evicts: the policies shared by the engine's
``ExpertCache`` and ``offload.trace.replay``, so that a replayed trace gives the engine's very counters.

- ``lru``: the least recently used expert (the paper's policy, arXiv 2312.17238).
- ``lrfu``: the expert with the smallest decayed use count. After each step of a layer, every
  expert's count is multiplied by ``LRFU_DECAY`` and each expert the step used gets +1; ties go to
  the least recently used. It keeps experts that a layer returns to often, where LRU drops them
  after one quiet spell (docs/BENCHMARKS.md, "Cache policy").

The host tier (issue 17) is one pool of experts of every layer, so its victim weighs experts of
different layers; its default, ``adaptive`` (``offload.experts.adaptive_policy``), follows whichever of
``cyclic`` and an estimate of each expert's next request has lately missed less. ``cyclic``
(``choose_cyclic_victim``): a token visits layers 0..L-1 in
order, so an expert of layer l' is next wanted when the model next reaches l', and among experts the
tier is asked for about equally often, the one whose layer comes round last goes (Belady's rule on the
cycle). Its counts are the tier's own requests, not every routed expert: behind a device cache, the
experts used most are the device's hits and never reach the tier; and they start again with each prompt
(``forget_requests``): one prompt's experts say little about the next one's, and a tier still weighing
the last prompt's reads up to 1.6x as much. An expert that the device holds counts for less: the tier's
copy serves nothing until the device evicts it (docs/BENCHMARKS.md, "Disk tier").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

CACHE_POLICIES = ("lrfu", "lru")
DEFAULT_CACHE_POLICY = "lrfu"
LRFU_DECAY = 0.9  # a use counts half after about 7 steps of its layer
# The host tier's policies; adaptive and cyclic count requests, see above.
HOST_TIER_POLICIES = ("adaptive", "cyclic", "lrfu", "lru")
DEFAULT_HOST_POLICY = "adaptive"
# The figures below are disk reads over Belady's on the seven demo traces of docs/BENCHMARKS.md ("Disk
# tier"), K = 0 / 2 / 4 device slots, a tier of half the experts; tuned on those traces.
# cyclic's request counts: a request counts half after about 700 steps of its layer. Slow decays read
# fewer bytes within a prompt (0.9: 1.81 / 1.44 / 1.51x; 0.98: 1.61 / 1.29 / 1.31x; 0.999: 1.46 / 1.29 /
# 1.30x; none: the same), and the counts start again with each prompt anyway.
CYCLIC_DECAY = 0.999
# What one layer step nearer is worth, in requests: enough to order experts whose counts differ only
# by the decay's rounding (two experts asked for once, a few steps apart), too little to override a
# real difference of one request (0: 1.50 / 1.30 / 1.30x; 0.05 to 0.3 within 0.02 of 0.1; 0.5: 1.49x at K = 0).
CYCLIC_STEP_WEIGHT = 0.1
# What a request of an expert that the device holds is worth: 0.8 reads 2.5 to 6.5% fewer bytes than 1
# at K = 1 to 4 (0.7 and 0.9 about as few; 0.5 and below more at K = 1 to 3).
CYCLIC_DEVICE_WEIGHT = 0.8
# How much more than its victim a guess must be worth for the host tier to evict for it (worth: cyclic's
# ``cyclic_worth``, lrfu's decayed uses): more than GUESS_FACTOR times the victim's worth (when positive) plus
# GUESS_MARGIN. A right guess saves a wait but no read (the step would have read it anyway); a wrong one costs
# a read and maybe its victim's. Disk reads over those of --prefetch 0 in the engine on three demo prompts
# (docs/BENCHMARKS.md, "The engine's tier under cyclic"), K = 0 / 2: evicting for every guess 1.68 / 1.77x;
# factor 1, margin 0: 1.08 / 1.27x; margin 3: 1.03 / 1.13x; margin 6: 1.01 / 1.07x; factor 2, margin 1: 1.002
# / 1.03x; factor 1.5, margin 1: 1.006 / 1.05x, with 3 / 10% of the demand misses read early instead. Counts
# grow through a prompt (CYCLIC_DECAY is slow), so a factor keeps the bar where a fixed margin would sink.
GUESS_FACTOR = 1.5
GUESS_MARGIN = 1.0


def age_uses(uses: list[float], used: Iterable[int], decay: float = LRFU_DECAY) -> None:
    """One step of a layer: decay every expert's count in place, then count one use of each of ``used``."""
    for expert in range(len(uses)):
        uses[expert] *= decay
    for expert in used:
        uses[expert] += 1.0


def choose_victim(policy: str, candidates: Sequence[int], uses: Sequence[float]) -> int:
    """The expert that a full layer evicts under ``policy`` (one of CACHE_POLICIES).

    ``candidates`` are the experts that may go, least recently used first; ``uses`` are the layer's
    decayed use counts (``age_uses``), which only lrfu reads.
    """
    if policy == "lru":
        return candidates[0]
    assert policy == "lrfu", f"unknown cache policy {policy!r}"
    # min() keeps the first of equal counts: ties go to the least recently used.
    return min(candidates, key=uses.__getitem__)


def cycle_distance(layer: int, now: int, num_layers: int) -> int:
    """Layer steps from layer ``now`` until the model next runs ``layer``: later in this token (1 to L-1),
    else in the next token (L for ``now`` itself)."""
    return (layer - now) % num_layers or num_layers


def starts_prompt(layer: int, used: Collection[int], top_k: int) -> bool:
    """Whether a step of ``layer`` that used ``used`` begins a prompt: a first layer using more experts
    than one token can (a prefill of several tokens; a decode step uses exactly ``top_k``)."""
    return layer == 0 and len(used) > top_k


def forget_requests(requests: list[list[float]]) -> None:
    """A new prompt: cyclic's counts start again from nothing (the experts in the tier stay)."""
    for row in requests:
        row[:] = [0.0] * len(row)


def choose_cyclic_victim(
    candidates: Sequence[tuple[int, int]],
    requests: Sequence[Sequence[float]],
    now: int,
    num_layers: int,
    on_device: Callable[[int, int], bool] | None = None,
) -> tuple[int, int]:
    """The (layer, expert) that the host tier evicts while serving layer ``now``: the smallest
    ``requests[layer][expert]`` (times ``CYCLIC_DEVICE_WEIGHT`` when ``on_device(layer, expert)``)
    ``- CYCLIC_STEP_WEIGHT * cycle_distance(layer, now, num_layers)``.

    ``candidates`` are the evictable experts, least recently requested first (ties go to the first);
    ``requests`` are each layer's decayed counts of what it asked the tier for since the prompt began:
    after each step of a layer, ``forget_requests`` if the step ``starts_prompt``, then ``age_uses`` with
    ``CYCLIC_DECAY`` and the experts the step asked the tier for. ``on_device`` says whether the device's
    slots hold an expert (None: no device cache, as when the host computes every expert from the tier).
    """

    return min(candidates, key=lambda key: cyclic_worth(key, requests, now, num_layers, on_device))


def cyclic_worth(
    key: tuple[int, int],
    requests: Sequence[Sequence[float]],
    now: int,
    num_layers: int,
    on_device: Callable[[int, int], bool] | None = None,
) -> float:
    """What keeping (layer, expert) in the host tier is worth under cyclic while the model serves layer
    ``now``: its requests (times ``CYCLIC_DEVICE_WEIGHT`` if the device holds it) less
    ``CYCLIC_STEP_WEIGHT`` per layer step until the model reaches its layer (``choose_cyclic_victim``)."""
    layer, expert = key
    count = requests[layer][expert]
    if on_device is not None and on_device(layer, expert):
        count *= CYCLIC_DEVICE_WEIGHT
    return count - CYCLIC_STEP_WEIGHT * cycle_distance(layer, now, num_layers)


def guess_may_evict(policy: str, victim_worth: float, guess_worth: float) -> bool:
    """Whether the host tier evicts its victim to read a guess (an expert the next layer may ask for) early:
    only for a guess worth more than ``GUESS_FACTOR`` times the victim (when that is positive) plus
    ``GUESS_MARGIN`` under the same policy (``cyclic_worth``; lrfu's decayed use counts). lru has no worth to
    compare, so its guesses only fill free slots.
    """
    if policy == "lru":
        return False
    return max(victim_worth, GUESS_FACTOR * victim_worth) + GUESS_MARGIN < guess_worth
