"""DimeRec: diffusion over the next interest, guided by the user's interests (Li et al., 2024,
arXiv 2408.12153; shared/papers/dimerec-summary.md).

Everything lives on the unit sphere: item vectors are L2-normalised wherever DimeRec reads
them. The guidance extraction module (GEM, ComiRec-SA's self-attentive multi-interest
extractor) reads the history and returns K interest vectors g_1..g_K: attention weights
softmax(W2 tanh(W1 (e_t + p_t))) over the history positions t, one distribution per
interest, pool the item vectors e_t (the positions p_t only steer the weights), and each
pooled vector is normalised.

Forward process, a geodesic random walk: the target x_0 moves along the sphere by the
exponential map of a Gaussian tangent vector, so its norm stays 1 (`geodesic_random_walk`).
The walk's angle at step n is arccos(sqrt(abar_n)) of the shared noise schedule: the angle
by which DDPM's sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps turns x_0 (eps at the items' scale,
N(0, I / d)), so abar_N ~ 0 ends a quarter turn away, where almost all of a
high-dimensional sphere is. Training takes that one step from x_0 (the closed form of the
walk up to step n), with n drawn uniformly.

The diffusion aggregation module (DAM) predicts x_0 from x_n, the step n and the interests:
SASRec's blocks over K + 1 tokens, the interests and x_n plus the step embedding (the
sinusoid through `step_mlp`), attending to each other; its output at the last token,
normalised, is the predicted x_0. The paper's DAM is an MLP conditioned on the interests;
a Transformer over them gives every adapter method (Houlsby, LoRA, prefix, diffusion_step)
its sites, and `step_context` holds the step embedding of the noised token while its
layers run (`adapters.diffusion_step.DiffusionStepHost`).

Loss (the scorer's, `DimeRecScorer`): L_gem + lambda L_recon + mu L_ssm. L_gem is the
softmax of the interest nearest the target (ComiRec's hard readout) over the items; L_recon
the squared distance ||x0_hat - x_0||^2 (the squared norm: over unit vectors a mean over
the d dimensions would be d times weaker than the softmax terms); L_ssm the softmax of
x0_hat over the items. Both softmaxes score cosine / `temperature`, over the whole catalog
(`--loss full`) or sampled (`--loss sampled`, the paper's, `--num-negatives`).

Inference: each of `num_seeds` samples starts from a uniform point on the sphere (seeded,
shared by every user, so a user's recommendations do not depend on the batch) and takes
`inference_steps` reverse steps at the strided steps of the schedule: predict x_0, then walk
the prediction to the next (smaller) step with fresh seeded noise; the last prediction is
the sample. The seeds' mean direction is scored against the items by cosine / temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftrec.pretraining.diffrec import (
    MAX_SEEDS,
    TransformerDenoiser,
    diffrec_setting,
    seeded_sampling,
    sinusoidal_embedding,
)
from peftrec.pretraining.losses import full_softmax_loss, sampled_softmax_loss
from peftrec.pretraining.sasrec import SASRecConfig, _init_weights
from peftrec.pretraining.schedules import build_schedule
from peftrec.pretraining.scoring import DotProductScorer, HistoryQuery, history_indicator

if TYPE_CHECKING:  # the type only: the recommender imports the backbones, which import this
    from peftrec.pretraining.recommender import SequentialRecommender


@dataclass
class DimeRecConfig(SASRecConfig):
    """The denoiser's Transformer settings (as SASRec's), the shared diffusion settings, and
    DimeRec's interests and loss weights. The paper summary gives none of DimeRec's values:
    the defaults below are our choices, each saying where it comes from."""

    # DiffRec's flags, read by DimeRec too: one --schedule, --diffusion-steps, --num-seeds,
    # --inference-steps and --mse-weight (lambda of L_recon, 1) for the diffusion family.
    schedule: str = diffrec_setting("schedule")
    num_steps: int = diffrec_setting("num_steps")
    num_seeds: int = diffrec_setting("num_seeds")
    inference_steps: int = diffrec_setting("inference_steps")
    mse_weight: float = diffrec_setting("mse_weight")
    # K = 4: ComiRec's default number of interests (DimeRec's GEM is ComiRec-SA).
    num_interests: int = field(default=4, metadata={
        "help": "DimeRec: K, the interest vectors the guidance module extracts from a history"})
    # Cosine logits are bounded by 1; 0.1 lets the softmax reach e^20 between items (our
    # choice; the paper's value is not in the summary).
    temperature: float = field(default=0.1, metadata={
        "help": "DimeRec: both softmaxes score cosine / temperature"})
    # mu of L_ssm; lambda is --mse-weight. Both 1: our choice, the losses as the paper sums them.
    denoised_softmax_weight: float = field(default=1.0, metadata={
        "help": "DimeRec: mu, the weight of the softmax on the denoised vector (L_ssm) next "
        "to the guidance softmax (L_gem, weight 1)"})
    inference_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        build_schedule(self.schedule, self.num_steps)  # names a bad schedule or step count
        if self.num_interests < 1:
            raise ValueError(f"--num-interests must be >= 1, got {self.num_interests}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.mse_weight < 0 or self.denoised_softmax_weight < 0:
            raise ValueError("--mse-weight and --denoised-softmax-weight must be >= 0, got "
                             f"{self.mse_weight} and {self.denoised_softmax_weight}")
        if not 1 <= self.num_seeds <= MAX_SEEDS:
            raise ValueError(f"--num-seeds must be in 1..{MAX_SEEDS}, got {self.num_seeds}")
        if not 1 <= self.inference_steps <= self.num_steps:
            raise ValueError(f"--inference-steps must be in 1..{self.num_steps} "
                             f"(--diffusion-steps), got {self.inference_steps}")


def exponential_map(points: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """Exp_x(v) = cos(|v|) x + sin(|v|) v / |v| on the unit sphere: unit `points` [..., d]
    moved along the geodesics of their tangent vectors `tangents` [..., d] (v . x = 0);
    v = 0 leaves x where it is."""
    length = tangents.norm(dim=-1, keepdim=True)
    return torch.cos(length) * points + torch.sinc(length / math.pi) * tangents


def geodesic_random_walk(points: torch.Tensor, noise: torch.Tensor,
                         angles: torch.Tensor) -> torch.Tensor:
    """Unit `points` [..., d] moved by the Gaussian `noise` [..., d] projected onto their
    tangent spaces and scaled so that its length is about `angles` [...] (radians), then
    mapped back onto the sphere (`exponential_map`): norms stay 1, zero noise moves nothing."""
    tangent = noise - (noise * points).sum(-1, keepdim=True) * points
    scale = angles / math.sqrt(max(points.shape[-1] - 1, 1))  # |tangent| ~ sqrt(d - 1)
    return exponential_map(points, scale.unsqueeze(-1).to(points.dtype) * tangent)


class DimeRecScorer(DotProductScorer):
    """Trains DimeRec on L_gem + lambda L_recon + mu L_ssm at each window's last target;
    scores candidates by the cosine of the generated vector with theirs / temperature."""

    inference_settings = ("num_seeds", "inference_steps")
    item_bias = "none"  # its losses and scores are cosines of its own

    def loss(self, model: SequentialRecommender,
             batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        has_target = targets[:, -1] > 0  # every training window ends with a target
        input_ids, targets = input_ids[has_target], targets[has_target, -1]
        backbone, catalog = model.backbone, model.item_encoder.catalog()
        losses = backbone.training_losses(catalog[input_ids], input_ids > 0, catalog[targets])
        items = F.normalize(catalog, dim=-1)
        offsets = None  # the repeat bias, on the scored (denoised) vector only
        if model.config.repeat_bias:
            offsets = model.repeat_bias * history_indicator(input_ids, len(catalog), False)
        config = backbone.config
        terms = {
            "gem": self.softmax_loss(model, losses["interest"], items, targets),
            "mse": config.mse_weight * losses["mse"],
            "ssm": config.denoised_softmax_weight * self.softmax_loss(
                model, losses["predicted"], items, targets, offsets),
        }
        logged = {"gem": terms["gem"].detach(), "mse": losses["mse"].detach(),
                  "ssm": terms["ssm"].detach()}
        return {"loss": sum(terms.values()), **logged, "terms": terms}

    @staticmethod
    def softmax_loss(model: SequentialRecommender, vectors: torch.Tensor, items: torch.Tensor,
                     targets: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of cosine(`vectors` [B, d], unit `items` [N + 1, d]) / temperature
        against `targets` [B]: over the catalog, or sampled with `--loss sampled`."""
        logits_scale = 1.0 / model.backbone.config.temperature
        queries = F.normalize(vectors, dim=-1) * logits_scale
        if model.config.loss == "sampled":
            return sampled_softmax_loss(queries, items, targets, model.config.num_negatives,
                                        model.sampling_probs, item_offsets=offsets)
        return full_softmax_loss(queries, items, targets, offsets)

    def query(self, model: SequentialRecommender,
              batch: dict[str, torch.Tensor]) -> torch.Tensor | HistoryQuery:
        """The seeds' mean generated direction / temperature [B, d] (with --repeat-bias, a
        `HistoryQuery` that also knows the inputs' items)."""
        input_ids = batch["input_ids"]
        samples = model.backbone.sample_predictions(model.item_encoder(input_ids),
                                                    input_ids > 0)
        state = F.normalize(samples.mean(1), dim=-1) / model.backbone.config.temperature
        return HistoryQuery(state, input_ids) if model.config.repeat_bias else state

    def candidate_vectors(self, model: SequentialRecommender,
                          item_ids: torch.Tensor) -> torch.Tensor:
        """The candidates' vectors on the unit sphere."""
        return F.normalize(super().candidate_vectors(model, item_ids), dim=-1)


class DimeRec(TransformerDenoiser):
    """The guidance module (interests) + the Transformer denoiser + the geodesic diffusion
    around them (module doc). The inherited position embedding serves the guidance module's
    history positions; the denoiser's tokens (interests, noised target) carry none."""

    scorer = DimeRecScorer()

    def __init__(self, config: DimeRecConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        # ComiRec-SA's W1 (d -> 4d, tanh) and W2 (4d -> K): one attention logit per interest.
        self.interest_attention = nn.Sequential(nn.Linear(d, 4 * d), nn.Tanh(),
                                                nn.Linear(4 * d, config.num_interests,
                                                          bias=False))
        self.apply(_init_weights)

    def interests(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """The unit interest vectors [B, K, d] of histories [B, L, d] (True at real items)."""
        length = item_vectors.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}; "
                             "truncate inputs to the model's max_len")
        items = F.normalize(item_vectors, dim=-1)
        positions = torch.arange(self.config.max_len - length, self.config.max_len,
                                 device=items.device)
        logits = self.interest_attention(items + self.position_embedding(positions))
        logits = logits.masked_fill(~padding_mask[..., None], torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=1)  # [B, L, K]: over the positions, per interest
        return F.normalize(weights.transpose(1, 2) @ items, dim=-1)

    def walk(self, points: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Unit `points` [B, d] walked to the noise level of `steps` [B] (0: clean)."""
        angles = self.schedule.abar(steps, device=points.device).sqrt().clamp(max=1).acos()
        return geodesic_random_walk(points, noise, angles)

    def forward(self, interests: torch.Tensor, noised: torch.Tensor,
                steps: torch.Tensor) -> torch.Tensor:
        """The predicted x_0 [B, d] (unit) from the interests [B, K, d], the noised target
        x_n [B, d] and its steps [B]."""
        step = self.step_mlp(sinusoidal_embedding(steps, self.config.hidden_size))[:, None]
        x = torch.cat([interests, noised[:, None] + step.to(noised.dtype)], dim=1)
        x = self.input_dropout(x)
        with self.step_context.use(step, 1):  # the last token carries the step
            for layer in self.layers:
                x = layer(x, None)  # no padding: every token sees every token
        return F.normalize(self.final_norm(x[:, -1]), dim=-1)

    def training_losses(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor,
                        target_vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """For histories [B, L, d] and targets [B, d]: the interest nearest each target
        ("interest" [B, d], ComiRec's hard readout), the predicted x_0 ("predicted" [B, d])
        from the target walked to a uniformly drawn step, and its squared distance to the
        target, averaged ("mse")."""
        interests = self.interests(item_vectors, padding_mask)
        targets = F.normalize(target_vectors, dim=-1)
        nearest = (interests @ targets[..., None]).squeeze(-1).argmax(-1)
        interest = interests[torch.arange(len(targets), device=targets.device), nearest]
        steps = torch.randint(1, self.config.num_steps + 1, (len(targets),),
                              device=targets.device)
        noised = self.walk(targets, torch.randn_like(targets), steps)
        predicted = self(interests, noised, steps)
        mse = (predicted - targets).float().pow(2).sum(-1).mean()
        return {"interest": interest, "predicted": predicted, "mse": mse}

    @torch.no_grad()
    def sample_predictions(self, item_vectors: torch.Tensor,
                           padding_mask: torch.Tensor) -> torch.Tensor:
        """Each seed's generated x_0 [B, S, d] (unit) for histories [B, L, d] (module doc)."""
        config = self.config
        batch, seeds, d = len(item_vectors), config.num_seeds, config.hidden_size
        interests = self.interests(item_vectors, padding_mask)
        every_interest = padding_mask.new_ones(interests.shape[:2])
        interests, _, noise = seeded_sampling(interests, every_interest, seeds,
                                              config.inference_seed)
        x = F.normalize(noise(), dim=-1)  # x_N: a uniform point on the sphere
        for n in self.schedule.set_timesteps(config.inference_steps).tolist():
            steps = torch.full((batch * seeds,), n, dtype=torch.long, device=x.device)
            predicted = self(interests, x, steps)
            following = self.schedule.previous_step(n)
            if following:
                x = self.walk(predicted, noise(), torch.full_like(steps, following))
        return predicted.view(batch, seeds, d)
