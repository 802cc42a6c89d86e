"""DiffuRec: a diffusion model over the next item's vector (Li et al., 2023, TOIS).

Training: the target item's vector x_0 is noised over a short schedule (`schedule`,
`num_steps`: the reference's truncated linear one of 32 steps by default),
x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps, with a step n drawn uniformly for each
sequence. The noised target plus its step embedding (the sinusoid
through a small MLP, as DiffRec's) is added into every history position, scaled per
element by lambda ~ N(delta, delta) (`uncertainty` = delta, 0.001 in the reference): the
history is read through the lens of the noised target. A Transformer over the history
(bidirectional, padding never attended, learned positions counted from the right end)
predicts x_0 at its last position; the scorer (`pretraining.diffusion_scorer`) trains that
prediction with the cross-entropy against all items, DiffuRec's only loss. While the layers
run, `step_context` holds the step embedding, carried by every position, for layers
conditioned on the step (`diffusion_step` adapters, `adapters.diffusion_step.DiffusionStepHost`).

Inference: reverse sampling. Each of `num_seeds` seeded samples starts from pure noise at
step N and runs every step of the reverse process, x_{n-1} drawn from the posterior given
the predicted x_0; lambda is its mean delta, so scores are deterministic. The noise of seed
s comes from a CPU generator seeded with `inference_seed + s`, shared by every user, so a
user's recommendations do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftrec.pretraining.diffrec import (
    MAX_SEEDS,
    TransformerDenoiser,
    diffrec_setting,
    seeded_sampling,
    sinusoidal_embedding,
)
from peftrec.pretraining.diffusion_scorer import DiffusionScorer
from peftrec.pretraining.sasrec import SASRecConfig, _init_weights
from peftrec.pretraining.schedules import build_schedule


@dataclass
class DiffuRecConfig(SASRecConfig):
    """The Transformer's settings (as SASRec's) plus DiffuRec's diffusion process."""

    # DiffRec's flags with the reference's values (src/main.py of WHUIR/DiffuRec: trunc_lin,
    # 32 steps, all run at inference; one sample). DiffuRec has no MSE term, so no
    # --mse-weight.
    schedule: str = diffrec_setting("schedule", "truncated-linear")
    num_steps: int = diffrec_setting("num_steps", 32)
    num_seeds: int = diffrec_setting("num_seeds", 1)
    uncertainty: float = field(default=0.001, metadata={  # the reference's lambda_uncertainty
        "help": "DiffuRec: delta, the mean and spread of the scale lambda ~ N(delta, delta) of "
        "the noised target added to every history position"})
    inference_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        build_schedule(self.schedule, self.num_steps)  # names a bad schedule or step count
        if self.uncertainty < 0:
            raise ValueError(f"DiffuRec's uncertainty must be >= 0, got {self.uncertainty}")
        if not 1 <= self.num_seeds <= MAX_SEEDS:
            raise ValueError(f"--num-seeds must be in 1..{MAX_SEEDS}, got {self.num_seeds}")


class DiffuRec(TransformerDenoiser):
    """The denoiser f(history, x_n, n) -> x_0 plus the diffusion around it (module doc)."""

    # Softmax of x_0 over the catalog, seed-averaged; --num-seeds may change after training.
    scorer = DiffusionScorer(inference_settings=("num_seeds",))

    def __init__(self, config: DiffuRecConfig) -> None:
        super().__init__(config)
        self.apply(_init_weights)

    def scoring_vectors(self, predicted: torch.Tensor) -> torch.Tensor:
        """The predicted x_0 as the softmax over the catalog reads it: unchanged."""
        return predicted

    def step_embedding(self, steps: torch.Tensor) -> torch.Tensor:
        """Steps [B] -> their embeddings [B, d] (the sinusoid through `step_mlp`)."""
        return self.step_mlp(sinusoidal_embedding(steps, self.config.hidden_size))

    def embed(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor,
              noised_target: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The Transformer's input [B, L, d]: each history item [B, L, d] plus its position
        plus lambda * (x_n + step), x_n = `noised_target` [B, d], `step` its step's
        embedding [B, d]; zero at padding."""
        length = item_vectors.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}; "
                             "truncate inputs to the model's max_len")
        guide = (noised_target + step.to(noised_target.dtype))[:, None]  # [B, 1, d]
        delta = self.config.uncertainty
        scale = (torch.normal(delta, delta, item_vectors.shape, device=item_vectors.device)
                 if self.training else delta)
        positions = torch.arange(self.config.max_len - length, self.config.max_len,
                                 device=item_vectors.device)
        x = item_vectors + self.position_embedding(positions) + scale * guide
        return self.input_dropout(x) * padding_mask.unsqueeze(-1).to(x.dtype)

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor,
                noised_target: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The predicted x_0 [B, d], read at the last history position."""
        step = self.step_embedding(steps)
        x = self.embed(item_vectors, padding_mask, noised_target, step)
        keep = padding_mask.unsqueeze(-1).to(x.dtype)
        attn_mask = padding_mask[:, None, None, :]  # every real item sees every real item
        with self.step_context.use(step[:, None], x.shape[1]):  # at every position
            for layer in self.layers:
                x = layer(x, attn_mask) * keep
        return self.final_norm(x[:, -1])

    def training_losses(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor,
                        target_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The predicted x_0 [B, d] of each target [B, d] from a uniformly drawn step; the
        cross-entropy over the catalog is the recommender's (DiffuRec has no MSE term)."""
        steps = torch.randint(1, self.config.num_steps + 1, (len(target_vectors),),
                              device=target_vectors.device)
        noised = self.schedule.add_noise(target_vectors, torch.randn_like(target_vectors),
                                         steps)
        return {"predicted": self(item_vectors, padding_mask, noised, steps)}

    @torch.no_grad()
    def sample_predictions(self, item_vectors: torch.Tensor,
                           padding_mask: torch.Tensor) -> torch.Tensor:
        """Each seed's x_0 [B, S, d] after the whole reverse process, for histories [B, L, d]."""
        config = self.config
        batch, seeds, d = len(item_vectors), config.num_seeds, config.hidden_size
        items, mask, noise = seeded_sampling(item_vectors, padding_mask, seeds,
                                             config.inference_seed)
        self.schedule.set_timesteps(config.num_steps)
        x = noise()  # x_N
        for n in self.schedule.timesteps.tolist():
            steps = torch.full((batch * seeds,), n, dtype=torch.long, device=x.device)
            predicted = self(items, mask, x, steps)
            x = self.schedule.step(predicted, n, x, noise=noise() if n > 1 else None)
        return x.view(batch, seeds, d)
