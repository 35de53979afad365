"""A live `offload serve` in a subprocess on a free port, for the serve tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180  # loading the demo model on a busy 2-core machine; only a bound, never a measured time


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """`offload serve ARGS --port P` running until ``stop``; its output goes to files in ``workdir``."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path, self.stderr_path = workdir / "serve.out", workdir / "serve.err"
        command = [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--threads",
            "1",
            "--port",
            str(self.port),
            *args,
        ]
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "OFFLOAD_HOME": str(workdir / "home"),
            **(env or {}),
        }
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(command, cwd=workdir, env=environment, stdout=out, stderr=err)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"offload serve exited with {self.process.returncode}: {self.stderr()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError(f"offload serve did not answer /health: {self.stderr()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def rss_bytes(self) -> int:
        """The server's resident memory now (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("offload serve did not stop on " + signal.Signals(sig).name) from None
        return self.process.returncode
