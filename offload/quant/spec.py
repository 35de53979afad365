"""Quantization specs: the short text a user writes (``hqq:4:64``, ``bnb:nf4``, ``none``) as a frozen value.

A spec says how one weight matrix is stored. It is checked when it is built, so an invalid spec never exists;
whether it fits a particular matrix is checked by the backend when that matrix is quantized, and what it
costs in bytes is ``offload.quant.linear.matrix_nbytes``. This module imports neither torch nor a backend,
so profiles and flags are checked without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.errors import QuantError

# The parts of the model that get their own spec, in the order config.json and profiles list them.
ROLES = ("attention", "experts", "gate", "embed", "lm_head")

BACKENDS = ("hqq", "bnb", "none")
HQQ_BITS = (2, 3, 4, 8)
HQQ_GROUP_SIZES = (16, 32, 64, 128)
HQQ_DEFAULT_GROUP_SIZE = 64
BNB_KINDS = {"nf4": 4, "fp4": 4, "int8": 8}  # kind -> bits per stored weight

ALLOWED = (
    "hqq:BITS[:GROUP] (bits 2, 3, 4, 8; group 16, 32, 64, 128; default 64), bnb:nf4, bnb:fp4, bnb:int8, none"
)


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is stored; ``str(spec)`` is the canonical text that ``parse`` reads back."""

    backend: str  # "hqq" | "bnb" | "none"
    bits: int | None  # hqq: 2, 3, 4, 8; bnb: 4 (nf4, fp4) or 8 (int8); none: None
    group_size: int | None  # hqq: weights per (scale, zero) pair, 16/32/64/128; else None
    kind: str | None  # bnb: "nf4" | "fp4" | "int8"; else None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise QuantError(f"invalid quantization spec {self!r}: {problem}; allowed: {ALLOWED}")

    def _problem(self) -> str:
        """Why these fields do not form a valid spec, or '' when they do."""
        if self.backend == "hqq":
            if self.bits not in HQQ_BITS:
                return f"hqq bits must be one of {HQQ_BITS}, got {self.bits}"
            if self.group_size not in HQQ_GROUP_SIZES:
                return f"hqq group size must be one of {HQQ_GROUP_SIZES}, got {self.group_size}"
            if self.kind is not None:
                return "hqq takes no kind"
        elif self.backend == "bnb":
            if self.kind not in BNB_KINDS:
                return f"bnb kind must be one of {tuple(BNB_KINDS)}, got {self.kind}"
            if self.bits != BNB_KINDS[self.kind]:
                return f"bnb:{self.kind} stores {BNB_KINDS[self.kind]} bits, got bits={self.bits}"
            if self.group_size is not None:
                return "bnb takes no group size"
        elif self.backend == "none":
            if (self.bits, self.group_size, self.kind) != (None, None, None):
                return "none takes no bits, group size or kind"
        else:
            return f"unknown backend {self.backend!r}"
        return ""

    @classmethod
    def parse(cls, text: str, where: str = "spec") -> QuantSpec:
        """Read ``hqq:4:64``, ``hqq:3`` (group 64), ``bnb:nf4``, ``bnb:fp4``, ``bnb:int8`` or ``none``.

        ``where`` names the source (a profile key, a CLI option) in the error message.
        """
        if not isinstance(text, str):
            raise QuantError(
                f"{where}: expected a quantization spec string, got {text!r}; allowed: {ALLOWED}"
            )
        parts = text.strip().lower().split(":")
        backend = parts[0]

        def fail(problem: str) -> QuantError:
            return QuantError(f"{where}: bad quantization spec {text!r} ({problem}); allowed: {ALLOWED}")

        if backend == "none" and len(parts) == 1:
            return cls("none", None, None, None)
        if backend == "bnb" and len(parts) == 2:
            kind = parts[1]
            if kind not in BNB_KINDS:
                raise fail(f"bnb kind must be one of {', '.join(BNB_KINDS)}")
            return cls("bnb", BNB_KINDS[kind], None, kind)
        if backend == "hqq" and len(parts) in (2, 3):
            bits = _parse_int(parts[1])
            if bits not in HQQ_BITS:
                raise fail(f"hqq bits must be one of {', '.join(map(str, HQQ_BITS))}")
            group_size = _parse_int(parts[2]) if len(parts) == 3 else HQQ_DEFAULT_GROUP_SIZE
            if group_size not in HQQ_GROUP_SIZES:
                raise fail(f"hqq group size must be one of {', '.join(map(str, HQQ_GROUP_SIZES))}")
            return cls("hqq", bits, group_size, None)
        if backend in BACKENDS:
            raise fail(f"wrong number of ':'-separated fields for {backend}")
        raise fail(f"unknown backend {backend!r}")

    def __str__(self) -> str:
        if self.backend == "hqq":
            return f"hqq:{self.bits}:{self.group_size}"
        if self.backend == "bnb":
            return f"bnb:{self.kind}"
        return "none"


def _parse_int(text: str) -> int | None:
    """The integer in ``text``, or None so the caller reports what is allowed."""
    return int(text) if text.isdigit() else None
