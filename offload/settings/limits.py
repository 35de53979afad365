"""The sampling settings' ranges, declared once: the flags (``cli.options``), chat's ``/set`` and a profile's
[generation] table check against these, so that each error states the same range.

``offload.generate.SamplingParams`` enforces them in the engine, importing them from here (this module must not
import torch: ``offload --help`` and ``offload profiles`` stay quick).
"""

from __future__ import annotations

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0  # beyond these, logits / temperature overflow or go flat
MAX_SEED = (1 << 64) - 1  # what torch.Generator.manual_seed takes
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0  # beyond these, penalized logits overflow or a penalty means nothing
MAX_TOP_K = 1 << 31  # far above any vocabulary; the serve API takes the same
MAX_OPENAI_PENALTY = 2.0  # presence and frequency penalties: OpenAI's range, -2 to 2
MAX_LOGIT_BIAS = 100.0  # OpenAI's range, -100 to 100: -100 bans a token, 100 all but forces it
TEMPERATURES = f"0 (greedy) or {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"  # as errors state the range


def temperature_allowed(value: float) -> bool:
    """0 (greedy), or a temperature at which logits divided by it stay finite and still differ (NaN: False)."""
    return value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE
