"""Fine-tune a pretrained recommender on a target dataset with bottleneck adapters.

Houlsby (at `attn` and/or `ffn`, sequential or `--parallel`) or its `pfeiffer` preset
(`ffn` only, relu); everything else frozen except `--tune` extras and, for ID models, the
target's fresh item table.

    python scripts/adapter_houlsby.py --pretrained runs/ml1m-text --dataset ml-100k \\
        --adapt both --layers top:1 --sites attn,ffn --reduction-factor 16
"""

from peftrec.downstream.cli import main_for
from peftrec.pretraining.cli import run_main

main = main_for(__doc__, ("houlsby", "pfeiffer"))

if __name__ == "__main__":
    run_main(main)
