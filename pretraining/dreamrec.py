"""DreamRec: generate the next item's vector, guided by the history (Yang et al., NeurIPS 2023).

A SASRec Transformer encodes the history; its state at the last position is the condition
h. The target item's vector x_0 is noised, x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps,
with a step n drawn uniformly for each sequence, and an MLP over [x_n, h, step embedding]
(the sinusoid through a small MLP) predicts x_0. The loss is that prediction's MSE alone:
no cross-entropy, no negatives.

Classifier-free guidance: in training, each sequence's h is replaced by a learned null
vector with probability p (`null_history_probability`), so the one denoiser also learns the
unconditional prediction. Sampling runs every step of the reverse process from pure noise,
each step from the guided prediction x_0 = (1 + w) f(x_n, h, n) - w f(x_n, null, n)
(`guidance_weight` = w). The generated vector is scored against every item by the dot
product. The noise comes from a CPU generator seeded with `inference_seed`, shared by every
user, so a user's recommendations do not depend on the batch.

`diffusion_step` adapters go in the denoiser (`step_adapter_sites`): the MLP runs on
[B, 1, 3d] rows, its one position the noised one, and `step_context` holds the step
embedding while it runs (`adapters.diffusion_step.DiffusionStepHost`). The other adapters go
in the history encoder.

Departures from the reference code: the denoiser is its two-layer MLP (`mlp2`; its default
is one linear layer), and the schedule and steps are the shared `--schedule` and
`--diffusion-steps` (sqrt, 1000; its default is an exponential schedule of 200 steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftrec.adapters.diffusion_step import StepContext
from peftrec.pretraining.diffrec import diffrec_setting, seed_noise, sinusoidal_embedding
from peftrec.pretraining.sasrec import SASRec, SASRecConfig
from peftrec.pretraining.schedules import build_schedule
from peftrec.pretraining.scoring import DotProductScorer

if TYPE_CHECKING:  # the type only: the recommender imports the backbones, which import this
    from peftrec.pretraining.recommender import SequentialRecommender


@dataclass
class DreamRecConfig(SASRecConfig):
    """The history encoder's settings (as SASRec's) plus DreamRec's diffusion and guidance."""

    schedule: str = diffrec_setting("schedule")
    num_steps: int = diffrec_setting("num_steps")
    guidance_weight: float = field(default=2.0, metadata={
        "help": "DreamRec: w, sampling from (1 + w) x the conditional minus w x the "
        "unconditional prediction (0: the conditional alone)"})
    null_history_probability: float = field(default=0.1, metadata={
        "help": "DreamRec: p, the chance that training replaces a history's encoding by the "
        "learned null vector (what guidance subtracts)"})
    inference_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        build_schedule(self.schedule, self.num_steps)  # names a bad schedule or step count
        if self.guidance_weight < 0:
            raise ValueError(f"--guidance-weight must be >= 0, got {self.guidance_weight}")
        if not 0 <= self.null_history_probability < 1:
            raise ValueError("--null-history-probability must be in [0, 1), got "
                             f"{self.null_history_probability}")


class GeneratedVectorScorer(DotProductScorer):
    """Trains the backbone on its own loss (DreamRec's MSE) on each window's last target;
    scores candidates by the dot product with the vector it generates from the history."""

    losses = ("full",)  # no softmax at all; "full" is the default the flag accepts
    item_bias = "none"  # its MSE has no scores to offset

    def loss(self, model: SequentialRecommender,
             batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        has_target = targets[:, -1] > 0  # every training window ends with a target
        input_ids, targets = input_ids[has_target], targets[has_target, -1]
        catalog = model.item_encoder.catalog()
        mse = model.backbone.training_losses(catalog[input_ids], input_ids > 0,
                                             catalog[targets])["mse"]
        return {"loss": mse, "mse": mse.detach()}

    def query(self, model: SequentialRecommender,
              batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generated next-item vector [B, d]."""
        input_ids = batch["input_ids"]
        return model.backbone.sample_predictions(model.item_encoder(input_ids), input_ids > 0)


class DreamRec(nn.Module):
    """History encoder + the guided MLP denoiser + the diffusion around them (module doc)."""

    # Adapters go in the history encoder: the denoiser is an MLP, not Transformer layers.
    adapter_sites = {site: f"history_encoder.{path}"
                     for site, path in SASRec.adapter_sites.items()}
    lora_targets = SASRec.lora_targets
    attention_modules = f"history_encoder.{SASRec.attention_modules}"
    # diffusion_step adapters go where the step is read: after the denoiser's output layer.
    step_adapter_sites = {"ffn": "denoiser"}
    scorer = GeneratedVectorScorer()

    def __init__(self, config: DreamRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.schedule = build_schedule(config.schedule, config.num_steps)
        self.history_encoder = SASRec(config)
        # At the scale of the encoder's layer-normed output, as the reference draws it.
        self.null_history = nn.Parameter(torch.randn(d))
        self.step_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.denoiser = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.step_context = StepContext()

    def condition(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """h [B, d]: the history encoder's state at the last position of histories [B, L, d]."""
        return self.history_encoder(item_vectors, padding_mask)[:, -1]

    def denoise(self, noised: torch.Tensor, condition: torch.Tensor,
                steps: torch.Tensor) -> torch.Tensor:
        """f(x_n, h, n): the predicted x_0 [B, d] from x_n [B, d], h [B, d] and steps [B]."""
        step = self.step_mlp(sinusoidal_embedding(steps, self.config.hidden_size))
        rows = torch.cat([noised, condition, step.to(noised.dtype)], dim=-1)[:, None]
        with self.step_context.use(step[:, None], 1):  # one position, the noised one
            return self.denoiser(rows)[:, 0]

    def guided_prediction(self, noised: torch.Tensor, condition: torch.Tensor,
                          steps: torch.Tensor) -> torch.Tensor:
        """(1 + w) f(x_n, h, n) - w f(x_n, null, n), w = `guidance_weight`."""
        weight = self.config.guidance_weight
        null = self.null_history.to(condition.dtype).expand_as(condition)
        return ((1 + weight) * self.denoise(noised, condition, steps)
                - weight * self.denoise(noised, null, steps))

    def training_losses(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor,
                        target_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The MSE of the predicted x_0 [B, d] against the targets [B, d] (averaged over the
        d dimensions, as the reference's), histories [B, L, d] nulled with probability p."""
        batch = len(target_vectors)
        condition = self.condition(item_vectors, padding_mask)
        if self.training:
            chance = self.config.null_history_probability
            nulled = torch.rand(batch, device=condition.device) < chance
            condition = torch.where(nulled[:, None], self.null_history.to(condition.dtype),
                                    condition)
        steps = torch.randint(1, self.config.num_steps + 1, (batch,), device=condition.device)
        noised = self.schedule.add_noise(target_vectors, torch.randn_like(target_vectors), steps)
        predicted = self.denoise(noised, condition, steps)
        return {"mse": (predicted - target_vectors).float().pow(2).mean(), "predicted": predicted}

    @torch.no_grad()
    def sample_predictions(self, item_vectors: torch.Tensor,
                           padding_mask: torch.Tensor) -> torch.Tensor:
        """The generated x_0 [B, d] after the whole guided reverse process (module doc)."""
        condition = self.condition(item_vectors, padding_mask)
        batch, d = condition.shape
        generator = torch.Generator().manual_seed(self.config.inference_seed)

        def noise() -> torch.Tensor:  # one draw, shared by the users: [B, d]
            return seed_noise([generator], (d,), condition)[0].expand(batch, -1)

        x = noise()  # x_N
        for n in self.schedule.set_timesteps(self.config.num_steps).tolist():
            steps = torch.full((batch,), n, dtype=torch.long, device=x.device)
            predicted = self.guided_prediction(x, condition, steps)
            x = self.schedule.step(predicted, n, x, noise=noise() if n > 1 else None)
        return x
