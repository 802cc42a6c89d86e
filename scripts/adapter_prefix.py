"""Fine-tune a pretrained recommender on a target dataset with prefix or prompt tuning.

`--method prefix`: learned key/value prefixes in the chosen attention layers (optionally
through an MLP, `--reparameterize`); `--method prompt`: learned input tokens.

    python scripts/adapter_prefix.py --pretrained runs/ml1m-text --dataset ml-100k \\
        --layers all --num-virtual-tokens 10
"""

from peftrec.downstream.cli import main_for
from peftrec.pretraining.cli import run_main

main = main_for(__doc__, ("prefix", "prompt"))

if __name__ == "__main__":
    run_main(main)
