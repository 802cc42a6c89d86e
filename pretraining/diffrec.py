"""DiffRec: a diffusion model over the target item's representation (Du et al., 2023).

The user's sequence is extended by its target (training) or a placeholder
(inference, the paper's [unk]); when that makes it longer than `max_len` its
first item is dropped. Only the last `noised_positions` positions are noised,
h^n = sqrt(abar_n) h^0 + sqrt(1 - abar_n) eps (Eq. 7), and they alone receive the
diffusion-step embedding: the sinusoid z_n (Eq. 15) through a small MLP
(`step_mlp`). A Transformer encoder built from SASRec's blocks, with learned
positions counted from the right end, predicts h^0 at the last position (Eq. 16).

Training (Algorithm 1): the step n of each sequence is drawn with probability
p_n proportional to sqrt(E[L_n^2]) over the last `history_size` losses of each
step, uniform until every step has a full history; the MSE of each sequence is
weighted by 1 / (N p_n) so that the weighted loss is unbiased (Eq. 18). The MSE
of a target is the mean over the d dimensions of (h^0 - f(h^n, n))^2, or with
`mse_reduction="sum"` the paper's squared norm ||h^0 - f(h^n, n)||^2 (Eq. 13, 17),
d times larger. The recommendation loss (Eq. 8, 13) over the whole catalog is computed
by the scorer (`pretraining.diffusion_scorer`), which also averages the seeds at inference.

Inference: each of `num_seeds` seeded samples starts from pure noise at step N;
`one_step` predicts h^0 in one step (Algorithm 3), `reverse` runs every step of
the reverse process and `strided` `inference_steps` of them (Algorithm 2). The
noise of seed s comes from a CPU generator seeded with `inference_seed + s` and is
shared by every user, so a user's recommendations do not depend on the batch.

With `causal_denoiser` every position attends only to itself and earlier ones,
so the history (everything before the noised positions) never sees the noised
target: its keys and values are computed once per user and reused for every
seed and every reverse step.

`every_position` (causal denoiser only) trains on the next item of every position of a
window, as SASRec does, instead of the window's last item alone. The denoiser runs
on two streams in one pass: the clean inputs (causal attention among themselves) and,
for each input position t, its noised next item at position t + 1, each with its own
step, attending to the clean inputs up to t and to itself only. Each noised token
then sees exactly what the single noised target sees at inference (the history, then
itself), so the inference code is unchanged.

While the denoiser's layers run, `step_context` holds the step embedding of the rows
being denoised, so that layers conditioned on the step (`diffusion_step` adapters) can
read it without a change to the blocks' call signature; outside, they refuse to run. The
contract is the adapters' (`adapters.diffusion_step.DiffusionStepHost`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

import torch
from torch import nn

from peftrec.adapters.diffusion_step import StepContext
from peftrec.pretraining.diffusion_scorer import DiffusionScorer
from peftrec.pretraining.sasrec import CausalSelfAttention, SASRecBlock, SASRecConfig, _init_weights
from peftrec.pretraining.schedules import SCHEDULES, build_schedule

INFERENCE_MODES = ("one_step", "reverse", "strided")
MSE_REDUCTIONS = ("mean", "sum")  # over the d dimensions of a target's squared error
MAX_SEEDS = 256


@dataclass
class DiffRecConfig(SASRecConfig):
    """The denoiser's Transformer settings (as SASRec's) plus the diffusion process."""

    # A field with help text is a command-line flag (pretraining.cli).
    schedule: str = field(default="sqrt", metadata={
        "choices": sorted(SCHEDULES), "help": "noise schedule of the diffusion process"})
    num_steps: int = field(default=1000, metadata={
        "flag": "diffusion-steps", "help": "N, the steps of the diffusion process"})
    noised_positions: int = field(default=1, metadata={  # paper 5.3.4
        "help": "noise the last K positions (1: the target only)"})
    num_seeds: int = field(default=10, metadata={
        "help": f"noise samples averaged at inference (1..{MAX_SEEDS})"})
    inference: str = field(default="one_step", metadata={
        "choices": INFERENCE_MODES,
        "help": "one step from pure noise, the full reverse process, or a strided one of "
        "--inference-steps steps"})
    inference_steps: int = field(default=50, metadata={"help": "steps of --inference strided"})
    causal_denoiser: bool = field(default=False, metadata={
        "help": "causal attention in the denoiser: the history is encoded once and reused "
        "for every seed and step"})
    # Train on every position's next item at once, not only the window's last (needs the
    # causal denoiser): ~max_len targets per window instead of one (see the module doc).
    every_position: bool = field(default=False, metadata={
        "help": "train on every position's next item, not only each window's last (needs "
        "--causal-denoiser; ~max-len targets per window)"})
    # The noised copies of the items carry no gradient to the item table. Through them a
    # trainable table can grow its norms until the noise hardly hides the target: training
    # gets easier while one-step inference, which starts from pure noise, gains nothing.
    detach_noised_items: bool = field(default=False, metadata={
        "help": "no gradient from the noised target copies to the item table (stops a "
        "trained table from inflating its norms past the noise)"})
    # Score softmax(s * h^0 @ E^T + b) with a learned scalar s. The softmax is tied to the
    # item table, so without s one vector serves two masters: the MSE pulls h^0 to the
    # items' scale, the cross-entropy wants it long for sharp probabilities (the paper's W
    # is a separate layer). s gives the sharpness, h^0 stays at the items' scale.
    logit_scale: bool = field(default=False, metadata={
        "help": "score with a learned scale s: softmax(s h0 E^T + b), so the MSE and the "
        "softmax do not fight over the length of h0"})
    # Score with the paper's separate output layer W (Eq. 13), a per-item table initialised
    # as a copy of the item vectors, instead of the item table itself. The item table then
    # serves only the inputs and the MSE targets, so it can stay frozen (e.g. as copied from
    # SASRec) while the softmax still learns every item's output vector.
    untied_output: bool = field(default=False, metadata={
        "help": "score with a separate output table W (the paper's Eq. 13, a copy of the "
        "item vectors at start), not the item table"})
    mse_weight: float = field(default=1.0, metadata={
        "help": "weight of the diffusion MSE next to the cross-entropy"})
    # A target's squared error averaged over the d dimensions ("mean"), or summed: the
    # squared norm of the paper's Eq. 13 and 17, d times stronger next to the cross-entropy.
    mse_reduction: str = field(default="mean", metadata={
        "choices": MSE_REDUCTIONS,
        "help": "a target's squared error averaged over the d dimensions, or summed: the "
        "paper's squared norm (Eq. 13), d times stronger"})
    history_size: int = 10  # losses remembered per step for importance sampling
    inference_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("noised_positions", "history_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown noise schedule {self.schedule!r}; choose one of {sorted(SCHEDULES)}"
            )
        if self.num_steps < 2:
            raise ValueError(f"--diffusion-steps must be >= 2, got {self.num_steps}")
        if self.noised_positions > self.max_len:
            raise ValueError(f"--noised-positions {self.noised_positions} exceeds --max-len "
                             f"{self.max_len}")
        if not 1 <= self.num_seeds <= MAX_SEEDS:
            raise ValueError(
                f"--num-seeds must be in 1..{MAX_SEEDS}, got {self.num_seeds} (inference "
                "memory and time grow with the number of seeds: batch x seeds sequences)"
            )
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"unknown inference {self.inference!r}; choose one of "
                             f"{list(INFERENCE_MODES)}")
        if self.inference == "strided" and not 1 <= self.inference_steps <= self.num_steps:
            raise ValueError(f"--inference-steps must be in 1..{self.num_steps} "
                             f"(--diffusion-steps), got {self.inference_steps}")
        if self.every_position and not (self.causal_denoiser and self.noised_positions == 1):
            raise ValueError("--every-position needs --causal-denoiser and --noised-positions 1"
                             ": each position's noised target may only see the clean items "
                             "before it")
        if self.mse_weight < 0:
            raise ValueError(f"mse_weight must be >= 0, got {self.mse_weight}")
        if self.mse_reduction not in MSE_REDUCTIONS:
            raise ValueError(f"unknown --mse-reduction {self.mse_reduction!r}; choose one of "
                             f"{list(MSE_REDUCTIONS)}")


def diffrec_setting(name: str, default=MISSING):
    """DiffRec's field `name` with its flag, for another diffusion backbone's config: one
    `--schedule`, one `--diffusion-steps`, ... serve every backbone that declares them.
    `default`: this backbone's own (unset: DiffRec's); where the backbones' defaults differ,
    the flag left unset gives each backbone its own (`pretraining.cli`)."""
    shared = next(setting for setting in fields(DiffRecConfig) if setting.name == name)
    return field(default=shared.default if default is MISSING else default,
                 metadata=shared.metadata)


class ImportanceStepSampler(nn.Module):
    """Draws diffusion steps with p_n proportional to sqrt(E[L_n^2]) (Eq. 18).

    Each step keeps its last `history_size` losses in a ring buffer (`history`,
    `counts`: buffers, so they are saved with the model and restored on resume).
    Until every step has a full history the steps are drawn uniformly.
    """

    def __init__(self, num_steps: int, history_size: int = 10) -> None:
        super().__init__()
        self.num_steps, self.history_size = num_steps, history_size
        self.register_buffer("history", torch.zeros(num_steps, history_size))
        self.register_buffer("counts", torch.zeros(num_steps, dtype=torch.long))

    def probabilities(self) -> torch.Tensor:
        """p_1 .. p_N, summing to one (computed on-device, without host syncs)."""
        uniform = torch.full_like(self.history[:, 0], 1.0 / self.num_steps)
        root_mean_square = self.history.double().pow(2).mean(1).sqrt().clamp_min(1e-12)
        weighted = (root_mean_square / root_mean_square.sum()).to(uniform.dtype)
        return torch.where((self.counts >= self.history_size).all(), weighted, uniform)

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """Steps [B] in 1..N and their loss weights 1 / (N p_n)."""
        probs = self.probabilities()
        index = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return index + 1, 1.0 / (self.num_steps * probs[index])

    @torch.no_grad()
    def update(self, steps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record each loss under its step (1-based), vectorised: no Python loop over steps."""
        index = steps.long() - 1
        order = torch.argsort(index, stable=True)
        index, losses = index[order], losses[order].to(self.history.dtype)
        first = torch.searchsorted(index, index)  # first occurrence of each step in the batch
        occurrence = torch.arange(len(index), device=index.device) - first
        in_batch = torch.bincount(index, minlength=self.num_steps)
        keep = occurrence >= in_batch[index] - self.history_size  # only the last H count
        slots = (self.counts[index] + occurrence) % self.history_size
        self.history[index[keep], slots[keep]] = losses[keep]
        self.counts += in_batch


def sinusoidal_embedding(steps: torch.Tensor, dim: int) -> torch.Tensor:
    """z_n (Eq. 15): z(2j) = sin(n / 10000^(2j/d)), z(2j+1) = cos(...); [B] -> [B, d]."""
    half = (dim + 1) // 2
    frequencies = torch.exp(-math.log(10000.0) * 2 * torch.arange(half, device=steps.device)
                            / dim)
    angles = steps.float()[:, None] * frequencies[None, :]
    z = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)
    return z[:, :dim]


def seed_noise(generators: list[torch.Generator], shape: tuple[int, ...],
               like: torch.Tensor) -> torch.Tensor:
    """[S, *shape] standard normal draws, one generator per seed (CPU, so portable), on the
    device and in the dtype of `like`."""
    draws = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return draws.to(like.device, like.dtype)


def seeded_sampling(item_vectors: torch.Tensor, padding_mask: torch.Tensor, num_seeds: int,
                    inference_seed: int) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """What a last-position reverse process needs: the histories [B, L, d] and their mask
    repeated once per seed ([B * S, ...]), and `noise()`, a fresh draw [B * S, d] per call
    from one generator per seed, shared by the users (a user's sample does not depend on
    the batch it is in)."""
    batch, d = len(item_vectors), item_vectors.shape[-1]
    generators = [torch.Generator().manual_seed(inference_seed + s) for s in range(num_seeds)]

    def noise() -> torch.Tensor:
        return seed_noise(generators, (d,), item_vectors).expand(batch, -1, -1).flatten(0, 1)

    return (item_vectors.repeat_interleave(num_seeds, dim=0),
            padding_mask.repeat_interleave(num_seeds, dim=0), noise)


class TransformerDenoiser(nn.Module):
    """What DiffRec, DiffuRec and DimeRec share: the noise schedule, positions, the step MLP over a
    sinusoid, input dropout, SASRec blocks and a final norm (their names are checkpoint
    keys), the adapter sites in those blocks and the step context the diffusion_step
    adapters read. A subclass adds its own parts, then applies `_init_weights`."""

    adapter_sites = {"attn": "layers.{i}.attention", "ffn": "layers.{i}.feed_forward"}
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    attention_modules = "layers.{i}.attention"  # the self-attention (prefix, prompt)

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.schedule = build_schedule(config.schedule, config.num_steps)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.step_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.step_context = StepContext()


class DiffRec(TransformerDenoiser):
    """The denoiser f(h^n, n) plus the diffusion process around it (see the module doc)."""

    # Softmax of h^0 over the catalog, seed-averaged; how it samples may change after training.
    scorer = DiffusionScorer(inference_settings=("inference", "num_seeds", "inference_steps"))

    def __init__(self, config: DiffRecConfig) -> None:
        super().__init__(config)
        self.step_sampler = ImportanceStepSampler(config.num_steps, config.history_size)
        self.apply(_init_weights)
        # log s, so that s stays positive; s = 1 at start, the model without it.
        self.log_logit_scale = nn.Parameter(torch.zeros(())) if config.logit_scale else None

    @torch.no_grad()
    def load_sasrec_transformer(self, state: dict[str, torch.Tensor],
                                sasrec: SASRecConfig) -> None:
        """Start the denoiser from a trained SASRec's Transformer (`state`: its backbone's
        weights), so that the clean history is encoded exactly as SASRec encodes it (with
        `causal_denoiser`; otherwise the history also attends to the noised target).

        SASRec feeds sqrt(d) e + p; this model e + p', so p' = p / sqrt(d) and every
        residual branch (attention output, feed-forward output) is scaled by 1 / sqrt(d):
        the whole residual stream is SASRec's divided by sqrt(d), which the pre-layer
        norms and the final norm do not see. Positions stay right-aligned: the last
        history position (max_len - 2) takes SASRec's last one, the target's position
        (max_len - 1, only ever noised) reuses it too. The step embedding stays new.
        """
        mine = self.config
        shapes = ("hidden_size", "num_layers", "num_heads", "ffn_size")
        differ = [f"{name} {getattr(sasrec, name)} vs {getattr(mine, name)}" for name in shapes
                  if getattr(sasrec, name) != getattr(mine, name)]
        if differ:
            raise ValueError(f"the SASRec Transformer has another shape ({', '.join(differ)}); "
                             "pass the SASRec run's --hidden-size/--num-layers/--num-heads/"
                             "--ffn-size")
        if mine.max_len - 1 > sasrec.max_len:
            raise ValueError(f"this denoiser's --max-len {mine.max_len} holds "
                             f"{mine.max_len - 1} history positions, the SASRec run has "
                             f"{sasrec.max_len}; pass --max-len {sasrec.max_len + 1} or less")
        scale = mine.hidden_size ** -0.5
        layers = {name.removeprefix("layers."): tensor for name, tensor in state.items()
                  if name.startswith("layers.")}
        for name, tensor in layers.items():
            residual_output = name.split(".")[1:3] in (["attention", "o_proj"],
                                                       ["feed_forward", "fc2"])
            layers[name] = tensor * scale if residual_output else tensor
        self.layers.load_state_dict(layers)
        self.final_norm.load_state_dict({name.removeprefix("final_norm."): tensor
                                         for name, tensor in state.items()
                                         if name.startswith("final_norm.")})
        history = torch.arange(mine.max_len - 1) + sasrec.max_len - mine.max_len + 1
        source = torch.cat([history, history[-1:]])  # the target reuses the last position
        self.position_embedding.weight.copy_(
            state["position_embedding.weight"][source] * scale)

    # -- building blocks ------------------------------------------------------------------
    def scoring_vectors(self, predicted: torch.Tensor) -> torch.Tensor:
        """Predicted h^0 as the softmax reads it: times s with `logit_scale`."""
        if self.log_logit_scale is None:
            return predicted
        return predicted * self.log_logit_scale.exp().to(predicted.dtype)

    def build_sequence(self, item_vectors, padding_mask, last_vectors):
        """History [B, L, d] + the target / placeholder [B, d] -> [B, L', d], mask [B, L']."""
        sequence = torch.cat([item_vectors, last_vectors[:, None]], dim=1)
        mask = torch.cat([padding_mask, padding_mask.new_ones(len(padding_mask), 1)], dim=1)
        if sequence.shape[1] > self.config.max_len:
            drop = sequence.shape[1] - self.config.max_len
            sequence, mask = sequence[:, drop:], mask[:, drop:]
        return sequence, mask

    def noised_count(self, length: int) -> int:
        return min(self.config.noised_positions, length)

    def noise_sequence(self, sequence, padding_mask, steps, noise):
        """Noise the last K real positions at `steps` [B]; the others are left untouched."""
        k = self.noised_count(sequence.shape[1])
        tail = sequence[:, -k:]
        noised = self.schedule.add_noise(self._noising_input(tail), noise,
                                         steps[:, None].expand(-1, k))
        noised = torch.where(padding_mask[:, -k:, None], noised, tail)
        return torch.cat([sequence[:, :-k], noised], dim=1)

    def squared_error(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each target's (h^0 - f(h^n, n))^2 over its d dimensions, by `mse_reduction`."""
        squared = (predicted - target).float().pow(2)
        return squared.sum(-1) if self.config.mse_reduction == "sum" else squared.mean(-1)

    def _noising_input(self, clean: torch.Tensor) -> torch.Tensor:
        return clean.detach() if self.config.detach_noised_items else clean

    def step_embedding(self, steps: torch.Tensor) -> torch.Tensor:
        """Steps [B] -> [B, 1, d], or a step per position [B, K] -> [B, K, d]."""
        per_row = steps.dim() == 1
        z = sinusoidal_embedding(steps.reshape(-1), self.config.hidden_size)
        return self.step_mlp(z).view(len(steps), 1 if per_row else steps.shape[1], -1)

    def embed(self, vectors, padding_mask, step, start: int, noised: int):
        """Denoiser input: vectors + positions (from `start` of the right-aligned range) +
        the step embedding `step` (`step_embedding`; None without noised positions) on the
        last `noised` positions."""
        length = vectors.shape[1]
        if start + length > self.config.max_len:
            raise ValueError(f"sequence length {start + length} exceeds max_len "
                             f"{self.config.max_len}; truncate inputs to the model's max_len")
        positions = torch.arange(start, start + length, device=vectors.device)
        x = vectors + self.position_embedding(positions)
        if noised:
            x = torch.cat([x[:, :-noised], x[:, -noised:] + step.to(x.dtype)], dim=1)
        return self.input_dropout(x) * padding_mask.unsqueeze(-1).to(x.dtype)

    def _mask(self, queries: int, padding_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """[B, 1, Q, K]: the last Q positions as queries over all K key positions."""
        keys = padding_mask.shape[1]
        allowed = padding_mask[:, None, None, :].expand(-1, 1, queries, keys)
        if self.config.causal_denoiser:
            rows = torch.arange(keys - queries, keys, device=padding_mask.device)[:, None]
            allowed = allowed & (torch.arange(keys, device=padding_mask.device) <= rows)
        return allowed

    def forward(self, sequence, padding_mask, steps) -> torch.Tensor:
        """f(h^n, n): the predicted h^0 [B, d] at the last position of a noised sequence."""
        length = sequence.shape[1]
        noised = self.noised_count(length)
        step = self.step_embedding(steps)  # once, for the input and the step context
        x = self.embed(sequence, padding_mask, step, self.config.max_len - length, noised)
        keep = padding_mask.unsqueeze(-1).to(x.dtype)
        attn_mask = self._mask(length, padding_mask)
        with self.step_context.use(step, noised):
            for layer in self.layers:
                x = layer(x, attn_mask) * keep
        return self.final_norm(x[:, -1])

    # -- training -------------------------------------------------------------------------
    def training_losses(self, item_vectors, padding_mask, target_vectors) -> dict:
        """Importance-weighted MSE (Eq. 17-18) and the predicted h^0 [B, d] of each target.

        `item_vectors` [B, L, d] with `padding_mask` [B, L] (True at real items) are the
        histories, `target_vectors` [B, d] the clean targets h^0.
        """
        sequence, mask = self.build_sequence(item_vectors, padding_mask, target_vectors)
        k = self.noised_count(sequence.shape[1])
        steps, weights = self.step_sampler.sample(len(sequence))
        noise = torch.randn_like(sequence[:, -k:])
        predicted = self(self.noise_sequence(sequence, mask, steps, noise), mask, steps)
        per_sequence = self.squared_error(predicted, target_vectors)
        if self.training:
            self.step_sampler.update(steps, per_sequence.detach())
        return {"mse": (weights * per_sequence).mean(), "predicted": predicted}

    def every_position_losses(self, item_vectors, padding_mask, target_vectors, has_target):
        """`training_losses` for the next item of every position (`every_position`).

        `item_vectors` [B, L, d] are the inputs, `target_vectors` [B, L, d] each position's
        next item and `has_target` [B, L] where there is one. Returns the importance-weighted
        MSE over the targets and the predicted h^0 [B, L', d] with the `has_target` [B, L']
        it belongs to (L' = L, or L - 1 when the first position must make room: a target
        sits one position after its input, within `max_len`).
        """
        if item_vectors.shape[1] >= self.config.max_len:  # as `build_sequence` drops it
            drop = item_vectors.shape[1] - self.config.max_len + 1
            item_vectors, padding_mask = item_vectors[:, drop:], padding_mask[:, drop:]
            target_vectors, has_target = target_vectors[:, drop:], has_target[:, drop:]
        batch, length = padding_mask.shape
        steps, weights = self.step_sampler.sample(batch * length)
        steps, weights = steps.view(batch, length), weights.view(batch, length)
        noised = self.schedule.add_noise(self._noising_input(target_vectors),
                                         torch.randn_like(target_vectors), steps)
        predicted = self.denoise_every_position(item_vectors, padding_mask, noised, steps,
                                                has_target)
        per_target = self.squared_error(predicted, target_vectors)
        if self.training:
            self.step_sampler.update(steps[has_target], per_target[has_target].detach())
        mse = (weights * per_target)[has_target].sum() / has_target.sum().clamp_min(1)
        return {"mse": mse, "predicted": predicted, "has_target": has_target}

    def denoise_every_position(self, item_vectors, padding_mask, noised_targets, steps,
                               has_target) -> torch.Tensor:
        """f(h^n, n) [B, L, d] of every position's noised next item at once (the two
        streams of the module doc): inputs `item_vectors` [B, L, d] (L < max_len),
        `noised_targets` [B, L, d] at `steps` [B, L], `has_target` [B, L]."""
        batch, length = padding_mask.shape
        # Clean inputs at positions up to max_len - 2, each noised target one to the right.
        x = torch.cat([item_vectors, noised_targets], dim=1)
        start = self.config.max_len - length - 1
        positions = torch.arange(length, device=x.device)
        x = x + self.position_embedding(torch.cat([positions, positions + 1]) + start)
        step = self.step_embedding(steps)
        x = torch.cat([x[:, :length], x[:, length:] + step.to(x.dtype)], dim=1)
        keep = torch.cat([padding_mask, has_target], dim=1).unsqueeze(-1).to(x.dtype)
        x = self.input_dropout(x) * keep
        # Query t of either stream sees the clean inputs up to t; a noised target also sees
        # itself, and no other position sees it.
        history = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        history = history & padding_mask[:, None, :]  # [B, L, L]
        itself = torch.eye(length, dtype=torch.bool, device=x.device).expand(batch, -1, -1)
        attn_mask = torch.cat([torch.cat([history, torch.zeros_like(history)], dim=2),
                               torch.cat([history, itself], dim=2)], dim=1)[:, None]
        with self.step_context.use(step, length):
            for layer in self.layers:
                x = layer(x, attn_mask) * keep
        return self.final_norm(x[:, length:])

    # -- inference ------------------------------------------------------------------------
    def inference_timesteps(self) -> list[int]:
        mode, n = self.config.inference, self.config.num_steps
        if mode == "one_step":
            return [n]
        count = n if mode == "reverse" else self.config.inference_steps
        return self.schedule.set_timesteps(count).tolist()

    @torch.no_grad()
    def sample_predictions(self, item_vectors, padding_mask, reuse_history: bool | None = None):
        """Each seed's predicted h^0 [B, S, d] for histories [B, L, d] (see the module doc).

        `reuse_history` (default: `causal_denoiser`) encodes the history once per user;
        without a causal denoiser it is not allowed (the history would see the noise).
        """
        config = self.config
        reuse = config.causal_denoiser if reuse_history is None else reuse_history
        if reuse and not config.causal_denoiser:
            raise ValueError("the history can only be reused with causal_denoiser=True")
        batch, d, seeds = len(item_vectors), config.hidden_size, config.num_seeds
        placeholder = item_vectors.new_zeros(batch, d)
        sequence, mask = self.build_sequence(item_vectors, padding_mask, placeholder)
        length = sequence.shape[1]
        k = self.noised_count(length)
        generators = [torch.Generator().manual_seed(config.inference_seed + s)
                      for s in range(seeds)]

        def per_seed(t: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B * S, ...]
            return t.repeat_interleave(seeds, dim=0)

        def expand(noise: torch.Tensor) -> torch.Tensor:  # [S, ...] -> [B * S, ...]
            return noise.expand(batch, *noise.shape).flatten(0, 1)

        clean_tail = per_seed(sequence[:, -k:-1])  # real items among the noised positions
        tail_noise = expand(seed_noise(generators, (k - 1, d), sequence))
        tail_mask = per_seed(mask[:, -k:])
        x_last = expand(seed_noise(generators, (d,), sequence))  # h^N = eps
        if reuse:
            cache = self._encode_history(sequence[:, :-k], mask[:, :-k],
                                         config.max_len - length)
        else:
            full_history, full_mask = per_seed(sequence[:, :-k]), per_seed(mask)
        timesteps = self.inference_timesteps()
        for i, n in enumerate(timesteps):
            steps = torch.full((batch * seeds,), n, device=sequence.device, dtype=torch.long)
            tail = torch.cat([clean_tail, x_last[:, None]], dim=1)
            noise = torch.cat([tail_noise, torch.zeros_like(x_last[:, None])], dim=1)
            noised = self.schedule.add_noise(tail, noise, steps[:, None].expand(-1, k))
            noised = torch.cat([noised[:, :-1], x_last[:, None]], dim=1)  # the last is x_n
            noised = torch.where(tail_mask[..., None], noised, tail)
            if reuse:
                predicted = self._denoise_tail(cache, noised, mask[:, :-k], tail_mask, steps)
            else:
                predicted = self(torch.cat([full_history, noised], dim=1), full_mask, steps)
            if i + 1 < len(timesteps):
                step_noise = expand(seed_noise(generators, (d,), sequence))
                x_last = self.schedule.step(predicted, n, x_last, noise=step_noise)
        return predicted.view(batch, seeds, d)

    def _encode_history(self, history, history_mask, start: int) -> list[tuple | None]:
        """Per layer, the keys and values [B, heads, P, d / heads] of the history positions."""
        if not history.shape[1]:
            return [None for _ in self.layers]
        x = self.embed(history, history_mask, None, start, 0)
        cache = []
        keep = history_mask.unsqueeze(-1).to(x.dtype)
        attn_mask = self._mask(history.shape[1], history_mask)
        with self.step_context.use(None, 0):  # the history positions carry no step
            for layer in self.layers:
                cache.append(_self_attention(layer).key_values(layer.attn_norm(x)))
                x = layer(x, attn_mask) * keep
        return cache

    def _denoise_tail(self, cache, tail, history_mask, tail_mask, steps) -> torch.Tensor:
        """The causal denoiser on the noised positions only, over the cached history."""
        seeds = len(tail) // len(history_mask)
        k = tail.shape[1]
        step = self.step_embedding(steps)
        x = self.embed(tail, tail_mask, step, self.config.max_len - k, k)
        keep = tail_mask.unsqueeze(-1).to(x.dtype)
        attn_mask = self._mask(k, torch.cat([history_mask.repeat_interleave(seeds, 0),
                                             tail_mask], dim=1))
        with self.step_context.use(step, k):
            for layer, past in zip(self.layers, cache, strict=True):
                if past is not None:
                    past = tuple(t.repeat_interleave(seeds, 0) for t in past)
                # Through the block itself, so adapters wrapping its modules apply here too.
                x = layer(x, attn_mask, past) * keep
        return self.final_norm(x[:, -1])


def _self_attention(layer: SASRecBlock) -> CausalSelfAttention:
    """The block's attention module, also when an adapter wraps it (keeping it as `.base`)."""
    return next(m for m in layer.attention.modules() if isinstance(m, CausalSelfAttention))
