"""The train stage: builds the Trainer for whatever launched us, fits NPE, exports the posterior.

The same call runs as one process, under Lightning's own launcher (``devices > 1``), under
``torchrun``, under ``mpiexec`` and under ``srun``: devices per node and node count are read from
the launcher's environment (:func:`pipeline.parallel.launch_layout`), never hard-coded.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pipeline import atomic, storage
from pipeline.data import OUTLIER_LIMIT, SimulationDataModule
from pipeline.models.npe import NPE
from pipeline.models.posterior import NeuralPosterior, PosteriorSpec, save_posterior
from pipeline.options import OptionsError
from pipeline.parallel import Layout, launch_layout
from pipeline.provenance import config_digest, file_digest, provenance
from pipeline.rounds.proposal import StackProposal, stack_proposal
from pipeline.storage import DataFileError, imported_rows, simulation_seeds
from pipeline.tasks import Task, get_task
from pipeline.tasks.base import check_recorded, prior_document
from pipeline.train_config import TrainConfig

log = logging.getLogger(__name__)


def build_trainer(
    config: TrainConfig,
    layout: Layout,
    out: Path,
    checkpoint_dir: Path,
    callbacks: Sequence[Callback] = (),
) -> pl.Trainer:
    """The one place a Trainer is built: callbacks (``callbacks`` added to ours), logger,
    strategy, determinism."""
    plugins = []
    if layout.launcher == "mpi":
        # Inside a SLURM allocation Lightning would pick SLURM; the launcher was mpiexec.
        from lightning.fabric.plugins.environments import MPIEnvironment

        plugins.append(MPIEnvironment())
    distributed = layout.devices * layout.num_nodes > 1
    return pl.Trainer(
        accelerator=config.accelerator,
        devices=layout.devices,
        num_nodes=layout.num_nodes,
        strategy="ddp" if distributed else "auto",
        plugins=plugins or None,
        max_epochs=config.max_epochs,
        # Minutes; the run then ends like an early stop (the best weights so far are kept).
        max_time={"minutes": config.max_time} if config.max_time else None,
        precision=config.precision,
        gradient_clip_val=config.gradient_clip or None,
        # The data module splits every epoch over the ranks itself (seeded, resumable).
        use_distributed_sampler=False,
        deterministic=True,
        # Beside the checkpoints, one folder per attempt: a resumed run keeps the whole history.
        logger=CSVLogger(save_dir=checkpoint_dir, name="", version=_next_attempt(checkpoint_dir)),
        callbacks=[
            EarlyStopping(monitor="val_loss", patience=config.patience),
            ModelCheckpoint(
                dirpath=checkpoint_dir, monitor="val_loss", save_top_k=1, save_last=True
            ),
            EpochLog(config.max_epochs),
            SameSplitOnEveryRank(),
            *callbacks,
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        # Where Lightning looks for a requeued SLURM job's hpc_ckpt_*.ckpt: this run's folder,
        # not the working directory every job of the workflow shares.
        default_root_dir=checkpoint_dir,
    )


class SameSplitOnEveryRank(Callback):
    """Refuses a DDP run whose ranks split the data differently: each chooses ``loading:
    auto`` from its own free memory, and memory and streaming split the rows differently, so
    one rank would validate on rows another trains on."""

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        datamodule = trainer.datamodule
        mine = (datamodule.loading, datamodule.num_train, datamodule.num_val)
        splits: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(splits, mine)
        check_same_split(splits)


def check_same_split(splits: Sequence[tuple[str, int, int]]) -> None:
    """Raises unless every rank's ``(loading, num_train, num_val)`` is the same."""
    if len(set(map(tuple, splits))) > 1:
        described = ", ".join(
            f"rank {rank}: {loading}, {train} training and {val} validation rows"
            for rank, (loading, train, val) in enumerate(splits)
        )
        raise RuntimeError(
            f"the ranks split the data differently ({described}): each chose how to load it "
            "from its own free memory. Set train.loading to memory or stream for every rank"
        )


class EpochLog(Callback):
    """One log line per epoch with losses, rate and an ETA bounded by ``max_epochs``."""

    def __init__(self, max_epochs: int) -> None:
        self.max_epochs = max_epochs

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Resumed runs start at a later epoch: rate only counts epochs run by this process.
        self.start, self.first_epoch = time.perf_counter(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Runs after the epoch's validation, so both losses are this epoch's.
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        per_epoch = (time.perf_counter() - self.start) / max(epoch - self.first_epoch, 1)
        log.info(
            "epoch %d/%d: train_loss %.4f, val_loss %.4f, %.2f s/epoch, ETA at most %.0f s",
            epoch,
            self.max_epochs,
            float(metrics.get("train_loss", float("nan"))),
            float(metrics.get("val_loss", float("nan"))),
            per_epoch,
            per_epoch * (self.max_epochs - epoch),
        )


def _next_attempt(checkpoint_dir: Path) -> str:
    # Every rank must agree: only count attempts that existed before this one started.
    return f"attempt-{len(list(checkpoint_dir.glob('attempt-*'))):03d}"


def merge_metrics(files: list[Path], out: Path) -> None:
    """Joins the CSV logs of successive attempts into one history of epochs.

    An attempt resumed from a checkpoint of epoch ``e`` supersedes the earlier attempts' rows
    from epoch ``e`` on (those epochs were rerun after the kill).
    """
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    for path in files:
        with path.open(newline="") as f:
            attempt = list(csv.DictReader(f))
        if not attempt:
            continue
        first = int(attempt[0]["epoch"])
        rows = [row for row in rows if int(row["epoch"]) < first] + attempt
        columns += [c for c in attempt[0] if c not in columns]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def run_identity(
    config: TrainConfig, data_digest: str, proposal: str | None = None
) -> dict[str, Any]:
    """What a run's checkpoints depend on: the options that shape the fit, the data and, for
    NPE's loss normalised over a rounds' proposal, that proposal's truncation file (digest):
    the plain loss and the normalised one are other objectives on the same data."""
    identity = {"train": config.shaping(), "data_digest": data_digest}
    return identity if proposal is None else {**identity, "proposal": proposal}


def check_checkpoints(
    checkpoint_dir: Path,
    config: TrainConfig,
    data_digest: str,
    *,
    write: bool,
    proposal: str | None = None,
    world_size: int = 1,
) -> None:
    """Refuses a checkpoint folder made for another configuration or other data.

    Arguments:
        write: Whether this process stamps a new folder with the run's identity (rank 0 only).
        proposal: The digest of the truncation file NPE's loss is normalised over, if any.
        world_size: The processes training together (nodes × devices per node).

    Raises:
        ValueError: If the folder holds checkpoints of a different configuration or data,
            naming what differs, or was written by another number of processes.
    """
    # Through JSON, so tuples compare equal to the lists read back from the stamp. The folder's
    # own path too: Lightning restores the best checkpoint's score only where it was written,
    # and a moved folder would export the best epoch of the resumed attempt alone.
    identity = json.loads(json.dumps(run_identity(config, data_digest, proposal)))
    identity["folder"] = str(checkpoint_dir.resolve())
    identity["world_size"] = world_size
    stamp = checkpoint_dir / "identity.json"
    if stamp.exists():
        try:
            previous = json.loads(stamp.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{stamp} is unreadable ({error}), so the checkpoints beside it cannot be matched "
                f"to this run; move {checkpoint_dir} away or choose another --checkpoint-dir"
            ) from None
        if previous.get("folder", identity["folder"]) != identity["folder"]:
            raise ValueError(
                f"{checkpoint_dir} was written at {previous['folder']}, and Lightning restores "
                "the best checkpoint only at the path it was written: move the folder back to "
                "resume there, or delete it to train from the start"
            )
        # Each process trains on its own share of every batch: with another number of them the
        # resumed epochs would see batches of another size and rows in another order, and the
        # weights would be neither run's.
        if previous.get("world_size", world_size) != world_size:
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints trained with world size "
                f"{previous['world_size']} (nodes × processes per node) and this run has "
                f"{world_size}: resume with {previous['world_size']}, or delete the folder to "
                "train from the start"
            )
        apart = ("folder", "world_size")  # checked above, each with its own fix
        if {k: v for k, v in previous.items() if k not in apart} != {
            k: v for k, v in identity.items() if k not in apart
        }:
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints of a different run "
                f"({_differences(previous, identity)}); delete the folder or choose another "
                "--checkpoint-dir"
            )
        # A stamp written before it recorded these: add them, so that a later change is caught.
        if any(key not in previous for key in apart) and write:
            atomic.write_json(stamp, identity, sort_keys=True, indent=1)
    elif write:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(stamp, identity, sort_keys=True, indent=1)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    parts = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(parts)


def default_checkpoint_dir(
    out: Path, config: TrainConfig, data_digest: str, proposal: str | None = None
) -> Path:
    """``OUT.checkpoints/<digest>``: a new configuration never resumes another's checkpoint."""
    digest = config_digest(run_identity(config, data_digest, proposal))
    return out.with_name(out.name + ".checkpoints") / digest


def train(
    data: Path,
    out: Path,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[Callback] = (),
    *,
    overwrite: bool = False,
    search: dict[str, Any] | None = None,
    truncation: Path | None = None,
    region_models: Sequence[Path] = (),
) -> dict[str, Any] | None:
    """Trains NPE on ``data`` and writes ``posterior.pt``, ``posterior.json``, ``metrics.csv``.

    ``callbacks`` (Lightning callbacks) run beside the pipeline's own, e.g. to watch a metric;
    ``search`` (the search that chose the options, when one did) is recorded in the metadata.
    ``truncation`` and ``region_models`` (rounds 0..r-1's posteriors): the region the last of
    the stacked rounds in ``data`` was drawn from, which NPE's loss is normalised over
    (:mod:`pipeline.rounds.proposal`).
    Returns the metadata written (on the global rank 0; ``None`` on other ranks).

    Raises:
        FileExistsError: If ``out`` holds a trained posterior and ``overwrite`` is false
            (checked before any training).
    """
    existing = [out / name for name in ("posterior.pt", "posterior.json") if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists: {out} holds a trained posterior; pass --overwrite to "
            "replace it, or choose another --out"
        )
    pl.seed_everything(config.seed, workers=True, verbose=False)
    layout = launch_layout(config.devices)
    datamodule, task = open_training_data(data, config, layout)
    config = config.for_task(task)
    warn_unused_embedding_options(config, task)
    data_digest = storage.data_digest(datamodule.attrs)
    # Memory and streaming split the rows differently: a run resumed with the other loading
    # would validate on rows it trained on, so the loading chosen is part of the run.
    config = replace(config, loading=datamodule.loading)
    spec = _spec(config, task)  # refuses what the method cannot model, e.g. NLE of a map
    check_modelled_features_vary(datamodule, config, task, data)
    posterior = NeuralPosterior(spec, **datamodule.statistics())
    proposal = rounds_proposal(data, datamodule.attrs, config, truncation, region_models)
    proposal_digest = None if proposal is None else file_digest(Path(truncation))
    default_dir = default_checkpoint_dir(out, config, data_digest, proposal_digest)
    checkpoint_dir = checkpoint_dir or default_dir
    module = NPE(
        posterior,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_schedule=config.lr_schedule,
        max_epochs=config.max_epochs,
        compile=config.compile,
        seed=config.seed,
        proposal=proposal,
        proposal_draws=config.proposal_draws,
        proposal_rows=config.proposal_rows,
        calibration=config.calibration,
        calibration_draws=config.calibration_draws,
        calibration_rows=config.calibration_rows,
    )
    trainer = build_trainer(config, layout, out, checkpoint_dir, callbacks)
    check_checkpoints(
        checkpoint_dir,
        config,
        data_digest,
        write=trainer.is_global_zero,
        proposal=proposal_digest,
        world_size=layout.devices * layout.num_nodes,
    )
    seconds = fit(trainer, module, datamodule, checkpoint_dir)
    if not trainer.is_global_zero:
        return None
    metadata = run_metadata(task, config, datamodule, layout, data, data_digest, seconds)
    if search is not None:
        metadata["search"] = search
    if proposal is not None:
        metadata["proposal"] = {"truncation": proposal_digest}
    export(posterior, trainer, config, out, checkpoint_dir, metadata)
    if checkpoint_dir.parent == default_dir.parent:
        with contextlib.suppress(OSError):  # other configurations' folders may remain
            checkpoint_dir.parent.rmdir()
    return metadata


def warn_unused_embedding_options(config: TrainConfig, task: Task) -> None:
    """Logs embedding options that ``x`` itself (``embedding: identity``, auto's choice from
    8 parameters) has no use for: set in a train block shared by tasks, they are not an error,
    but they shape nothing here."""
    defaults = {f.name: f.default for f in fields(config)}
    unused = [
        name
        for name in ("embedding_dim", "embedding_hidden")
        if getattr(config, name) != defaults[name]
    ]
    if config.method != "nle" and config.embedding == "identity" and unused:
        log.warning(
            "%s unused: task %s's posterior sees x itself (embedding identity), with no "
            "embedding network",
            " and ".join(unused),
            task.name,
        )


def rounds_proposal(
    data: Path,
    attrs: dict[str, Any],
    config: TrainConfig,
    truncation: Path | None,
    region_models: Sequence[Path],
) -> StackProposal | None:
    """The proposal NPE's loss is normalised over: the stacked rounds' of ``data`` (``attrs``
    its attributes) given their last region, or None where the loss is the plain one (no
    ``truncation``, method nle or fmpe, ``proposal_draws`` 0), which the log says."""
    stacked = len(attrs.get("rounds") or [])
    if truncation is None:
        if stacked > 1 and config.method == "npe":
            log.warning(
                "%s stacks %d rounds drawn from truncated regions; without --truncation the "
                "loss is not normalised over their proposal (plain TSNPE)",
                data,
                stacked,
            )
        return None
    if config.method != "npe" or config.proposal_draws == 0:
        why = "proposal_draws is 0" if config.method == "npe" else f"method {config.method}"
        log.info("%s: the loss is not normalised over the rounds' proposal", why)
        return None
    return stack_proposal(data, truncation, region_models)


def run_metadata(
    task: Task,
    config: TrainConfig,
    datamodule: SimulationDataModule,
    layout: Layout,
    data: Path,
    data_digest: str,
    seconds: float,
) -> dict[str, Any]:
    """What ``posterior.json`` records of a run besides the architecture: task, data, split,
    options, launcher and provenance (:func:`export` adds the fit's outcome)."""
    return {
        "task": task.name,
        # A user's task's definition (its files' digest) as the training file records it:
        # what sample checks observations against, whatever path named the task.
        "task_digest": datamodule.attrs.get("task_digest"),
        "parameter_names": list(task.parameter_names),
        "parameter_units": list(task.parameter_units),
        "method": config.method,
        "flow": config.flow,
        "embedding": config.embedding,
        "ensemble": config.ensemble,
        "num_train": datamodule.num_train,
        "num_val": datamodule.num_val,
        "loading": datamodule.loading,
        "num_nonfinite_excluded": datamodule.num_nonfinite,
        "outlier_limit": OUTLIER_LIMIT,  # rows this many robust deviations out were refused
        "train_seconds": seconds,
        "seed": config.seed,
        "launcher": layout.launcher,
        "batch_size": config.batch_size,
        "train_config": asdict(config),
        "data": {
            "path": str(data),
            "config_digest": data_digest,
            "seeds": simulation_seeds(datamodule.attrs),
            **({"imported": rows} if (rows := imported_rows(datamodule.attrs)) else {}),
        },
        "provenance": provenance({"train": config.shaping(), "data_digest": data_digest}),
    }


def open_training_data(
    data: Path, config: TrainConfig, layout: Layout
) -> tuple[SimulationDataModule, Task]:
    """The data module over ``data`` (split, scaled, checked) and the task its file names.

    Raises:
        DataFileError: If the file names no task.
        ValueError: If its rows do not have the task's shapes.
    """
    datamodule = SimulationDataModule(
        data,
        config.val_fraction,
        config.batch_size,
        config.seed,
        loading=config.loading,
        copies=layout.devices,
        num_workers=config.num_workers,
    )
    datamodule.setup("fit")
    if "task" not in datamodule.attrs:
        raise DataFileError(
            f"{data} names no task (attribute 'task'), so its parameters and shapes are "
            "unknown. Import your arrays with `pipeline import --task TASK ...`, which records it"
        )
    task = get_task(datamodule.attrs["task"])
    statistics = datamodule.statistics()
    found = (tuple(statistics["theta_mean"].shape), tuple(statistics["x_mean"].shape))
    expected = ((task.dim_theta,), tuple(task.x_shape))
    if found != expected:
        raise ValueError(
            f"{data}: rows of theta {found[0]} and x {found[1]} do not match task "
            f"{task.name!r}, whose theta is {expected[0]} and x {expected[1]}; simulate the "
            "file again with `pipeline simulate` for this task"
        )
    check_recorded(task, datamodule.attrs, data)
    return datamodule, task


def check_modelled_features_vary(
    datamodule: SimulationDataModule, config: TrainConfig, task: Task, data: Path
) -> None:
    """Refuses a constant feature of what the flow models (``theta`` for a posterior, ``x``
    for a likelihood): its density would be a spike whose loss falls without bound, and
    checkpointing and early stopping would follow it instead of the other features."""
    modelled = "x" if config.method == "nle" else "theta"
    constant = datamodule.constant_features()[modelled]
    if constant:
        named = [task.parameter_names[i] for i in constant] if modelled == "theta" else constant
        raise ValueError(
            f"{data}: {modelled} feature(s) {named} take one value in every training simulation, "
            f"and method {config.method} models {modelled}: drop them from the "
            f"{'parameters' if modelled == 'theta' else 'summary'} (or give them noise)"
        )


def fit(
    trainer: pl.Trainer, module: NPE, datamodule: SimulationDataModule, checkpoint_dir: Path
) -> float:
    """Fits ``module``, resuming from ``checkpoint_dir/last.ckpt`` when there is one; returns
    the seconds it took. SIGTERM (a time limit or preemption) exits with status 143."""
    # last.ckpt is only written during fit, so every rank sees the same answer here.
    last = checkpoint_dir / "last.ckpt"
    if last.exists():
        log.info("resuming from %s", last)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The folder holds our identity stamp, which Lightning mistakes for stale checkpoints.
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.exists() else None)
        except SIGTERMException:
            # Lightning exits with status 0 here, which a scheduler would read as success.
            log.error(
                "stopped by SIGTERM (time limit or preemption); rerun the same command to "
                "resume from %s",
                checkpoint_dir,
            )
            raise SystemExit(128 + signal.SIGTERM) from None
    return time.perf_counter() - start


def export(
    posterior: NeuralPosterior,
    trainer: pl.Trainer,
    config: TrainConfig,
    out: Path,
    checkpoint_dir: Path,
    metadata: dict[str, Any],
) -> None:
    """Loads the best checkpoint into ``posterior``, refuses it if it diverged, writes it to
    ``out`` with ``metadata`` (completed here with the fit's outcome) and the merged history
    of every attempt, and removes the checkpoints (a finished run is not to be resumed)."""
    best = trainer.checkpoint_callback.best_model_path
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    posterior.load_state_dict({k.removeprefix("posterior."): v for k, v in state.items()})
    check_converged(posterior, trainer.checkpoint_callback.best_model_score, trainer, config)
    metadata |= {
        "epochs": trainer.current_epoch,
        "best_val_loss": float(trainer.checkpoint_callback.best_model_score),
        "world_size": trainer.world_size,
        "effective_batch_size": config.batch_size * trainer.world_size,
    }
    save_posterior(posterior.cpu(), out, metadata)
    merge_metrics(sorted(checkpoint_dir.glob("attempt-*/metrics.csv")), out / "metrics.csv")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("saved posterior to %s (best val_loss %.4f)", out, metadata["best_val_loss"])


class TrainingDiverged(RuntimeError):
    """Training ended without a model worth saving (non-finite loss or weights)."""


def check_converged(
    posterior: NeuralPosterior, best: torch.Tensor | None, trainer: pl.Trainer, config: TrainConfig
) -> None:
    """Raises :class:`TrainingDiverged` unless the best validation loss and every weight of the
    model about to be saved are finite: a model of NaN weights must never look trained."""
    tensors = {k: v for k, v in posterior.state_dict().items() if v.is_floating_point()}
    broken = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    score = float("nan") if best is None else float(best)
    if broken or not math.isfinite(score):
        raise TrainingDiverged(
            f"training diverged: best validation loss {score} after "
            f"{trainer.current_epoch} epoch(s), {len(broken)} of {len(tensors)} weight "
            f"tensors hold NaN or inf; no model was saved. Lower learning_rate (now "
            f"{config.learning_rate:g}), set gradient_clip (e.g. 1.0), or look for extreme "
            "values in the simulations (pipeline inspect FILE)"
        )


def _spec(config: TrainConfig, task: Any) -> PosteriorSpec:
    """The architecture: the options both dataclasses name alike, plus the task's shapes."""
    bounds = None if task.prior is None else task.prior.bounds
    shared = {f.name for f in fields(PosteriorSpec)} & {f.name for f in fields(TrainConfig)}
    extra = {}
    if config.method == "nle":
        if task.prior is None:
            raise OptionsError(
                f"method nle needs the prior of task {task.name!r} to turn the likelihood into a "
                "posterior, and the task declares none: add a prior to the task, or use npe"
            )
        if len(task.x_shape) != 1:
            raise OptionsError(
                f"method nle models x itself, which must be a vector; task {task.name!r} has x "
                f"of shape {tuple(task.x_shape)}: use npe or fmpe (with an embedding of x), or "
                "a task whose x is a vector of summaries"
            )
        extra["prior"] = prior_document(task.prior)
    return PosteriorSpec(
        parameter_names=tuple(task.parameter_names),
        x_shape=tuple(task.x_shape),
        low=None if bounds is None else tuple(map(float, bounds[0])),
        high=None if bounds is None else tuple(map(float, bounds[1])),
        extra=extra,
        **{name: getattr(config, name) for name in shared},
    )
