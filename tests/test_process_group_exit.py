"""A process that leaves a launched run destroys its process group before the interpreter
finalizes: left to finalization, gloo's worker threads abort it now and then (SIGABRT,
"terminate called without an active exception"), and the launcher then kills the others:
the flake of the 2-process tests, and of a user's 2-process run at its very end."""

import os
import subprocess
import sys

from tests.helpers import ROOT, free_port

# The check is registered before the trainer module is imported: exit handlers run last
# registered first, so it sees what the trainer's handler left.
SCRIPT = """
import atexit, sys
import torch.distributed as dist

atexit.register(lambda: print("process group at exit:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
import peftrec.pretraining.trainer
if sys.argv[1] == "error":
    raise SystemExit(2)
"""


def test_every_exit_destroys_the_process_group():
    for how in ("end", "error"):
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(port=free_port()), how],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert "process group at exit: False" in done.stdout, done.stderr[-2000:]
