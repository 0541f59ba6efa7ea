"""The ``train`` command line: argparse groups whose defaults come from :mod:`herbarium.config`.

Resuming (``--resume RUN``, ``--resume-if-exists``, or a torchrun restart)
continues with the run's own saved config. An option given on the command
line that differs from the saved value is applied and recorded when it is in
:data:`RESUME_CHANGEABLE` (it changes how the run proceeds, not what it
is), and refused, naming the option, otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

from herbarium.config import DataConfig, LossConfig, O2UConfig, OptimConfig, TrainConfig
from herbarium.distributed import restart_count
from herbarium.errors import UsageError, command
from herbarium.data.augment import PRESETS
from herbarium.data.gpu import AUTO_DEVICE_BELOW_CORES, DECODES
from herbarium.models import HEADS, ModelConfig
from herbarium.noisy.o2u import O2U_WEIGHTINGS
from herbarium.recipes import RECIPES, recipe_defaults

D, M, L, O, T, U = DataConfig(), ModelConfig(), LossConfig(), OptimConfig(), TrainConfig(), O2UConfig()


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _weights(value: str) -> dict[str, float]:
    """``species=1.5,genus=1`` -> {'species': 1.5, 'genus': 1.0}."""
    try:
        return {rank: float(weight) for rank, weight in (part.split("=") for part in _csv(value))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rank=weight pairs like species=1.5,genus=1, got {value!r}") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("data", nargs="?", default=D.data, help="dataset folder (Herbarium 2020/2021/2022 layout or CSV manifests); or --data DATA")
    parser.add_argument("--data", dest="data_option", metavar="DATA", default=None, help="the dataset folder, as tta_eval.py takes it (same as the positional DATA)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-split", default=D.train_split, help=f"training split (default: {D.train_split})")
    data.add_argument("--val-split", default=D.val_split, help="validation split (default: none, or --holdout of train)")
    data.add_argument("--holdout", type=float, default=D.holdout, help=f"fraction of train held out for validation when no --val-split, stratified; 0: no validation, every image trains and the last epoch is the checkpoint (default: {D.holdout:g})")
    data.add_argument("--ranks", type=_csv, default=D.ranks, help=f"the taxonomy's ranks, coarse to fine (default: {','.join(D.ranks)})")
    data.add_argument("--stats", default=D.stats, help="stats JSON from collect-stats (default: DATA/<train-split>/stats.json if present, else ImageNet mean/std)")
    data.add_argument("--size", type=int, default=D.size, help=f"input side in pixels (default: {D.size})")
    data.add_argument("--batch-size", type=int, default=D.batch_size, help=f"images per step per process (default: {D.batch_size})")
    data.add_argument("--workers", type=int, default=D.workers, help="decoding processes (default: all cores)")
    data.add_argument("--sampler", choices=("none", "balanced", "sqrt"), default=D.sampler, help=f"class rebalancing of the draws (default: {D.sampler})")
    data.add_argument("--augment", choices=sorted(PRESETS), default=D.augment, help=f"augmentation preset (default: {D.augment})")
    data.add_argument("--decode", choices=DECODES, default=D.decode, help=f"where JPEGs are decoded and augmented: cpu (PIL in the workers), gpu (nvJPEG and batched augmentation on the device, the workers only read bytes) or auto: gpu only on a CUDA device that decodes JPEGs with fewer than {AUTO_DEVICE_BELOW_CORES} cores per GPU, else cpu (measured faster with 16 cores; see README) (default: auto)")
    data.add_argument("--skip-bad-images", action="store_true", default=D.skip_bad_images, help="skip and count unreadable images instead of stopping (default: off)")
    data.add_argument("--subset", default=D.subset, help="CSV with an image_id column (e.g. clean-labels' kept.csv): train on these training images only (default: all)")
    data.add_argument("--holdout-ids", default=D.holdout_ids, help="CSV with an image_id column: these training images are the validation split (default: a random --holdout)")

    model = parser.add_argument_group("model")
    model.add_argument("--trunk", default=M.trunk, help=f"timm model name, or pretrainedmodels:NAME (default: {M.trunk})")
    model.add_argument("--pretrained", action="store_true", default=M.pretrained, help="start from ImageNet weights: packaged for efficientnet_lite0/1/2, else timm's own (its local cache, else a download); offline without them, says which file to pass with --weights (default: off)")
    model.add_argument("--weights", "--trunk-weights", dest="weights", default=M.weights, help="local trunk weights: .pth/.pt or .safetensors (default: none)")
    model.add_argument("--pool", default=M.pool, help=f"pooling: avg, max or gem (default: {M.pool})")
    model.add_argument("--dropout", type=float, default=M.dropout, help=f"dropout before each head (default: {M.dropout})")
    model.add_argument("--embedding-dim", type=int, default=M.embedding_dim, help=f"embedding layer before the heads, 0 for none (default: {M.embedding_dim})")
    model.add_argument("--head", choices=tuple(HEADS), default=M.head, help=f"head of every rank: linear, or arcface (scaled cosines, angular margin in training) (default: {M.head})")
    model.add_argument("--arcface-levels", type=_csv, default=M.arcface_levels, help="ranks that get an ArcFace head alongside --head for the others, e.g. species (default: none)")
    model.add_argument("--arcface-margin", type=float, default=M.arcface_margin, help=f"ArcFace additive angular margin in radians (default: {M.arcface_margin})")
    model.add_argument("--arcface-scale", type=float, default=M.arcface_scale, help=f"ArcFace scale: logits are scale * cosine (default: {M.arcface_scale:g})")
    model.add_argument("--drop-path", type=float, default=M.drop_path, help=f"stochastic depth rate of the trunk, timm trunks that support it (default: {M.drop_path:g})")
    model.add_argument("--arcface-subcenters", type=int, default=M.arcface_subcenters, help=f"ArcFace centres per class, > 1 for sub-centre ArcFace (default: {M.arcface_subcenters})")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--levels", type=_csv, default=L.levels, help=f"ranks that get a head (default: {','.join(L.levels)})")
    loss.add_argument("--rank-weights", "--level-weights", dest="level_weights", type=_weights, default=L.level_weights, help="loss weight per rank, e.g. species=1.5,genus=1 (default: 1 per rank); --level-weights is the old name")
    loss.add_argument("--loss", default=L.loss, help=f"logit_adjusted, focal, focal_logit_adjusted, ce, label_smoothing, balanced_softmax or sce; one for all ranks or rank=name,... (default: {L.loss})")
    loss.add_argument("--class-weights", default=L.class_weights, help=f"none, inverse, sqrt_inverse or effective (default: {L.class_weights})")
    loss.add_argument("--gamma", type=float, default=L.gamma, help=f"focal loss gamma (default: {L.gamma})")
    loss.add_argument("--beta", type=float, default=L.beta, help=f"effective-number beta (default: {L.beta})")
    loss.add_argument("--tau", type=float, default=L.tau, help=f"logit adjustment strength (default: {L.tau})")
    loss.add_argument("--smoothing", type=float, default=L.smoothing, help=f"label smoothing (default: {L.smoothing})")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=T.epochs, help=f"epochs (default: {T.epochs})")
    optim.add_argument("--optim", default=O.optim, help=f"optimizer phases name[@lr]:start_epoch, e.g. adam:0,sgd:10,adam:20 (default: {O.optim})")
    optim.add_argument("--schedule", default=O.schedule, help=f"LR schedule: step:N[:gamma], cosine[:warmup=N], sgdr:N[:mult=M], constant (default: {O.schedule})")
    timm_style = ("timm-style shortcuts onto --optim/--schedule: --lr sets every phase's LR, --warmup-epochs and "
                  "--min-lr the cosine/sgdr schedule's warmup and floor")
    optim.add_argument("--lr", type=float, default=None, help=f"base LR of every optimizer phase without its own @LR (default: each optimizer's own). {timm_style}")
    optim.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup epochs of a cosine or sgdr --schedule, as :warmup=N (default: the schedule's)")
    optim.add_argument("--min-lr", type=float, default=None, help="lowest LR of a cosine or sgdr --schedule, as :min=MIN_LR/LR; the phases must share one LR (default: 0)")
    optim.add_argument("--weight-decay", type=float, default=O.weight_decay, help="weight decay for every phase (default: each optimizer's own: adamw 0.05, adam 0, sgd 1e-4)")
    optim.add_argument("--plateau-patience", type=int, default=O.plateau_patience, help="switch to the next optimizer phase after this many epochs without gain (default: off)")
    optim.add_argument("--accum-steps", type=int, default=O.accum_steps, help=f"gradient accumulation steps (default: {O.accum_steps})")
    optim.add_argument("--clip-grad", type=float, default=O.clip_grad, help="clip the gradient norm (default: off)")

    noisy = parser.add_argument_group("noisy labels (O2U reweighting; needs --schedule sgdr:...)")
    noisy.add_argument("--o2u", action="store_true", default=U.enabled, help="weight each sample by its normalised loss over the previous SGDR cycle (default: off)")
    noisy.add_argument("--o2u-weighting", choices=O2U_WEIGHTINGS, default=U.weighting, help=f"exp: exp(-max(loss, 0)/T); rank: 1 - loss percentile (default: {U.weighting})")
    noisy.add_argument("--o2u-temperature", type=float, default=U.temperature, help=f"T of the exp weighting, in nats of normalised loss (default: {U.temperature:g})")
    noisy.add_argument("--o2u-floor", type=float, default=U.floor, help=f"smallest sample weight (default: {U.floor:g})")
    noisy.add_argument("--o2u-warmup-cycles", type=int, default=U.warmup_cycles, help=f"SGDR cycles trained unweighted first (default: {U.warmup_cycles})")

    run = parser.add_argument_group("run")
    run.add_argument("--recipe", choices=tuple(RECIPES), default=T.recipe,
                     help="a named set of defaults; flags given still win: default (chosen on validation data) or "
                          "herbarium2020 (Adam 3e-4 halved every 5 epochs, class-weighted focal loss, rank weights "
                          f"1.5/1/1, dropout 0.5, 10%% hold-out) (default: {T.recipe})")
    run.add_argument("--out", default=T.out, help=f"run directory (default: {T.out})")
    run.add_argument("--resume", default=None, help="resume from a run directory or checkpoint; its saved config is used, and of the options given only those that may change on resume apply (see the README) (default: off)")
    run.add_argument("--resume-if-exists", action="store_true", help="continue the run in --out from its checkpoints/last.pt if there is one, else start it: re-running the same command after a crash picks up where it stopped (torchrun restarts do this by themselves) (default: off)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out instead of refusing (default: off)")
    run.add_argument("--seed", type=int, default=T.seed, help=f"random seed (default: {T.seed})")
    run.add_argument("--device", default=T.device, help=f"cpu, cuda, cuda:N or auto (default: {T.device})")
    run.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=T.precision, help=f"autocast precision (default: {T.precision}: bf16 on CUDA, fp32 on CPU)")
    run.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=T.channels_last, help="keep NCHW memory format (default: channels_last)")
    run.add_argument("--compile", action="store_true", default=T.compile, help="torch.compile the model (default: off)")
    run.add_argument("--log-every", type=int, default=T.log_every, help=f"optimizer steps between logged values (default: {T.log_every})")
    run.add_argument("--checkpoint-every", type=int, default=T.checkpoint_every, help="optimizer steps between mid-epoch checkpoints (default: 0, epoch ends only)")
    run.add_argument("--nan-policy", choices=("stop", "skip"), default=T.nan_policy, help=f"on a NaN/inf loss: stop naming the step, or skip the step (the model is left exactly as it was) and count it (default: {T.nan_policy})")
    run.add_argument("--nan-skip-limit", type=float, default=T.nan_skip_limit, help=f"with --nan-policy skip, stop with an error when more than this fraction of an epoch's steps in a row were skipped, at least 1 (default: {T.nan_skip_limit:g})")
    run.add_argument("--dist-timeout", type=float, default=T.dist_timeout, help="seconds a process of a multi-GPU run waits for the others before failing; a process that dies is noticed at once (default: torch's 30 min)")
    run.add_argument("--snapshots", action="store_true", default=T.snapshots, help="save checkpoints/snapshot_<k>.pt at the end of SGDR cycle k (default: off)")
    run.add_argument("--quiet", action="store_true", help="no progress bars, for logs: the start-up summary, one line per epoch and the end-of-run summary stay (default: off)")
    run.add_argument("--stop-after-epoch", type=int, default=T.stop_after_epoch, help="end the process after this epoch, resumable later (default: off)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    from herbarium.cli import prog

    parser = argparse.ArgumentParser(prog=prog("train.py"), description="Train one trunk with a head per taxonomic rank.")
    return add_train_arguments(parser)


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the defaults of the ``--recipe`` it names; flags given explicitly still win."""
    chosen, _ = parser.parse_known_args(argv)
    parser.set_defaults(**recipe_defaults(chosen.recipe))
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
    from dataclasses import replace

    from herbarium.optim import DEFAULT_LRS, parse_phases, parse_schedule

    optim, schedule = args.optim, args.schedule
    lr, warmup, min_lr = getattr(args, "lr", None), getattr(args, "warmup_epochs", None), getattr(args, "min_lr", None)
    if lr is not None:
        if lr <= 0:
            raise SystemExit(f"train: --lr must be > 0, got {lr}")
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
    return TrainConfig(
        out=args.out, recipe=args.recipe, epochs=args.epochs, seed=args.seed, device=args.device, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, nan_policy=args.nan_policy, nan_skip_limit=args.nan_skip_limit,
        dist_timeout=args.dist_timeout, stop_after_epoch=args.stop_after_epoch, snapshots=args.snapshots,
        data=DataConfig(data=str(args.data), train_split=args.train_split, val_split=args.val_split, holdout=args.holdout,
                        ranks=args.ranks, stats=args.stats, size=args.size, batch_size=args.batch_size, workers=args.workers,
                        sampler=args.sampler, augment=args.augment, decode=args.decode, skip_bad_images=args.skip_bad_images,
                        subset=args.subset, holdout_ids=args.holdout_ids),
        model=ModelConfig(trunk=args.trunk, pretrained=args.pretrained, weights=args.weights, pool=args.pool,
                          dropout=args.dropout, embedding_dim=args.embedding_dim, head=args.head,
                          arcface_levels=args.arcface_levels, arcface_margin=args.arcface_margin,
                          arcface_scale=args.arcface_scale, arcface_subcenters=args.arcface_subcenters,
                          drop_path=args.drop_path),
        loss=LossConfig(levels=args.levels, level_weights=args.level_weights, loss=args.loss, class_weights=args.class_weights,
                        gamma=args.gamma, beta=args.beta, tau=args.tau, smoothing=args.smoothing),
        optim=OptimConfig(optim=optim, schedule=schedule, weight_decay=args.weight_decay,
                          plateau_patience=args.plateau_patience, accum_steps=args.accum_steps, clip_grad=args.clip_grad),
        o2u=O2UConfig(enabled=args.o2u, weighting=args.o2u_weighting, temperature=args.o2u_temperature,
                      floor=args.o2u_floor, warmup_cycles=args.o2u_warmup_cycles),
    )


# ------------------------------------------------------------------ resuming
# Options a resumed run may change: they say how the run proceeds (how long, where, how often it logs and saves,
# how it treats bad input), not what it trains. Anything else given with a different value is refused.
RESUME_CHANGEABLE = (
    "epochs", "checkpoint_every", "log_every", "workers", "device", "decode", "compile",
    "nan_policy", "nan_skip_limit", "dist_timeout", "skip_bad_images", "data",
)
RUN_CONTROL = ("resume", "resume_if_exists", "overwrite", "out")  # say which run, not how it trains
PER_INVOCATION = ("stop_after_epoch",)  # an instruction to this process only: taken from the command line, never kept


def config_field(dest: str) -> tuple[str, ...]:
    """The :class:`TrainConfig` field an option sets: ``("epochs",)``, ``("data", "batch_size")``, ``("o2u", "floor")``."""
    if dest == "o2u":
        return ("o2u", "enabled")
    if dest.startswith("o2u_"):
        return ("o2u", dest[len("o2u_"):])
    for section in ("data", "model", "loss", "optim"):
        if dest in {f.name for f in dataclasses.fields(getattr(TrainConfig(), section))}:
            return (section, dest)
    if dest in {f.name for f in dataclasses.fields(TrainConfig)}:
        return (dest,)
    raise KeyError(f"option {dest!r} sets no TrainConfig field")


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


def locate_resume(value: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) of ``--resume``: a run folder (its ``checkpoints/last.pt``) or a checkpoint file."""
    path = Path(value)
    if path.is_dir():
        run_dir, checkpoint = path, path / "checkpoints" / "last.pt"
    elif path.is_file():
        run_dir, checkpoint = path.parent.parent, path
    else:
        raise UsageError(f"--resume {value}: no such run folder or checkpoint file")
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {value}: {run_dir} is not a run folder (it has no config.json)")
    if not checkpoint.is_file():
        raise UsageError(f"--resume {value}: {run_dir} has no checkpoints/last.pt to continue from (the run stopped before "
                         "its first checkpoint); start it again with --overwrite")
    return run_dir, checkpoint


def _same(dest: str, saved: Any, wanted: Any) -> bool:
    if saved == wanted:
        return True
    if dest == "data" and saved and wanted:
        return Path(saved).resolve() == Path(wanted).resolve()
    return False


def reconcile(saved: TrainConfig, wanted: TrainConfig, dests: Sequence[str], parser: argparse.ArgumentParser,
              run_dir: Path, why: str) -> TrainConfig:
    """``saved`` with the options ``dests`` of ``wanted`` that differ applied (changeable ones) or refused (the others).

    Each applied change is appended to ``saved.changes``; the trainer stamps
    it with the epoch and step it takes effect at.
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
            raise UsageError(
                f"{flag}: the run in {run_dir} was trained with {old!r}, this command gives {new!r}; {why} keeps the run's "
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
        run_dir, checkpoint = locate_resume(args.resume)
        given = given_options(parser, argv)
        if "out" in given and Path(args.out).resolve() != run_dir.resolve():
            raise UsageError(f"--out {args.out}: a resumed run stays in its folder {run_dir}; drop --out")
        saved = TrainConfig.load(run_dir / "config.json")
        wanted = config_from_args(argparse.Namespace(**{**vars(args), "data": args.data or saved.data.data}))
        cfg = reconcile(saved, wanted, sorted(config_dests(given)), parser, run_dir, "--resume")
        cfg.out = str(run_dir)  # the folder may have moved since
        return cfg, checkpoint
    if args.overwrite and args.resume_if_exists:
        raise UsageError("--resume-if-exists continues the run in --out and --overwrite replaces it; give one")
    cfg = config_from_args(args)
    last = Path(cfg.out) / "checkpoints" / "last.pt"
    if (args.resume_if_exists or restarted) and last.is_file():
        run_dir = Path(cfg.out)
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"{run_dir} has checkpoints but no config.json; pass --overwrite to start again")
        saved = TrainConfig.load(run_dir / "config.json")
        dests = [action.dest for action in parser._actions if action.dest != "help" and _sets_config(action.dest)]
        why = "a torchrun restart" if restarted and not args.resume_if_exists else "--resume-if-exists"
        return reconcile(saved, cfg, dests, parser, run_dir, why), last
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


@command
def main(argv: Sequence[str] | None = None) -> int:
    from herbarium.engine import train

    parser = build_parser()
    args = parse_train_args(parser, argv)
    cfg, resume = run_config(parser, args, argv)
    train(cfg, resume=resume, overwrite=args.overwrite and resume is None, quiet=args.quiet)
    return 0
