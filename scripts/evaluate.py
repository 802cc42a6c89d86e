"""Re-evaluate the best checkpoint of a pretraining or fine-tuning run folder by full ranking.

    python scripts/evaluate.py --run runs/ml-100k-sasrec [--mask-history]
"""

from peftrec.downstream import evaluate_any_run
from peftrec.pretraining.cli import evaluate_parser, parse_args, run_main


def main(argv=None):
    return evaluate_any_run(parse_args(evaluate_parser(__doc__), argv))


if __name__ == "__main__":
    run_main(main)
