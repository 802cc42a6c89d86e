"""Pretrain a text-based sequential recommender (item text -> transformers encoder -> SASRec).

    python scripts/pretrain_text.py --dataset ml-100k --encoder minilm
    python scripts/pretrain_text.py --dataset DIR --text-template '{title}. {genre}' \\
        --encoder path/to/bert --train-encoder --trainable-layers 2 --loss sampled
    accelerate launch scripts/pretrain_text.py --dataset ml-1m --output-dir runs/ml1m-text
    python scripts/pretrain_text.py --dataset ml-1m --item-head moe --num-experts 8
    python scripts/pretrain_text.py --dataset ml-1m --item-encoder text+id --fusion gate

By default the encoder is frozen and its item vectors are cached under
<dataset folder>/cache (--encoder-cache-dir); --train-encoder trains it end to end.
"""

from peftrec.pretraining.cli import parse_args, pretrain_parser, run_main
from peftrec.pretraining.pipeline import pretrain


def main(argv=None):
    return pretrain(parse_args(pretrain_parser(__doc__, "text"), argv))


if __name__ == "__main__":
    run_main(main)
