"""Train the bundled demo model: a small Mixtral (transformers' `MixtralForCausalLM`) on stdlib docs.

Steps: build the corpus (scripts/build_demo_corpus.py), train a sentencepiece-style BPE tokenizer,
tokenize (reference prose as documents, question/answer pairs through our chat template), train
with the router load-balancing loss, and save config.json + model.safetensors (bf16, the hub's
layout) + tokenizer.json into `--out`, atomically.

    python scripts/train_demo.py --config demo --steps 500 --out offload/demo
    python scripts/train_demo.py --config tiny --steps 3 --limit 40 --out /tmp/tiny-demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# The sibling scripts are not a package: import them from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_demo_corpus

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Mixtral
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))  # ids 3..258: byte fallback, like sentencepiece
METASPACE = "▁"


@dataclass(frozen=True)
class Size:
    """One training setup: the model's shape and the optimiser's schedule."""

    vocab_size: int  # tokenizer pieces, including the 3 specials and 256 byte tokens
    hidden_size: int  # model width
    intermediate_size: int  # each expert's FFN width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # GQA: key/value heads shared by groups of query heads
    seq_len: int  # packed sequence length
    batch_size: int  # sequences per step
    lr: float  # peak AdamW learning rate
    warmup_steps: int  # linear warm-up before the cosine decay


SIZES: dict[str, Size] = {
    # For the test: trains in seconds, same code path.
    "tiny": Size(512, 64, 96, 2, 4, 2, 64, 4, 3e-3, 1),
    # The shipped model: 14.3M parameters, 28.6 MB in bf16 (experts are 77% of it).
    "demo": Size(5120, 256, 448, 4, 8, 2, 256, 16, 2e-3, 100),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A BPE tokenizer laid out like Mixtral's: <unk> <s> </s>, 256 byte pieces, then learned pieces.

    Spaces become "▁" (Metaspace, prepended to the first word only); any character the vocabulary
    lacks falls back to its UTF-8 bytes, so every text encodes without <unk>.
    """
    # Metaspace, then words split sentencepiece-style ("▁word"), except that a run of spaces stays
    # one pre-token ("▁▁▁" before "▁word"), so indentation can become one piece as in Mixtral's vocab.
    metaspace = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=False),
            pre_tokenizers.Split(Regex("▁?[^▁]+|▁+(?=▁[^▁])|▁+"), behavior="isolated"),
        ]
    )
    draft = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        # Rare characters are left to the byte pieces rather than spending vocabulary on them.
        limit_alphabet=160,
        show_progress=False,
    )
    draft.train_from_iterator(texts, trainer)
    # The trainer cannot place plain (non-special) byte pieces at ids 3..258, so rebuild the model
    # with sentencepiece's id layout; merges are strings, so they carry over unchanged.
    learned = sorted(draft.get_vocab().items(), key=lambda item: item[1])
    vocab = {piece: i for i, piece in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for piece, _ in learned:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) for m in json.loads(draft.to_str())["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement=METASPACE, prepend_scheme="first")]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Like the hub's Mixtral tokenizer.json: encode(text) with special tokens adds <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def chat_text(question: str, reply: str) -> str:
    """A pair as the chat template spells it, for the tokenizer trainer only."""
    return f"[INST] {question} [/INST] {reply}"


def tokenize(split: dict[str, Any], chat: Any, pair_repeats: int = 1) -> list[list[int]]:
    """Token documents: <s> prose </s>, and each pair as chat prompt + reply + </s>."""
    documents = [[chat.bos_id, *chat.encode(d["text"]), chat.eos_id] for d in split["docs"]]
    for pair in split["pairs"]:
        ids = chat.encode_chat([{"role": "user", "content": pair["q"]}]) + chat.encode_reply(pair["a"])
        documents.extend([[*ids, chat.eos_id]] * pair_repeats)
    return documents


def windows(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """Documents in corpus order, concatenated and cut into (N, seq_len) rows (tail dropped)."""
    stream = [t for doc in documents for t in doc]
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def batches(documents: list[list[int]], size: Size, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch, seq_len) batches; each epoch repacks with a new, seeded document order."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(documents)))
        rng.shuffle(order)
        rows = windows([documents[i] for i in order], size.seq_len)
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(rng.randrange(2**31)))]
        for start in range(0, len(rows) - size.batch_size + 1, size.batch_size):
            yield rows[start : start + size.batch_size]


def mixtral_config(size: Size, vocab_size: int, aux_coef: float) -> Any:
    """A MixtralConfig with Mixtral 8x7B's structure (8 experts, top-2, GQA, untied head) at `size`."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=aux_coef,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def lr_at(step: int, total: int, size: Size) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < size.warmup_steps:
        return size.lr * (step + 1) / size.warmup_steps
    progress = (step - size.warmup_steps) / max(1, total - size.warmup_steps)
    return size.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model: Any, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss on held-out rows (LM loss only, no router loss)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        n = batch.numel() - len(batch)  # the first token of each row is never predicted
        total += model(input_ids=batch, labels=batch).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformer load balancing, per layer, averaged over layers (1.0 when balanced).

    transformers' Mixtral loss pools all layers' routing counts before balancing them, so an
    expert may die in one layer as long as the same index is busy in another; balancing each
    layer keeps every expert of every layer in use. Also returns each layer's smallest expert share.
    """
    losses, smallest = [], []
    for logits in router_logits:  # (N tokens, E experts) per layer
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        share = torch.bincount(chosen.flatten(), minlength=probs.shape[1]).float() / chosen.numel()
        losses.append(probs.shape[1] * (share * probs.mean(dim=0)).sum())
        smallest.append(share.min())
    return torch.stack(losses).mean(), torch.stack(smallest)


def save_state(path: Path, model: Any, optimizer: Any, table: list[dict], fingerprint: dict) -> None:
    """Checkpoint the run (weights, AdamW moments, loss table) as safetensors + JSON, atomically."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for index, moments in opt["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in moments.items()})
    meta = {"fingerprint": fingerprint, "table": table, "param_groups": opt["param_groups"]}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "state.tmp")
    (path / "state.json.tmp").write_text(json.dumps(meta))
    (path / "state.tmp").replace(path / "state.safetensors")
    (path / "state.json.tmp").replace(path / "state.json")


def load_state(path: Path, model: Any, optimizer: Any, fingerprint: dict) -> list[dict]:
    """Restore a checkpoint of the same run into `model` and `optimizer`; its loss table, or [] if none."""
    from safetensors.torch import load_file

    if not (path / "state.json").exists():
        return []
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "state.safetensors")
    if meta["fingerprint"] != fingerprint or len(tensors) == 0:
        return []
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".")
            moments.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
    return meta["table"]


def train(
    model: Any,
    documents: list[list[int]],
    held_out_rows: torch.Tensor,
    size: Size,
    steps: int,
    seed: int,
    log_every: int,
    state: Path | None = None,
    fingerprint: dict | None = None,
) -> list[dict]:
    """AdamW over packed batches, in fp32; returns the loss table (a row every `log_every` steps).

    Each row averages the training losses since the previous row and measures the held-out loss.
    `cpu_s` is process CPU time, a hint at what the run costs on idle cores when the machine is shared.
    With `state`, the run checkpoints there at every row and resumes from it, bit-identically,
    when restarted with the same `fingerprint` (the options that shape the run).
    """
    # No weight decay on norms and router gates (as usual for gains and small classifier heads).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "gate.weight" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=size.lr,
        betas=(0.9, 0.95),
    )
    table = load_state(state, model, optimizer, fingerprint or {}) if state is not None else []
    done = table[-1]["step"] if table else 0
    if done:
        print(f"resumed from {state} at step {done}", flush=True)
    window: dict[str, Any] = {"lm": 0.0, "aux": 0.0, "n": 0, "share": 0.0}
    started = time.perf_counter() - (table[-1]["elapsed_s"] if table else 0.0)
    cpu_started = time.process_time() - (table[-1]["cpu_s"] if table else 0.0)
    model.train()
    for step, batch in zip(range(steps), batches(documents, size, seed), strict=False):
        if step < done:
            continue  # replaying the batch order is cheap, and keeps a resumed run identical
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, size)
        out = model(input_ids=batch, output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        balance, smallest = balance_loss(out.router_logits, model.config.num_experts_per_tok)
        (lm + model.config.router_aux_loss_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window["lm"] += lm.item()
        window["aux"] += balance.item()
        window["share"] = window["share"] + smallest.detach()
        window["n"] += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - started
            row = {
                "step": step + 1,
                "train_loss": round(window["lm"] / window["n"], 4),
                "held_out_loss": round(held_out_loss(model, held_out_rows, size.batch_size), 4),
                "balance_loss": round(window["aux"] / window["n"], 4),
                # the least-used expert's share of routings in the worst layer (0.125 is uniform)
                "min_expert_share": round((window["share"] / window["n"]).min().item(), 4),
                "lr": round(lr_at(step, steps, size), 6),
                "elapsed_s": round(elapsed, 1),
                "cpu_s": round(time.process_time() - cpu_started, 1),
            }
            table.append(row)
            print(json.dumps(row), flush=True)
            window = {"lm": 0.0, "aux": 0.0, "n": 0, "share": 0.0}
            if state is not None:
                save_state(state, model, optimizer, table, fingerprint or {})
    return table


def save_atomically(model: Any, tokenizer: Tokenizer, out: Path) -> None:
    """Write config.json, model.safetensors (bf16) and tokenizer.json into `out`, replacing it whole."""
    out = out.resolve()
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16)
    model.config.output_router_logits = False  # an inference default; training passed it per call
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save(str(staging / "tokenizer.json"))
    for file in staging.iterdir():
        # save_pretrained also writes generation_config.json; the demo ships only what loading needs.
        if file.name not in ("config.json", "model.safetensors", "tokenizer.json"):
            file.unlink()
        else:
            file.chmod(0o644)  # safetensors writes 0600; shipped files must be readable by everyone
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)


def main() -> None:
    """Parse options, then tokenizer, tokens, training, save."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced atomically)")
    parser.add_argument("--config", choices=sorted(SIZES), default="demo", help="model and schedule size")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for the corpus, init and batch order")
    parser.add_argument("--limit", type=int, default=None, help="use only this many docs and pairs (tests)")
    parser.add_argument(
        "--corpus-cache", type=Path, default=None, help="corpus JSON to reuse (e.g. under /tmp)"
    )
    parser.add_argument(
        "--aux-coef", type=float, default=0.05, help="weight of the per-layer router load-balancing loss"
    )
    parser.add_argument("--pair-repeats", type=int, default=1, help="times each Q/A pair appears per epoch")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=100, help="steps per loss-table row")
    parser.add_argument("--state", type=Path, default=None, help="checkpoint dir to resume from (e.g. /tmp)")
    parser.add_argument("--log-json", type=Path, default=None, help="also write the loss table here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = SIZES[args.config]
    started = time.perf_counter()

    corpus = build_demo_corpus.load_or_build(args.corpus_cache, seed=args.seed, limit=args.limit)
    train_split = corpus["train"]
    texts = [d["text"] for d in train_split["docs"]] + [
        chat_text(p["q"], p["a"]) for p in train_split["pairs"]
    ]
    tokenizer = train_tokenizer(texts, size.vocab_size)
    print(
        f"tokenizer: {tokenizer.get_vocab_size()} pieces ({time.perf_counter() - started:.1f}s)", flush=True
    )

    # Our chat template module reads tokenizer.json from disk, so hand it the file we just trained.
    from offload.tokenizer import Tokenizer as ChatTokenizer

    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"offload-demo-tokenizer-{os.getpid()}.json"
    tokenizer.save(str(scratch))
    chat = ChatTokenizer.from_file(scratch)
    scratch.unlink()
    documents = tokenize(train_split, chat, args.pair_repeats)
    n_tokens = sum(len(d) for d in documents)
    print(f"train tokens per epoch: {n_tokens} in {len(documents)} documents", flush=True)

    from transformers import MixtralForCausalLM

    config = mixtral_config(size, tokenizer.get_vocab_size(), args.aux_coef)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, {n_params * 2 / 1e6:.1f} MB in bf16", flush=True)
    held_out_rows = windows(tokenize(corpus["eval"], chat), size.seq_len)
    # Everything that shapes the run: a checkpoint made with other values is not resumed.
    fingerprint = {
        k: str(v) for k, v in vars(args).items() if k not in ("out", "log_json", "state", "threads")
    }
    table = train(
        model, documents, held_out_rows, size, args.steps, args.seed, args.log_every, args.state, fingerprint
    )
    summary = {
        "config": args.config,
        "size": asdict(size),
        "steps": args.steps,
        "parameters": n_params,
        "train_tokens_per_epoch": n_tokens,
        "epochs": round(args.steps * size.batch_size * size.seq_len / n_tokens, 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "table": table,
    }
    save_atomically(model, tokenizer, args.out)
    if args.log_json is not None:
        args.log_json.write_text(json.dumps(summary, indent=1))
    print(f"saved {args.out} after {summary['wall_s']}s ({summary['epochs']} epochs)", flush=True)


if __name__ == "__main__":
    main()
