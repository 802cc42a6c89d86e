"""benchmarks/results.py's provenance records the command so that it can be pasted back."""

import shlex
import sys

from tests.helpers import load_benchmark


def test_the_recorded_command_keeps_its_quotes(monkeypatch):
    results = load_benchmark("results")
    argv = ["benchmarks/transfer.py", "--only", "LoRA rank 4", "--results", "it's/a test"]
    monkeypatch.setattr(sys, "argv", argv)
    command = results.provenance()["command"]
    # Split back as a shell would: the row name with spaces stays one argument.
    assert shlex.split(command) == ["python", *argv]
    given = ["python", "x.py", "--only", "Houlsby (both)"]
    assert shlex.split(results.provenance(given)["command"]) == given
