"""`ensembler train-folds`: k-fold training of one architecture into a registered family."""

from __future__ import annotations

import argparse

from ..names import AUGMENTS, CROPS, HEADS, LOSS_NAMES, MONITORS, OPTIMIZERS, SCHEDULERS, TARGETS
from ._common import (add_data_args, add_executor_args, add_registry_arg, console, err_console, executor_from_args,
                      parse_int_list, printed_warnings)

_EPILOG = """\
defaults by regime (measured on real face photos, benchmarks/bench_quality.py):
  fine-tune (--pretrained, the default):  --lr 3e-4, --warmup-epochs 1, --augment standard, --crop timm
  from scratch (--no-pretrained):         --lr 3e-3, --warmup-epochs 0.3, --augment flip, --crop full
  an explicit flag always wins; the run header says which values came from the regime.

examples:
  ensembler train-folds --data digits --arch resnet18 --no-pretrained --img-size 32 --epochs 8
  ensembler train-folds --data /data/mask/train --arch efficientnet_b3 --k 5 --loss mix --loss-weights ce=0.3,f1=0.7
  ensembler train-folds --data /data/mask/train --arch efficientnet_b3 --target age --loss focal
  ensembler train-folds --data /data/mask/train --arch resnet50 --resume --family resnet50-flat
  ensembler train-folds --data /shared/mask/train --arch efficientnet_b3,resnet50 --executor ray \
      --ray-address auto --gpus-per-fold 1 --registry /shared/checkpoints

files (under the registry): <family>/fold<k>/weights.safetensors, <family>/oof.npz,
<family>/metrics.csv, <family>/learning_curves.png; <family>/fold<k>/state.pt while a fold
trains (--resume continues from it).
"""


def register(sub) -> None:
    """Add ``train-folds``."""
    p = sub.add_parser(
        "train-folds",
        help="train an architecture on k person-grouped folds; register checkpoints and OOF logits",
        description="Split the data into K grouped, stratified folds; train one model per fold, keep the "
        "best epoch by validation macro-F1 (or --monitor), register each checkpoint, and write the "
        "family's out-of-fold logits, metrics.csv and learning curves.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(p)
    add_registry_arg(p)
    g = p.add_argument_group("model")
    g.add_argument("--arch", required=True,
                   help="timm architecture, e.g. resnet18, efficientnet_b3, swin_base_patch4_window7_224; several, "
                   "comma-separated (resnet18,efficientnet_b0), train one family each in one run")
    g.add_argument("--head", choices=HEADS, default="flat",
                   help="flat: one logit per class; factored: one softmax block per factor (mask data, or a "
                        "multi-factor --target); multilabel: a sigmoid per factor level trained with BCE, joint "
                        "log-probs from the sigmoids given one level per factor (default flat)")
    g.add_argument("--target", default=None, metavar="FACTOR[,FACTOR]",
                   help="train a per-factor model (mask data): mask, gender, age, or several such as gender,age; "
                        "compose it with the other factors' families: --members mask-fam+this-fam")
    g.add_argument("--img-size", type=int, default=None, metavar="PX", help="input size (default: the arch's own)")
    g.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                   help="start from timm's pretrained weights (default; needs hub access or --pretrained-path)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="train from scratch")
    g.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="local pretrained weights (.safetensors/.pth) instead of a download")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")

    g = p.add_argument_group("folds")
    g.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    g.add_argument("--folds", default=None, metavar="I,J", help="train only these folds, e.g. 0,3 (OOF is then partial)")
    g.add_argument("--family", default=None, help="registry family name (default <arch>-<head>[-<target>], made unique)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of --family (or of the newest default-named family): "
                   "finished folds are skipped, an unfinished one continues from its last epoch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="epochs per fold (default 10)")
    g.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default by regime: 3e-4 fine-tuning pretrained weights, 3e-3 from scratch)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (default 0.01)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="default adamw")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="cosine",
                   help="LR schedule after warm-up, stepped per batch (default cosine)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up epochs, capped at a quarter of the run (default by regime: 1 fine-tuning, 0.3 from scratch)")
    g.add_argument("--loss", choices=LOSS_NAMES, default="ce",
                   help="ce, focal, label-smoothing, f1 (soft macro-F1), bce (one sigmoid per class; what "
                        "--head multilabel trains with) or mix (default ce; bce with --head multilabel)")
    g.add_argument("--loss-weights", default=None, metavar="ce=0.3,f1=0.7", help="weights of --loss mix")
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (default 2)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default 0.1)")
    g.add_argument("--augment", nargs="?", const="standard", default="auto",
                   choices=AUGMENTS,
                   help="train-time augmentation: standard (random-resized crop+flip+colour), light "
                   "(small crop+rotation, no flip: digits/text), flip (eval geometry + flip), none; auto = by "
                   "regime: standard fine-tuning, flip from scratch (digits: light, none) (default auto; "
                   "bare --augment = standard)")
    g.add_argument("--crop", choices=CROPS, default=None,
                   help="eval geometry stored with each checkpoint: timm (the arch's centre crop) or full (the whole "
                        "image resized, nothing cut) (default by regime: timm fine-tuning, full from scratch)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="= --augment none")
    g.add_argument("--monitor", choices=MONITORS, default="f1",
                   help="validation metric that picks the best epoch (default f1 = macro-F1)")
    g.add_argument("--patience", type=int, default=5,
                   help="stop a fold after this many epochs without improvement; 0 = never (default 5)")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16, else fp16); ignored on CPU")
    g.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, init, shuffling, augmentation (default 0)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms: a resumed run matches an uninterrupted one (CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_executor_args(g, unit="fold")
    p.set_defaults(func=_train_folds)


def configs_from_args(args) -> list:
    """One TrainConfig per ``--arch`` (comma-separated)."""
    from ..errors import EnsemblerError

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs:
        raise EnsemblerError("--arch: name a timm architecture")
    if len(set(archs)) != len(archs):
        raise EnsemblerError(f"--arch {args.arch}: an architecture is listed twice")
    if len(archs) > 1 and args.family:
        raise EnsemblerError(f"--family names one family; with several --arch ({args.arch}) leave it out: each "
                             f"family is named <arch>-<head>")
    return [config_from_args(args, arch) for arch in archs]


def config_from_args(args, arch: str | None = None):
    """The TrainConfig the parsed flags describe (for ``arch``, default ``--arch``)."""
    from ..train.config import TrainConfig

    return TrainConfig(
        arch=arch or args.arch, k=args.k, folds=parse_int_list(args.folds, "--folds"), family=args.family,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        optimizer=args.optimizer, scheduler=args.scheduler, warmup_epochs=args.warmup_epochs,
        img_size=args.img_size, head=args.head, loss=args.loss, loss_weights=args.loss_weights,
        focal_gamma=args.focal_gamma, smoothing=args.smoothing, augment=args.augment, amp=args.amp,
        seed=args.seed, workers=args.workers, pretrained=args.pretrained or args.pretrained_path is not None,
        pretrained_path=args.pretrained_path, monitor=args.monitor,
        patience=None if args.patience == 0 else args.patience, device=args.device, target=args.target,
        deterministic=args.deterministic, channels_last=args.channels_last, crop=args.crop,
    )


def _train_folds(args) -> int:
    import time

    from ..data import load_source_from_args
    from ..registry import Registry
    from ..train import train_families

    configs = configs_from_args(args)  # bad flags fail before the data is read
    executor = executor_from_args(args, unit="fold")
    table = load_source_from_args(args)
    registry = Registry(args.registry)
    t0 = time.perf_counter()
    with printed_warnings():
        results = train_families(table, configs, registry, progress=args.progress, resume=args.resume,
                                 console=err_console(), executor=executor)
    seconds = time.perf_counter() - t0
    for result in results:
        _print_result(result, seconds)
    return 0


def _print_result(result, seconds: float) -> None:
    from rich.table import Table

    out = console()
    t = Table(title=f"family {result.family} ({result.config.arch}, {result.config.head} head"
              + (f", target {result.config.target}" if result.config.target else "") + ")", title_justify="left")
    for col in ("fold", "best epoch", "epochs", "val macro-F1", "val acc", "val loss", "checkpoint"):
        t.add_column(col, justify="left" if col == "checkpoint" else "right", overflow="fold")
    for f in result.folds:
        t.add_row(str(f.fold), str(f.best_epoch), str(f.epochs_run) + (" (early stop)" if f.stopped_early else ""),
                  f"{f.val_f1:.4f}", f"{f.val_acc:.4f}", f"{f.val_loss:.4f}",
                  f.entry_id + (" (earlier run)" if f.skipped else ""))
    label = "OOF" if result.oof_complete else f"OOF (partial: {result.oof_rows}/{result.total_rows} rows)"
    t.add_section()
    t.add_row(label, "", "", f"{result.oof_f1:.4f}", f"{result.oof_acc:.4f}", "", "")
    out.print(t)
    for note in result.notes:
        out.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"oof:     {result.oof_path}\nmetrics: {result.metrics_csv}\ncurves:  {result.curves_png}\n"
              f"time:    {seconds:.1f}s", highlight=False)
