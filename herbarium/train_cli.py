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
from herbarium.data.gpu import DECODES
from herbarium.models import HEADS, ModelConfig
from herbarium.noisy.o2u import O2U_WEIGHTINGS

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
    parser.add_argument("data", nargs="?", default=D.data, help="dataset folder (Herbarium 2020/2021/2022 layout or CSV manifests)")
    data = parser.add_argument_group("data")
    data.add_argument("--train-split", default=D.train_split, help=f"training split (default: {D.train_split})")
    data.add_argument("--val-split", default=D.val_split, help="validation split (default: hold out --holdout of train, stratified)")
    data.add_argument("--holdout", type=float, default=D.holdout, help=f"fraction of train held out when no --val-split; 0 trains without validation (no best.pt) (default: {D.holdout})")
    data.add_argument("--ranks", type=_csv, default=D.ranks, help=f"the taxonomy's ranks, coarse to fine (default: {','.join(D.ranks)})")
    data.add_argument("--stats", default=D.stats, help="stats JSON from collect-stats (default: DATA/<train-split>/stats.json if present, else ImageNet mean/std)")
    data.add_argument("--size", type=int, default=D.size, help=f"input side in pixels (default: {D.size})")
    data.add_argument("--batch-size", type=int, default=D.batch_size, help=f"images per step per process (default: {D.batch_size})")
    data.add_argument("--workers", type=int, default=D.workers, help="decoding processes (default: all cores)")
    data.add_argument("--sampler", choices=("none", "balanced", "sqrt"), default=D.sampler, help=f"class rebalancing of the draws (default: {D.sampler})")
    data.add_argument("--augment", choices=sorted(PRESETS), default=D.augment, help=f"augmentation preset (default: {D.augment})")
    data.add_argument("--decode", choices=DECODES, default=D.decode, help="where JPEGs are decoded and augmented: cpu (PIL in the workers), gpu (nvJPEG and augmentation on the device, the workers only read bytes) or auto: gpu on a CUDA device that decodes JPEGs, else cpu (default: auto)")
    data.add_argument("--skip-bad-images", action="store_true", default=D.skip_bad_images, help="skip and count unreadable images instead of stopping (default: off)")
    data.add_argument("--subset", default=D.subset, help="CSV with an image_id column (e.g. clean-labels' kept.csv): train on these training images only (default: all)")
    data.add_argument("--holdout-ids", default=D.holdout_ids, help="CSV with an image_id column: these training images are the validation split (default: a random --holdout)")

    model = parser.add_argument_group("model")
    model.add_argument("--trunk", default=M.trunk, help=f"timm model name, or pretrainedmodels:NAME (default: {M.trunk})")
    model.add_argument("--pretrained", action="store_true", default=M.pretrained, help="start from the trunk's packaged offline ImageNet weights (default: off)")
    model.add_argument("--weights", default=M.weights, help="local trunk weights: .pth/.pt or .safetensors (default: none)")
    model.add_argument("--pool", default=M.pool, help=f"pooling: avg, max or gem (default: {M.pool})")
    model.add_argument("--dropout", type=float, default=M.dropout, help=f"dropout before each head (default: {M.dropout})")
    model.add_argument("--embedding-dim", type=int, default=M.embedding_dim, help=f"embedding layer before the heads, 0 for none (default: {M.embedding_dim})")
    model.add_argument("--head", choices=tuple(HEADS), default=M.head, help=f"head of every rank: linear, or arcface (scaled cosines, angular margin in training) (default: {M.head})")
    model.add_argument("--arcface-levels", type=_csv, default=M.arcface_levels, help="ranks that get an ArcFace head alongside --head for the others, e.g. species (default: none)")
    model.add_argument("--arcface-margin", type=float, default=M.arcface_margin, help=f"ArcFace additive angular margin in radians (default: {M.arcface_margin})")
    model.add_argument("--arcface-scale", type=float, default=M.arcface_scale, help=f"ArcFace scale: logits are scale * cosine (default: {M.arcface_scale:g})")
    model.add_argument("--arcface-subcenters", type=int, default=M.arcface_subcenters, help=f"ArcFace centres per class, > 1 for sub-centre ArcFace (default: {M.arcface_subcenters})")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--levels", type=_csv, default=L.levels, help=f"ranks that get a head (default: {','.join(L.levels)})")
    loss.add_argument("--level-weights", type=_weights, default=L.level_weights, help="loss weight per rank, e.g. species=1.5,genus=1 (default: species=1.5, others 1)")
    loss.add_argument("--loss", default=L.loss, help=f"focal, ce, label_smoothing, logit_adjusted, balanced_softmax or sce; one for all ranks or rank=name,... (default: {L.loss})")
    loss.add_argument("--class-weights", default=L.class_weights, help=f"none, inverse, sqrt_inverse or effective (default: {L.class_weights})")
    loss.add_argument("--gamma", type=float, default=L.gamma, help=f"focal loss gamma (default: {L.gamma})")
    loss.add_argument("--beta", type=float, default=L.beta, help=f"effective-number beta (default: {L.beta})")
    loss.add_argument("--tau", type=float, default=L.tau, help=f"logit adjustment strength (default: {L.tau})")
    loss.add_argument("--smoothing", type=float, default=L.smoothing, help=f"label smoothing (default: {L.smoothing})")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=T.epochs, help=f"epochs (default: {T.epochs})")
    optim.add_argument("--optim", default=O.optim, help=f"optimizer phases name[@lr]:start_epoch, e.g. adam:0,sgd:10,adam:20 (default: {O.optim})")
    optim.add_argument("--schedule", default=O.schedule, help=f"LR schedule: step:N[:gamma], cosine[:warmup=N], sgdr:N[:mult=M], constant (default: {O.schedule})")
    optim.add_argument("--weight-decay", type=float, default=O.weight_decay, help="weight decay for every phase (default: each optimizer's own: adam 0, adamw 0.01, sgd 1e-4)")
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
    run.add_argument("--stop-after-epoch", type=int, default=T.stop_after_epoch, help="end the process after this epoch, resumable later (default: off)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train one trunk with a head per taxonomic rank.")
    return add_train_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the parsed arguments describe (see :func:`run_config` for resuming)."""
    if not args.data:
        raise UsageError("train: the DATA folder is required (or --resume RUN_DIR)")
    return TrainConfig(
        out=args.out, epochs=args.epochs, seed=args.seed, device=args.device, precision=args.precision,
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
                          arcface_scale=args.arcface_scale, arcface_subcenters=args.arcface_subcenters),
        loss=LossConfig(levels=args.levels, level_weights=args.level_weights, loss=args.loss, class_weights=args.class_weights,
                        gamma=args.gamma, beta=args.beta, tau=args.tau, smoothing=args.smoothing),
        optim=OptimConfig(optim=args.optim, schedule=args.schedule, weight_decay=args.weight_decay,
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
        cfg = reconcile(saved, wanted, sorted(given), parser, run_dir, "--resume")
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
    args = parser.parse_args(argv)
    cfg, resume = run_config(parser, args, argv)
    train(cfg, resume=resume, overwrite=args.overwrite and resume is None)
    return 0
