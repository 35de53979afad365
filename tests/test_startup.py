"""Start-up cost: what a command imports before it does its work (no timings: imports are exact)."""

from __future__ import annotations

import subprocess
import sys


def modules_after(*args: str) -> set[str]:
    """The modules imported by one `offload ARGS` run in a fresh interpreter."""
    code = (
        "import sys\nfrom cli.main import run\nsys.argv = ['offload', *sys.argv[1:]]\n"
        "try:\n    run()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('\\nMODULES', ' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.rsplit("MODULES ", 1)[1].split())


def test_generate_builds_the_model_without_dynamo() -> None:
    # nn.init on meta tensors imports torch._dynamo: over a second of every start-up.
    modules = modules_after("generate", "--max-new-tokens", "1", "--temperature", "0", "hi")
    assert "offload.model" in modules
    assert "torch._dynamo" not in modules
