"""Meta Fusion tasks: `metafusion-sim`, `metafusion-alzheimer`, `metafusion-meg`, `metafusion-mfeat`.

`stepfusion-train TASK [flags]` (or `main(argv)`); `add_arguments(parser)` and `run(args)` (args.task is
one of TASKS) let the `stepfusion-train` dispatcher host the same flags. Each run writes, under --out,
`metrics.json` (every repeat's numbers, their mean and standard error, the chosen rho and teachers),
`table.md` (mean +- standard error over repeats) and `plot.png`.

Methods reported (test set, the student chosen or the ensemble built on validation data only):
    Meta Fusion               greedy ensemble of the cohort trained at the chosen rho
    best student (mutual)     lowest validation loss, cohort at the chosen rho
    best student (rho=0)      lowest validation loss, cohort trained without mutual learning
    simple average            equal-weight average of every student of the rho = 0 cohort
    early fusion              the all-raw student, rho = 0
    late fusion               average of the raw unimodal students, rho = 0
    unimodal <name>           the raw unimodal student of that modality, rho = 0
"""

import argparse
import json
import math
import os

import numpy as np
import torch

from ..data import alzheimer, mfeat, resolve_data_path, sktime_ts
from ..models import meta_fusion as mf
from .common import set_up_device

TASKS = ("metafusion-sim", "metafusion-alzheimer", "metafusion-meg", "metafusion-mfeat")

# Simulation settings after the paper's section 5: modality m = [shared latents, its own latents] mixed
# linearly into p_m features, then noise making up a fraction eta of each feature's variance. "specific":
# y depends on both modalities' own latents; "shared": on the shared latents only. "quadratic": squares of
# the latents plus 10% of their pairwise products (modality 1 only for "specific", where modality 2 adds a
# linear term).
SIM_SETTINGS = {
    "1.1": {"widths": (500, 400), "signal": "specific", "form": "linear", "eta": 0.4},
    "1.2": {"widths": (2000, 100), "signal": "specific", "form": "quadratic", "eta": 0.1},
    "2.1": {"widths": (500, 400), "signal": "shared", "form": "linear", "eta": 0.4},
    "2.2": {"widths": (2000, 400), "signal": "shared", "form": "quadratic", "eta": 0.3},
}
SIM_LATENTS = 5  # per latent block: shared, modality 1's own, modality 2's own
SIM_RESPONSE_NOISE = 0.5  # sd of the response noise, the signal having unit variance
SIM_SPLIT = (1280, 320, 400)
MEG_BANDS = ((0.5, 4.0), (4.0, 8.0), (8.0, 13.0), (13.0, 30.0), (30.0, 100.0))  # Hz
MEG_RATE = 400.0
MEG_DECIMATION = 10  # block means of 10 samples keep the < 20 Hz activity that carries the direction


def add_arguments(parser):
    parser.add_argument("--data", default=None, help="data file or directory (default: under data_root())")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per training run at most")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", default="auto", help="cohort_mutual_loss backend")
    parser.add_argument("--out", default=None, help="output directory (default runs/TASK)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--settings", nargs="+", default=list(SIM_SETTINGS), choices=list(SIM_SETTINGS),
                        help="sim only: which settings")
    parser.add_argument("--samples", type=int, default=sum(SIM_SPLIT),
                        help="sim only: n, split 64/16/20%% like 1280/320/400")
    parser.add_argument("--feature-scale", type=float, default=1.0,
                        help="sim only: multiply every modality's width p (for quick runs)")
    return parser


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stepfusion-train", description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=TASKS)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args):
    if args.task not in TASKS:
        raise ValueError(f"meta_fusion.run: task must be one of {TASKS}, got {args.task!r}")
    set_up_device(args.device, args.threads)
    out = args.out or os.path.join("runs", args.task)
    os.makedirs(out, exist_ok=True)
    experiments = {"metafusion-sim": _sim_experiments, "metafusion-alzheimer": _alzheimer_experiments,
                   "metafusion-meg": _meg_experiments, "metafusion-mfeat": _mfeat_experiments}[args.task](args)
    results = {}
    for name, experiment in experiments.items():
        results[name] = _run_repeats(name, experiment, args)
    # Only plain values: a dispatcher hosting these flags may keep callables in its namespace.
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    report = {"task": args.task, "config": config, "results": results}
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    table = format_table(args.task, results)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table)
    plot(results, os.path.join(out, "plot.png"), args.task)
    print(table)
    return report


# Experiments: each is (task kind, menus, modality names, split(repeat) -> ((train, val, test) inputs and targets))

def _sim_experiments(args):
    experiments = {}
    for setting in args.settings:
        spec = SIM_SETTINGS[setting]
        widths = tuple(max(2, int(round(w * args.feature_scale))) for w in spec["widths"])
        menus = [(mf.RAW, mf.pca(min(10, w)), mf.encoder(64, 16)) for w in widths]

        def split(repeat, spec=spec, widths=widths, setting=setting):
            seed = args.seed * 1000 + repeat * 10 + list(SIM_SETTINGS).index(setting)
            features, y = simulate(spec, widths, args.samples, seed)
            train_n = int(round(args.samples * SIM_SPLIT[0] / sum(SIM_SPLIT)))
            val_n = int(round(args.samples * SIM_SPLIT[1] / sum(SIM_SPLIT)))
            parts = (slice(0, train_n), slice(train_n, train_n + val_n), slice(train_n + val_n, None))
            return [([f[part] for f in features], y[part]) for part in parts]

        experiments[f"setting {setting}"] = {"task": "regression", "menus": menus,
                                             "modalities": ["modality 1", "modality 2"], "split": split}
    return experiments


def simulate(spec, widths, samples, seed):
    """([modality 1 (n, p1), modality 2 (n, p2)] float32, y (n,) float32) of one simulation setting."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    shared, own = normal(samples, SIM_LATENTS), [normal(samples, SIM_LATENTS) for _ in widths]
    features = []
    for latents, width in zip(own, widths):
        signal = torch.cat([shared, latents], dim=1) @ normal(2 * SIM_LATENTS, width)
        signal = (signal - signal.mean(0)) / signal.std(0)
        features.append((math.sqrt(1 - spec["eta"]) * signal + math.sqrt(spec["eta"]) * normal(samples, width)).float())

    def coefficients(count):
        magnitude = 0.5 + 0.5 * torch.rand(count, generator=generator, dtype=torch.float64)
        return magnitude * torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).double()

    def quadratic(latents):
        pairs = torch.combinations(torch.arange(latents.shape[1]), 2)
        chosen = pairs[torch.randperm(len(pairs), generator=generator)[:max(1, len(pairs) // 10)]]
        products = latents[:, chosen[:, 0]] * latents[:, chosen[:, 1]]
        return (latents ** 2) @ coefficients(latents.shape[1]) + products @ coefficients(len(chosen))

    if spec["signal"] == "specific":
        first = own[0] @ coefficients(SIM_LATENTS) if spec["form"] == "linear" else quadratic(own[0])
        signal = first + own[1] @ coefficients(SIM_LATENTS)
    else:
        signal = shared @ coefficients(SIM_LATENTS) if spec["form"] == "linear" else quadratic(shared)
    signal = (signal - signal.mean()) / signal.std()
    y = signal + SIM_RESPONSE_NOISE * normal(samples)
    return features, y.float()


def _stratified_split(labels, fractions, seed):
    """Index arrays (train, val, test) taking `fractions` of every class, shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    parts = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        first = int(round(fractions[0] * len(members)))
        second = first + int(round(fractions[1] * len(members)))
        for part, chunk in zip(parts, (members[:first], members[first:second], members[second:])):
            part.extend(chunk.tolist())
    return [np.array(sorted(part)) for part in parts]


def _table_experiment(modalities, labels, menus, args, fractions=(0.6, 0.2, 0.2)):
    names = list(modalities)
    blocks = [torch.from_numpy(modalities[name]) for name in names]
    targets = torch.from_numpy(labels)

    def split(repeat):
        indices = _stratified_split(labels, fractions, args.seed * 1000 + repeat)
        return [([block[torch.from_numpy(index)] for block in blocks], targets[torch.from_numpy(index)])
                for index in indices]

    return {"task": "classification", "menus": menus, "modalities": names, "split": split}


def _alzheimer_experiments(args):
    path = resolve_data_path(args.data, os.path.join("alzheimer", "ad_data.csv"))
    modalities, labels, _ = alzheimer.read_ad_data(path)
    menus = [(mf.RAW,), (mf.RAW,), (mf.RAW, mf.pca(10), mf.encoder(64, 16))]
    return {"Impaired vs Control": _table_experiment(modalities, labels, menus, args)}


def _mfeat_experiments(args):
    directory = resolve_data_path(args.data, "mfeat")
    features, labels = mfeat.read_mfeat(directory)
    menus = [(mf.RAW,)] * len(features)
    return {"10 digits, 6 views": _table_experiment(features, labels, menus, args)}


def meg_modalities(series):
    """MEG trials (n, 10, 400) -> {"signal": (n, 400) the channels' 40 Hz block means, "band power": (n, 50)
    the log mean power of each channel in each of MEG_BANDS}."""
    n, channels, length = series.shape
    signal = series.reshape(n, channels, length // MEG_DECIMATION, MEG_DECIMATION).mean(-1).reshape(n, -1)
    centred = series - series.mean(-1, keepdims=True)
    power = np.abs(np.fft.rfft(centred, axis=-1)) ** 2
    frequency = np.fft.rfftfreq(length, d=1.0 / MEG_RATE)
    bands = [np.log(power[..., (frequency >= low) & (frequency < high)].mean(-1) + 1e-12) for low, high in MEG_BANDS]
    return {"signal": signal.astype(np.float32), "band power": np.stack(bands, -1).reshape(n, -1).astype(np.float32)}


def _meg_experiments(args):
    directory = resolve_data_path(args.data, "meg")
    train_series, train_labels, classes = sktime_ts.read_ts(os.path.join(directory, "HandMovementDirection_TRAIN.ts"))
    test_series, test_labels, _ = sktime_ts.read_ts(os.path.join(directory, "HandMovementDirection_TEST.ts"))
    train_y = np.array([classes.index(label) for label in train_labels], dtype=np.int64)
    test_y = torch.tensor([classes.index(label) for label in test_labels], dtype=torch.int64)
    train_blocks = {k: torch.from_numpy(v) for k, v in meg_modalities(train_series).items()}
    test_blocks = [torch.from_numpy(v) for v in meg_modalities(test_series).values()]
    menus = [(mf.RAW, mf.pca(20), mf.encoder(64, 16)), (mf.RAW, mf.pca(10))]

    def split(repeat):
        # The competition's own test set; validation is a stratified quarter of its training set.
        train_index, val_index, _ = _stratified_split(train_y, (0.75, 0.25), args.seed * 1000 + repeat)
        targets = torch.from_numpy(train_y)
        parts = [([b[torch.from_numpy(i)] for b in train_blocks.values()], targets[torch.from_numpy(i)])
                 for i in (train_index, val_index)]
        return parts + [(test_blocks, test_y)]

    return {"4 directions": {"task": "classification", "menus": menus, "modalities": list(train_blocks),
                             "split": split}}


# One experiment over repeats --------------------------------------------------------------------------------

def _standardise(parts):
    """z-score every modality with the training part's statistics (zero-variance features left centred)."""
    (train_x, _), _, _ = parts
    stats = [(x.mean(0), x.std(0).clamp_min(1e-6)) for x in train_x]
    return [([(x - m) / s for x, (m, s) in zip(xs, stats)], y) for xs, y in parts]


def _run_repeats(name, experiment, args):
    from tqdm import tqdm

    task, menus = experiment["task"], experiment["menus"]
    per_repeat = []
    for repeat in range(args.repeats):
        parts = _standardise(experiment["split"](repeat))
        if task == "regression":
            mean, std = parts[0][1].mean(), parts[0][1].std()
            parts = [(x, (y - mean) / std) for x, y in parts]
        device = torch.device(args.device)
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = [
            ([x.to(device) for x in xs], y.to(device)) for xs, y in parts]
        widths = [x.shape[1] for x in train_x]
        pca_bases = {}
        for modality, menu in enumerate(menus):
            components = max((entry.components for entry in menu if entry.kind == "pca"), default=0)
            if components:
                pca_bases[modality] = mf.fit_pca(torch.cat([train_x[modality], val_x[modality]]), components)
        out_features = 1 if task == "regression" else int(torch.cat([train_y, val_y, test_y]).max()) + 1
        seed = args.seed * 1000 + repeat

        def make_cohort():
            torch.manual_seed(seed)
            return mf.CohortMLP(menus, widths, out_features, pca_bases=pca_bases).to(device)

        steps = args.epochs * math.ceil(len(train_y) / args.batch_size)
        steps = min(steps, args.max_steps) if args.max_steps else steps
        with tqdm(total=steps * len(mf.RHOS), desc=f"{name} repeat {repeat + 1}/{args.repeats}") as progress:
            fitted = mf.fit_meta_fusion(make_cohort, (train_x, train_y), (val_x, val_y), task, seed=seed,
                                        progress=progress, epochs=args.epochs, max_steps=args.max_steps,
                                        batch_size=args.batch_size, lr=args.lr, backend=args.backend)
        per_repeat.append(evaluate(fitted, val_x, val_y, test_x, test_y, task, experiment["modalities"]))
    return summarise(per_repeat)


def evaluate(fitted, val_x, val_y, test_x, test_y, task, modality_names):
    """Test metrics of every method (see the module docstring) and the run's Meta Fusion choices."""
    rho = fitted["rho"]
    cohorts = fitted["cohorts"]
    students = cohorts[0.0].students
    val_out = {r: mf.predict(c, val_x) for r, c in cohorts.items()}
    test_out = {r: mf.predict(c, test_x) for r, c in cohorts.items()}
    val_losses = fitted["val_losses"]

    def loss_of(members, weights):
        return mf.ensemble_loss(mf.combine(val_out[rho], members, weights, task), val_y, task)

    members, weights = mf.greedy_ensemble(val_losses[rho], loss_of)
    raw = tuple(mf.RAW for _ in modality_names)
    unimodal = [students.index(tuple(mf.RAW if j == m else None for j in range(len(raw))))
                for m in range(len(raw))]
    methods = {
        "Meta Fusion": (rho, members, weights),
        "best student (mutual)": (rho, [int(val_losses[rho].argmin())], [1.0]),
        "best student (rho=0)": (0.0, [int(val_losses[0.0].argmin())], [1.0]),
        "simple average": (0.0, list(range(len(students))), [1.0] * len(students)),
        "early fusion": (0.0, [students.index(raw)], [1.0]),
        "late fusion": (0.0, unimodal, [1.0] * len(unimodal)),
    }
    for name, index in zip(modality_names, unimodal):
        methods[f"unimodal {name}"] = (0.0, [index], [1.0])
    metrics = {name: _metrics(mf.combine(test_out[r], m, w, task), test_y, task)
               for name, (r, m, w) in methods.items()}
    teachers = (fitted["teacher_weights"] > 0).nonzero().flatten().tolist()
    return {"metrics": metrics, "rho": rho, "teacher_loss": {str(k): v for k, v in fitted["teacher_loss"].items()},
            "teachers": [mf.student_name(students[i]) for i in teachers],
            "ensemble": [mf.student_name(students[i]) for i in members], "students": len(students)}


def _metrics(prediction, targets, task):
    if task == "regression":
        return {"mse": ((prediction[:, 0] - targets) ** 2).mean().item()}
    metrics = {"accuracy": (prediction.argmax(dim=1) == targets).double().mean().item()}
    if prediction.shape[1] == 2:
        metrics["auc"] = roc_auc(prediction[:, 1], targets)
    return metrics


def roc_auc(scores, labels):
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted one half."""
    positive, negative = scores[labels == 1].double(), scores[labels == 0].double()
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).double().mean()
    equal = (positive[:, None] == negative[None, :]).double().mean()
    return (greater + 0.5 * equal).item()


def summarise(per_repeat):
    methods = per_repeat[0]["metrics"]
    summary = {}
    for method, metrics in methods.items():
        summary[method] = {}
        for metric in metrics:
            values = [run["metrics"][method][metric] for run in per_repeat]
            se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
            summary[method][metric] = {"mean": float(np.mean(values)), "se": se, "values": values}
    return {"summary": summary, "repeats": per_repeat}


def format_table(task, results):
    lines = []
    for name, result in results.items():
        summary = result["summary"]
        metrics = list(next(iter(summary.values())))
        rhos = [run["rho"] for run in result["repeats"]]
        lines.append(f"**{task}, {name}** ({len(rhos)} repeats; chosen rho per repeat: {rhos})\n")
        lines.append("| method | " + " | ".join(f"test {m} (mean ± se)" for m in metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for method, values in summary.items():
            cells = " | ".join(f"{values[m]['mean']:.4f} ± {values[m]['se']:.4f}" for m in metrics)
            lines.append(f"| {method} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path, task):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for axis, (name, result) in zip(axes[0], results.items()):
        summary = result["summary"]
        metric = next(iter(next(iter(summary.values()))))
        methods = list(summary)
        means = [summary[m][metric]["mean"] for m in methods]
        errors = [summary[m][metric]["se"] for m in methods]
        colours = ["tab:red" if m == "Meta Fusion" else "tab:blue" for m in methods]
        axis.barh(range(len(methods)), means, xerr=errors, color=colours)
        axis.set_yticks(range(len(methods)), methods, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(f"test {metric}")
        axis.set_title(name, fontsize=10)
    figure.suptitle(f"{task}: mean ± standard error over repeats")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
