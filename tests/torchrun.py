"""One way the tests launch a script under torchrun: CPU processes on a free local port, one thread each.

Each process joins the gloo group the project's runtime makes (mner.runtime); a preset the script needs is
written whole by whichever rank gets there first (configs/presets.py, save_model).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def torchrun(script: Path, *args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` with `args` in `processes` torchrun processes; its exit status and output."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def tail(done: subprocess.CompletedProcess) -> str:
    """The ends of a finished launch's stdout and stderr, for an assertion's message."""
    return done.stdout[-3000:] + done.stderr[-3000:]
