"""Fidelity of each quantization spec on the demo model: top-1 agreement, perplexity and KL against float.

The demo model is loaded with our loader (``offload.loading.load_model``, experts resident on the CPU)
once in float and once per spec, quantized at load time. Both run teacher-forced over the held-out split
of scripts/build_demo_corpus.py, tokenized and cut into windows exactly as scripts/eval_demo.py does. Per
spec: the share of predicted positions where the quantized argmax equals the float argmax, the quantized
model's perplexity and its rise over float, and the mean KL(float || quantized) in nats per token. The
reference is always the fp32 float model; each row computes in the dtype it names.

    nice -n 10 .venv/bin/python benchmarks/quant_fidelity.py --corpus-cache /tmp/offload-demo/corpus.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # the sibling scripts are not a package

from offload.config import ModelConfig  # noqa: E402
from offload.errors import OffloadError  # noqa: E402
from offload.loading import load_model  # noqa: E402
from offload.model import MixtralModel  # noqa: E402
from offload.quant.scheme import QuantScheme  # noqa: E402
from offload.settings.profile import load_profile  # noqa: E402

ATTENTION = "hqq:4:64"
EXPERT_SPECS = ("hqq:3:64", "hqq:2:16", "hqq:4:64", "hqq:8:64", "bnb:nf4", "bnb:fp4", "bnb:int8")
EXPERTS_ONLY = ("hqq:3:64", "hqq:2:16")
PROFILE = "laptop-8gb"
BAR = {"attention": "hqq:4:64", "experts": "hqq:3:64", "agreement": 0.90, "ppl_rise": 0.15}


@dataclass
class Tally:
    """Sums over predicted positions of a quantized model against the float reference."""

    tokens: int = 0
    agree: int = 0
    nll: float = 0.0  # the quantized model's next-token NLL, summed (nats)
    reference_nll: float = 0.0
    kl: float = 0.0  # KL(float || quantized), summed (nats)

    def add(self, reference: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Add (B, T, V) logits that predict the (B, T) ``labels``; ``reference`` is the float model's."""
        ref = torch.log_softmax(reference.float(), dim=-1)
        quant = torch.log_softmax(logits.float(), dim=-1)
        self.tokens += labels.numel()
        self.agree += int((ref.argmax(-1) == quant.argmax(-1)).sum())
        self.nll -= float(quant.gather(-1, labels[..., None]).sum())
        self.reference_nll -= float(ref.gather(-1, labels[..., None]).sum())
        self.kl += float((ref.exp() * (ref - quant)).sum())

    def summary(self) -> dict[str, float]:
        """Agreement, both perplexities, the relative rise and the mean KL per token."""
        perplexity = math.exp(self.nll / self.tokens)
        reference = math.exp(self.reference_nll / self.tokens)
        return {
            "tokens": self.tokens,
            "agreement": self.agree / self.tokens,
            "perplexity": perplexity,
            "reference_perplexity": reference,
            "ppl_rise": perplexity / reference - 1,
            "kl": self.kl / self.tokens,
        }


@dataclass(frozen=True)
class Row:
    label: str
    scheme: QuantScheme
    dtype: str = "float32"


def held_out_rows(corpus_cache: Path | None, tokenizer: Path, seq_len: int) -> Tensor:
    """The held-out split as (N, seq_len) token rows, as scripts/eval_demo.py builds them."""
    import build_demo_corpus
    import train_demo

    from offload.tokenizer import Tokenizer

    chat = Tokenizer.from_file(tokenizer)
    held_out = build_demo_corpus.load_or_build(corpus_cache, seed=0)["eval"]
    return train_demo.windows(train_demo.tokenize(held_out, chat), seq_len)


@torch.no_grad()
def compare(reference: MixtralModel, model: MixtralModel, rows: Tensor, batch_size: int) -> Tally:
    """Teacher-forced logits of both models over ``rows``; each row's last position predicts nothing."""
    tally = Tally()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        tally.add(reference(batch)[:, :-1], model(batch)[:, :-1], batch[:, 1:])
    return tally


def plan(num_layers: int, config: ModelConfig, extra: list[str], bf16: bool) -> list[Row]:
    """The rows to measure: float, attention + each expert spec, each part alone, the GPU profile."""
    build = QuantScheme.build
    rows = [Row("float", build(num_layers))]
    if bf16:
        rows.append(Row("float", build(num_layers), "bfloat16"))
    for experts in (*EXPERT_SPECS, *extra):
        rows.append(Row("attention + experts", build(num_layers, attention=ATTENTION, experts=experts)))
        if bf16 and (ATTENTION, experts) == (BAR["attention"], BAR["experts"]):
            rows.append(Row("attention + experts", rows[-1].scheme, "bfloat16"))
    rows.append(Row("attention only", build(num_layers, attention=ATTENTION)))
    rows += [Row("experts only", build(num_layers, experts=experts)) for experts in EXPERTS_ONLY]
    resolved = load_profile(PROFILE).for_model(config)
    rows.append(Row(f"profile `{PROFILE}`", QuantScheme.from_profile(resolved)))
    return rows


def describe(scheme: QuantScheme) -> tuple[str, str]:
    """The attention spec and the expert spec(s) as table cells, plus any other quantized role."""
    experts = sorted({str(scheme.expert_spec(layer)) for layer in range(max(len(scheme.experts), 1))})
    others = [
        f"{role} {getattr(scheme, role)}"
        for role in ("gate", "lm_head")
        if str(getattr(scheme, role)) != "none"
    ]
    return str(scheme.attention), ", ".join(experts) + (f" ({'; '.join(others)})" if others else "")


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| row | attention | experts | compute | tokens | top-1 agreement | perplexity | ppl rise | KL (nats/token) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['label']} | `{r['attention']}` | `{r['experts']}` | {r['dtype']} |"
        if "error" in r:
            lines.append(f"{head} – | fails: {r['error']} | | | |")
            continue
        lines.append(
            f"{head} {r['tokens']} | {100 * r['agreement']:.2f}% | {r['perplexity']:.3f} |"
            f" {100 * r['ppl_rise']:+.2f}% | {r['kl']:.4f} |"
        )
    return "\n".join(lines)


def verdict(results: list[dict]) -> str:
    """Whether the fp32 attention + experts row of the bar's specs meets it."""
    for r in results:
        if (r["attention"], r["experts"], r["dtype"]) == (BAR["attention"], BAR["experts"], "float32"):
            met = "error" not in r and r["agreement"] >= BAR["agreement"] and r["ppl_rise"] <= BAR["ppl_rise"]
            return (
                f">= {100 * BAR['agreement']:.0f}% agreement and <= {100 * BAR['ppl_rise']:.0f}% ppl rise for"
                f" {BAR['attention']} attention + {BAR['experts']} experts: {'met' if met else 'not met'}"
            )
    return "the bar's row was not measured"


def main() -> None:
    """Measure every row and print the Markdown table (and JSON when asked)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "offload" / "demo", help="float model directory")
    parser.add_argument("--corpus-cache", type=Path, default=None, help="corpus JSON (built if missing)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length (training used 256)")
    parser.add_argument("--rows", type=int, default=None, help="use only the first N windows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--extra-experts", nargs="*", default=[], help="more expert specs with the attention")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows = held_out_rows(args.corpus_cache, args.model / "tokenizer.json", args.seq_len)[: args.rows]
    config = ModelConfig.from_file(args.model / "config.json")
    reference = load_model(args.model, dtype="float32", device="cpu", quant=None)
    results = []
    for row in plan(config.num_hidden_layers, config, args.extra_experts, not args.no_bf16):
        attention, experts = describe(row.scheme)
        result = {"label": row.label, "attention": attention, "experts": experts, "dtype": row.dtype}
        started = time.perf_counter()
        try:
            model = load_model(args.model, dtype=row.dtype, device="cpu", quant=row.scheme)
        except OffloadError as err:  # e.g. an hqq group size that does not divide a row
            result["error"] = str(err).splitlines()[0]
        else:
            result |= compare(reference, model, rows, args.batch_size).summary()
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    print(f"{len(rows)} windows of {args.seq_len} tokens, {results[0]['tokens']} predicted positions\n")
    print(markdown(results))
    print(f"\n{verdict(results)}")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
