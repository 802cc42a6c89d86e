"""Run a script over a grid and/or a list of flag overrides, for several seeds, and collect
one table (mean ± sample sd over seeds) into OUTPUT_DIR/results.csv and results.md.

    python scripts/sweep.py benchmarks/sweeps/in-domain-ml-1m.yaml
    python scripts/sweep.py SWEEP.yaml --dry-run        # the commands, nothing run
    python scripts/sweep.py SWEEP.yaml --collect-only   # the table of the finished runs

Finished runs (metrics.json) are skipped and interrupted ones resumed, so running it again
continues a sweep. The sweep file's keys: docs/user-guide.md#sweeps.
"""

from peftrec.downstream.sweep import sweep_command, sweep_parser
from peftrec.pretraining.cli import parse_args, run_main


def main(argv=None):
    return sweep_command(parse_args(sweep_parser(__doc__), argv))


if __name__ == "__main__":
    run_main(main)
