"""The one Trainer: pretraining and fine-tuning alike, on one CPU or many GPUs via Accelerate.

Run folder layout (DESIGN.md, command-line contract):
    best_model/    best checkpoint by validation metric (config.json + model.safetensors)
    state/         `accelerator.save_state` + trainer_state.json, rewritten atomically, with
                   checksums; state.old/ keeps the save before it, which a resume falls
                   back to when state/ is damaged
    log.jsonl      one JSON object per epoch (main process only); a resume drops the rows
                   of epochs after its saved state, which it trains again (and does not
                   log to the trackers again: they got each row's epoch before the row)

A NaN or inf training loss (`on_nan`) stops the run with an error that names the step, the
batch's users and the last saved state, or skips that optimizer step ("skip"), counted in
log.jsonl, the training summary and trainer_state.json.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from peftrec.dataset_tools import atomic_write, clean_interrupted_writes
from peftrec.dataset_tools.checkpoints import BEST_DIR, STATE_DIR, CheckpointError
from peftrec.dataset_tools.integrity import damaged_file, write_checksums
from peftrec.pretraining.evaluation import EvaluationProtocol, evaluate
from peftrec.pretraining.pcgrad import pcgrad_objective

SCHEDULERS = ("constant", "cosine", "step", "one_cycle")
# torch.optim.lr_scheduler.OneCycleLR's defaults: the rate starts at --lr / ONE_CYCLE_DIV,
# peaks at --lr after ONE_CYCLE_RISE of the run and ends at --lr / ONE_CYCLE_DIV / 1e4.
ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV, ONE_CYCLE_RISE = 25.0, 1e4, 0.3
ON_NAN = ("stop", "skip")
LOG = "log.jsonl"
TRAINER_STATE = "trainer_state.json"
SHOWN_USERS = 32  # users a non-finite loss report lists by name; the rest are counted

logger = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """A NaN or inf training loss under `on_nan="stop"` (a ValueError: scripts print it as
    one line and exit 2)."""


@dataclass
class TrainingConfig:
    # A field with help text is a command-line flag of the scripts that train (its text is
    # the flag's help, see pretraining.cli); the others are set by the code.
    output_dir: str
    epochs: int = field(default=200, metadata={"help": "epochs to train at most"})
    max_steps: int = field(default=0, metadata={
        "help": "stop after N optimizer steps in total (0: no limit)"})
    batch_size: int = field(default=128, metadata={"help": "training sequences per batch"})
    eval_batch_size: int = field(default=256, metadata={
        "help": "users scored at once in full ranking (bounds evaluation memory)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="constant", metadata={
        "choices": SCHEDULERS,
        "help": "the rate after warm-up: constant, cosine to 0 over --epochs, or step "
        "(multiplied by --decay-factor after each of --decay-epochs); or one_cycle (torch's "
        "OneCycleLR: from --lr/25 up to --lr over --warmup-steps, default 30%% of the run's "
        "steps, then down to --lr/25e4; the run is --epochs, or --max-steps if fewer)"})
    warmup_steps: int = field(default=0, metadata={
        "help": "steps of linear warm-up to --lr (one_cycle: of its rise)"})
    decay_epochs: tuple[int, ...] = field(default=(), metadata={
        "help": "--scheduler step: the epochs after which the rate drops"})
    decay_factor: float = field(default=0.1, metadata={
        "help": "--scheduler step: what each drop multiplies the rate by"})
    grad_accum: int = field(default=1, metadata={
        "help": "batches whose gradients are summed before each optimizer step"})
    max_grad_norm: float = field(default=5.0, metadata={
        "help": "clip the gradient norm to this (0: no clipping)"})
    # Unset by default: the launcher's --mixed_precision (an `accelerate launch` config,
    # passed as ACCELERATE_MIXED_PRECISION) decides then; a given flag wins over it. Set to
    # the one used once the config exists, so config.json records it.
    mixed_precision: str | None = field(default=None, metadata={
        "choices": ("no", "fp16", "bf16"),
        "help": "through Accelerate (unset: the launcher's --mixed_precision or "
        "ACCELERATE_MIXED_PRECISION, else no; config.json records the one used)"})
    patience: int = field(default=10, metadata={
        "help": "epochs without better validation NDCG@10 before stopping"})
    metric: str = "ndcg@10"
    num_workers: int = field(default=0, metadata={"help": "data loading processes"})
    seed: int = field(default=42, metadata={
        "help": "seeds model init, data order, dropout and the --eval-users sample"})
    save_steps: int = field(default=0, metadata={
        "help": "also save the training state every N steps (0: once per epoch)"})
    report_to: str = field(default="auto", metadata={
        "help": "trackers: auto (installed ones), none, or tensorboard,mlflow"})
    cpu: bool = field(default=False, metadata={"help": "run on CPU even if a GPU is present"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model through Accelerate (inductor)"})
    # Gradient surgery between the terms of a loss of several (pretraining.pcgrad).
    pcgrad: bool = field(default=False, metadata={
        "help": "PCGrad (Yu et al. 2020) between the terms of a loss of several (a diffusion "
        "backbone's MSE and cross-entropy): where two terms' gradients of the shared "
        "parameters conflict, each loses its component along the other"})
    # Parameters whose names start with one of these get no update before epoch
    # `freeze_epochs` (e.g. pretrained item embeddings kept while the backbone warms up).
    freeze_prefixes: tuple[str, ...] = ()
    freeze_epochs: int = 0
    # Progressive unfreezing: the model's `unfreezing_stages()` (top down) get no update
    # before epoch k * unfreeze_every for stage k = 1, 2, ... (0 = everything trains).
    unfreeze_every: int = field(default=0, metadata={
        "metavar": "N",
        "help": "progressive unfreezing: train the top backbone layer, the final norm, the "
        "item side's head and the per-item tables at first, then one more backbone layer, "
        "from the top down, every N epochs, and the pretrained embeddings (positions) last "
        "(0: everything from the start)"})
    on_nan: str = field(default="stop", metadata={
        "choices": ON_NAN,
        "help": "a NaN or inf training loss: stop with an error naming the step, the batch's "
        "users and the last saved state, or skip that optimizer step (counted as "
        "skipped_steps in log.jsonl and metrics.json)"})

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size", "grad_accum", "patience")
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.freeze_epochs < 0:
            raise ValueError(f"freeze epochs (--freeze-items-epochs) must be >= 0, "
                             f"got {self.freeze_epochs}")
        if self.unfreeze_every < 0:
            raise ValueError(f"--unfreeze-every must be >= 0, got {self.unfreeze_every}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown --scheduler {self.scheduler!r}; use one of {SCHEDULERS}")
        if (self.scheduler == "step") != bool(self.decay_epochs):
            raise ValueError("--decay-epochs goes with --scheduler step, and step needs it: "
                             "e.g. --scheduler step --decay-epochs 30 40")
        if list(self.decay_epochs) != sorted(set(self.decay_epochs)) or any(
                e < 1 for e in self.decay_epochs):
            raise ValueError(f"--decay-epochs must be increasing epochs >= 1, "
                             f"got {list(self.decay_epochs)}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"--decay-factor must be in (0, 1], got {self.decay_factor}")
        if self.mixed_precision is None:  # what Accelerator(mixed_precision=None) would use
            launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            if launcher not in ("no", "fp16", "bf16"):
                raise ValueError(f"unknown ACCELERATE_MIXED_PRECISION {launcher!r} (the "
                                 "launcher's --mixed_precision); use 'no', 'fp16' or 'bf16'")
            self.mixed_precision = launcher
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"unknown --mixed-precision {self.mixed_precision!r}; use 'no', 'fp16' or 'bf16'"
            )
        if self.on_nan not in ON_NAN:
            raise ValueError(f"unknown --on-nan {self.on_nan!r}; use one of {ON_NAN}")


@dataclass
class TrainerState:
    """What a resumed run needs beyond `save_state`: where it was and how it was doing."""

    epoch: int = 0  # epochs completed
    # Batches of the current epoch already trained, summed over processes, so a run can
    # resume mid-epoch at another process count (each process skips its share).
    batches_in_epoch: int = 0
    global_step: int = 0  # optimizer steps
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    # Totals over every epoch trained, across resumes, for the run's training summary.
    trained_epochs: int = 0
    trained_seconds: float = 0.0
    trained_positions: int = 0
    data_wait_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (--on-nan skip)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainingConfig,
        train_dataset: Dataset,
        valid_dataset: Dataset,
        collate_fn: Callable,
        protocol: EvaluationProtocol | None = None,
        accelerator: Accelerator | None = None,
        save_model: Callable[[torch.nn.Module, dict, Path], None] | None = None,
    ) -> None:
        """`save_model(model, state_dict, directory)` writes the best checkpoint (default:
        `model.save_pretrained`); fine-tuning passes one that writes the adapter alone."""
        self.config = config
        self.save_model = save_model or _save_pretrained
        self.protocol = protocol or EvaluationProtocol()
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or build_accelerator(config)
        set_seed(config.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters; unfreeze something first")
        self.early_frozen = self._early_frozen_parameters(model)
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if config.on_nan == "skip" and deepspeed:
            raise ValueError("--on-nan skip decides before the optimizer step, which DeepSpeed "
                             "takes inside backward; use --on-nan stop, or DDP/FSDP")
        if config.pcgrad and self.accelerator.distributed_type in (DistributedType.FSDP,
                                                                   DistributedType.DEEPSPEED):
            raise ValueError("--pcgrad needs each parameter's whole gradient, which FSDP and "
                             "DeepSpeed shard; use DDP (multi_gpu_ddp.yaml)")
        self.trainable = trainable  # the parameters PCGrad combines gradients of
        self.train_dataset = train_dataset  # names the users of a batch with a non-finite loss
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                      **fused_if_supported(trainable))
        train_loader = self._loader(train_dataset, config.batch_size, collate_fn, shuffle=True)
        valid_loader = self._loader(valid_dataset, config.eval_batch_size, collate_fn)
        steps_per_epoch = math.ceil(
            len(train_loader) / self.accelerator.num_processes / config.grad_accum
        )
        scheduler = _lr_scheduler(optimizer, config, steps_per_epoch,
                                  self.accelerator.num_processes)
        (self.model, self.optimizer, self.train_loader, self.valid_loader,
         self.scheduler) = self.accelerator.prepare(
            model, optimizer, train_loader, valid_loader, scheduler
        )
        self.state = TrainerState()
        self.epoch_lr = config.lr
        # Epochs the trackers already have (main process): a resume trains some again, to
        # the same numbers, and does not log them twice.
        self.tracked_epochs = 0

    def _early_frozen_parameters(self, model: torch.nn.Module
                                 ) -> list[tuple[list[torch.nn.Parameter], int]]:
        """(trainable parameters, the first epoch that updates them) for those
        `freeze_prefixes` names and for each stage of progressive unfreezing, looked up
        before `prepare` (which may rename them, e.g. `module.` under DDP; the objects stay
        the same). Every one is in the optimizer from the start: until its epoch, its
        gradient is dropped before each step."""
        config = self.config
        if not config.freeze_epochs and not config.unfreeze_every:
            return []
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError("freezing parameters for the first epochs needs their own gradients, "
                             "which FSDP and DeepSpeed shard; use DDP (multi_gpu_ddp.yaml)")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        schedule = []
        if config.freeze_epochs:
            frozen = [p for name, p in named if name.startswith(tuple(config.freeze_prefixes))]
            if not frozen:
                raise ValueError(f"no trainable parameter's name starts with "
                                 f"{config.freeze_prefixes}; nothing to freeze for the first "
                                 "epochs")
            schedule.append((frozen, config.freeze_epochs))
        if config.unfreeze_every:
            stages = getattr(model, "unfreezing_stages", None)
            if stages is None:
                raise ValueError(f"--unfreeze-every: {type(model).__name__} names no "
                                 "unfreezing stages")
            for stage, names in enumerate(stages(), start=1):
                frozen = [p for name, p in named if name in names]
                if frozen:  # a stage frozen for good (--freeze) has nothing to unfreeze
                    schedule.append((frozen, stage * config.unfreeze_every))
        return schedule

    def _loader(self, dataset: Dataset, batch_size: int, collate_fn: Callable, shuffle=False):
        if len(dataset) == 0:
            raise ValueError("a dataset split is empty: no user has enough interactions")
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
            num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0,
            # Its own generator: starting an iterator (also after a mid-epoch resume) must
            # not draw from the global RNG that dropout uses.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    # ---------------------------------------------------------------- training
    def train(self) -> dict:
        """Train until `epochs` or early stopping; returns the training summary."""
        acc = self.accelerator
        if self.config.resume:
            if acc.is_main_process:  # touches neither state/ nor state.old/, which all load
                self._clean_interrupted_saves()
            self._load_state()
            if acc.is_main_process:  # epochs after the saved state (all without one) train again
                self.tracked_epochs = self._drop_log_rows_after(self.state.epoch)
        acc.init_trackers("peftrec", config=_flat_hparams(self.config))
        state, config = self.state, self.config
        while (state.epoch < config.epochs and not self._patience_spent()
               and not self._step_limit_reached()):
            started = time.perf_counter()
            loss_sum, wait, seen = self._train_one_epoch()
            seconds = time.perf_counter() - started
            state.trained_epochs += 1
            state.trained_seconds += seconds
            state.trained_positions += seen
            state.data_wait_seconds += wait
            state.peak_memory_mb = max(state.peak_memory_mb, peak_memory_mb(acc.device))
            valid = evaluate(self.model, self.valid_loader, acc, self.protocol, "valid")
            self._end_epoch(valid, loss_sum, seconds, wait)
        if self._patience_spent() and state.epoch < config.epochs:
            # Also reached at once by a resume of a run that stopped early: say why it
            # trains nothing, and how to go on.
            acc.print(f"early stopping after epoch {state.epoch}: valid {config.metric} has not "
                      f"passed {state.best_metric:.4f} (epoch {state.best_epoch}) for "
                      f"{state.bad_epochs} epochs (--patience {config.patience}); to train on, "
                      "--resume with a larger --patience")
        # Not `end_training()`: it tears down the process group the final evaluation needs.
        for tracker in acc.trackers:
            tracker.finish()
        return self.summary()

    def summary(self) -> dict:
        """The whole run's training figures (every epoch, across resumes); the timings are
        None until an epoch has trained."""
        state, acc = self.state, self.accelerator
        seconds = state.trained_seconds
        return {
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            f"best_valid_{self.config.metric}": state.best_metric,
            "seconds_per_epoch": seconds / state.trained_epochs if state.trained_epochs else None,
            "target_positions_per_second": state.trained_positions / seconds if seconds else None,
            "data_wait_share": state.data_wait_seconds / seconds if seconds else None,
            "peak_memory_mb": state.peak_memory_mb or peak_memory_mb(acc.device),
            "num_processes": acc.num_processes,
            "torch_threads": torch.get_num_threads(),
            "skipped_steps": state.skipped_steps,  # non-finite losses (--on-nan skip)
        }

    def _train_one_epoch(self) -> tuple[float, float, int]:
        acc, config = self.accelerator, self.config
        self.model.train()
        self.train_loader.set_epoch(self.state.epoch)
        loader = self.train_loader
        done_here = self.state.batches_in_epoch // acc.num_processes
        if done_here:  # resuming in the middle of an epoch
            loader = acc.skip_first_batches(loader, done_here)
        loss_sum = torch.zeros((), device=acc.device)
        counted = torch.zeros((), dtype=torch.long, device=acc.device)  # finite losses summed
        positions = torch.zeros((), dtype=torch.long, device=acc.device)
        wait = 0.0
        # The micro-batches of the optimizer step in progress: (loss is finite, users).
        window: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # A function of the epoch counter, so a resumed run freezes exactly as before.
        frozen_now = [p for frozen, until in self.early_frozen if self.state.epoch < until
                      for p in frozen]
        # Closed (the bar cleared) also when a NaN stops the run: the error gets its own line.
        with tqdm(total=len(self.train_loader), initial=done_here,
                  desc=f"epoch {self.state.epoch + 1}", leave=False,
                  disable=not acc.is_local_main_process) as progress:
            iterator = iter(loader)
            while True:
                fetch_started = time.perf_counter()
                batch = next(iterator, None)
                wait += time.perf_counter() - fetch_started
                if batch is None:
                    break
                loss, finite, skip = self._train_step(batch, window, frozen_now)
                # Kept as tensors: no host-device sync per batch.
                loss_sum += torch.where(finite, loss.detach(), 0.0)
                counted += finite
                positions += (batch["target_ids"] > 0).sum()
                self.state.batches_in_epoch += acc.num_processes
                progress.update()
                if acc.sync_gradients:
                    window = []
                    if skip:
                        self.state.skipped_steps += 1
                        continue
                    self.state.global_step += 1
                    if config.save_steps and self.state.global_step % config.save_steps == 0:
                        self._save_state()
                    if self._step_limit_reached():
                        break
        # The mean of the finite losses (a skipped step's NaN would hide the others').
        mean_loss = acc.reduce(loss_sum, "sum").item() / max(acc.reduce(counted, "sum").item(), 1)
        return mean_loss, wait, int(acc.reduce(positions, "sum").item())

    def _train_step(self, batch: dict, window: list, frozen_now: list[torch.nn.Parameter]
                    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Forward and backward on one micro-batch, then, at the end of its accumulation
        window, the optimizer step, or none if a loss of the window was not finite (then
        returns skip=True); (loss, whether it is finite, skip)."""
        acc, config = self.accelerator, self.config
        with acc.accumulate(self.model):
            losses = self.model(batch)
            loss = losses["loss"]
            finite = torch.isfinite(loss.detach())
            window.append((finite, batch.get("user")))
            acc.backward(self._pcgrad_objective(losses) if config.pcgrad else loss)
            # Every micro-step's loss is checked, once per optimizer step (one host sync):
            # a NaN in any of them has reached the accumulated gradients.
            if acc.sync_gradients and self._non_finite_step(window):
                self.optimizer.zero_grad(set_to_none=True)  # no optimizer, scheduler step
                return loss, finite, True
            if acc.sync_gradients and frozen_now:
                # No gradient: AdamW skips them (no moment update, no weight decay).
                # Gradients are already all-reduced, so every process drops the same.
                for parameter in frozen_now:
                    parameter.grad = None
            if acc.sync_gradients and config.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            self.optimizer.step()
            self.epoch_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, finite, False

    def _pcgrad_objective(self, losses: dict) -> torch.Tensor:
        """What --pcgrad backpropagates: the objective whose gradient is PCGrad's combination
        of the loss's terms (`losses["terms"]`, named tensors summing to the loss)."""
        terms = losses.get("terms", {})
        if len(terms) < 2:
            raise ValueError("--pcgrad projects the gradients of a loss's terms on each other, "
                             "and this model's loss has one; drop --pcgrad, or train a loss of "
                             "several terms (e.g. --backbone diffrec: MSE + cross-entropy)")
        return pcgrad_objective(list(terms.values()), self.trainable)

    def _non_finite_step(self, window: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
        """Whether a micro-batch of the optimizer step now due had a NaN or inf loss on any
        process: the same answer on every process (all of them call this, at each step).
        Stops the run (`on_nan="stop"`) or warns and returns True (`"skip"`)."""
        acc, state = self.accelerator, self.state
        bad_here = torch.stack([~finite for finite, _ in window]).any().long()
        if not acc.reduce(bad_here, "sum").item():  # a no-op on one process
            return False
        users = self._batch_users(window)
        step, epoch = state.global_step + 1, state.epoch + 1
        where = f"step {step} (epoch {epoch}, batch of users {users})"
        if self.config.on_nan == "skip":
            if acc.is_main_process:
                logger.warning("non-finite (NaN or inf) training loss in %s: skipped that "
                               "optimizer step (--on-nan skip)", where)
            return True
        raise NonFiniteLossError(
            f"non-finite (NaN or inf) training loss in {where}; last good checkpoint: "
            f"{self._last_checkpoint()}. Lower --lr (or check the data), or pass --on-nan skip "
            "to skip such steps"
        )

    def _batch_users(self, window: list[tuple[torch.Tensor, torch.Tensor | None]]) -> str:
        """The users of the micro-batches with a non-finite loss, gathered from every process
        (a collective): their original ids where the training set knows them, else their
        internal indices; "unknown" where batches carry no `user`."""
        acc = self.accelerator
        if any(users is None for _, users in window):  # the same on every process
            return "unknown"
        local = [users.flatten() for finite, users in window if not finite]
        here = (torch.cat(local) if local
                else torch.zeros(0, dtype=torch.long, device=acc.device))
        gathered = acc.gather(acc.pad_across_processes(here, pad_index=-1))
        indices = [int(index) for index in gathered.tolist() if index >= 0]
        names = getattr(self.train_dataset, "user_names", None)
        shown = names(indices[:SHOWN_USERS]) if names else indices[:SHOWN_USERS]
        text = ", ".join(str(name) for name in shown)
        more = len(indices) - len(shown)
        return f"{text} and {more} more" if more > 0 else text

    def _last_checkpoint(self) -> str:
        """The saved training state a resume would continue from, or "none"."""
        found = self._saved_state()
        if found is None:
            return f"none (no training state saved in {self.output_dir} yet)"
        saved = json.loads((found / TRAINER_STATE).read_text())
        return (f"{found} (epoch {saved['epoch']}, step {saved['global_step']}; --resume "
                "continues from it)")

    def _saved_state(self) -> Path | None:
        """The newest saved state whose files verify: state/, else the save before it
        (state.old/, also all there is after an interruption between the renames of
        `_save_state`); None if nothing was saved. Raises if every saved state is damaged."""
        damage = []
        for candidate in (self.output_dir / STATE_DIR, self.output_dir / f"{STATE_DIR}.old"):
            if not (candidate / TRAINER_STATE).is_file():
                continue
            problem = damaged_file(candidate)
            if problem is None:
                if damage:
                    self.accelerator.print(f"--resume: {damage[0]}; falling back to the "
                                           f"previous saved state, {candidate}")
                return candidate
            damage.append(problem)
        if damage:
            raise CheckpointError(f"cannot --resume {self.output_dir}: {'; '.join(damage)}; "
                                  "start the run again (without --resume)")
        return None

    def _patience_spent(self) -> bool:
        return self.state.bad_epochs >= self.config.patience

    def _step_limit_reached(self) -> bool:
        return 0 < self.config.max_steps <= self.state.global_step

    def _end_epoch(self, valid: dict, train_loss: float, seconds: float, wait: float) -> None:
        acc, state = self.accelerator, self.state
        state.epoch += 1
        state.batches_in_epoch = 0
        score = valid[self.config.metric]
        if score > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_epochs = score, state.epoch, 0
            full_state = acc.get_state_dict(self.model)  # collective under FSDP/DeepSpeed
            if acc.is_main_process:
                self.save_model(acc.unwrap_model(self.model), full_state,
                                self.output_dir / BEST_DIR)
        else:
            state.bad_epochs += 1
        row = {
            "epoch": state.epoch,
            "step": state.global_step,
            "train_loss": train_loss,
            "valid": {k: v for k, v in valid.items() if k != "protocol"},
            "seconds": seconds,
            "data_wait_share": wait / seconds if seconds else 0.0,
            "lr": self.epoch_lr,  # the rate of the epoch's last step
            "skipped_steps": state.skipped_steps,  # in the whole run so far (--on-nan skip)
        }
        # The trackers, then log.jsonl, then the state: a kill between two of them loses
        # nothing (a resume from the state before trains the epoch again), and a row in
        # log.jsonl tells a resume that the trackers have its epoch.
        if state.epoch > self.tracked_epochs:
            acc.log(_tracker_metrics(row), step=state.epoch)
        if acc.is_main_process:  # a resume from the state before drops it
            with open(self.output_dir / LOG, "a") as log:
                log.write(json.dumps(row) + "\n")
        self._save_state()
        acc.print(
            f"epoch {state.epoch}: loss {train_loss:.4f}  valid {self.config.metric} {score:.4f}"
            f"  (best {state.best_metric:.4f} @ {state.best_epoch})  {seconds:.1f}s"
        )

    # ------------------------------------------------------- checkpoint/resume
    def _save_state(self) -> None:
        """Write the full training state to `state/`, atomically (all processes call this)."""
        acc = self.accelerator
        final, tmp = self.output_dir / STATE_DIR, self.output_dir / f"{STATE_DIR}.tmp"
        old = self.output_dir / f"{STATE_DIR}.old"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            # Every process writes its own RNG state into it: it must exist before any does.
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # see `_load_state` on what loads it
        acc.wait_for_everyone()  # no rename while another process is still writing there
        if acc.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(self.state)))
            write_checksums(tmp)
            # The previous save stays as state.old: what a resume falls back to.
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
        acc.wait_for_everyone()

    def _clean_interrupted_saves(self) -> None:
        """Remove what saves cut short by a kill left in the run folder: a half-written
        state.tmp/ and the hidden siblings of the atomic writes (`.best_model.tmp-...`),
        so a run resumed again and again does not grow (see `clean_interrupted_writes`)."""
        cleaned = clean_interrupted_writes(self.output_dir)
        unfinished_state = self.output_dir / f"{STATE_DIR}.tmp"
        if unfinished_state.exists():
            shutil.rmtree(unfinished_state)
            cleaned.append(unfinished_state.name)
        if cleaned:
            self.accelerator.print(f"--resume: cleaned up after interrupted saves: "
                                   f"{', '.join(cleaned)}")

    def _apply_configured_lr(self) -> None:
        """Use this run's --lr and --scheduler after a restore, which brings back the saved
        run's rate: a resume may lower it for the last epochs, or switch to a step decay
        whose boundary has passed, and must not train its first step at the old rate."""
        schedule = self.scheduler.scheduler  # the LambdaLR inside accelerate's wrapper
        # The restored LambdaLR keeps this run's factor functions (its state holds none)
        # and the saved step count, so the factor is this run's schedule at that step.
        for group, factor in zip(self.optimizer.param_groups, schedule.lr_lambdas, strict=True):
            group["lr"] = self.config.lr * factor(schedule.last_epoch)
            group["initial_lr"] = self.config.lr
        schedule.base_lrs = [self.config.lr] * len(schedule.base_lrs)

    def _load_state(self) -> None:
        found = self._saved_state()
        if found is None:
            self.accelerator.print(f"--resume: no saved state in {self.output_dir}; starting fresh")
            return
        # What Accelerate (1.16) reads back, and how: the model from model.safetensors
        # (`safe_serialization=True`; FSDP's full state dict from a .bin via torch.load with
        # weights_only=True); optimizer.bin, scheduler.bin, the sampler, the GradScaler and
        # random_states_<rank>.pkl through `accelerate.utils.load`, a torch.load with
        # weights_only=True (numpy's RNG state allowed by name); trainer_state.json is ours.
        # Only objects registered with `register_for_checkpointing` (we register none) load
        # with weights_only=False, and FSDP's sharded DCP checkpoints (not our
        # fsdp.yaml's FULL_STATE_DICT) read their metadata with pickle. `load_kwargs` pins
        # weights_only for the files that take it, whatever a later default.
        self.accelerator.load_state(str(found), load_kwargs={"weights_only": True})
        self._apply_configured_lr()
        self.state = TrainerState(**json.loads((found / TRAINER_STATE).read_text()))
        self.accelerator.print(
            f"resumed from {found}: epoch {self.state.epoch}, "
            f"batch {self.state.batches_in_epoch}, step {self.state.global_step}"
        )

    def _drop_log_rows_after(self, epoch: int) -> int:
        """Keep log.jsonl's rows up to `epoch` (those of the state a resume continues from):
        a run killed after logging an epoch but before saving its state trains it again.
        A row cut short by the kill is dropped too. Returns the last epoch it had a whole
        row of (the trackers have it too: they are logged first)."""
        path = self.output_dir / LOG
        if not path.is_file():
            return 0
        kept, last_logged = [], 0
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            last_logged = row["epoch"]
            if row["epoch"] <= epoch:
                kept.append(line + "\n")
        atomic_write(path, "".join(kept))
        return last_logged


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig,
                  steps_per_epoch: int, num_processes: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The rate's schedule in scheduler steps: `prepare` steps it once per process per
    optimizer step, so every length is counted in `num_processes` units."""
    warmup = config.warmup_steps * num_processes
    if config.scheduler == "one_cycle":
        steps = steps_per_epoch * config.epochs
        if config.max_steps:
            steps = min(steps, config.max_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, one_cycle_factor(steps * num_processes, warmup or None))
    if config.scheduler != "step":
        return get_scheduler(
            "cosine" if config.scheduler == "cosine" else "constant_with_warmup", optimizer,
            num_warmup_steps=warmup,
            num_training_steps=steps_per_epoch * config.epochs * num_processes,
        )
    # A step decay planned up front: the same rates as stopping after each decay epoch
    # and resuming with a lower --lr, in one run.
    boundaries = [epoch * steps_per_epoch * num_processes for epoch in config.decay_epochs]

    def factor(step: int) -> float:
        warm = step / warmup if step < warmup else 1.0
        return warm * config.decay_factor ** sum(step >= b for b in boundaries)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def one_cycle_factor(total_steps: int, rise_steps: int | None = None) -> Callable[[int], float]:
    """torch.optim.lr_scheduler.OneCycleLR's rate (cosine annealing, default divisors, no
    momentum cycling) as a factor of the peak rate, for a LambdaLR: a function of the step
    alone, so a resume applies this run's --lr and length at the saved step (see
    `Trainer._apply_configured_lr`), as for the other schedules. `rise_steps` (default 30% of
    `total_steps`) is where the rate peaks; past `total_steps` it stays at its end."""
    total = max(total_steps, 2)
    peak = float(rise_steps if rise_steps else ONE_CYCLE_RISE * total) - 1
    peak = min(max(peak, 1e-9), total - 1 - 1e-9)  # both phases have a length
    start, end = 1 / ONE_CYCLE_DIV, 1 / ONE_CYCLE_DIV / ONE_CYCLE_FINAL_DIV

    def factor(step: int) -> float:
        if step <= peak:
            low, high, share = start, 1.0, step / peak
        else:
            low, high, share = 1.0, end, min((step - peak) / (total - 1 - peak), 1.0)
        return high + (low - high) / 2 * (math.cos(math.pi * share) + 1)

    return factor


def _save_pretrained(model: torch.nn.Module, state_dict: dict, directory: Path) -> None:
    model.save_pretrained(directory, state_dict)


def build_accelerator(config: TrainingConfig) -> Accelerator:
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        log_with=_trackers(config.report_to) or None,
        project_dir=config.output_dir,
        dynamo_backend="inductor" if config.compile else None,
        # Same data order for a seed and epoch at any process count, and after resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_process_count(accelerator)
    return accelerator


def leave_process_group() -> None:
    """Destroy this process's process group, if it has one, while the interpreter is still
    whole. Left to interpreter finalization, gloo's worker threads can abort the process
    ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489):
    the process that finishes first, its share of the final evaluation done, dies, and the
    launcher then SIGTERMs the others. Every collective is behind it: no barrier first (a
    process leaving on an error must not wait for the others)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# At the exit of every script (they all import this module), also on an error: none ends
# its run through `Accelerator.end_training`, which would destroy the group mid-script.
atexit.register(leave_process_group)


def check_process_count(accelerator: Accelerator) -> None:
    """Refuse N launched processes that each believe they are alone (N duplicated runs)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(
            f"the launcher started {launched} processes but Accelerate sees "
            f"{accelerator.num_processes}: each would train its own copy. On CPU, launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ... "
            "(see docs/user-guide.md, Several processes, GPUs and machines)"
        )


def fused_if_supported(parameters: list[torch.nn.Parameter]) -> dict:
    """`fused=True` where torch has a fused AdamW kernel: one pass, no parameter-sized
    temporaries (which otherwise grow with the item table)."""
    devices = {p.device.type for p in parameters}
    floating = all(p.is_floating_point() for p in parameters)
    return {"fused": True} if floating and devices <= {"cpu", "cuda"} else {}


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory if on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trackers(report_to: str) -> list[str]:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available

    installed = {"tensorboard": is_tensorboard_available(), "mlflow": is_mlflow_available()}
    if report_to == "none":
        return []
    # MLflow logs to the store MLFLOW_TRACKING_URI names; without one it would open
    # ./mlflow.db in the working directory (a SQL store mlflow-skinny cannot open), so
    # `auto` skips it and `mlflow` asks for one.
    store = os.environ.get("MLFLOW_TRACKING_URI")
    if report_to == "auto":
        return [name for name, available in installed.items()
                if available and (name != "mlflow" or store)]
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    for name in names:
        if name not in installed:
            raise ValueError(f"unknown tracker {name!r} in --report-to; use {sorted(installed)}")
        if not installed[name]:
            raise ValueError(f"--report-to {name}: {name} is not installed "
                             "(pip install -e '.[tracking]')")
    if "mlflow" in names and not store:
        raise ValueError("--report-to mlflow: set MLFLOW_TRACKING_URI to your MLflow store "
                         "(e.g. http://HOST:5000, or sqlite:///mlflow.db with sqlalchemy and "
                         "alembic installed)")
    return names


def _tracker_metrics(row: dict) -> dict[str, float]:
    # MLflow rejects '@' in metric names: ndcg@10 -> valid/ndcg_at_10.
    metrics = {f"valid/{k.replace('@', '_at_')}": v for k, v in row["valid"].items()}
    return {**metrics, "train/loss": row["train_loss"], "train/lr": row["lr"],
            "train/skipped_steps": row["skipped_steps"]}


def _flat_hparams(config: TrainingConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
