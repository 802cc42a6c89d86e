"""Fine-tune a pretrained recommender on a target dataset with LoRA.

Low-rank updates on the attention and feed-forward Linear layers of the backbone (own
layer) and of a transformers item encoder (through peft); the pretrained weights stay
frozen and unchanged.

    python scripts/adapter_lora.py --pretrained runs/ml1m-text --dataset ml-100k \\
        --adapt backbone --layers all --rank 8 --alpha 16
"""

from peftrec.downstream.cli import main_for
from peftrec.pretraining.cli import run_main

main = main_for(__doc__, ("lora",))

if __name__ == "__main__":
    run_main(main)
