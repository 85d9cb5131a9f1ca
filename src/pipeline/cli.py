"""``pipeline STAGE ...``: one subcommand per stage, the same by hand as under Snakemake.

The CLI turns arguments into typed keyword arguments of library functions; nothing below it
reads argv, environment-driven config or Snakemake.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from pipeline.options import (
    C2stOptions,
    ObserveOptions,
    ReportOptions,
    SampleOptions,
    SearchOptions,
    SimulateOptions,
    TruncateOptions,
    ValidateOptions,
    json_object,
)

log = logging.getLogger("pipeline")

_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")


def process_rank() -> int:
    """This process's global rank as its launcher announced it (0 without a launcher)."""
    for name in _RANK_VARS:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def setup_logging(log_file: Path | None) -> None:
    """Logs to stderr and, if given, to ``log_file`` (rank ``r > 0``: ``log_file.rank<r>``)."""
    rank = process_rank()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        path = Path(log_file) if rank == 0 else Path(f"{log_file}.rank{rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="a"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)


def cmd_simulate(args: argparse.Namespace) -> None:
    from pipeline import simulation

    options = SimulateOptions.from_args(args)
    task, plan = _task_and_plan(args, options)
    simulation.simulate(
        plan,
        task,
        args.out,
        overwrite=args.overwrite,
        merge=options.merge,
        compression=options.compression,
        chunk=args.chunk,
        fit_chunks=args.fit_chunks,
    )


def _task_and_plan(args: argparse.Namespace, options: SimulateOptions):
    """The task ``simulate`` and ``merge`` run (drawing theta from ``--truncation``'s region
    where given) and their plan, whose identity records that region."""
    from pipeline.simulation import SimulationPlan
    from pipeline.tasks import get_task

    task = get_task(args.task)
    plan = SimulationPlan(
        task=args.task,
        num_simulations=options.num_simulations,
        seed=options.seed,
        chunk_size=options.chunk_size,
    )
    if (args.truncation is None) != (args.model is None):
        raise ValueError("--truncation and --model go together: the region and its posterior")
    if args.region_models and args.truncation is None:
        raise ValueError("--region-models are the models of --truncation's region; pass both")
    floor = getattr(args, "min_prior_mass", None)
    if floor is not None and not 0 < floor <= 1:
        raise ValueError(
            f"--min-prior-mass {floor:g}: it is the share of prior draws a --truncation's "
            "region must hold, in (0, 1]"
        )
    if args.truncation is None:
        return task, plan
    from dataclasses import replace

    from pipeline.rounds.region import truncated_task

    task = truncated_task(task, args.task, args.truncation, args.model, args.region_models, floor)
    return task, replace(plan, proposal=task.proposal)


def cmd_truncate(args: argparse.Namespace) -> None:
    from pipeline.atomic import check_new
    from pipeline.rounds.region import truncate

    options = TruncateOptions.from_args(args)
    check_new(args.out, overwrite=args.overwrite)
    if args.region_models and args.within is None:
        raise ValueError("--region-models are the models of --within's region; pass both")
    truncation = truncate(
        args.model, args.observations, args.index, options, args.within, args.region_models
    )
    truncation.write(args.out, overwrite=args.overwrite)


def cmd_stack_rounds(args: argparse.Namespace) -> None:
    from pipeline.rounds.stack import stack_rounds

    stack_rounds(args.task, args.rounds, args.out, overwrite=args.overwrite)


def cmd_select_observation(args: argparse.Namespace) -> None:
    from pipeline.observations import select_observation

    select_observation(args.observations, args.index, args.out, overwrite=args.overwrite)


def cmd_merge(args: argparse.Namespace) -> None:
    from pipeline import simulation

    options = SimulateOptions.from_args(args)
    task, plan = _task_and_plan(args, options)
    simulation.merge(
        plan,
        task,
        args.out,
        overwrite=args.overwrite,
        merge=options.merge,
        compression=options.compression,
    )


def cmd_import(args: argparse.Namespace) -> None:
    from pipeline.importing import import_simulations
    from pipeline.tasks import get_task

    start, stop = _row_range(args.rows)
    import_simulations(
        get_task(args.task),
        args.theta,
        args.x,
        args.out,
        start=start,
        stop=stop,
        overwrite=args.overwrite,
        compression=args.compression,
    )


def _row_range(text: str) -> tuple[int, int | None]:
    """``START:STOP``, ``START:`` or ``:STOP`` (negative counts from the end) as integers."""
    first, colon, last = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return int(first or 0), int(last) if last else None
    except ValueError:
        raise ValueError(
            f"--rows {text!r}: expected START:STOP, START: or :STOP with integers "
            "(negative counts from the end, e.g. --rows=-1000: for the last 1000 rows)"
        ) from None


def cmd_observe(args: argparse.Namespace) -> None:
    from pipeline.observations import import_observations, make_observations
    from pipeline.tasks import get_task

    options = ObserveOptions.from_args(args)
    if args.source is not None and args.mock_of is not None:
        raise ValueError("--from reads real data and --mock-of draws mocks: give one of them")
    if args.source is not None:
        given = [
            "--" + f.name.replace("_", "-")
            for f in fields(ObserveOptions)
            if getattr(args, f.name, None) is not None
        ]
        if given or getattr(args, "options", None):
            raise ValueError(
                f"--from reads the observations as they are, so {', '.join(given) or '--options'}"
                " would do nothing: leave them out, or drop --from to draw synthetic ones"
            )
        import_observations(get_task(args.task), args.source, args.out, overwrite=args.overwrite)
        return
    make_observations(
        get_task(args.task),
        options.num_observations,
        options.num_reference_samples,
        options.seed,
        args.out,
        overwrite=args.overwrite,
        mock=None if args.mock_of is None else get_task(args.mock_of),
    )


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.training import TrainConfig, train

    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    if args.options:
        config = config.replaced(json_object(args.options, "--options"), source="--options")
    flags = {k: v for k, v in (("seed", args.seed), ("devices", args.devices)) if v is not None}
    config = config.replaced(flags, source="command line")
    if (args.truncation is None) != (not args.region_models):
        raise ValueError(
            "--truncation and --region-models go together: the region the last round was "
            "drawn from and the posteriors of its levels"
        )
    search = None
    if args.chosen:
        from pipeline.search.select import check_base, read_choice
        from pipeline.storage import data_digest, read_attrs

        attrs = read_attrs(args.data)
        digest = data_digest(attrs)
        choice = read_choice(args.chosen, attrs.get("task"), digest)
        config = config.replaced(choice.options, source=str(args.chosen))
        check_base(choice, config.shaping(choice.search["space"]), args.chosen)
        search = {"path": str(args.chosen), "chosen": choice.chosen, "reason": choice.reason}
        search |= {"search_digest": choice.search_digest, "options": choice.options}
    train(
        args.data,
        args.out,
        config,
        checkpoint_dir=args.checkpoint_dir,
        overwrite=args.overwrite,
        search=search,
        truncation=args.truncation,
        region_models=args.region_models,
    )


def cmd_search_trial(args: argparse.Namespace) -> None:
    from pipeline.search.space import SearchSpace
    from pipeline.search.trial import run_trial
    from pipeline.training import TrainConfig

    base = TrainConfig.from_dict(json_object(args.train_options, "--train-options"))
    space = SearchSpace.from_dict(json_object(args.space, "--space"), "--space")
    options = SearchOptions.from_args(args)
    run_trial(
        args.data,
        args.out,
        base,
        space,
        options,
        args.trial,
        args.history,
        overwrite=args.overwrite,
    )


def cmd_search_select(args: argparse.Namespace) -> None:
    from pipeline.search.select import select

    select(args.scores, args.out, SearchOptions.from_args(args), overwrite=args.overwrite)


def cmd_sample(args: argparse.Namespace) -> None:
    from pipeline.sampling import sample

    options = SampleOptions.from_args(args)
    sample(
        args.model,
        args.observations,
        args.out,
        options,
        overwrite=args.overwrite,
        truncation=args.truncation,
        region_models=args.region_models,
        iid=args.iid,
    )


def cmd_validate(args: argparse.Namespace) -> None:
    from pipeline.atomic import check_new
    from pipeline.validation import validate

    options = ValidateOptions.from_args(args)
    check_new(Path(args.out) / "metrics.json", overwrite=args.overwrite)
    validate(
        args.test_samples,
        args.observation_samples,
        args.observations,
        args.out,
        **(options.as_dict() | {"c2st_max_samples": options.c2st_max_samples or None}),
    )


def cmd_c2st(args: argparse.Namespace) -> None:
    from pipeline.atomic import check_new
    from pipeline.validation import score_budget

    options = C2stOptions.from_args(args)
    check_new(args.out, overwrite=args.overwrite)
    score_budget(
        args.observation_samples,
        args.observations,
        args.out,
        **(options.as_dict() | {"max_samples": options.max_samples or None}),
    )


def cmd_report(args: argparse.Namespace) -> None:
    from pipeline.report.stage import report_experiment

    report_experiment(
        args.experiment_dir,
        args.tasks,
        ReportOptions.from_args(args),
        args.out,
        config=json_object(args.config_json, "--config-json") if args.config_json else {},
        specs=args.task_specs,
        budgets=args.budgets,
        rounds=args.rounds,
        summary=args.summary,
        overwrite=args.overwrite,
    )


def cmd_index(args: argparse.Namespace) -> None:
    from pipeline.atomic import check_new
    from pipeline.report import write_report
    from pipeline.report.index import build_index
    from pipeline.report.stage import check_replaceable

    if not Path(args.results).is_dir():
        raise ValueError(
            f"--results {args.results} is not a folder: give the results folder whose "
            "experiments the index lists (results by default)"
        )
    if Path(args.out).exists():
        check_replaceable(Path(args.out), "results index page")
    check_new(args.out, overwrite=args.overwrite)
    html = build_index(args.results)
    write_report(html, args.out)
    log.info("wrote %s (%d kB)", args.out, len(html) // 1024)


def cmd_inspect(args: argparse.Namespace) -> None:
    from pipeline.storage import describe

    print("\n".join(describe(args.file)))


# add(name, handler, help, parents) -> the subcommand's parser (see build_parser).
AddCommand = Callable[..., argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    """``pipeline``'s parser: one subcommand per stage, each with the common flags."""
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    # --log-file too: torchrun's own parser refuses --log as an abbreviation of its --log-dir.
    common.add_argument(
        "--log", "--log-file", dest="log", type=Path, help="also write log lines to this file"
    )
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: more oversubscribes small models on CPU)",
    )

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], None],
        text: str,
        parents: Sequence[argparse.ArgumentParser] = (),
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common, *parents], help=text, description=text)
        command.set_defaults(handler=handler)
        return command

    for commands in (
        _simulation_commands,
        _import_command,
        _observe_command,
        _train_command,
        _round_commands,
        _search_commands,
        _sample_command,
        _validation_commands,
        _report_commands,
        _inspect_command,
    ):
        commands(add)
    return parser


def _simulation_commands(add: AddCommand) -> None:
    """``simulate`` and ``merge``, which share the plan's flags."""
    plan = argparse.ArgumentParser(add_help=False)
    plan.add_argument("--task", required=True)
    plan.add_argument("--out", type=Path, required=True)
    plan.add_argument("--overwrite", action="store_true", help="replace an existing output")
    SimulateOptions.add_flags(plan)
    plan.add_argument(
        "--truncation",
        type=Path,
        help="draw theta from the prior truncated to this region (`pipeline truncate`'s file): "
        "a round of sequential inference; needs --model",
    )
    plan.add_argument("--model", type=Path, help="the posterior folder --truncation was made from")
    add_region_models(plan)
    text = "simulate (theta, x) pairs; run under mpiexec for ranks"
    p = add("simulate", cmd_simulate, text, [plan])
    p.add_argument(
        "--fit-chunks",
        action="store_true",
        help="shrink --chunk-size so that every MPI rank gets a chunk (the data do not change)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        metavar="START",
        help="simulate only the chunk starting at index START into its shard; no merge "
        "(scatter/gather: one job per chunk, then `pipeline merge`)",
    )
    p.add_argument(
        "--min-prior-mass",
        type=float,
        metavar="FRACTION",
        help="with --truncation: stop when fewer than this share of prior draws falls in the "
        "region (default: the truncation's own; it changes no draw, only when to stop; "
        "without --truncation it has nothing to act on)",
    )
    add("merge", cmd_merge, "join the shards of `simulate --chunk` jobs into one file", [plan])


def _import_command(add: AddCommand) -> None:
    """``import``: archived simulations."""
    text = "import existing (theta, x) arrays (.npy, .npz:MEMBER, .h5:DATASET) for training"
    p = add("import", cmd_import, text)
    p.add_argument("--task", required=True)
    p.add_argument("--theta", required=True, help="parameters (N, D): a SOURCE as for --x")
    p.add_argument(
        "--x",
        required=True,
        help="simulations (N, *x_shape): PATH.npy, PATH.npz:MEMBER or PATH.h5:DATASET",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--rows",
        default=":",
        metavar="START:STOP",
        help="rows of the sources to import (default all); negative counts from the end: "
        "--rows=:-1000 and --rows=-1000: split one archive into train and test",
    )
    p.add_argument(
        "--compression",
        choices=("gzip", "lzf", "none"),
        default="gzip",
        help="HDF5 filter of the datasets (gzip: portable; lzf: fast, h5py only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _observe_command(add: AddCommand) -> None:
    """``observe``: synthetic observations or real ones."""
    text = "draw observations with truths and reference posteriors, or read real ones (--from)"
    p = add("observe", cmd_observe, text)
    p.add_argument("--task", required=True)
    ObserveOptions.add_flags(p)
    p.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        help="real observed data instead: x.npy (n_obs, *x_shape) or file.h5[:dataset]",
    )
    p.add_argument(
        "--mock-of",
        metavar="TASK",
        help="draw x from this other forward model of the same parameters (mock observations, "
        "no reference): what the model concludes from data it does not describe",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--out", type=Path, required=True)


def _train_command(add: AddCommand) -> None:
    """``train``."""
    p = add("train", cmd_train, "train a neural posterior estimator (Lightning, DDP-ready)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="model folder")
    p.add_argument("--config", type=Path, help="YAML of training options")
    p.add_argument("--options", help="JSON object of training options (override --config)")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--devices", type=int, help="processes Lightning starts without a launcher")
    p.add_argument("--checkpoint-dir", type=Path, help="default: OUT.checkpoints/<digest>")
    p.add_argument("--overwrite", action="store_true", help="replace a posterior in --out")
    p.add_argument(
        "--truncation",
        type=Path,
        help="the region the last of --data's stacked rounds was drawn from (`pipeline "
        "truncate`'s file): npe's loss is normalised over the rounds' proposal",
    )
    add_region_models(
        p, "the posterior folders of --truncation's levels, round 0's first, its own last"
    )
    p.add_argument(
        "--chosen",
        type=Path,
        help="options chosen by a search (`pipeline search-select`'s file), over --options",
    )


def add_region_models(
    p: argparse.ArgumentParser,
    text: str = "the posterior folders of the earlier rounds whose regions this one lies "
    "inside, round 0's first (as the truncation file lists them)",
) -> None:
    """``--region-models``: the earlier rounds' posteriors a nested region lies inside."""
    p.add_argument("--region-models", type=Path, nargs="+", default=[], metavar="DIR", help=text)


def _round_commands(add: AddCommand) -> None:
    """``truncate``, ``stack-rounds`` and ``select-observation``: sequential rounds' jobs."""
    text = "the region of a round's posterior at one observation that the next round samples"
    p = add("truncate", cmd_truncate, text)
    p.add_argument("--model", type=Path, required=True, help="the round's posterior folder")
    p.add_argument("--observations", type=Path, required=True)
    p.add_argument("--index", type=int, default=0, help="the observation, from 0")
    p.add_argument(
        "--within",
        type=Path,
        help="the previous round's truncation: the new region is its intersection with this "
        "posterior's (nested regions); needs --region-models",
    )
    add_region_models(p)
    TruncateOptions.add_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--out", type=Path, required=True, help="the truncation (JSON)")
    text = "stack the simulations of rounds 0..r into one training file"
    p = add("stack-rounds", cmd_stack_rounds, text)
    p.add_argument("--task", required=True)
    p.add_argument("--rounds", type=Path, nargs="+", required=True, help="files, in order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--out", type=Path, required=True)
    text = "write one observation of an observe file alone (the one rounds aim at)"
    p = add("select-observation", cmd_select_observation, text)
    p.add_argument("--observations", type=Path, required=True)
    p.add_argument("--index", type=int, required=True, help="the observation, from 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--out", type=Path, required=True)


def _search_commands(add: AddCommand) -> None:
    """``search-trial`` and ``search-select``: a hyperparameter search's jobs."""
    text = "propose one trial's training options from the earlier trials, train and score it"
    p = add("search-trial", cmd_search_trial, text)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the trial's folder")
    p.add_argument("--trial", type=int, required=True, help="the trial's number, from 0")
    p.add_argument("--train-options", default="{}", help="JSON of the options not searched")
    p.add_argument("--space", required=True, help="JSON of {option: {low, high, log} or choices}")
    p.add_argument(
        "--history", type=Path, nargs="*", default=[], help="score.json of every earlier trial"
    )
    SearchOptions.add_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace the trial's results")
    text = "choose the trial to train with: lowest held-out loss, calibration among near-equals"
    p = add("search-select", cmd_search_select, text)
    p.add_argument(
        "--scores", type=Path, nargs="+", required=True, help="every trial's score.json"
    )
    SearchOptions.add_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--out", type=Path, required=True, help="the choice (JSON)")


def _sample_command(add: AddCommand) -> None:
    """``sample``."""
    p = add("sample", cmd_sample, "draw posterior samples for observations (.npy or .h5)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--observations", type=Path, required=True)
    p.add_argument(
        "--truncation",
        type=Path,
        help="restrict the draws to this region of the model (`pipeline truncate`'s file): "
        "for simulations drawn from a sequential round's truncated prior",
    )
    add_region_models(p)
    p.add_argument(
        "--iid",
        action="store_true",
        help="the rows of --observations are independent observations of one theta: one "
        "posterior from all of them (a model trained with method nle)",
    )
    SampleOptions.add_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--out", type=Path, required=True)


def _validation_commands(add: AddCommand) -> None:
    """``validate`` and ``c2st`` (the budget study's score)."""
    p = add("validate", cmd_validate, "coverage (TARP, HPD, SBC) and C2ST; metrics.json + PNGs")
    p.add_argument("--test-samples", type=Path, required=True)
    p.add_argument("--observation-samples", type=Path, required=True)
    p.add_argument("--observations", type=Path, required=True)
    ValidateOptions.add_flags(p)
    p.add_argument("--out", type=Path, required=True, help="validation folder")
    p.add_argument("--overwrite", action="store_true", help="replace a validation in --out")

    p = add("c2st", cmd_c2st, "C2ST of posterior samples at the observations (budget study)")
    p.add_argument("--observation-samples", type=Path, required=True)
    p.add_argument("--observations", type=Path, required=True)
    C2stOptions.add_flags(p, required="budget")
    p.add_argument("--out", type=Path, required=True, help="JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _report_commands(add: AddCommand) -> None:
    """``report`` (one experiment) and ``index`` (every experiment)."""
    p = add("report", cmd_report, "write one self-contained HTML report per experiment")
    p.add_argument("--experiment-dir", type=Path, required=True)
    p.add_argument("--tasks", nargs="+", required=True, help="task folder names")
    p.add_argument(
        "--task-specs",
        nargs="*",
        default=[],
        help="the task each folder's outputs record (import path or task file), where it "
        "differs from the folder's name; one per --tasks",
    )
    p.add_argument(
        "--budgets", nargs="*", type=int, default=[], help="budgets whose C2ST the page plots"
    )
    p.add_argument(
        "--rounds",
        nargs="*",
        type=int,
        default=[],
        help="sequential rounds that made each task's model (0: amortized); one per --tasks",
    )
    p.add_argument("--config-json", default="", help="the experiment config, shown verbatim")
    ReportOptions.add_flags(p)
    p.add_argument("--summary", type=Path, help="also write the verdicts as JSON (for index)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing page and summary")

    p = add("index", cmd_index, "write one page over every experiment of a results folder")
    p.add_argument("--results", type=Path, required=True, help="folder of experiment folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing index page")


def _inspect_command(add: AddCommand) -> None:
    """``inspect``: what an HDF5 file holds."""
    p = add("inspect", cmd_inspect, "print an HDF5 file's attributes, shapes and NaN counts")
    p.add_argument("file", type=Path)


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # h5py objects freed while their file's writes fail on a full disk complain one by one;
    # the stage reports the full disk once, as its own error.
    from pipeline.atomic import is_disk_full

    if unraisable.exc_value is not None and is_disk_full(unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    sys.unraisablehook = _unraisable
    uses_torch = ("train", "search-trial", "sample", "truncate")
    if args.command in uses_torch or getattr(args, "truncation", None) is not None:
        import torch

        torch.set_num_threads(max(args.threads, 1))
    try:
        args.handler(args)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        log.error("%s failed: %s", args.command, message)
        storage = sys.modules.get("pipeline.storage")
        if storage is not None and storage.HDF5_LEFT_OPEN:
            # HDF5 would flush the file it failed to close again at exit, and crash.
            logging.shutdown()
            os._exit(2)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
