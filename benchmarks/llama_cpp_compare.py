"""CPU-only decode of issue 15's random Mixtral: llama.cpp (F32, Q4_K_M) beside offload (float32, hqq:4:64).

llama.cpp is a benchmark tool here, built from source outside the repository, never a dependency:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # its sdist vendors llama.cpp
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    # this machine's CPU reports AMX but faults on it: append -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
    # to `-march=native` in ggml/src/ggml-cpu/CMakeLists.txt
    cmake -B /tmp/llama/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build /tmp/llama/build -j2 --target llama-bench llama-quantize llama-simple

Then, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/llama_cpp_compare.py --llama-build /tmp/llama/build \\
        --model /tmp/offload-bench/llama-compare/float32 --rounds 7

What it does:

1. Writes what is missing under the model directory's parent: the model (float32, hidden 1024, FFN 3584,
   4 layers of 8 experts, vocabulary 32000, random weights; mistral-common's v1 sentencepiece model as its
   tokenizer, which the GGUF needs), its F32 GGUF (`convert_hf_to_gguf.py --outtype f32` from the llama.cpp
   tree the build came from), the Q4_K_M GGUF (`llama-quantize`) and offload's conversions
   (`offload convert`, attention and experts `hqq:4:64`, the lm_head kept, in `bnb:int8` or in `hqq:4:64`).
2. Runs every row once per round, each in its own process, interleaved round by round (the starting row
   rotates), so a change in machine load hits every row alike. Each process makes a warm-up run and then
   REPS measured runs of TOKENS decode tokens, and gives their median: llama.cpp `llama-bench -p 0 -n TOKENS
   -r REPS`; offload `offload bench --runs REPS` (greedy, after a one-token prompt, every expert resident).
   The figure of a row is the median over rounds of those medians; peak RSS is the child's own
   (``os.wait4``), the largest over rounds.
3. Prints a markdown table pairing each llama.cpp row with offload's, the commands, and the load average
   before every round; ``--json`` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = Path("/tmp/offload-bench/llama-compare/float32")
# offload conversions: directory suffix -> extra `offload convert` flags (attention and experts hqq:4:64)
CONVERSIONS = {
    "hqq4": [],
    "hqq4-lm8": ["--lm-head", "bnb:int8"],
    "hqq4-lm": ["--lm-head", "hqq:4:64"],  # nearest to Q4_K_M (output matrix in Q6_K)
}
# table lines: (llama.cpp row, offload row); each row is measured once per round even when paired twice
PAIRS = [
    ("F32", "float32"),
    ("Q4_K_M", "hqq4"),
    ("Q4_K_M", "hqq4-lm8"),
    ("Q4_K_M", "hqq4-lm"),
    ("Q4_K_M", "hqq4-lm-torch"),
]
# offload rows run with torch's int4 kernel instead of ours (OFFLOAD_CPU_KERNEL=torch): row -> conversion
TORCH_KERNEL_ROWS = {"hqq4-lm-torch": "hqq4-lm"}
OFFLOAD_LABELS = {
    "float32": "float32",
    "hqq4": "converted `hqq:4:64` (lm_head float)",
    "hqq4-lm8": "converted `hqq:4:64`, lm_head `bnb:int8`",
    "hqq4-lm": "converted `hqq:4:64`, lm_head `hqq:4:64` too",
    "hqq4-lm-torch": "the same, `OFFLOAD_CPU_KERNEL=torch`",
}


@dataclass
class Row:
    """One thing measured: a command whose decode tok/s is parsed from its standard output."""

    name: str
    engine: str  # "llama.cpp" or "offload"
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for this row's process only
    speeds: list[float] = field(default_factory=list)
    rss_gb: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.speeds)


def offload_command(*args: str) -> list[str]:
    """`offload ARGS` run from this working tree (not whatever `offload` an editable install points at)."""
    return [sys.executable, "-m", "cli.main", *args]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("COLUMNS", None)
    return env


def run_logged(command: list[str], threads: int) -> None:
    """Run a preparation step; on failure show its output and stop."""
    print("$ " + " ".join(command), file=sys.stderr)
    done = subprocess.run(command, env=child_env(threads), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def llama_source(build: Path) -> Path:
    """The llama.cpp tree ``build`` was configured from (CMakeCache's CMAKE_HOME_DIRECTORY)."""
    for line in (build / "CMakeCache.txt").read_text().splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1])
    sys.exit(f"{build}: no CMAKE_HOME_DIRECTORY in CMakeCache.txt; pass --llama-src")


def prepare(model: Path, build: Path, source: Path, threads: int) -> dict[str, Path]:
    """Write whatever is missing; return the paths of the GGUFs and offload's checkpoints by row name."""
    import torch

    from benchmarks.random_model import write_random_model

    if not (model / "config.json").is_file():
        print(f"writing the random model to {model}", file=sys.stderr)
        write_random_model(model, dtype=torch.float32)
    if not any((model / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        import mistral_common

        # GGUF embeds a vocabulary; any 32000-token sentencepiece model fits a random model
        shutil.copy(
            Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", model / "tokenizer.model"
        )
    work = model.parent
    paths = {"float32": model, "F32": work / "gguf" / "F32.gguf", "Q4_K_M": work / "gguf" / "Q4_K_M.gguf"}
    paths["F32"].parent.mkdir(parents=True, exist_ok=True)
    if not paths["F32"].is_file():
        convert = source / "convert_hf_to_gguf.py"
        run_logged(
            [sys.executable, str(convert), str(model), "--outtype", "f32", "--outfile", str(paths["F32"])],
            threads,
        )
    if not paths["Q4_K_M"].is_file():
        quantize = build / "bin" / "llama-quantize"
        run_logged([str(quantize), str(paths["F32"]), str(paths["Q4_K_M"]), "Q4_K_M", str(threads)], threads)
    for name, flags in CONVERSIONS.items():
        paths[name] = work / name
        if not (paths[name] / "config.json").is_file():
            run_logged(
                offload_command(
                    "convert", str(model), str(paths[name]), "--experts", "hqq:4:64", "--attention", "hqq:4:64",
                    "--force", *flags,
                ),
                threads,
            )  # fmt: skip
    return paths


def rows(paths: dict[str, Path], build: Path, threads: int, tokens: int, reps: int) -> dict[str, Row]:
    table: dict[str, Row] = {}
    for name in ("F32", "Q4_K_M"):
        table[name] = Row(
            name,
            "llama.cpp",
            [
                str(build / "bin" / "llama-bench"), "-m", str(paths[name]), "-t", str(threads),
                "-p", "0", "-n", str(tokens), "-r", str(reps), "-o", "json",
            ],
        )  # fmt: skip
    for name in ("float32", *CONVERSIONS, *TORCH_KERNEL_ROWS):
        # the profile by path: the default one of a CPU, but this tree's (an editable install of another
        # checkout would otherwise supply its own profiles/)
        table[name] = Row(
            name,
            "offload",
            env={"OFFLOAD_CPU_KERNEL": "torch"} if name in TORCH_KERNEL_ROWS else {},
            command=offload_command(
                "bench", "-m", str(paths[TORCH_KERNEL_ROWS.get(name, name)]), "--profile", str(ROOT / "profiles" / "cpu.toml"),
                "--threads", str(threads), "--dtype", "float32",
                "--prompt-tokens", "1", "--new-tokens", str(tokens), "--runs", str(reps), "--json", "-",
            ),
        )  # fmt: skip
    return table


def measure(row: Row, threads: int) -> tuple[float, float]:
    """Run ``row`` once: (decode tok/s, peak RSS in GB of that process)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = child_env(threads) | row.env
        child = subprocess.Popen(row.command, stdout=out, stderr=err, env=env, cwd=ROOT)
        # wait4, not Popen.wait: the rusage is this child's alone (RUSAGE_CHILDREN keeps the max of all)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read()
        if child.returncode != 0:
            sys.exit(f"{row.name} failed ({child.returncode}): {' '.join(row.command)}\n{err.read()[-3000:]}")
    rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB
    if row.engine == "llama.cpp":
        return statistics.median(json.loads(text)[0]["samples_ts"]), rss_gb
    report = json.loads(text)
    (only,) = report["rows"]
    assert report["experts_per_layer"] is None, "offload ran offloaded, not resident"
    return float(only["decode_tokens_per_second"]), rss_gb


def shell(row: Row) -> str:
    """A copyable command line: this tree's `offload` spelled as `offload`, paths kept."""
    command = row.command
    if command[:3] == [sys.executable, "-m", "cli.main"]:
        command = ["offload", *command[3:]]
    return " ".join([*(f"{key}={value}" for key, value in row.env.items()), *command])


def report(table: dict[str, Row], loads: list[tuple[float, float, float]], args: argparse.Namespace) -> str:
    first = [load[0] for load in loads]
    lines = [
        f"{args.threads} thread(s), {args.rounds} interleaved rounds of one process per row, each the median "
        f"of {args.reps} runs of {args.tokens} decode tokens; medians over rounds. Load average (1 min) before the rounds: median {statistics.median(first):.2f}, "
        f"min {min(first):.2f}, max {max(first):.2f}.",
        "",
        "| llama.cpp | tok/s | peak RSS GB | offload | tok/s | peak RSS GB | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for llama, ours in PAIRS:
        if llama in table and ours in table:
            a, b = table[llama], table[ours]
            lines.append(
                f"| {llama} | {a.median():.1f} | {max(a.rss_gb):.2f} | {OFFLOAD_LABELS[ours]} | {b.median():.1f} "
                f"| {max(b.rss_gb):.2f} | {b.median() / a.median():.2f} |"
            )
    lines += ["", "Speed-ups of the 4-bit rows over their own float row:"]
    lines.append(f"- llama.cpp Q4_K_M / F32: {table['Q4_K_M'].median() / table['F32'].median():.2f}x")
    for name in (*CONVERSIONS, *TORCH_KERNEL_ROWS):
        lines.append(f"- offload {name} / float32: {table[name].median() / table['float32'].median():.2f}x")
    lines += ["", "Every run (tok/s):"]
    for row in table.values():
        lines.append(f"- {row.name}: " + ", ".join(f"{s:.1f}" for s in row.speeds))
    lines.append("- load average (1, 5, 15 min) before each round: " + "; ".join(
        ", ".join(f"{x:.2f}" for x in load) for load in loads
    ))  # fmt: skip
    lines += ["", "Commands (one run each, per round):", "```"]
    lines += [shell(row) for row in table.values()]
    lines.append("```")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-build", type=Path, required=True, help="llama.cpp's cmake build directory")
    parser.add_argument("--llama-src", type=Path, help="llama.cpp's source tree (default: from the build)")
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="the float32 model (written if missing)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    parser.add_argument("--reps", type=int, default=3, help="measured runs per process (their median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()

    build = args.llama_build.resolve()
    paths = prepare(args.model.resolve(), build, args.llama_src or llama_source(build), args.threads)
    table = rows(paths, build, args.threads, args.tokens, args.reps)
    names = list(table)
    loads = []
    for round_ in range(args.rounds):
        loads.append(os.getloadavg())
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            speed, rss = measure(table[name], args.threads)
            table[name].speeds.append(speed)
            table[name].rss_gb.append(rss)
        print(
            f"round {round_ + 1}/{args.rounds} (load {loads[-1][0]:.2f}): "
            + ", ".join(f"{n} {table[n].speeds[-1]:.1f}" for n in names),
            file=sys.stderr,
        )
    text = report(table, loads, args)
    print(text)
    if args.json:
        figures = {
            "threads": args.threads,
            "rounds": args.rounds,
            "tokens": args.tokens,
            "reps": args.reps,
            "load_averages": loads,
            "git_head": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "rows": {
                row.name: {
                    "engine": row.engine,
                    "command": shell(row),
                    "decode_tok_s": row.median(),
                    "runs": row.speeds,
                    "peak_rss_gb": max(row.rss_gb),
                }
                for row in table.values()
            },
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
