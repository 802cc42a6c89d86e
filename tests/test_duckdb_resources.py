"""prepare_data.py --engine duckdb running out of memory or of disk space: one error line
naming what ran out and what to change, no traceback, nothing written, no temporary files
left; a killed run's temporary folder is removed by the next run (issue 23)."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pytest

from peftrec.dataset_tools.out_of_core import (
    SpilledLog,
    remove_abandoned_work_folders,
    work_folder,
)
from peftrec.pretraining.cli import run_main
from tests.helpers import load_script, write_synthetic_interactions

ROOT = Path(__file__).resolve().parents[1]

# DuckDB 2.0's message when its spill folder is full (the disk, or max_temp_directory_size).
SPILL_FULL = ("Out of Memory Error: failed to offload data block of size 96.0 KiB (896.0 "
              "KiB/976.5 KiB used).\nThis limit was set by the 'max_temp_directory_size' "
              "setting.\nBy default, this setting utilizes the available disk space on the "
              "drive where the 'temp_directory' is located.")


def prepare(tmp_path, monkeypatch, capsys, *flags: str) -> tuple[int, list[str]]:
    """Run prepare_data.py on a small log with the duckdb engine; (exit code, stderr lines).
    The temporary folder is checked to be left empty."""
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    log = write_synthetic_interactions(tmp_path / "log.csv")
    argv = ["--input", str(log), "--format", "csv", "--user-col", "user_id", "--item-col",
            "item_id", "--time-col", "timestamp", "--engine", "duckdb",
            "--output", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as stopped:
        run_main(load_script("prepare_data").main, argv)
    assert not (tmp_path / "out").exists() and not list(spill.iterdir())
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def test_out_of_memory_names_the_memory_limit(tmp_path, monkeypatch, capsys):
    code, errors = prepare(tmp_path, monkeypatch, capsys, "--memory-limit", "1MB")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: the duckdb engine ran out of memory under its cap of "
                                "1MB (Out of Memory Error: ")
    assert "rerun with a larger --memory-limit" in errors[0]


@pytest.mark.parametrize("failure", [duckdb.OutOfMemoryException(SPILL_FULL),
                                     duckdb.IOException("IO Error: Could not write file "
                                                        "\"x.tmp\": No space left on device")])
def test_a_full_disk_names_the_temporary_folder(failure, tmp_path, monkeypatch, capsys):
    def full_disk(self, con, config):
        raise failure

    monkeypatch.setattr(SpilledLog, "_clean", full_disk)
    code, errors = prepare(tmp_path, monkeypatch, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: the duckdb engine ran out of disk space in its "
                                f"temporary folder {tmp_path / 'tmp'}")
    assert "set TMPDIR to a folder on a disk with room" in errors[0]


def test_a_memory_limit_duckdb_cannot_read_is_refused(tmp_path, monkeypatch, capsys):
    code, errors = prepare(tmp_path, monkeypatch, capsys, "--memory-limit", "lots")
    assert code == 2 and errors == ["error: --memory-limit 'lots' is not a size DuckDB reads "
                                    "(Parser Error: Memory must have a number (e.g. 1GB)); "
                                    "give one such as 4GB"]


# A prepare_data run SIGKILLed while it spills the log into its temporary folder.
KILLED_RUN = """
import os, signal, tempfile, sys
tempfile.tempdir = sys.argv[1]
from peftrec.dataset_tools.out_of_core import work_folder
with work_folder() as folder:
    (folder / "parts").mkdir()
    (folder / "parts" / "000000.parquet").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path, monkeypatch,
                                                                    caplog):
    spill = tmp_path / "tmp"
    spill.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(spill)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = [path for path in spill.iterdir() if path.is_dir()]
    assert (left / "parts" / "000000.parquet").is_file()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    with work_folder() as live:  # the next run removes it, and never a live run's folder
        assert sorted(spill.iterdir()) == [live, live.with_suffix(".lock")]
        assert remove_abandoned_work_folders(spill) == [] and live.is_dir()
    assert f"removed the temporary folders of 1 killed prepare_data runs: {left}" in caplog.text
    assert not list(spill.iterdir())
