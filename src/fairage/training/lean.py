"""The lean loop: a feature-cached stage I trained on in-memory tensors, without Lightning's Trainer.

Once stage I's frozen part has computed its features (``factories.cached_features``), an
epoch of the head is a few milliseconds of arithmetic; Lightning's per-epoch machinery
(validation loop, hooks, metric logging, a full checkpoint written every epoch) then costs
many times the training. This loop keeps what the stage means and drops the rest:

* the same objective: ``AgeModule.batch_loss`` (loss, sample weights, the methods of
  ``fairage.models.losses``, ``label_std``), the same Adam and ReduceLROnPlateau
  (``AgeModule.configure_optimizers``), warm-up (``AgeModule.warm_up``), gradient clipping by
  global norm, bf16 autocast of the training steps under ``bf16-mixed`` and float32 validation;
* the same batches: index loaders with the Lightning path's sampler, generator and seeding,
  so shuffling, weighted sampling and dropout masks repeat the Lightning loop's draws;
* the same stops: early stopping on ``val_loss`` (``patience``; a non-finite loss stops),
  NaN/inf stop (``non_finite_message``), collapse (``CollapseStop.observe``; a collapsed
  epoch is never the best);
* the same files: ``checkpoints/{stage}-best.ckpt`` and ``-last.ckpt`` (``state_dict`` of
  ``model.*``/``objective.*`` keys, ``epoch``, ``global_step``, ``optimizer_states``,
  ``lr_schedulers``, the run's config), ``history.csv`` (``HISTORY_COLUMNS``, one row per
  epoch) and, with Group DRO, ``dro_q.csv``.

Writes. ``history.csv`` (and ``dro_q.csv``), then ``-last.ckpt`` are rewritten after an epoch
once ``LAST_EVERY_SECONDS`` of training, and ``LAST_EVERY_WRITES`` times the previous write's
duration, have passed since the previous write; after the stage's final epoch; and when the loop is
interrupted (SIGTERM raised as ``fairage.training.interrupt.Terminated``, Ctrl-C): then they hold the
last finished epoch. A hard kill (SIGKILL, power) loses at most that interval of training,
which is less than the feature extraction a resume redoes anyway; the history is never
behind the checkpoint, so a resume's history stays continuous. Besides Lightning's keys the
file holds ``LEAN_KEY``: the random states (global torch RNG, CUDA's, the sampler's generator),
the early-stopping and collapse state and the best epoch's weights, so a resumed stage repeats
an uninterrupted one exactly. ``-best.ckpt`` is written with ``-last.ckpt`` whenever the best
epoch changed (before the final epoch only on an interruption: ``-last.ckpt`` holds the best
epoch's weights, and a resume rewrites ``-best.ckpt`` from them).

Threads. On a CPU the head's steps run on one intra-op thread: their matrices are small
enough that splitting them costs more than it gains, and on a machine whose cores are
shared, every parallel region waits for its slowest, descheduled thread (measured on 2 busy
cores: 20 epochs of the benchmark's head took 120 s on 2 threads, 6 s on one). The feature
extraction keeps torch's thread setting.

``lean_unsupported`` says when the loop does not apply (then ``fit_stage`` uses Lightning's):
uncached stages, extra Lightning callbacks, several devices or nodes, a strategy, precisions
other than float32 and bf16-mixed, a logger, ``deterministic``, and a ``-last.ckpt`` that
Lightning wrote (an interrupted run resumes in the loop that started it).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..atomic import save_torch, write_text
from ..config.runtime import RuntimeSettings
from ..config.schema import StageConfig, TrainerConfig
from ..errors import ConfigError, DataError
from ..models.regressor import AgeRegressor
from ..store.checkpoint import CONFIG_KEY, read_checkpoint
from ..store.run_folder import HISTORY_COLUMNS, RunFolder
from .factories import (
    CollapseStop,
    StageArrays,
    cached_features,
    non_finite_message,
    seeded_generator,
    train_sampler,
    write_history,
)
from .module import AgeModule
from .spec import RunContext, StageFolder, StageSpec

#: key of a checkpoint the lean loop wrote: its loop state (random states, stops, best epoch)
LEAN_KEY = "fairage_lean"
#: seconds of training between two writes of ``-last.ckpt`` (besides the final epoch and interrupts)
LAST_EVERY_SECONDS = 1.0
#: ... and at least this many times the previous write's duration, so writes stay a small share of the loop
LAST_EVERY_WRITES = 10.0
#: Lightning precisions the lean loop runs, with their autocast dtype of the training steps
LEAN_PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}


def written_by_lean(path: str | Path) -> bool:
    """Whether the checkpoint ``path`` was written by the lean loop (holds ``LEAN_KEY``)."""
    return LEAN_KEY in read_checkpoint(path)


def lean_unsupported(
    stage: StageConfig,
    trainer_cfg: TrainerConfig,
    *,
    use_cache: bool,
    callbacks=(),
    ckpt_path: str | Path | None = None,
    runtime: RuntimeSettings | None = None,
) -> str | None:
    """Why the lean loop cannot train this stage (one phrase), or None when it can (``runtime``: the
    run's, else resolved from ``trainer_cfg``)."""
    runtime = runtime or RuntimeSettings.resolve(trainer_cfg)
    if not use_cache:
        return "the stage does not train on cached features"
    if stage.lr_schedule != "plateau":
        return f"lr_schedule {stage.lr_schedule}"
    if callbacks:
        return "extra Lightning callbacks are given"
    accelerator = runtime.accelerator
    if accelerator not in ("cpu", "gpu"):
        return f"accelerator {trainer_cfg.accelerator!r}"
    devices = str(trainer_cfg.devices)
    one_gpu = accelerator == "cpu" or torch.cuda.device_count() <= 1
    if not (devices == "1" or (devices in ("auto", "-1") and one_gpu)) or trainer_cfg.num_nodes != 1:
        return f"devices {trainer_cfg.devices}, num_nodes {trainer_cfg.num_nodes}"
    if trainer_cfg.strategy != "auto":
        return f"strategy {trainer_cfg.strategy!r}"
    precision = runtime.precision
    if precision not in LEAN_PRECISIONS:
        return f"precision {precision}"
    if trainer_cfg.logger != "none":
        return f"logger {trainer_cfg.logger}"
    if trainer_cfg.deterministic:
        return "deterministic: true"
    if ckpt_path is not None and not written_by_lean(ckpt_path):
        return f"{Path(ckpt_path).name} was written by the Lightning loop"
    return None


def choose_loop(
    stage_name: str,
    stage: StageConfig,
    trainer_cfg: TrainerConfig,
    *,
    use_cache: bool,
    callbacks=(),
    ckpt_path: str | Path | None = None,
    runtime: RuntimeSettings | None = None,
) -> str:
    """ "lean" or "lightning": the loop ``fit_stage`` trains this stage in (``stage.loop``).

    ``auto`` takes the lean loop wherever ``lean_unsupported`` finds nothing against it;
    ``lean`` where it does is a ConfigError naming the reason. A Lightning loop asked to
    resume a checkpoint the lean loop wrote is a DataError.
    """
    if stage.loop != "lightning":
        reason = lean_unsupported(
            stage, trainer_cfg, use_cache=use_cache, callbacks=callbacks, ckpt_path=ckpt_path, runtime=runtime
        )
        if reason is None:
            return "lean"
        if stage.loop == "lean":
            raise ConfigError(f"{stage_name}.loop 'lean' cannot train this stage: {reason}; set loop: auto")
    if ckpt_path is not None and written_by_lean(ckpt_path):
        raise DataError(
            f"{ckpt_path} was written by the lean loop, which cannot resume this stage now "
            f"({stage_name}.loop {stage.loop}); resume with the config the run started with"
        )
    return "lightning"


@dataclass
class LoopOutcome:
    """What a stage's loop leaves: best checkpoint and score, last checkpoint, epochs, history, stops."""

    best_path: str | None
    best_val_loss: float | None
    last_path: str | None
    epochs: int
    history: pd.DataFrame
    non_finite: str | None
    collapsed: str | None


class _EarlyStop:
    """Lightning's ``EarlyStopping(monitor="val_loss", mode="min", check_finite=True)``."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = math.inf
        self.wait = 0

    def should_stop(self, current: float) -> bool:
        if not math.isfinite(current):
            return True
        if current < self.best:
            self.best, self.wait = current, 0
            return False
        self.wait += 1
        return self.wait >= self.patience


def fit_lean(
    model: AgeRegressor,
    spec: StageSpec,
    arrays: StageArrays,
    context: RunContext,
    folder: StageFolder,
    objective,
) -> LoopOutcome:
    """Train stage I's trainable part on cached features (see the module docstring).

    Call where ``fit_stage`` would build its loaders: after seeding and building the stage's
    ``objective``, with ``context.runtime`` resolved. ``folder.ckpt_path``: a ``-last.ckpt``
    this loop wrote, to resume from.
    """
    return _LeanLoop(model, spec, arrays, context, folder, objective).run()


class _LeanLoop:
    """One stage in the lean loop: the constructor sets it up (and restores a resumed stage),
    ``run()`` trains it epoch by epoch and returns its outcome."""

    def __init__(
        self,
        model: AgeRegressor,
        spec: StageSpec,
        arrays: StageArrays,
        context: RunContext,
        folder: StageFolder,
        objective,
    ):
        self.model, self.spec, self.stage, self.objective = model, spec, spec.config, objective
        self.config_yaml, self.progress = context.config_yaml, context.progress
        self.device = context.runtime.device
        self.autocast_dtype = LEAN_PRECISIONS[context.runtime.precision]
        feats_train, feats_val = cached_features(
            model, self.stage, arrays, context.runtime, context.trainer.channels_last
        )
        weights = self._index_loaders(arrays, context.seed)
        self.module = AgeModule(
            model,
            self.stage,
            frozen=spec.frozen,
            inputs="features",
            channels_last=context.trainer.channels_last,
            image_size=arrays.image_size,
            objective=objective,
        ).to(self.device)
        self._place_tensors(arrays, feats_train, feats_val, weights)
        optim = self.module.configure_optimizers(mixed=self.autocast_dtype is not None)
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        self.frozen_prefixes = _frozen_prefixes(self.module)
        self._open_state(arrays, folder)

    def _index_loaders(self, arrays: StageArrays, seed: int):
        """Loaders of positions, not of tensors: the same sampler, generator and per-epoch draws as
        the Lightning path's loaders, without collating a batch face by face. Returns the per-face
        loss weights (None: all 1)."""
        stage = self.stage
        sampler, weights = train_sampler(stage, arrays, seed)
        generator = seeded_generator(seed) if sampler is None else None
        self.train_index = DataLoader(
            range(len(arrays.train_ages)),
            batch_size=stage.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            drop_last=False,
        )
        self.val_index = DataLoader(range(len(arrays.val_ages)), batch_size=max(stage.batch_size, 64), shuffle=False)
        self.order_generator = generator if sampler is None else sampler.generator
        self.batches = len(self.train_index)
        return weights

    def _place_tensors(self, arrays: StageArrays, feats_train, feats_val, weights) -> None:
        """Features (N, D), ages (N,) years and loss weights (N,) of both splits on the training device."""
        device, n_train, n_val = self.device, len(arrays.train_ages), len(arrays.val_ages)
        self.x_train = feats_train.to(device)
        self.x_val = feats_val.to(device)
        self.age_train = torch.as_tensor(np.asarray(arrays.train_ages, np.float32)).to(device)
        self.age_val = torch.as_tensor(np.asarray(arrays.val_ages, np.float32)).to(device)
        w_train = torch.ones(n_train) if weights is None else torch.as_tensor(np.asarray(weights, np.float32))
        self.w_train = w_train.to(device)
        self.ones_val = torch.ones(n_val, device=device)
        self.with_index = self.objective is not None and self.objective.needs_index

    def _open_state(self, arrays: StageArrays, folder: StageFolder) -> None:
        """The stage's files, stops and loop state; a resumed stage's restored from ``folder.ckpt_path``."""
        name, stage = self.spec.name, self.stage
        self.folder = RunFolder(folder.run_dir)
        self.best_file, self.last_file = self.folder.checkpoint(name, "best"), self.folder.checkpoint(name, "last")
        self.history_path = self.folder.file(RunFolder.HISTORY) if folder.history_file else None
        previous = folder.previous_history
        self.rows: list[dict] = [] if previous is None else previous.to_dict("records")
        self.early = _EarlyStop(stage.patience)
        self.collapse = CollapseStop(name) if stage.stop_on_collapse else None
        self.state = {
            "epoch": -1,
            "global_step": 0,
            "best_score": None,
            "best_epoch": None,
            "non_finite": None,
            "collapsed": None,
            "stopped": False,
        }
        self.best_snapshot: dict | None = None
        if folder.ckpt_path is not None:
            self.best_snapshot = self._restore(read_checkpoint(folder.ckpt_path))
        dro = self.objective is not None and self.objective.dro is not None
        start = self.state["epoch"] + 1
        self.dro_rows = _dro_rows(folder.run_dir, name, start) if dro and folder.history_file else None
        self.dro_columns = [f"q[{group}]" for group in arrays.face_arrays.group_names] if dro else []
        # epochs on disk; after a resume -best.ckpt is rewritten at the next write (a kill between the two
        # files' writes can leave it an epoch ahead of -last.ckpt)
        self.written = {"last_epoch": None, "best_epoch": None if folder.ckpt_path is None else -2}
        self.last_snap: dict | None = None

    # ------------------------------------------------------------------ training

    def run(self) -> LoopOutcome:
        """Train the remaining epochs, writing as the module docstring says; the outcome of the stage."""
        state, stage = self.state, self.stage
        bar = _EpochBar(self.spec.name, stage.max_epochs, state["epoch"] + 1) if self.progress else None
        since, write_seconds = time.monotonic(), 0.0
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            for epoch in range(state["epoch"] + 1, stage.max_epochs):
                if state["stopped"]:
                    break
                final, val_loss, val_mae = self._epoch(epoch)
                if final or time.monotonic() - since >= max(LAST_EVERY_SECONDS, LAST_EVERY_WRITES * write_seconds):
                    started = time.monotonic()
                    # -last.ckpt holds the best epoch's weights too: -best.ckpt can wait for the end
                    self._flush(self.last_snap, with_best=final)
                    since = time.monotonic()
                    write_seconds = since - started
                if bar is not None:
                    bar.advance(epoch + 1, val_loss, val_mae)
        except BaseException:
            # interrupted (SIGTERM as Terminated, Ctrl-C, an error): keep the last finished epoch
            self._flush_interrupted()
            raise
        finally:
            torch.set_num_threads(threads)
            if bar is not None:
                bar.stop()
        return self._finish()

    def _epoch(self, epoch: int) -> tuple[bool, float, float]:
        """Train and validate epoch ``epoch`` (0-based) and record it; (whether it is the stage's last,
        val_loss, val_mae in years)."""
        state, name = self.state, self.spec.name
        epoch_lr = float(self.opt.param_groups[0]["lr"])
        train_loss, train_mae = self._train_epoch(epoch)
        val_loss, val_mae, std, mean = _validate(
            self.module, self.val_index, self.x_val, self.age_val, self.ones_val, self.device
        )
        state["epoch"] = epoch
        stop = False
        collapsed_now = False
        if self.collapse is not None and self.collapse.observe(std, mean, self.model.output, epoch):
            collapsed_now, stop = True, True
            state["collapsed"] = self.collapse.message
        row = {
            "epoch": epoch + 1,
            "stage": name,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "train_mae": train_mae,
            "val_mae": val_mae,
            "lr": epoch_lr,
        }
        self.rows.append(row)
        message = non_finite_message(name, row)
        if message:
            state["non_finite"], stop = message, True
        if self.dro_rows is not None:
            q = self.objective.dro.q.detach().cpu().tolist()
            self.dro_rows.append({"epoch": epoch + 1, "stage": name, **dict(zip(self.dro_columns, q))})
        stop = self.early.should_stop(val_loss) or stop
        # Lightning's ModelCheckpoint: the first epoch is always kept (a NaN scores inf), later
        # ones when strictly lower; never a collapsed epoch
        improved = not collapsed_now and (state["best_score"] is None or val_loss < state["best_score"])
        if improved:
            state["best_score"] = val_loss if not math.isnan(val_loss) else math.inf
            state["best_epoch"] = epoch
        self.sched.step(val_loss)
        state["stopped"] = stop
        self.last_snap = self._snapshot()
        if improved:
            self.best_snapshot = self.last_snap
        return stop or epoch + 1 >= self.stage.max_epochs, val_loss, val_mae

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        """The training steps of one epoch; (train_loss, train_mae in years), float32 as Lightning's logs."""
        module, opt, state, device = self.module, self.opt, self.state, self.device
        module.train()  # the frozen part stays in eval mode
        if self.objective is not None:
            self.objective.start_epoch(epoch)
        faces, sums = 0, torch.zeros(2, device=device)  # loss and MAE times faces
        # exactly len() batches, as Lightning takes them: exhausting the loader would draw the
        # sampler's next permutation early (RandomSampler's trailing randperm)
        for index in itertools.islice(self.train_index, self.batches):
            module.warm_up(opt, state["global_step"], self.batches)
            index = index.to(device, non_blocking=True)
            age = self.age_train[index]
            batch = (self.x_train[index], age, self.w_train[index], *([index] if self.with_index else []))
            with self._autocast():
                loss, years = module.batch_loss(batch, train=True)
                mae = (years - age).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.stage.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.stage.grad_clip)
            opt.step()
            state["global_step"] += 1
            faces += len(index)
            sums += torch.stack([loss.detach().float(), mae.detach()]) * len(index)
        train_loss, train_mae = (float(v) for v in (sums / faces).cpu())
        return train_loss, train_mae

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _finish(self) -> LoopOutcome:
        """The best weights back into the model (the caller loads the file too) and the stage's outcome."""
        state = self.state
        if self.best_snapshot is not None:
            self.module.load_state_dict({**self.module.state_dict(), **self.best_snapshot["trainable"]})
        has_best = state["best_epoch"] is not None and self.best_file.is_file()
        return LoopOutcome(
            best_path=str(self.best_file) if has_best else None,
            best_val_loss=state["best_score"],
            last_path=str(self.last_file) if self.last_file.is_file() else None,
            epochs=state["epoch"] + 1,
            history=pd.DataFrame(self.rows, columns=HISTORY_COLUMNS),
            non_finite=state["non_finite"],
            collapsed=state["collapsed"],
        )

    # ------------------------------------------------------------------ checkpoints and resume

    def _snapshot(self) -> dict:
        """The state at the end of the epoch just finished (trainable weights copied; frozen ones unchanged)."""
        state, collapse = self.state, self.collapse
        return {
            "epoch": state["epoch"],
            "global_step": state["global_step"],
            "trainable": {
                k: v.detach().clone()
                for k, v in self.module.state_dict().items()
                if not k.startswith(self.frozen_prefixes)
            },
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "scheduler": copy.deepcopy(self.sched.state_dict()),
            "rng": {
                "torch": torch.get_rng_state(),
                "order": self.order_generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            },
            "early": {"best": self.early.best, "wait": self.early.wait},
            "rows": len(self.rows),
            "dro_rows": None if self.dro_rows is None else len(self.dro_rows),
            "collapse": None if collapse is None else {"spread_before": collapse.spread_before},
            "loop": {k: state[k] for k in ("best_score", "best_epoch", "non_finite", "collapsed", "stopped")},
        }

    def _checkpoint(self, snap: dict, resumable: bool) -> dict:
        """Lightning's checkpoint keys (what the rest of fairage reads) and, to resume from, ``LEAN_KEY``."""
        weights = self.module.state_dict()  # the frozen part's tensors; the trainable ones come from the snapshot
        weights.update(snap["trainable"])
        ckpt = {
            "epoch": snap["epoch"],
            "global_step": snap["global_step"],
            "state_dict": weights,
            "optimizer_states": [snap["optimizer"]],
            "lr_schedulers": [snap["scheduler"]],
        }
        if self.config_yaml is not None:
            ckpt[CONFIG_KEY] = self.config_yaml
        if resumable:
            best = self.best_snapshot
            ckpt[LEAN_KEY] = {
                "rng": snap["rng"],
                "early": snap["early"],
                "collapse": snap["collapse"],
                "loop": snap["loop"],
                "best_trainable": None if best is None else best["trainable"],
            }
        return ckpt

    def _flush(self, snap: dict, with_best: bool = True) -> None:
        """Write the history up to ``snap``, ``-best.ckpt`` (``with_best``, when the best epoch changed)
        and ``-last.ckpt``."""
        if self.history_path is not None:
            write_history(self.history_path, pd.DataFrame(self.rows[: snap["rows"]], columns=HISTORY_COLUMNS))
        if self.dro_rows is not None:
            dro_q = pd.DataFrame(self.dro_rows[: snap["dro_rows"]]).to_csv(index=False)
            write_text(self.folder.file(RunFolder.DRO_Q), dro_q)
        best, written = self.best_snapshot, self.written
        if with_best and best is not None and written["best_epoch"] != best["epoch"]:
            save_torch(self._checkpoint(best, resumable=False), self.best_file)
            written["best_epoch"] = best["epoch"]
        save_torch(self._checkpoint(snap, resumable=True), self.last_file)
        written["last_epoch"] = snap["epoch"]

    def _flush_interrupted(self) -> None:
        """On an interruption: write the last finished epoch (and best) unless they are on disk already."""
        last, best, written = self.last_snap, self.best_snapshot, self.written
        unwritten = last is not None and (
            written["last_epoch"] != last["epoch"] or (best is not None and written["best_epoch"] != best["epoch"])
        )
        if unwritten:
            with contextlib.suppress(OSError, RuntimeError):  # the interruption is what the caller must see
                self._flush(last)

    def _restore(self, ckpt: dict) -> dict | None:
        """Load a lean ``-last.ckpt`` into the loop; return the best epoch's snapshot (None before any)."""
        lean, state, device = ckpt[LEAN_KEY], self.state, self.device
        self.module.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["optimizer_states"][0])
        self.sched.load_state_dict(ckpt["lr_schedulers"][0])
        torch.set_rng_state(lean["rng"]["torch"])
        self.order_generator.set_state(lean["rng"]["order"])
        if device.type == "cuda" and lean["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(lean["rng"]["cuda"])
        self.early.best, self.early.wait = float(lean["early"]["best"]), int(lean["early"]["wait"])
        if self.collapse is not None and lean["collapse"] is not None:
            self.collapse.spread_before = bool(lean["collapse"]["spread_before"])
        state.update(lean["loop"], epoch=int(ckpt["epoch"]), global_step=int(ckpt["global_step"]))
        if lean["best_trainable"] is None:
            return None
        # enough of a snapshot to rewrite -best.ckpt: its weights and epoch (the optimizer of that epoch is not kept)
        return {
            "epoch": state["best_epoch"],
            "global_step": ckpt["global_step"],
            "trainable": {k: v.to(device) for k, v in lean["best_trainable"].items()},
            "optimizer": ckpt["optimizer_states"][0],
            "scheduler": ckpt["lr_schedulers"][0],
        }


@torch.inference_mode()
def _validate(
    module: AgeModule,
    index_loader: DataLoader,
    x: torch.Tensor,
    ages: torch.Tensor,
    ones: torch.Tensor,
    device: torch.device,
) -> tuple[float, float, float, float]:
    """(val_loss, val_mae, std and mean of the predictions in years), float32 as the Lightning path's."""
    module.eval()
    faces, sums = 0, torch.zeros(2, device=device)
    moments = torch.zeros(2, dtype=torch.float64, device=device)
    for index in index_loader:  # its iterator draws from the global RNG, as the Lightning path's does
        index = index.to(device, non_blocking=True)
        age = ages[index]
        loss, years = module.batch_loss((x[index], age, ones[index]), train=False)
        faces += len(index)
        sums += torch.stack([loss.float(), (years - age).abs().mean()]) * len(index)
        y = years.double()
        moments += torch.stack([y.sum(), (y * y).sum()])
    val_loss, val_mae = (float(v) for v in (sums / faces).cpu())
    n = float(faces)
    total, squares = (float(v) for v in moments.cpu())
    mean = total / n
    return val_loss, val_mae, max(squares / n - mean * mean, 0.0) ** 0.5, mean


def _frozen_prefixes(module: AgeModule) -> tuple[str, ...]:
    """State-dict key prefixes of the modules stage I freezes (their tensors never change)."""
    names = {id(m): name for name, m in module.named_modules()}
    return tuple(f"{names[id(m)]}." for m in module.frozen_modules())


def _dro_rows(run_dir: Path, stage_name: str, start_epoch: int) -> list[dict]:
    """``dro_q.csv``'s rows to keep: other stages', and this stage's up to ``start_epoch`` (0-based start)."""
    path = RunFolder(run_dir).file(RunFolder.DRO_Q)
    if not path.is_file():
        return []
    previous = pd.read_csv(path)
    keep = (previous["stage"] != stage_name) | (previous["epoch"] <= start_epoch)
    return previous[keep].to_dict("records")


class _EpochBar:
    """A rich progress bar over the stage's epochs: "stage1 epoch 3/50", with the validation loss and MAE."""

    def __init__(self, stage_name: str, max_epochs: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.stage_name, self.max_epochs = stage_name, max_epochs
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[scores]}")
        )
        self.task = self.bar.add_task(
            f"{stage_name} epoch {done}/{max_epochs}", total=max_epochs, completed=done, scores=""
        )
        self.bar.start()

    def advance(self, done: int, val_loss: float, val_mae: float) -> None:
        self.bar.update(
            self.task,
            completed=done,
            description=f"{self.stage_name} epoch {done}/{self.max_epochs}",
            scores=f"val_loss {val_loss:.4g} val_mae {val_mae:.2f}",
        )

    def stop(self) -> None:
        self.bar.stop()
