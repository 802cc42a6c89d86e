"""The quick-start demo: pretrain a text SASRec (shipped MiniLM) on ML-1M, fine-tune it on
ML-100k with Houlsby adapters, next to full fine-tuning and training from scratch, and
print the table (about 10 minutes on 2 CPU cores; rerunning reuses finished runs).

    python scripts/transfer_demo.py [--output-dir runs/demo] [--pretrain-epochs 5]
"""

from peftrec.downstream.demo import DemoSettings, transfer_demo
from peftrec.pretraining.cli import add_settings, cli_parser, parse_args, run_main, settings


def main(argv=None):
    parser = cli_parser(__doc__)
    add_settings(parser, DemoSettings)
    args = parse_args(parser, argv)
    return transfer_demo(**settings(args, DemoSettings), common=("--report-to", "none"))


if __name__ == "__main__":
    run_main(main)
