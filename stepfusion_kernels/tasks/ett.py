"""ETT long-horizon forecasting with the standard protocol (Informer/Autoformer): 12/4/4 months of
train/validation/test, each later split starting `lookback` rows early, z-scores from the training rows,
all 7 variables, MSE and MAE on the normalised test windows.

Choices (stated here so the numbers can be read):
- reversible instance normalisation (RevIN): each input window is centred per variable (and, with
  `--revin mean-std`, scaled by its std), and the forecast is mapped back. Centring alone is the
  default: at horizon 96 it has the better validation MSE, both with the model and with the
  least-squares linear forecaster alone;
- the two modalities are two views of the 7-variable window: A = its patches (`patch_len` steps of all 7
  variables every `patch_stride` steps, PatchTST-style tokens), B = its single time steps (7 values
  and the 4 calendar features of the timestamp). La = 11 != Lb = 96 at lookback 96, and guidance
  attention's aligned centre maps each patch to the steps it covers;
- the forecast is the model's linear map from the fused A tokens to horizon x 7, plus its
  channel-independent linear map of each variable's normalised window to its horizon (RLinear), so the
  fusion path learns a correction to a strong linear forecaster;
- residual cycle forecasting (CycleNet, Lin et al. 2024): a learned daily cycle per variable (24 hourly
  or 96 quarter-hourly values) is subtracted from the window at its phase before RevIN, as CycleNet
  does, and added back to the forecast at the phase that follows, after RevIN is undone; the model
  forecasts what the daily pattern leaves over. The cycle starts from the training rows' mean value at
  each phase (`mean_cycle`) rather than zeros, so that training only refines it. (Taking the cycle
  out after RevIN instead, in units of each window's std, makes the least-squares linear forecaster's
  validation MSE worse at every horizon.)
Full channel independence (7x the series per batch) was too slow for the CPU budget this was developed on."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from ..data import ett as ett_data  # noqa: E402
from ..data import resolve_data_path  # noqa: E402
from ..models import StepFusionConfig, StepFusionNet  # noqa: E402
from . import metrics  # noqa: E402
from .training import TaskSetup  # noqa: E402

NAME = "ett"
DEFAULT_DATA = os.path.join("ett", "ETTh1.csv")
HORIZONS = (96, 192, 336, 720)
TRAINING_LOSSES = {"mse": F.mse_loss, "mae": F.l1_loss}
HOURS_PER_DAY = 24
REVIN_EPS = 1e-5
MODEL_DEFAULTS = {"dim": 16, "heads": 4, "layers_a": 1, "layers_b": 1, "steps": 1, "window": 2,
                  "global_tokens": 2, "dropout": 0.5, "gate_init": 0.1}
# The horizon-96 recipe of the README's results table.
TRAINING_DEFAULTS = {"epochs": 8, "batch_size": 256, "lr": 3e-3, "weight_decay": 0.05}
# The task's flags that `stepfusion-train --evaluate` takes from its own command line, not the checkpoint's.
EVALUATION_FLAGS = ("eval_stride",)


class EttWindows(Dataset):
    """(history (lookback, V), calendar (lookback, 4), future (horizon, V), phase) for every `stride`-th
    window whose rows lie in [start, end) (stride 1, every window, is the standard protocol). `phase` is
    the first history row's position in the daily cycle of `cycle_len` rows; row 0 of the table is at
    position `first_phase`."""

    def __init__(self, values, calendar, bounds, lookback, horizon, stride=1, cycle_len=24, first_phase=0):
        start, end = bounds
        self.phase_offset = first_phase + start
        self.values = torch.from_numpy(values[start:end])
        self.calendar = torch.from_numpy(calendar[start:end])
        self.lookback, self.horizon, self.stride, self.cycle_len = lookback, horizon, stride, cycle_len
        self.count = -(-max(0, end - start - lookback - horizon + 1) // stride)

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        index *= self.stride
        middle = index + self.lookback
        return (self.values[index:middle], self.calendar[index:middle],
                self.values[middle:middle + self.horizon], (self.phase_offset + index) % self.cycle_len)


def load_splits(path, lookback, horizon, eval_stride=1):
    """Train/validation/test EttWindows of the z-scored table (training statistics), and the table; the
    validation and test splits keep every `eval_stride`-th window."""
    table = ett_data.read_ett(path)
    per_hour = ett_data.steps_per_hour(table.dates)
    bounds = ett_data.split_bounds(lookback, per_hour)
    if bounds[-1][1] > len(table.values):
        raise ValueError(f"{path}: the standard split needs {bounds[-1][1]} rows, the file has {len(table.values)}")
    train_rows = table.values[bounds[0][0]:bounds[0][1]]
    mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
    values = ((table.values - mean) / std).astype(np.float32)
    calendar = ett_data.calendar_features(table.dates)
    strides = (1, eval_stride, eval_stride)
    cycle_len = HOURS_PER_DAY * per_hour
    minutes = int((table.dates[0] - table.dates[0].astype("datetime64[D]")) / np.timedelta64(1, "m"))
    first_phase = minutes * per_hour // 60
    return [EttWindows(values, calendar, b, lookback, horizon, s, cycle_len, first_phase)
            for b, s in zip(bounds, strides)], table


def mean_cycle(windows):
    """(cycle_len, V): the mean of each variable over the training rows at each phase of the daily cycle."""
    values = windows.values
    phases = (windows.phase_offset + torch.arange(len(values))) % windows.cycle_len
    sums = torch.zeros(windows.cycle_len, values.shape[1]).index_add_(0, phases, values)
    counts = torch.bincount(phases, minlength=windows.cycle_len).clamp(min=1)
    return sums / counts[:, None]


class RevinForecaster(nn.Module):
    """RevIN around a StepFusionNet forecast head: history (B, L, V), calendar (B, L, C) and the window's
    phase in the daily cycle (B,) -> forecast (B, horizon, V). With cycle_len 0 there is no cycle. RevIN
    centres each window; with scale=True it also divides it by its std."""

    def __init__(self, config, patch_len, patch_stride, cycle_len=0, scale=False):
        super().__init__()
        self.config = config
        self.patch_len, self.patch_stride, self.scale = patch_len, patch_stride, scale
        self.net = StepFusionNet(config)
        self.cycle = nn.Parameter(torch.zeros(cycle_len, config.out_vars)) if cycle_len > 0 else None

    @staticmethod
    def num_patches(lookback, patch_len, patch_stride):
        return (lookback - patch_len) // patch_stride + 1

    def _cycle_at(self, phase, offset, length):
        positions = torch.arange(offset, offset + length, device=phase.device)
        return self.cycle[(phase[:, None] + positions[None, :]) % self.cycle.shape[0]]

    def normalise(self, history, phase=None):
        """(normalised history, mean, std): the cycle taken out at the window's phase, then RevIN. `std` is
        all ones when the model does not scale."""
        if self.cycle is not None:
            if phase is None:
                raise ValueError("RevinForecaster: phase is required when the model has a cycle")
            history = history - self._cycle_at(phase, 0, history.shape[1])
        mean = history.mean(dim=1, keepdim=True)
        if self.scale:
            std = torch.sqrt(history.var(dim=1, keepdim=True, unbiased=False) + REVIN_EPS)
        else:
            std = torch.ones_like(mean)
        return (history - mean) / std, mean, std

    def denormalise(self, forecast, mean, std, phase=None, lookback=0):
        """The inverse of `normalise` for a forecast that starts `lookback` rows after the history does."""
        forecast = forecast * std + mean
        if self.cycle is not None:
            forecast = forecast + self._cycle_at(phase, lookback, forecast.shape[1])
        return forecast

    def forward(self, history, calendar, phase=None):
        normalised, mean, std = self.normalise(history, phase)
        # (B, L, V) -> (B, P, V, patch_len) -> (B, P, V * patch_len): a patch token holds every variable.
        patches = normalised.unfold(1, self.patch_len, self.patch_stride).flatten(2)
        steps = torch.cat([normalised, calendar], dim=-1)
        forecast = self.net(patches, steps, skip=normalised)
        return self.denormalise(forecast, mean, std, phase, history.shape[1])


def add_arguments(parser):
    parser.add_argument("--horizon", type=int, default=96, choices=HORIZONS)
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--patch-len", type=int, default=16)
    parser.add_argument("--patch-stride", type=int, default=8)
    parser.add_argument("--no-cycle", action="store_true", help="no residual daily cycle (CycleNet's RCF)")
    parser.add_argument("--revin", default="mean", choices=("mean", "mean-std"),
                        help="per-window normalisation: centre only, or centre and scale")
    parser.add_argument("--loss", default="mse", choices=tuple(TRAINING_LOSSES),
                        help="training loss (the model is still selected and reported by MSE and MAE)")
    parser.add_argument("--eval-stride", type=int, default=1,
                        help="evaluate every n-th validation/test window (1, every window, is the protocol)")
    parser.set_defaults(**MODEL_DEFAULTS, **TRAINING_DEFAULTS)


def build(args, model_kwargs):
    path = resolve_data_path(args.data, DEFAULT_DATA)
    (train, validation, test), table = load_splits(path, args.lookback, args.horizon, args.eval_stride)
    variables = train.values.shape[1]
    patches = RevinForecaster.num_patches(args.lookback, args.patch_len, args.patch_stride)
    config = StepFusionConfig(in_a=variables * args.patch_len, in_b=variables + train.calendar.shape[1],
                              max_len_a=patches, max_len_b=args.lookback, head="forecast", horizon=args.horizon,
                              out_vars=variables, skip_len=args.lookback, **model_kwargs)
    model = RevinForecaster(config, args.patch_len, args.patch_stride, 0 if args.no_cycle else train.cycle_len,
                            scale=args.revin == "mean-std")
    if model.cycle is not None:
        with torch.no_grad():
            model.cycle.copy_(mean_cycle(train))

    training_loss = TRAINING_LOSSES[args.loss]

    def loss(model, batch):
        history, calendar, future, phase = batch
        return training_loss(model(history, calendar, phase), future)

    def predict(model, batch):
        history, calendar, future, phase = batch
        return model(history, calendar, phase), future

    def evaluate(prediction, target):
        return {"mse": metrics.mse(prediction, target), "mae": metrics.mae(prediction, target)}

    return TaskSetup(name=NAME, model=model, train=train, validation=validation, test=test, loss=loss,
                     predict=predict, evaluate=evaluate, plot=forecast_plot(table.columns, args.horizon),
                     selection="mse", higher_is_better=False,
                     description={"data": path, "lookback": args.lookback, "horizon": args.horizon,
                                  "windows": [len(train), len(validation), len(test)],
                                  "eval_stride": args.eval_stride, "loss": args.loss, "revin": args.revin,
                                  "cycle_len": 0 if args.no_cycle else train.cycle_len,
                                  "variables": table.columns})


def forecast_plot(columns, horizon, windows=4):
    """Forecast vs truth of the last variable (OT) on `windows` test windows spread over the test split."""
    def plot(path, prediction, target):
        picks = np.linspace(0, len(prediction) - 1, windows).astype(int)
        figure, axes = plt.subplots(windows, 1, figsize=(9, 2.2 * windows), sharex=True)
        for axis, pick in zip(np.atleast_1d(axes), picks):
            axis.plot(target[pick, :, -1], label="truth", color="black", linewidth=1)
            axis.plot(prediction[pick, :, -1], label="forecast", color="tab:red", linewidth=1)
            axis.set_ylabel(f"{columns[-1]} (z)")
            axis.set_title(f"test window {pick}: MSE {metrics.mse(prediction[pick], target[pick]):.3f} "
                           "(all variables)", fontsize=9)
        np.atleast_1d(axes)[0].legend(loc="upper right")
        np.atleast_1d(axes)[-1].set_xlabel(f"step ahead (horizon {horizon})")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return plot
