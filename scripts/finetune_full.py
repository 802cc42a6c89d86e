"""Fine-tune every parameter of a pretrained recommender on a target dataset (the upper
reference for adapters), or the baselines: `--from-scratch` (same architecture, random
weights, target only) and `--zero-shot` (evaluate without training; content models).

    python scripts/finetune_full.py --pretrained runs/ml1m-text --dataset ml-100k
    python scripts/finetune_full.py --pretrained runs/ml1m-text --dataset ml-100k --zero-shot
"""

from peftrec.downstream.cli import main_for
from peftrec.pretraining.cli import run_main

main = main_for(__doc__)

if __name__ == "__main__":
    run_main(main)
