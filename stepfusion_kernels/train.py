"""stepfusion-train TASK [options]: train and evaluate StepFusionNet on one of the real-data tasks.

    stepfusion-train ett --horizon 96 --out runs/ett_h96
    stepfusion-train ecg5000 --out runs/ecg5000
    stepfusion-train mitdb --data /path/to/mitdb --out runs/mitdb
    stepfusion-train ecg5000 --members 5 --out runs/ecg5000_x5   # 5 seeds, their mean probabilities tested
    torchrun --nproc_per_node=2 -m stepfusion_kernels.train ett --max-steps 100   # DistributedDataParallel
    stepfusion-train ett --evaluate runs/ett_h96/best.pt --data /path/to/ETTh2.csv   # test a checkpoint
    stepfusion-train metafusion-alzheimer --repeats 5 --out runs/metafusion-alzheimer   # Meta Fusion
    stepfusion-train ssfn-digits --sweep --out runs/ssfn-digits                          # SSFN skew sweep

--data is a file or directory (default: the task's folder under $STEPFUSION_DATA, which defaults to
../shared/data next to the checkout). A run shows tqdm progress, keeps the best-validation checkpoint
(best.pt), writes metrics.json and a PNG into --out, and ends by printing the test metrics on one line.
Each task sets its own defaults for the model and training options; the flags override them."""

import argparse
import dataclasses
import os
import sys

import torch

from ._backend import BACKENDS
from .tasks import TASKS
from .tasks import meta_fusion, ssfn
from .tasks.common import set_up_device
from .tasks.training import AUTOCAST_DTYPES, TrainingOptions, evaluate_checkpoint, evaluate_ensemble, train

# Flag -> StepFusionConfig field, for the model options every task shares.
MODEL_FLAGS = ("dim", "heads", "layers_a", "layers_b", "steps", "window", "global_tokens", "dropout",
               "gate_init", "share_steps", "backend")
# What --evaluate takes from its own command line: where the data is, where and how the model runs, where
# the results go. Every other flag (the model, the data's preprocessing and split, the seed) comes from
# the checkpoint, so that the model is rebuilt and its data prepared exactly as in training.
EVALUATION_FLAGS = ("data", "device", "autocast", "backend", "threads", "no_progress", "out", "evaluate")


def _add_common(parser):
    parser.add_argument("--data", default=None, help="data file or directory (default: under $STEPFUSION_DATA)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: none)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="evaluate an exponential moving average of the weights with this decay (0: off)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--autocast", default="off", choices=tuple(AUTOCAST_DTYPES),
                        help="run the forward passes under torch.autocast in this dtype (fp16 with a gradient "
                             "scaler; the cpu backend takes bf16 only)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="backend of the fusion ops")
    parser.add_argument("--out", default=None, help="output directory (default: runs/TASK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=int, default=1,
                        help="train K models with seeds SEED..SEED+K-1 (each in OUT/member-k; the data split "
                             "keeps SEED) and test the mean of their predictions (class probabilities or "
                             "forecasts)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--evaluate", nargs="+", metavar="CHECKPOINT",
                        help="no training: validate and test these best.pt files (the mean prediction of several) "
                             "with the flags they were trained with; only --data, --device, --autocast, --backend, "
                             "--threads, --no-progress, --out (default runs/TASK-evaluation) and the task's "
                             "evaluation flags (ett: --eval-stride) apply")
    model = parser.add_argument_group("model (StepFusionConfig)")
    model.add_argument("--dim", type=int)
    model.add_argument("--heads", type=int)
    model.add_argument("--layers-a", type=int)
    model.add_argument("--layers-b", type=int)
    model.add_argument("--steps", type=int, help="K fusion steps (0: no fusion)")
    model.add_argument("--window", type=int, help="guidance attention local half-width (-1: all keys)")
    model.add_argument("--global-tokens", type=int)
    model.add_argument("--dropout", type=float)
    model.add_argument("--gate-init", type=float)
    model.add_argument("--share-steps", action="store_true", help="every fusion step uses the same weights")


def parser():
    top = argparse.ArgumentParser(prog="stepfusion-train", description=__doc__.split("\n\n")[0])
    tasks = top.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, module in TASKS.items():
        sub = tasks.add_parser(name, help=module.__doc__.split("\n")[0])
        _add_common(sub)
        module.add_arguments(sub)
    # Meta Fusion trains cohorts of students, not StepFusionNet: its tasks bring their own flags.
    for name in meta_fusion.TASKS:
        meta_fusion.add_arguments(tasks.add_parser(name, help=f"Meta Fusion: {name.split('-', 1)[1]}"))
    # SSFN trains frozen encoders and many small fusion heads: its tasks bring their own flags too.
    for name in ssfn.TASKS:
        ssfn.add_arguments(tasks.add_parser(name, help=f"SSFN: {name.split('-', 1)[1]}"))
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    if args.task in meta_fusion.TASKS:
        meta_fusion.run(args)
        return 0
    if args.task in ssfn.TASKS:
        ssfn.run(args)
        return 0
    set_up_device(args.device, args.threads)
    if args.evaluate:
        _evaluate(args)
        return 0
    if args.members < 1:
        raise ValueError(f"--members must be >= 1, got {args.members}")
    out = args.out or f"runs/{args.task}"
    if args.members == 1:
        _train_member(args, args.seed, out)
        return 0
    seeds, results = range(args.seed, args.seed + args.members), []
    for k, seed in enumerate(seeds):
        setup, options, result = _train_member(args, seed, os.path.join(out, f"member-{k}"))
        results.append(result)
    options = dataclasses.replace(options, out=out, seed=args.seed)
    evaluate_ensemble(setup, results, out, {"seeds": list(seeds), "options": dataclasses.asdict(options),
                                            "setup": setup.description,
                                            "config": dataclasses.asdict(setup.model.config)})
    return 0


def _train_member(args, seed, out):
    """(setup, options, result) of one model trained with `seed` (initial weights, batch order,
    augmentation) on the data split of `args.seed`."""
    torch.manual_seed(seed)
    setup = TASKS[args.task].build(args, {flag: getattr(args, flag) for flag in MODEL_FLAGS})
    options = TrainingOptions(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, ema_decay=args.ema_decay, autocast=args.autocast,
                              device=args.device, out=out, seed=seed, progress=not args.no_progress,
                              flags=dict(vars(args)))
    return setup, options, train(setup, options)


def _evaluate(args):
    """--evaluate: each checkpoint's model rebuilt from the flags it was trained with, on the data of
    this command line, validated and tested; several checkpoints are also tested as an ensemble."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--evaluate runs in one process: start it without torchrun")
    out = args.out or f"runs/{args.task}-evaluation"
    setups, results = [], []
    for k, path in enumerate(args.evaluate):
        checkpoint = torch.load(path, map_location="cpu")
        if checkpoint.get("task") != args.task:
            raise ValueError(f"--evaluate: {path} is a checkpoint of task {checkpoint.get('task')!r}, "
                             f"not {args.task!r}")
        if not checkpoint.get("flags"):
            raise ValueError(f"--evaluate: {path} does not record the flags it was trained with (written by "
                             "train() without them, or before --evaluate existed); its 'model' and 'config' "
                             "entries can still be loaded into StepFusionNet(StepFusionConfig(**config)) by hand")
        own = EVALUATION_FLAGS + TASKS[args.task].EVALUATION_FLAGS
        flags = {**checkpoint["flags"], **{name: getattr(args, name) for name in own}}
        run_args = argparse.Namespace(**flags)
        setup = TASKS[args.task].build(run_args, {flag: flags[flag] for flag in MODEL_FLAGS})
        built = dataclasses.asdict(setup.model.config)
        changed = sorted(name for name in built if name != "backend" and checkpoint["config"].get(name) != built[name])
        if changed:  # the same flags give another model: the code changed since the checkpoint was written
            raise ValueError(f"--evaluate: {path}'s flags now build a different model: "
                             + ", ".join(f"{name} {checkpoint['config'].get(name)!r} -> {built[name]!r}"
                                         for name in changed))
        options = TrainingOptions(device=args.device, autocast=args.autocast, seed=flags["seed"], flags=flags,
                                  out=out if len(args.evaluate) == 1 else os.path.join(out, f"member-{k}"),
                                  progress=not args.no_progress)
        setups.append(setup)
        results.append(evaluate_checkpoint(setup, options, checkpoint, path))
    if len(results) > 1:
        evaluate_ensemble(setups[0], results, out, {"checkpoints": list(args.evaluate)})


if __name__ == "__main__":
    sys.exit(main())
