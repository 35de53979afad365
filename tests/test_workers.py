"""Background workers at exit: a run that ends while a host job computes exits with its own code, not an abort."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from offload.experts.host import ThreadHost
    from offload.experts.disk import FileDisk
    from offload.experts.link import EmulatedLink

    disk, link, host = FileDisk(), EmulatedLink(12), ThreadHost()
    weights = torch.randn(400, 400)

    def slow(x):
        for _ in range(60):
            x = torch.tanh(weights @ x)
        return x

    host.submit(slow, torch.randn(400, 400))
    sys.exit(2)  # an error ends the run while the job is inside torch
    """
)


def test_an_error_while_a_host_job_computes_exits_cleanly() -> None:
    # Without the workers being joined at exit, the daemon thread is stopped inside torch's C++ frames and the
    # process aborts ("terminate called without an active exception", exit 134).
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "terminate called" not in done.stderr
