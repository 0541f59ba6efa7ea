"""The ``train`` command line: one option per field of :mod:`herbarium.config`, in argparse groups.

The options are generated from the config dataclasses (see
:mod:`herbarium.options`), so a setting's default and help are written once,
in its field. Only the options that set no field are written here: the
dataset folder, the timm-style LR shortcuts and the run control flags.

Resuming (``--resume RUN``, ``--resume-if-exists``, or a torchrun restart)
continues with the run's own saved config. An option given on the command
line that differs from the saved value is applied and recorded when it is in
:data:`RESUME_CHANGEABLE` (it changes how the run proceeds, not what it
is), and refused, naming the option, otherwise.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Collection, Sequence

from herbarium.arguments import ArgumentParser
from herbarium.cli import prog
from herbarium.config import SECTIONS, DataConfig, LossConfig, O2UConfig, OptimConfig, TrainConfig
from herbarium.config_file import option_defaults
from herbarium.distributed import restart_count
from herbarium.engine import train
from herbarium.errors import UsageError, command
from herbarium.losses import LOSS_SETTINGS, unread_loss_settings
from herbarium.models import ModelConfig
from herbarium.optim import DEFAULT_LRS, parse_phases, parse_schedule
from herbarium.options import add_options, dests, number, values_from_namespace, within
from herbarium.provenance import command_line, environment, version_changes
from herbarium.recipes import recipe_defaults
from herbarium.run_dir import RunDir

# Config fields that get no generated option: the nested sections (each is a group of its own), the record of
# options changed on resume, and the dataset folder, taken as the positional DATA (or --data) written below.
NOT_OPTIONS: dict[type, tuple[str, ...]] = {TrainConfig: (*SECTIONS, "changes", "environment"), DataConfig: ("data",)}
PREFIXES = {"o2u": "o2u_"}  # sections whose options carry a prefix: --o2u-floor sets o2u.floor
O2U_GROUP = "noisy labels (O2U reweighting; needs --schedule sgdr:...)"


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``train``: one per config field (see :mod:`herbarium.config`), then the hand-written ones."""
    _add_data_folder(parser)
    add_options(parser.add_argument_group("data"), DataConfig, skip=NOT_OPTIONS[DataConfig])
    add_options(parser.add_argument_group("model"), ModelConfig)
    add_options(parser.add_argument_group("loss"), LossConfig)
    optim = parser.add_argument_group("optimisation")
    add_options(optim, TrainConfig, only=("epochs",))
    add_options(optim, OptimConfig)
    _add_schedule_shortcuts(optim)
    add_options(parser.add_argument_group(O2U_GROUP), O2UConfig, prefix=PREFIXES["o2u"])
    run = parser.add_argument_group("run")
    add_options(run, TrainConfig, skip=(*NOT_OPTIONS[TrainConfig], "epochs"))
    _add_run_control(run)
    return parser


# ------------------------------------------------- options that are no config field
def _add_data_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=DataConfig.data,
                        help="dataset folder (Herbarium 2020/2021/2022 layout or CSV manifests); or --data DATA")
    parser.add_argument("--data", dest="data_option", metavar="DATA", default=None,
                        help="the dataset folder, as tta_eval.py takes it (default: the positional DATA)")


def _add_schedule_shortcuts(group: argparse._ArgumentGroup) -> None:
    """timm-style --lr, --warmup-epochs and --min-lr: they rewrite --optim / --schedule (see timm_style_schedule)."""
    timm_style = ("timm-style shortcuts onto --optim/--schedule: --lr sets every phase's LR, --warmup-epochs and "
                  "--min-lr the cosine/sgdr schedule's warmup and floor")
    group.add_argument("--lr", type=within(number, above=0), default=None, help=f"base LR of every optimizer phase without its own @LR (default: each optimizer's own). {timm_style}")
    group.add_argument("--warmup-epochs", type=within(number, minimum=0), default=None, help="linear warmup epochs of a cosine or sgdr --schedule, as :warmup=N (default: the schedule's)")
    group.add_argument("--min-lr", type=within(number, minimum=0), default=None, help="lowest LR of a cosine or sgdr --schedule, as :min=MIN_LR/LR; the phases must share one LR (default: 0)")


def _add_run_control(group: argparse._ArgumentGroup) -> None:
    """Which run this process continues or replaces, and how it prints: not settings of the run."""
    group.add_argument("--resume", default=None, help="resume from a run directory or checkpoint; its saved config is used, and of the options given only those that may change on resume apply (see the README) (default: off)")
    group.add_argument("--resume-if-exists", action="store_true", help="continue the run in --out from its checkpoints/last.pt if there is one, else start it: re-running the same command after a crash picks up where it stopped (torchrun restarts do this by themselves) (default: off)")
    group.add_argument("--overwrite", action="store_true", help="replace the run already in --out instead of refusing (default: off)")
    group.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file giving option defaults (a run's own config.json replays that run); flags on the command line win (default: none)")
    group.add_argument("--quiet", action="store_true", help="no progress bars, for logs: the start-up summary, one line per epoch and the end-of-run summary stay (default: off)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog("train.py"), description="Train one trunk with a head per taxonomic rank.")
    return add_train_arguments(parser)


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of ``--config FILE`` and of the ``--recipe`` named (on the command line, else in
    the file): the recipe's defaults, then the file's, then the flags given, each winning over the one before."""
    chosen, _ = parser.parse_known_args(argv)
    from_file = option_defaults(chosen.config, parser, FIELD_PATHS) if chosen.config else {}
    recipe = chosen.recipe if "recipe" in given_options(parser, argv) else from_file.get("recipe", chosen.recipe)
    parser.set_defaults(**{**recipe_defaults(recipe), **from_file})
    return parser.parse_args(argv)


def resolve_data(args: argparse.Namespace) -> argparse.Namespace:
    """Merge ``--data DATA`` into the positional ``DATA``; two different folders are an error."""
    option = getattr(args, "data_option", None)
    if option:
        if args.data and str(args.data) != str(option):
            raise SystemExit(f"train: DATA given twice, as {args.data!r} and --data {option!r}; give one")
        args.data = option
    return args


def timm_style_schedule(args: argparse.Namespace) -> tuple[str, str]:
    """``(--optim, --schedule)`` with ``--lr``, ``--warmup-epochs`` and ``--min-lr`` applied to them."""
    optim, schedule = args.optim, args.schedule
    lr, warmup, min_lr = getattr(args, "lr", None), getattr(args, "warmup_epochs", None), getattr(args, "min_lr", None)
    if lr is not None:
        entries = [entry.strip().rpartition(":") for entry in optim.split(",")]  # (name[@lr], ":", start)
        optim = ",".join(f"{head if '@' in head else f'{head}@{lr:g}'}:{start}" for head, _, start in entries)
        parse_phases(optim)  # a bad spec fails here with its own message
    if warmup is None and min_lr is None:
        return optim, schedule
    parsed = parse_schedule(schedule)
    if parsed.kind not in ("cosine", "sgdr"):
        flag = "--warmup-epochs" if warmup is not None else "--min-lr"
        raise SystemExit(f"train: {flag} applies to --schedule cosine or sgdr:N; {schedule!r} has no warmup or floor")
    if warmup is not None:
        parsed = replace(parsed, warmup_epochs=warmup)
    if min_lr is not None:
        lrs = {p.lr if p.lr is not None else DEFAULT_LRS[p.name] for p in parse_phases(optim)}
        if len(lrs) != 1:
            raise SystemExit(f"train: --min-lr needs one LR for every phase (--lr LR), but {optim!r} has {sorted(lrs)}; "
                             "or give the floor as a factor: --schedule ...:min=FACTOR")
        parsed = replace(parsed, min_factor=min_lr / lrs.pop())
    return optim, parsed.to_spec()


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the parsed arguments describe (see :func:`run_config` for resuming)."""
    resolve_data(args)
    if not args.data:
        raise UsageError("train: the DATA folder is required (or --resume RUN_DIR)")
    optim, schedule = timm_style_schedule(args)
    given = {"data": {"data": str(args.data)}, "optim": {"optim": optim, "schedule": schedule}}
    sections = {name: values_from_namespace(section, args, PREFIXES.get(name, ""), **given.get(name, {}))
                for name, section in SECTIONS.items()}
    return values_from_namespace(TrainConfig, args, **sections)


# ------------------------------------------------------------------ resuming
# Options a resumed run may change: they say how the run proceeds (how long, where, how often it logs and saves,
# how it treats bad input), not what it trains. Anything else given with a different value is refused.
RESUME_CHANGEABLE = (
    "epochs", "checkpoint_every", "log_every", "workers", "device", "decode", "compile",
    "nan_policy", "nan_skip_limit", "dist_timeout", "skip_bad_images", "data", "early_stop",
)
RUN_CONTROL = ("resume", "resume_if_exists", "overwrite", "out")  # say which run, not how it trains
PER_INVOCATION = ("stop_after_epoch",)  # an instruction to this process only: taken from the command line, never kept


def _field_paths() -> dict[str, tuple[str, ...]]:
    """``{dest: path of the TrainConfig field it sets}`` for every option generated from a config field."""
    paths: dict[str, tuple[str, ...]] = {dest: (name,) for dest, name in dests(TrainConfig).items()}
    for section, config_cls in SECTIONS.items():
        for dest, name in dests(config_cls, PREFIXES.get(section, "")).items():
            if dest in paths:
                raise TypeError(f"option dest {dest!r} sets both {paths[dest]} and {(section, name)}")
            paths[dest] = (section, name)
    paths["data"] = ("data", "data")  # the positional DATA
    return paths


FIELD_PATHS = _field_paths()


def config_field(dest: str) -> tuple[str, ...]:
    """The :class:`TrainConfig` field an option sets: ``("epochs",)``, ``("data", "batch_size")``, ``("o2u", "floor")``."""
    if dest not in FIELD_PATHS:
        raise KeyError(f"option {dest!r} sets no TrainConfig field")
    return FIELD_PATHS[dest]


def _get(cfg: TrainConfig, path: tuple[str, ...]) -> Any:
    value: Any = cfg
    for name in path:
        value = getattr(value, name)
    return value


def _set(cfg: TrainConfig, path: tuple[str, ...], value: Any) -> None:
    setattr(_get(cfg, path[:-1]) if len(path) > 1 else cfg, path[-1], value)


def option_flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest:
            return action.option_strings[0] if action.option_strings else dest.upper()
    return f"--{dest.replace('_', '-')}"


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests of the options (and positionals) actually on the command line, not left at their defaults."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given = parser.parse_args(argv)
    finally:
        for action, default in defaults.items():
            action.default = default
    return set(vars(given))


def locate_resume(value: str | Path) -> tuple[RunDir, Path]:
    """(run, checkpoint) of ``--resume``: a run folder (its ``checkpoints/last.pt``) or a checkpoint file."""
    path = Path(value)
    if path.is_dir():
        run, checkpoint = RunDir(path), RunDir(path).last
    elif path.is_file():
        run, checkpoint = RunDir.of_checkpoint(path), path
    else:
        raise UsageError(f"--resume {value}: no such run folder or checkpoint file")
    if not run.is_run():
        raise UsageError(f"--resume {value}: {run} is not a run folder (it has no {run.config_file.name})")
    if not checkpoint.is_file():
        raise UsageError(f"--resume {value}: {run} has no checkpoints/last.pt to continue from (the run stopped before "
                         "its first checkpoint); start it again with --overwrite")
    return run, checkpoint


def _same(dest: str, saved: Any, wanted: Any) -> bool:
    if saved == wanted:
        return True
    if dest == "data" and saved and wanted:
        return Path(saved).resolve() == Path(wanted).resolve()
    if dest == "optim":  # adamw:0 and adamw@0.001:0 (--lr 0.001, its default) are one setting
        return parse_phases(saved) == parse_phases(wanted)
    return False


def reconcile(saved: TrainConfig, wanted: TrainConfig, dests: Sequence[str], parser: argparse.ArgumentParser,
              run_dir: Path, why: str, given: Collection[str] = ()) -> TrainConfig:
    """``saved`` with the options ``dests`` of ``wanted`` that differ applied (changeable ones) or refused (the others).

    Each applied change is appended to ``saved.changes``; the trainer stamps
    it with the epoch and step it takes effect at. A refusal names the
    shortcut among ``given`` (``--lr``) that set the option, if one did.
    """
    for dest in PER_INVOCATION:
        path = config_field(dest)
        _set(saved, path, _get(wanted, path))
    for dest in dests:
        if dest in RUN_CONTROL or dest in PER_INVOCATION:
            continue
        path = config_field(dest)
        old, new = _get(saved, path), _get(wanted, path)
        if _same(dest, old, new):
            continue
        flag = option_flag(parser, dest)
        if dest not in RESUME_CHANGEABLE:
            via = ", ".join(option_flag(parser, short) for short in sorted(given) if dest in SHORTCUTS.get(short, ()))
            raise UsageError(
                f"{f'{flag} (set by {via})' if via else flag}: the run in {run_dir} was trained with {old!r}, this command gives {new!r}; {why} keeps the run's "
                f"own settings and may change only {', '.join(option_flag(parser, d) for d in RESUME_CHANGEABLE)}. "
                "Train into another --out to change it"
            )
        _set(saved, path, new)
        saved.changes.append({"option": flag, "from": old, "to": new})
    return saved


def run_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
               argv: Sequence[str] | None) -> tuple[TrainConfig, Path | None]:
    """The config to train with and the checkpoint to resume from (None: a new run).

    * ``--resume RUN``: the run's saved config; each option given on the
      command line that differs from it is applied (changeable) or refused.
    * ``--resume-if-exists``, or a torchrun restart: when ``--out`` holds
      ``checkpoints/last.pt``, the run continues, and the command's whole
      config (it is the same command again) must match the saved one but for
      changeable options; else a new run starts.
    """
    restarted = restart_count() > 0
    if args.resume:
        if args.overwrite or args.resume_if_exists:
            raise UsageError("--resume continues a run; drop --overwrite / --resume-if-exists")
        if args.config:
            raise UsageError(f"--config {args.config}: --resume continues with the run's own config; drop --config "
                             "(or give the options to change on the command line)")
        run, checkpoint = locate_resume(args.resume)
        given = given_options(parser, argv)
        if "out" in given and Path(args.out).resolve() != run.path.resolve():
            raise UsageError(f"--out {args.out}: a resumed run stays in its folder {run}; drop --out")
        saved = run.read_config()
        moved = args.data or args.data_option  # --data: the data folder may have moved since
        own = {dest: getattr(saved.optim, dest) for dest in ("optim", "schedule") if dest not in given}  # --lr & co. rewrite these
        wanted = config_from_args(argparse.Namespace(**{**vars(args), **own, "data": moved or saved.data.data}))
        cfg = reconcile(saved, wanted, sorted(config_dests(given)), parser, run.path, "--resume", given)
        cfg.out = str(run)  # the folder may have moved since
        return cfg, checkpoint
    if args.overwrite and args.resume_if_exists:
        raise UsageError("--resume-if-exists continues the run in --out and --overwrite replaces it; give one")
    cfg = config_from_args(args)
    run = RunDir(cfg.out)
    if (args.resume_if_exists or restarted) and run.last.is_file():
        if not run.is_run():
            raise UsageError(f"{run} has checkpoints but no {run.config_file.name}; pass --overwrite to start again")
        dests = [action.dest for action in parser._actions if action.dest != "help" and _sets_config(action.dest)]
        why = "a torchrun restart" if restarted and not args.resume_if_exists else "--resume-if-exists"
        return reconcile(run.read_config(), cfg, dests, parser, run.path, why), run.last
    return cfg, None


# Command-line shortcuts that set no field of their own but rewrite these ones.
SHORTCUTS = {"lr": ("optim",), "warmup_epochs": ("schedule",), "min_lr": ("schedule",), "data_option": ("data",)}


def config_dests(given: set[str]) -> set[str]:
    """The options among ``given`` that set config fields, with each shortcut replaced by the fields it rewrites."""
    dests = {dest for dest in given if _sets_config(dest)}
    return dests | {field for dest in given & set(SHORTCUTS) for field in SHORTCUTS[dest]}


def _sets_config(dest: str) -> bool:
    try:
        config_field(dest)
    except KeyError:
        return False
    return True


def settings_given(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] | None) -> set[str]:
    """The dests given on the command line, and those a ``--config`` file sets to other than the recipe's default.

    A run's own ``config.json`` names every setting; only the ones it
    changes count as given, so replaying a run warns about nothing new.
    """
    fresh = build_parser()  # ``parser`` holds the file's and the recipe's defaults, which would all look given
    given = given_options(fresh, argv)
    if args.config:
        baseline = {**{action.dest: action.default for action in fresh._actions}, **recipe_defaults(args.recipe)}
        from_file = option_defaults(args.config, parser, FIELD_PATHS)
        given |= {dest for dest, value in from_file.items() if value != baseline.get(dest)}
    return given


def warn_unread_loss_settings(cfg: TrainConfig, given: Collection[str], parser: argparse.ArgumentParser) -> None:
    """Warn, naming the option, about each loss setting given (flag or config file) that no loss of the run reads.

    Under torchrun only the first process warns: one warning per run, not one per GPU.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return
    loss = cfg.loss
    asked = [dest for dest in LOSS_SETTINGS if dest in given]
    for dest in unread_loss_settings(asked, loss.loss_by_rank().values(), loss.class_weights):
        warnings.warn(f"{option_flag(parser, dest)} {getattr(loss, dest)} changes nothing: no loss of this run reads it "
                      f"(--loss {loss.loss}, --class-weights {loss.class_weights})", stacklevel=2)


def warn_version_changes(cfg: TrainConfig, current: dict[str, Any], resume: Path) -> None:
    """Warn when a run resumes under other versions of the packages that move its numbers (first process only)."""
    changes = version_changes(cfg.environment, current)
    if changes and int(os.environ.get("RANK", "0")) == 0:
        warnings.warn(f"resuming {resume} with other package versions than the run started with "
                      f"({', '.join(changes)}): it trains on, but not bit for bit as it would have", stacklevel=2)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_train_args(parser, argv)
    cfg, resume = run_config(parser, args, argv)
    warn_unread_loss_settings(cfg, settings_given(parser, args, argv), parser)
    current = environment(parser.prog, command_line() if argv is None else argv)
    if resume is None:
        cfg.environment = current
    else:
        warn_version_changes(cfg, current, resume)
    train(cfg, resume=resume, overwrite=args.overwrite and resume is None, quiet=args.quiet)
    return 0
