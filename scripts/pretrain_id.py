"""Pretrain an ID-based sequential recommender (SASRec) and evaluate it by full ranking.

    python scripts/pretrain_id.py --dataset ml-100k
    accelerate launch scripts/pretrain_id.py --dataset ml-1m --output-dir runs/ml1m-id
"""

from peftrec.pretraining.cli import parse_args, pretrain_parser, run_main
from peftrec.pretraining.pipeline import pretrain


def main(argv=None):
    return pretrain(parse_args(pretrain_parser(__doc__), argv))


if __name__ == "__main__":
    run_main(main)
