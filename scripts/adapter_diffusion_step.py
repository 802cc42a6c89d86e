"""Fine-tune a pretrained DiffRec on a target dataset with diffusion-step adapters.

Bottlenecks inside the denoiser whose activations are scaled and shifted by the
diffusion-step embedding, or (`--step-mlp-only`) only the step-embedding MLP trained.

    python scripts/adapter_diffusion_step.py --pretrained runs/ml1m-diffrec \\
        --dataset ml-100k --layers all --sites attn,ffn
"""

from peftrec.downstream.cli import main_for
from peftrec.pretraining.cli import run_main

main = main_for(__doc__, ("diffusion_step",))

if __name__ == "__main__":
    run_main(main)
