"""Pretrain an image-based sequential recommender (item image -> ViT / ViTMAE -> SASRec).

    python scripts/build_image_store.py --source IMAGES --output-dir STORE ...
    python scripts/pretrain_image.py --dataset DIR --image-store STORE --encoder path/to/vit
    accelerate launch scripts/pretrain_image.py --dataset DIR --image-store STORE \\
        --encoder path/to/mae --train-encoder --trainable-layers 1 --loss sampled
    python scripts/pretrain_image.py --dataset DIR --image-store STORE --encoder path/to/vit \\
        --item-encoder image+id --item-head mlp

Images are read from the LMDB store by the dataset's item ids. ViTMAE runs with mask ratio
0 and a fixed patch order. By default the encoder is frozen and its item vectors are
cached under <dataset folder>/cache (--encoder-cache-dir).
"""

from peftrec.pretraining.cli import parse_args, pretrain_parser, run_main
from peftrec.pretraining.pipeline import pretrain


def main(argv=None):
    return pretrain(parse_args(pretrain_parser(__doc__, "image"), argv))


if __name__ == "__main__":
    run_main(main)
