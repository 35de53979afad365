"""What ``offload convert`` wrote: stored bytes, bits per weight and output error, per role and spec.

The output error of a matrix is ``||W_q x - W x|| / ||W x||`` for a fixed batch of Gaussian inputs x, with
W_q dequantized from exactly the tensors that were written. It is measured on a sample (the attention
projections, the gates and lm_head, and each layer's first expert) and pooled per role and spec as
``sqrt(sum ||W_q x - W x||^2 / sum ||W x||^2)``, so a large matrix weighs as much as its outputs do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from offload.quant.linear import dequantize_linear
from offload.quant.spec import ROLES, QuantSpec

REPORT_ROLES = (*ROLES, "norms")  # norms are never quantized, but they are part of the size
PROBE_COLUMNS = 16  # input vectors per sampled matrix: enough for a stable ratio, cheap to multiply
PROBE_SEED = 0


@dataclass
class RoleReport:
    """The totals of one role stored under one spec."""

    role: str  # one of REPORT_ROLES
    spec: str  # the canonical spec text, e.g. "hqq:3:64"
    matrices: int = 0  # source tensors (an expert counts three)
    tensors: int = 0  # tensors written (codes and metadata count separately)
    weights: int = 0  # source elements
    stored_bytes: int = 0  # bytes of the tensors written, metadata included
    sampled: int = 0  # matrices whose output error was measured
    error_squared: float = 0.0  # sum of ||W_q x - W x||^2 over the sampled matrices
    reference_squared: float = 0.0  # sum of ||W x||^2 over the sampled matrices

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per source weight, metadata included."""
        return 8 * self.stored_bytes / self.weights if self.weights else 0.0

    @property
    def output_error(self) -> float | None:
        """Pooled relative output error of the sampled matrices; None when nothing was sampled."""
        if not self.sampled:
            return None
        if self.reference_squared == 0:
            return 0.0 if self.error_squared == 0 else math.inf
        return math.sqrt(self.error_squared / self.reference_squared)

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values."""
        return {
            "role": self.role,
            "spec": self.spec,
            "matrices": self.matrices,
            "tensors": self.tensors,
            "weights": self.weights,
            "stored_bytes": self.stored_bytes,
            "bits_per_weight": self.bits_per_weight,
            "output_error": self.output_error,
            "sampled": self.sampled,
        }


@dataclass
class ConvertReport:
    """The result of one ``convert_checkpoint`` run."""

    source: str  # the float checkpoint directory
    destination: str  # the converted checkpoint directory
    scheme: dict[str, Any]  # the quantization block written into config.json
    rows: list[RoleReport] = field(default_factory=list)  # ordered by REPORT_ROLES, then spec
    shards: int = 0  # safetensors files written
    total_bytes: int = 0  # bytes of every tensor written
    seconds: float = 0.0  # wall time of the conversion

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per source weight over the whole model."""
        weights = sum(row.weights for row in self.rows)
        return 8 * self.total_bytes / weights if weights else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The report as one JSON-ready object (what ``offload convert --json`` prints)."""
        return {
            "source": self.source,
            "destination": self.destination,
            "quantization": self.scheme,
            "roles": [row.as_dict() for row in self.rows],
            "shards": self.shards,
            "total_bytes": self.total_bytes,
            "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds,
        }


class ReportBuilder:
    """Collects rows while convert streams; ``build`` orders them."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], RoleReport] = {}
        self._probes: dict[int, Tensor] = {}

    def row(self, role: str, spec: QuantSpec | str) -> RoleReport:
        """The row of ``role`` under ``spec``, made on first use."""
        key = (role, str(spec))
        if key not in self._rows:
            self._rows[key] = RoleReport(role, str(spec))
        return self._rows[key]

    def add(
        self, role: str, spec: QuantSpec | str, stored: dict[str, Tensor], *, matrices: int, weights: int
    ) -> int:
        """Count tensors written for ``matrices`` source tensors of ``weights`` elements; returns their bytes."""
        nbytes = sum(tensor.numel() * tensor.element_size() for tensor in stored.values())
        row = self.row(role, spec)
        row.matrices += matrices
        row.tensors += len(stored)
        row.weights += weights
        row.stored_bytes += nbytes
        return nbytes

    def sample(self, role: str, spec: QuantSpec, weight: Tensor, stored: dict[str, Tensor]) -> None:
        """Measure one matrix's output error: ``weight`` is the source (out, in), ``stored`` what was written."""
        probe = self._probe(weight.shape[1])
        restored = dequantize_linear(stored, spec, torch.float32, "cpu")
        reference = weight.float() @ probe  # (out, PROBE_COLUMNS)
        row = self.row(role, spec)
        row.sampled += 1
        row.error_squared += (restored @ probe - reference).square().sum().item()
        row.reference_squared += reference.square().sum().item()

    def _probe(self, width: int) -> Tensor:
        # One seeded batch per input width, so every matrix of that width sees the same inputs on every run.
        if width not in self._probes:
            generator = torch.Generator().manual_seed(PROBE_SEED)
            self._probes[width] = torch.randn(width, PROBE_COLUMNS, generator=generator)
        return self._probes[width]

    def build(self, report: ConvertReport) -> ConvertReport:
        """Fill ``report``'s rows and total, in role order."""
        order = {role: index for index, role in enumerate(REPORT_ROLES)}
        report.rows = sorted(self._rows.values(), key=lambda row: (order[row.role], row.spec))
        report.total_bytes = sum(row.stored_bytes for row in report.rows)
        return report
