"""The real-size run of issue 17: plan, load and generate on a Mixtral-8x7B-shaped checkpoint, with peak RSS.

    python benchmarks/write_mixtral_shaped.py /tmp/real-mixtral          # once: about 25 GB
    python benchmarks/real_size_run.py /tmp/real-mixtral --host-memory 8  # one JSON summary on stdout

Runs ``offload plan -m DIR --json``, then ``offload generate -m DIR --json`` for ``--tokens`` greedy tokens with
``--threads 1`` and OMP_NUM_THREADS=1 in a child process, and reports:

- the child's peak RSS (``ru_maxrss`` from wait4, the kernel's own high-water mark; /proc's VmHWM is sampled too);
- load time (generate's ``load_seconds``), time to first token and decode tok/s;
- bytes the child read from disk (/proc/PID/io ``read_bytes``: reads the page cache did not serve) and per token;
- the cache's and the host tier's counters from generate's JSON (every ``cache`` and ``host_tier`` key);
- the plan's predicted peak RSS (``predicted_peak_rss_bytes``, else ``needed_bytes``) against the measured peak,
  and, with ``--host-memory``, whether the peak stays within the budget plus the plan's dense weights plus
  1.5 GiB (issue 17's target).

``--host-memory`` is passed through to generate (and to plan, if this offload's plan takes it). Without it, or on an
offload without the disk tier, every expert must fit in RAM: the run refuses to start when the plan says it needs
more than the memory available now, rather than push a shared machine into the OOM killer (``--anyway`` overrides).
``--drop-caches`` empties the page cache first (root only), so the disk reads are cold.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
OVERHEAD_GIB = 1.5  # issue 17: peak RSS <= host budget + dense weights + 1.5 GiB
PROMPT = "The quick brown fox"
SAMPLE_SECONDS = 0.1


def offload_command(*args: str) -> list[str]:
    """This tree's CLI (not whatever an editable install points at), run by this interpreter."""
    return [sys.executable, "-c", "from cli.main import run; run()", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def takes_flag(command: str, flag: str) -> bool:
    """Whether ``offload COMMAND --help`` lists ``flag``."""
    done = subprocess.run(offload_command(command, "--help"), capture_output=True, text=True, env=child_env())
    return flag in done.stdout


def proc_fields(pid: int, name: str) -> dict[str, int]:
    """/proc/PID/status (kB values, in bytes) or /proc/PID/io; empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields


class Sampler(threading.Thread):
    """Samples a child's RSS, high-water mark and disk reads until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.started = time.perf_counter()
        self.last: dict[str, int] = {}
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, VmRSS bytes)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status, io = proc_fields(self.pid, "status"), proc_fields(self.pid, "io")
            if "VmRSS" in status:  # a zombie has no memory lines: keep the last live sample
                self.last |= {k: status[k] for k in ("VmRSS", "VmHWM") if k in status}
                self.timeline.append((time.perf_counter() - self.started, status["VmRSS"]))
            self.last |= {k: io[k] for k in ("read_bytes", "rchar") if k in io}
            self.done.wait(SAMPLE_SECONDS)


def run_measured(command: list[str]) -> dict[str, Any]:
    """Run ``command`` as a child; its stdout, exit code, wall time, peak RSS and the sampler's figures."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    sampler = Sampler(child.pid)
    sampler.start()
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(child.stderr.read()), daemon=True)
    reader.start()
    stdout = child.stdout.read()
    _, status, usage = os.wait4(
        child.pid, 0
    )  # ru_maxrss: the kernel's peak RSS of the child, in KiB on Linux
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    sampler.join()
    reader.join()
    return {
        "exit": child.returncode,
        "wall_seconds": time.perf_counter() - started,
        "stdout": stdout.decode(errors="replace"),
        "stderr": b"".join(stderr).decode(errors="replace"),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "sampled": sampler.last,
        "timeline": sampler.timeline,
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"host_tier": {"hits": 3}}`` -> ``{"host_tier.hits": 3}``)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat |= flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    return flat


def decimate(timeline: list[tuple[float, int]], points: int = 40) -> list[list[float]]:
    """At most ``points`` (seconds, GiB) samples of the RSS curve, evenly spread, the last one kept."""
    step = max(1, -(-len(timeline) // points))
    kept = timeline[::step] + ([timeline[-1]] if timeline and (len(timeline) - 1) % step else [])
    return [[round(t, 1), round(rss / GIB, 3)] for t, rss in kept]


def checkpoint_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated now without swapping or the OOM killer."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "directory", type=Path, help="a converted checkpoint (benchmarks/write_mixtral_shaped.py)"
    )
    parser.add_argument(
        "--host-memory", type=float, metavar="GIB", help="the host tier's budget, passed through"
    )
    parser.add_argument("--tokens", type=int, default=16, help="new tokens to generate (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--profile", help="passed through to plan and generate")
    parser.add_argument(
        "--anyway", action="store_true", help="run even when the plan needs more than free RAM"
    )
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache first (root only)")
    parser.add_argument(
        "--generate-arg", action="append", default=[], help="another generate flag; repeatable"
    )
    args = parser.parse_args(argv)

    directory = args.directory.expanduser().absolute()
    if not (directory / "config.json").is_file():
        print(
            f"error: {directory}: no config.json; write one with benchmarks/write_mixtral_shaped.py",
            file=sys.stderr,
        )
        return 2
    shared = ["-m", str(directory)] + (["--profile", args.profile] if args.profile else [])
    host_flag: list[str] = []
    if args.host_memory is not None:
        if not takes_flag("generate", "--host-memory"):
            print(
                "error: --host-memory: this offload's generate has no host tier yet (issue 17)",
                file=sys.stderr,
            )
            return 2
        host_flag = ["--host-memory", f"{args.host_memory:g}"]
    plan_flags = host_flag if host_flag and takes_flag("plan", "--host-memory") else []

    summary: dict[str, Any] = {
        "directory": str(directory),
        "checkpoint_bytes": checkpoint_bytes(directory),
        "host_memory_gib": args.host_memory,
        "load_average_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    plan_started = time.perf_counter()
    plan_command = offload_command("plan", *shared, *plan_flags, "--json")
    planned = subprocess.run(plan_command, capture_output=True, text=True, env=child_env())
    if planned.returncode != 0:
        print(f"error: offload plan failed: {planned.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 2
    plan = json.loads(planned.stdout)
    summary["plan"] = {
        "command": shlex.join(["offload", *plan_command[3:]]),
        "seconds": round(time.perf_counter() - plan_started, 2),
        "needed_bytes": plan.get("needed_bytes"),
        "predicted_peak_rss_bytes": plan.get("predicted_peak_rss_bytes"),
        "dense_bytes": plan.get("dense", {}).get("total"),
        "predicted_tok_s": plan.get("predicted_tok_s"),
        "fits": plan.get("fits"),
        **{
            k: v
            for k, v in flatten(plan).items()
            if k.startswith(("host_tier.", "peak_rss.", "tok_s_with_disk."))
        },
    }
    needed = plan.get("needed_bytes") or 0
    if not host_flag and needed > available_bytes() and not args.anyway:
        print(
            f"error: the plan needs {needed / GIB:.1f} GiB with every expert in RAM, but {available_bytes() / GIB:.1f} "
            "GiB is available; pass --host-memory GIB (the disk tier), or --anyway",
            file=sys.stderr,
        )
        return 2
    if args.drop_caches:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    generate = offload_command(
        "generate", *shared, *host_flag, "--no-chat", "--temperature", "0", "--max-new-tokens", str(args.tokens),
        "--threads", str(args.threads), "--json", *args.generate_arg, args.prompt,
    )  # fmt: skip
    ran = run_measured(generate)
    summary["generate_command"] = "OMP_NUM_THREADS=1 " + shlex.join(["offload", *generate[3:]])
    summary["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if ran["exit"] != 0:
        summary["error"] = ran["stderr"].strip().splitlines()[-1:] or [f"exit {ran['exit']}"]
        summary["peak_rss_gib"] = round(ran["peak_rss_bytes"] / GIB, 3)
        print(json.dumps(summary))
        return 1
    result = json.loads(ran["stdout"])
    timings = result.get("timings", {})
    tokens = len(result.get("token_ids", []))
    read_bytes = ran["sampled"].get("read_bytes")
    peak = ran["peak_rss_bytes"]
    summary |= {
        "generated_tokens": tokens,
        "wall_seconds": round(ran["wall_seconds"], 2),
        "load_seconds": result.get("load_seconds"),
        "ttft_seconds": timings.get("ttft_seconds"),
        "decode_tokens_per_second": timings.get("decode_tokens_per_second"),
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / GIB, 3),
        "sampled_vm_hwm_gib": round(ran["sampled"].get("VmHWM", 0) / GIB, 3),
        "disk_read_bytes": read_bytes,  # the child's whole life: load and generation
        "disk_read_bytes_per_token": read_bytes / tokens if read_bytes is not None and tokens else None,
        "stats": {
            k: v
            for k, v in flatten(result).items()
            if k.startswith(("cache", "host_tier")) or "host_tier" in k
        },
        "rss_timeline_gib": decimate(ran["timeline"]),
    }
    predicted = plan.get("predicted_peak_rss_bytes") or needed  # older plans predict no peak of their own
    if predicted:
        summary["peak_over_plan"] = round(peak / predicted, 3)
    dense = summary["plan"]["dense_bytes"]
    if args.host_memory is not None and dense:
        limit = args.host_memory * GIB + dense + OVERHEAD_GIB * GIB
        summary["rss_limit_gib"] = round(limit / GIB, 3)  # budget + dense weights + 1.5 GiB
        summary["within_limit"] = peak <= limit
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
