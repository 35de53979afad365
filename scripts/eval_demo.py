"""Evaluate the demo model with transformers: held-out perplexity, expert usage, sample answers.

Everything is measured on the held-out split of scripts/build_demo_corpus.py (rebuilt, or read
from `--corpus-cache`), tokenized exactly as training tokenized it, and printed as the Markdown
tables that docs/DEMO_MODEL.md shows.

    python scripts/eval_demo.py --model offload/demo --corpus-cache /tmp/offload-demo/corpus.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

# The sibling scripts are not a package: import them from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_demo_corpus
import train_demo

# Questions for the sample transcripts; their names are kept in the training split
# (build_demo_corpus.ALWAYS_TRAIN) and each phrasing is one the training data uses for that name.
SAMPLE_QUESTIONS: tuple[str, ...] = (
    "What does json.dumps do?",
    "Explain os.path.join.",
    "What does str.split do?",
    "How do I use math.sqrt?",
    "What does random.choice do?",
)


@torch.no_grad()
def perplexity_and_routing(model: Any, rows: torch.Tensor, batch_size: int = 8) -> dict[str, Any]:
    """Mean next-token NLL over `rows`, and per layer how often each expert is among the top-k.

    `locality` is the fraction of a token's top-k experts that the previous token (in the same
    row) also used, per layer: what an LRU cache of recently used experts can hope to hit.
    """
    num_layers = model.config.num_hidden_layers
    num_experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    counts = torch.zeros(num_layers, num_experts, dtype=torch.long)
    reused = torch.zeros(num_layers)
    pairs = 0
    nll, predicted = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        n = batch.numel() - batch.shape[0]  # the first token of each row has no prediction
        nll += (out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()) * n
        predicted += n
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.topk(top_k, dim=-1).indices.view(*batch.shape, top_k)  # (B, T, k)
            counts[layer] += torch.bincount(chosen.flatten(), minlength=num_experts)
            hits = (chosen[:, 1:, :, None] == chosen[:, :-1, None, :]).any(-1)  # (B, T-1, k)
            reused[layer] += hits.float().sum()
        pairs += batch.shape[0] * (batch.shape[1] - 1) * top_k
    usage = counts.float() / counts.sum(dim=1, keepdim=True)
    return {
        "tokens": predicted,
        "nll": nll / predicted,
        "perplexity": math.exp(nll / predicted),
        "usage": usage.tolist(),
        "locality": (reused / pairs).tolist(),
    }


@torch.no_grad()
def answer(model: Any, chat: Any, question: str, max_new_tokens: int) -> str:
    """The greedy reply to `question` under the chat template, decoded by our tokenizer."""
    prompt = torch.tensor([chat.encode_chat([{"role": "user", "content": question}])])
    out = model.generate(
        prompt,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=chat.eos_id,
        pad_token_id=chat.eos_id,
    )
    return chat.decode(out[0, prompt.shape[1] :].tolist())


def markdown(result: dict[str, Any]) -> str:
    """The evaluation as Markdown tables and transcripts."""
    lines = ["| split | tokens | perplexity |", "|---|---|---|"]
    for name in ("docs", "pairs", "all"):
        part = result["held_out"][name]
        lines.append(f"| {name} | {part['tokens']} | {part['perplexity']:.2f} |")
    usage = result["held_out"]["all"]["usage"]
    locality = result["held_out"]["all"]["locality"]
    experts = range(len(usage[0]))
    lines += ["", "| layer | " + " | ".join(f"e{e}" for e in experts) + " | min | reuse vs previous token |"]
    lines.append("|---" * (len(usage[0]) + 3) + "|")
    for layer, row in enumerate(usage):
        cells = " | ".join(f"{100 * u:.1f}" for u in row)
        lines.append(f"| {layer} | {cells} | {100 * min(row):.1f} | {100 * locality[layer]:.1f} |")
    for sample in result["samples"]:
        lines += ["", f"> **user:** {sample['question']}", ">", f"> **model:** {sample['answer']}"]
    return "\n".join(lines)


def main() -> None:
    """Load the model and corpus, evaluate, print Markdown (and JSON when asked)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("offload/demo"), help="model directory")
    parser.add_argument("--corpus-cache", type=Path, default=None, help="corpus JSON written by train_demo")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed used for training")
    parser.add_argument("--seq-len", type=int, default=256, help="evaluation window (training used 256)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="reply length limit for samples")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import MixtralForCausalLM

    from offload.tokenizer import Tokenizer

    chat = Tokenizer.from_file(args.model / "tokenizer.json")
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    held_out = build_demo_corpus.load_or_build(args.corpus_cache, seed=args.seed)["eval"]
    result: dict[str, Any] = {"held_out": {}, "samples": []}
    parts = {
        "docs": {"docs": held_out["docs"], "pairs": []},
        "pairs": {"docs": [], "pairs": held_out["pairs"]},
        "all": held_out,
    }
    for name, split in parts.items():
        rows = train_demo.windows(train_demo.tokenize(split, chat), args.seq_len)
        result["held_out"][name] = perplexity_and_routing(model, rows)
    questions = [*SAMPLE_QUESTIONS, held_out["pairs"][0]["q"]]
    for question in questions:
        reply = answer(model, chat, question, args.max_new_tokens)
        result["samples"].append({"question": question, "answer": reply})
    result["samples"][-1]["question"] += " *(held out: never seen in training)*"
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
