"""The training loop every task shares: AdamW with a cosine schedule, tqdm progress, validation after
every epoch (and when the step budget runs out), the best-validation checkpoint kept on disk and
restored for the test, metrics.json, a PNG and one printed line of test metrics. With an empty
validation split the checkpoint is the final weights. With `ema_decay` > 0 an exponential moving average
of the weights (updated after every optimizer step) is what gets validated, checkpointed and tested.
With `autocast` "bf16" or "fp16" the forward passes (training and evaluation) run under torch.autocast
in that dtype, float16 with a gradient scaler. `evaluate_checkpoint` tests a saved checkpoint without
training, and `evaluate_ensemble` the mean prediction of several trained models.

Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1 in the environment) it trains with
DistributedDataParallel: gloo on CPU, NCCL on CUDA, a DistributedSampler sharding each epoch, and
rank 0 alone writing files and printing."""

import dataclasses
import json
import math
import os
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

CHECKPOINT = "best.pt"
METRICS = "metrics.json"
AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TaskSetup:
    """What a task hands the loop. `loss(model, batch)` returns a scalar training loss; `predict(model,
    batch)` returns (prediction, target) tensors whose concatenation over a split `evaluate(prediction,
    target)` turns into a dict of metrics (numpy in, floats out); `plot(path, prediction, target)`
    writes the task's PNG for the test split. The validation metric `selection` picks the checkpoint."""
    name: str
    model: torch.nn.Module
    train: Dataset
    validation: Dataset
    test: Dataset
    loss: Callable
    predict: Callable
    evaluate: Callable
    plot: Callable
    selection: str
    higher_is_better: bool
    description: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainingOptions:
    epochs: int = 10
    max_steps: int = -1            # optimizer steps over all epochs; -1: no limit
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    eval_batch_size: int = 512
    device: str = "cpu"
    out: str = "runs/step_fusion"
    seed: int = 0
    progress: bool = True
    ema_decay: float = 0.0         # 0: evaluate the trained weights themselves
    autocast: str = "off"          # a key of AUTOCAST_DTYPES: the forward passes' torch.autocast dtype
    flags: dict = dataclasses.field(default_factory=dict)  # the command line's flags, kept in the checkpoint


@dataclasses.dataclass
class TrainingResult:
    validation: dict
    test: dict
    best_step: int
    steps: int
    last_state: dict  # weights at the end of training, before the best checkpoint was restored
    test_prediction: np.ndarray  # the checkpoint's predictions on the test split (what `evaluate` took)
    test_target: np.ndarray


def distributed_context(device):
    """(rank, world_size) after joining the process group torchrun describes; (0, 1) without one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _device_for_rank(device, world_size):
    if device == "cuda" and world_size > 1:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)  # NCCL's collectives run on the current device
        return local
    return torch.device(device)


@torch.no_grad()
def predict_split(setup, model, dataset, options, device):
    """(prediction, target) numpy arrays over a whole split, in order."""
    model.eval()
    predictions, targets = [], []
    for batch in DataLoader(dataset, batch_size=options.eval_batch_size, shuffle=False):
        with autocast_context(options.autocast, device):
            prediction, target = setup.predict(model, [t.to(device) for t in batch])
        predictions.append((prediction.float() if prediction.is_floating_point() else prediction).cpu().numpy())
        targets.append(target.cpu().numpy())
    return np.concatenate(predictions), np.concatenate(targets)


def _check_autocast(name):
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {name!r}")


def autocast_context(name, device):
    """The torch.autocast context of AUTOCAST_DTYPES[name] ("off", "bf16", "fp16") on `device` (a disabled one
    for "off"). With "fp16" a training loop also needs a gradient scaler: `gradient_scaler(name, device)`."""
    _check_autocast(name)
    dtype = AUTOCAST_DTYPES[name]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def gradient_scaler(name, device):
    """float16's narrow range needs the loss scaled up before backward (bfloat16 has float32's range): an
    enabled GradScaler for "fp16", a pass-through one otherwise."""
    _check_autocast(name)
    return torch.amp.GradScaler(torch.device(device).type, enabled=name == "fp16")


def _cosine_schedule(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(setup, options):
    rank, world_size = distributed_context(options.device)
    device = _device_for_rank(options.device, world_size)
    torch.manual_seed(options.seed)
    model = setup.model.to(device)
    if world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        trained = model
    sampler = (DistributedSampler(setup.train, num_replicas=world_size, rank=rank, shuffle=True, seed=options.seed)
               if world_size > 1 else None)
    loader = DataLoader(setup.train, batch_size=options.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(setup.train) // world_size > options.batch_size)
    steps_per_epoch = len(loader)
    total_steps = options.epochs * steps_per_epoch
    if options.max_steps >= 0:
        total_steps = min(total_steps, options.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    if not 0.0 <= options.ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {options.ema_decay}")
    scaler = gradient_scaler(options.autocast, device)
    average = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(options.ema_decay), use_buffers=True)
        if options.ema_decay > 0 else None)
    evaluated = model if average is None else average.module  # the weights validated, kept and tested
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _cosine_schedule(step, total_steps, options.warmup_steps))
    os.makedirs(options.out, exist_ok=True)
    checkpoint_path = os.path.join(options.out, CHECKPOINT)
    best_value, best_step, best_validation, step = None, 0, {}, 0
    history = []

    def validate():
        nonlocal best_value, best_step, best_validation
        if len(setup.validation) == 0:  # nothing to choose by: the latest weights are the checkpoint
            metrics, improved = {}, True
        else:
            metrics = setup.evaluate(*predict_split(setup, evaluated, setup.validation, options, device))
            value = metrics[setup.selection]
            # Ties go to the later, longer-trained weights (accuracy on a small validation split plateaus).
            improved = best_value is None or (value >= best_value if setup.higher_is_better else value <= best_value)
        history.append({"step": step, "train_loss": running_loss, **metrics})
        if improved:
            best_value, best_step, best_validation = metrics.get(setup.selection), step, metrics
            if rank == 0:
                torch.save({"model": evaluated.state_dict(), "config": _plain(getattr(model, "config", None)),
                            "step": step, "validation": metrics, "task": setup.name, "flags": options.flags},
                           checkpoint_path)
        return metrics

    running_loss = float("nan")
    epoch = 0
    while step < total_steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        trained.train()
        bar = tqdm(loader, desc=f"{setup.name} epoch {epoch + 1}/{options.epochs}",
                   disable=not options.progress or rank != 0, leave=False)
        for batch in bar:
            with autocast_context(options.autocast, device):
                loss = setup.loss(trained, [t.to(device) for t in batch])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if average is not None:
                average.update_parameters(model)
            step += 1
            running_loss = loss.item() if math.isnan(running_loss) else 0.95 * running_loss + 0.05 * loss.item()
            bar.set_postfix(loss=f"{running_loss:.4f}", step=step)
            if step >= total_steps:
                break
        bar.close()
        metrics = validate()
        if rank == 0 and options.progress:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "none (no validation split)"
            tqdm.write(f"{setup.name} epoch {epoch + 1} step {step}: train loss {running_loss:.4f}, validation {scores}")
        epoch += 1
    if total_steps == 0:
        validate()
    last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if world_size > 1:
        dist.barrier()  # rank 0 has written the best checkpoint before anyone reads it
    model.load_state_dict(torch.load(checkpoint_path, map_location=device)["model"])
    report = {"validation": best_validation, "best_step": best_step, "steps": step, "world_size": world_size,
              **_model_report(setup, model, options), "history": history}
    test, prediction, target = _test_and_report(setup, model, options, device, report, rank)
    return TrainingResult(best_validation, test, best_step, step, last_state, prediction, target)


def evaluate_checkpoint(setup, options, checkpoint, path):
    """No training: the weights of `checkpoint` (a loaded best.pt of `train`, found at `path`) validated and
    tested on `setup`'s splits, with metrics.json and the PNG written to `options.out` and the test metrics
    printed, as a run of `train` ends. Returns a TrainingResult (0 steps, no last_state)."""
    device = torch.device(options.device)
    model = setup.model.to(device)
    model.load_state_dict(checkpoint["model"])
    validation = (setup.evaluate(*predict_split(setup, model, setup.validation, options, device))
                  if len(setup.validation) else {})
    report = {"validation": validation, "checkpoint": path, "best_step": checkpoint["step"],
              **_model_report(setup, model, options)}
    test, prediction, target = _test_and_report(setup, model, options, device, report)
    return TrainingResult(validation, test, checkpoint["step"], 0, {}, prediction, target)


def _model_report(setup, model, options):
    return {"parameters": sum(p.numel() for p in model.parameters()), "options": dataclasses.asdict(options),
            "setup": setup.description, "config": _plain(getattr(model, "config", None))}


def _test_and_report(setup, model, options, device, report, rank=0):
    """(test metrics, prediction, target) of `model` on the test split; rank 0 writes the PNG and
    metrics.json (the task, the test metrics, then `report`) to options.out and prints the test line."""
    prediction, target = predict_split(setup, model, setup.test, options, device)
    test = setup.evaluate(prediction, target)
    if rank == 0:
        os.makedirs(options.out, exist_ok=True)
        setup.plot(os.path.join(options.out, f"{setup.name}.png"), prediction, target)
        with open(os.path.join(options.out, METRICS), "w") as handle:
            json.dump({"task": setup.name, "test": test, **report}, handle, indent=2)
        print(_test_line(setup.name, test), flush=True)
    return test, prediction, target


def evaluate_ensemble(setup, members, out, report):
    """Test the mean of the members' test predictions (class probabilities or forecasts) of `members`,
    TrainingResults of the same task on the same test split: write the PNG, and metrics.json holding
    `report` with the ensemble's and every member's metrics added, print the metrics on one line (rank 0
    only) and return them."""
    target = members[0].test_target
    if any(not np.array_equal(member.test_target, target) for member in members):
        raise ValueError("ensemble members were tested on different test splits")
    prediction = np.mean([member.test_prediction for member in members], axis=0)
    test = setup.evaluate(prediction, target)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        setup.plot(os.path.join(out, f"{setup.name}.png"), prediction, target)
        report = {"task": setup.name, "test": test, **report,
                  "members": [{"test": member.test, "validation": member.validation, "best_step": member.best_step,
                               "steps": member.steps} for member in members]}
        with open(os.path.join(out, METRICS), "w") as handle:
            json.dump(report, handle, indent=2)
        print(_test_line(setup.name, test) + f" (mean of {len(members)} members)", flush=True)
    return test


def _test_line(name, test):
    """The one line of test metrics a run ends with."""
    return f"{name} test: " + " ".join(f"{k}={v:.4f}" for k, v in test.items())


def _plain(config):
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
