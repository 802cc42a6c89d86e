"""The quick-start demo: pretrain a text SASRec (shipped MiniLM) on ML-1M, fine-tune it on
ML-100k with Houlsby adapters, next to full fine-tuning and training from scratch, and
print the table (about 10 minutes on 2 CPU cores; rerunning reuses finished runs).

    python scripts/transfer_demo.py [--output-dir runs/demo] [--pretrain-epochs 5]
"""

from pathlib import Path

from peftrec.downstream.demo import transfer_demo
from peftrec.pretraining.cli import cli_parser, run_main


def main(argv=None):
    parser = cli_parser(__doc__, config_file=False)
    parser.add_argument("--source", default="ml-1m")
    parser.add_argument("--target", default="ml-100k")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--encoder", default="minilm", help="text encoder (folder or minilm)")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    args = parser.parse_args(argv)
    return transfer_demo(args.source, args.target, args.output_dir, args.encoder,
                         args.pretrain_epochs, args.finetune_epochs, ("--report-to", "none"))


if __name__ == "__main__":
    run_main(main)
