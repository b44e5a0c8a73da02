"""SSFN tasks: `ssfn-digits` (spoken + written digits) and `ssfn-mfeat` (two UCI mfeat views).

`stepfusion-train TASK [--sweep] [flags]` (or `main(argv)`); `add_arguments(parser)` and `run(args)` let the
`stepfusion-train` dispatcher host the same flags. A run:
1. trains one `LayerStackEncoder` per modality on that modality alone (best validation accuracy kept),
   freezes both and computes their layer stacks once for every item (token 0 of every layer; the whole
   token sequences too in `--attention sample` mode), held in memory;
2. trains SSFN fusion heads on the frozen stacks, `--repeats` head seeds each: with `--sweep` every valid
   (skew d, pairs D) for d in `--skews` and D in `--sparsity` (`skew_pairs(d, D, L, L)`; a D that leaves
   the stacks at that d is skipped), else the one `--skew`/`--num-pairs` head; always late fusion (pair
   (L-1, L-1)), pairwise fusion (all L same-depth pairs) and each unimodal head (the same block with both
   inputs from one modality, pair (L-1, L-1));
3. writes `metrics.json`, `table.md`, `heatmap.png` (mean test accuracy over (d, D)) and `encoders.pt`
   under --out (default runs/TASK) and prints the table.

In "batch" attention mode a prediction depends on its batch (the paper's form): heads train on shuffled
batches and are evaluated on the split in one fixed seeded shuffle, cut into batches of --batch-size.

Data:
    ssfn-digits  A = audio: FSDD recordings, the centred 6144 samples (0.77 s; zero-padded when shorter),
                 log-mel (n_fft 512, hop 256, 40 mels: 25 frames), minus each utterance's mean per mel
                 band, z-scored per band with training statistics; speaker-disjoint splits (a seeded
                 order of the 6 speakers: 4 train, 1 validation, 1 test).
                 B = image: scikit-learn's bundled 8x8 digits (`load_digits`), 8 row tokens of 8 pixels
                 / 16; a stratified 60/20/20 split of the 1,797 images, disjoint between splits.
                 Pairs: every recording with an image of its digit from the same split, cycling through a
                 seeded shuffle of that split's images of the digit (each image used as evenly as possible).
    ssfn-mfeat   the same 2,000 digits in two views (`--views`, default pix fou): pix = 16 row tokens of
                 15 pixel averages, fou = 19 tokens of 4 consecutive Fourier coefficients (any other view:
                 tokens of 4 features); z-scored per feature with training statistics; stratified 60/20/20.
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import fsdd, mfeat, resolve_data_path
from ..models.ssfn import ATTENTION_MODES, SSFN, LayerStackEncoder, first_token
from ..ops import skew_pairs
from .common import set_up_device, stratified_split
from .training import AUTOCAST_DTYPES, autocast_context, gradient_scaler

TASKS = ("ssfn-digits", "ssfn-mfeat")
AUDIO_SAMPLES = 6144
AUDIO_FFT, AUDIO_HOP, AUDIO_MELS = 512, 256, 40
VIEW_TOKENS = {"pix": 16, "fou": 19}  # tokens per sample; other views: chunks of TOKEN_WIDTH features
TOKEN_WIDTH = 4


def add_arguments(parser):
    parser.add_argument("--data", default=None, help="data directory (default: the task's folder under data_root())")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every fusion head")
    parser.add_argument("--encoder-epochs", type=int, default=20, help="epochs of each modality's encoder")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per training run at most")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the fusion heads")
    parser.add_argument("--encoder-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="auto", help="backend of skew_pair_project and guidance_attention")
    parser.add_argument("--autocast", default="off", choices=tuple(AUTOCAST_DTYPES),
                        help="run the forward passes (encoders, their layer stacks, the heads) under torch.autocast "
                             "in this dtype (fp16 with a gradient scaler; the cpu backend takes bf16 only)")
    parser.add_argument("--out", default=None, help="output directory (default runs/TASK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=64, help="encoder and fusion width")
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--layers", type=int, default=12, help="layers of each encoder")
    model.add_argument("--ffn-dim", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.1)
    model.add_argument("--attention", choices=ATTENTION_MODES, default="batch")
    sweep = parser.add_argument_group("pairs")
    sweep.add_argument("--sweep", action="store_true", help="every (skew, pairs) of --skews x --sparsity")
    sweep.add_argument("--skew", type=int, default=0, help="without --sweep: the skew d of the one head")
    sweep.add_argument("--num-pairs", type=int, default=1, help="without --sweep: its number of pairs D")
    sweep.add_argument("--skews", type=int, nargs="+", default=None, help="sweep skews (default -(L-1)..L-1)")
    sweep.add_argument("--sparsity", type=int, nargs="+", default=[1, 3, 5], help="sweep pair counts D")
    sweep.add_argument("--repeats", type=int, default=3, help="head seeds per pair set")
    data = parser.add_argument_group("data")
    data.add_argument("--views", nargs=2, default=["pix", "fou"], choices=mfeat.VIEWS, help="ssfn-mfeat: A and B")
    data.add_argument("--max-samples", type=int, default=None,
                      help="keep at most this many samples per split (quick runs; ssfn-digits: recordings)")
    return parser


# Data: two modalities of items, and paired splits indexing them -------------------------------------------------

@dataclass
class PairedData:
    """items[m] (n_m, T_m, F_m) float32 tokens of modality m; labels[m] (n_m,); splits[name] = (index into
    modality A's items, index into B's, labels) for "train", "validation", "test"."""
    names: tuple
    items: tuple
    labels: tuple
    splits: dict
    description: dict


def _zscore(values, train_rows, axes):
    mean = values[train_rows].mean(axis=axes, keepdims=True)
    std = values[train_rows].std(axis=axes, keepdims=True)
    return ((values - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def pair_by_label(audio_index, audio_labels, image_index, image_labels, rng):
    """For each item of `audio_index` an item of `image_index` with the same label: per label, a seeded
    shuffle of that label's images repeated as often as needed, so each image is used as evenly as possible.
    Returns the image index aligned with audio_index."""
    paired = np.empty(len(audio_index), dtype=np.int64)
    for label in np.unique(audio_labels[audio_index]):
        slots = np.flatnonzero(audio_labels[audio_index] == label)
        pool = image_index[image_labels[image_index] == label]
        if len(pool) == 0:
            raise ValueError(f"pair_by_label: no image of label {label} in this split")
        repeats = math.ceil(len(slots) / len(pool))
        paired[slots] = np.concatenate([rng.permutation(pool) for _ in range(repeats)])[:len(slots)]
    return paired


def _limit(index, count, rng):
    return index if count is None or len(index) <= count else np.sort(rng.choice(index, count, replace=False))


def audio_tokens(signals):
    """(n, frames, mels) log-mel tokens with each utterance's mean per band removed."""
    fixed = torch.stack([fsdd.fix_length(torch.from_numpy(s), AUDIO_SAMPLES) for s in signals])
    features = fsdd.log_mel(fixed, fsdd.RATE, AUDIO_FFT, AUDIO_HOP, AUDIO_MELS)
    return (features - features.mean(dim=1, keepdim=True)).numpy()


def load_digits_task(args):
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("ssfn-digits pairs the recordings with scikit-learn's bundled 8x8 digit images: "
                          "pip install scikit-learn (or stepfusion-kernels[ssfn])") from error

    rng = np.random.default_rng(args.seed)
    signals, digits, speakers, _ = fsdd.read_fsdd(resolve_data_path(args.data, "fsdd"))
    speakers = np.array(speakers)
    order = list(rng.permutation(sorted(set(speakers.tolist()))))
    speaker_split = {"test": order[:1], "validation": order[1:2], "train": order[2:]}
    audio_parts = {name: _limit(np.flatnonzero(np.isin(speakers, chosen)), args.max_samples, rng)
                   for name, chosen in speaker_split.items()}
    audio = audio_tokens(signals)
    audio = _zscore(audio, audio_parts["train"], (0, 1))

    images = load_digits()
    pixels = (images.images / 16.0).astype(np.float32)       # (1797, 8, 8): 8 row tokens of 8 pixels
    image_labels = images.target.astype(np.int64)
    train_images, val_images, test_images = stratified_split(image_labels, (0.6, 0.2, 0.2), args.seed)
    image_parts = {"train": train_images, "validation": val_images, "test": test_images}
    splits = {}
    for name in ("train", "validation", "test"):
        audio_index = audio_parts[name]
        image_index = pair_by_label(audio_index, digits, image_parts[name], image_labels, rng)
        splits[name] = (audio_index, image_index, digits[audio_index])
    description = {"speakers": {k: [str(s) for s in v] for k, v in speaker_split.items()},
                   "audio": f"log-mel {AUDIO_MELS} bands, {audio.shape[1]} frames of {AUDIO_SAMPLES} samples",
                   "image": "8x8 digits, 8 row tokens"}
    return PairedData(("audio", "image"), (audio, pixels), (digits, image_labels), splits, description)


def view_tokens(view, features):
    """(n, d) view features -> (n, T, d / T) tokens: pix as 16 image rows of 15 pixel averages, the others as
    consecutive chunks (fou: 19 tokens of 4 coefficients; a last short chunk is zero-padded)."""
    tokens = VIEW_TOKENS.get(view, math.ceil(features.shape[1] / TOKEN_WIDTH))
    width = math.ceil(features.shape[1] / tokens)
    padded = np.pad(features, ((0, 0), (0, tokens * width - features.shape[1])))
    return padded.reshape(len(features), tokens, width).astype(np.float32)


def load_mfeat_task(args):
    rng = np.random.default_rng(args.seed)
    first, second = args.views
    features, labels = mfeat.read_mfeat(resolve_data_path(args.data, "mfeat"), views=(first, second))
    parts = stratified_split(labels, (0.6, 0.2, 0.2), args.seed)
    parts = dict(zip(("train", "validation", "test"), (_limit(p, args.max_samples, rng) for p in parts)))
    items = tuple(view_tokens(view, _zscore(features[view], parts["train"], 0)) for view in (first, second))
    splits = {name: (index, index, labels[index]) for name, index in parts.items()}
    description = {"views": [first, second], "tokens": [list(item.shape[1:]) for item in items]}
    return PairedData((first, second), items, (labels, labels), splits, description)


# Training --------------------------------------------------------------------------------------------------------

def _batches(count, batch_size, generator):
    order = torch.randperm(count, generator=generator)
    return [order[start:start + batch_size] for start in range(0, count, batch_size)]


def _fit(model, forward, count, labels, validate, args, epochs, lr, seed, progress=None):
    """AdamW on shuffled batches; after every epoch `validate()` -> accuracy, keeping the best weights.
    Returns (best validation accuracy, steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    scaler = gradient_scaler(args.autocast, labels.device)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, steps = -1.0, None, 0
    for _ in range(epochs):
        model.train()
        for index in _batches(count, args.batch_size, generator):
            with autocast_context(args.autocast, labels.device):
                loss = F.cross_entropy(forward(index), labels[index.to(labels.device)])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            if args.max_steps is not None and steps >= args.max_steps:
                break
        accuracy = validate()
        if accuracy > best:
            best, best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress is not None:
            progress.update(1)
        if args.max_steps is not None and steps >= args.max_steps:
            break
    model.load_state_dict(best_state)
    return best, steps


@torch.no_grad()
def _accuracy(predict, count, labels, args, seed):
    """Accuracy over one fixed seeded shuffle of the split in batches of args.batch_size (in batch mode the
    prediction depends on the batch, so the evaluation batches are as random as the training ones)."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for index in _batches(count, args.batch_size, generator):
        with autocast_context(args.autocast, labels.device):
            prediction = predict(index)
        correct += (prediction.argmax(dim=-1) == labels[index.to(labels.device)]).sum().item()
    return correct / max(count, 1)


def train_encoder(data, modality, args, device, progress=None):
    """A LayerStackEncoder trained on modality `modality` alone, on the distinct items of the training and
    validation splits; returns (encoder in eval mode, best validation accuracy)."""
    items = torch.from_numpy(data.items[modality]).to(device)
    labels = torch.from_numpy(data.labels[modality]).to(device)
    train_items = torch.from_numpy(np.unique(data.splits["train"][modality])).to(device)
    val_items = torch.from_numpy(np.unique(data.splits["validation"][modality])).to(device)
    torch.manual_seed(args.seed * 1000 + modality)
    encoder = LayerStackEncoder(items.shape[2], items.shape[1], int(max(data.labels[modality])) + 1, dim=args.dim,
                                heads=args.heads, layers=args.layers, ffn_dim=args.ffn_dim,
                                dropout=args.dropout).to(device)

    def validate():
        encoder.eval()
        return _accuracy(lambda i: encoder(items[val_items[i]]), len(val_items), labels[val_items], args, args.seed)

    best, _ = _fit(encoder, lambda i: encoder(items[train_items[i.to(device)]]), len(train_items),
                   labels[train_items], validate, args, args.encoder_epochs, args.encoder_lr, args.seed, progress)
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder, best


@torch.no_grad()
def layer_stacks(encoder, items, tokens, batch_size=256, autocast="off"):
    """The frozen encoder's stack of every item: (L, n, dim) token 0, or (L, n, T + 1, dim) every token, in
    float32 (computed under torch.autocast in the dtype `autocast` names)."""
    with autocast_context(autocast, items.device):
        pieces = [encoder.hidden_states(items[start:start + batch_size]).float()
                  for start in range(0, len(items), batch_size)]
    stack = torch.cat(pieces, dim=1)
    return stack if tokens == "all" else first_token(stack).contiguous()


def pair_sets(args, layers):
    """{name: (skew or None, D, pairs)}: the baselines, then every valid (d, D) of the sweep (or the one head)."""
    last = layers - 1
    sets = {"late fusion": (0, 1, torch.tensor([[last, last]])),
            "pairwise fusion": (0, layers, skew_pairs(0, layers, layers, layers))}
    if args.sweep:
        skews = args.skews if args.skews is not None else list(range(-last, last + 1))
        grid = [(d, count) for count in args.sparsity for d in skews]
    else:
        grid = [(args.skew, args.num_pairs)]
    for d, count in grid:
        if abs(d) + count <= layers and count >= 1:
            sets[f"d={d}, D={count}"] = (d, count, skew_pairs(d, count, layers, layers))
        elif not args.sweep:
            raise ValueError(f"--skew {d} --num-pairs {count}: the pairs leave the {layers}-layer stacks")
    return sets


def train_head(pairs, stack_a, stack_b, data, args, device, seed):
    """One SSFN head on the frozen stacks; returns (validation accuracy, test accuracy)."""
    labels = {name: torch.from_numpy(split[2]).to(device) for name, split in data.splits.items()}
    index = {name: (torch.from_numpy(split[0]).to(device), torch.from_numpy(split[1]).to(device))
             for name, split in data.splits.items()}
    torch.manual_seed(seed)
    model = SSFN(args.dim, args.heads, args.ffn_dim, int(max(data.labels[0])) + 1, pairs=pairs,
                 layers=(stack_a.shape[0], stack_b.shape[0]), attention=args.attention, dropout=args.dropout,
                 backend=args.backend).to(device)

    def predict(split):
        ia, ib = index[split]
        return lambda i: model(stack_a[:, ia[i.to(device)]], stack_b[:, ib[i.to(device)]])

    def evaluate(split):
        model.eval()
        return _accuracy(predict(split), len(labels[split]), labels[split], args, args.seed + 1)

    best, _ = _fit(model, predict("train"), len(labels["train"]), labels["train"], lambda: evaluate("validation"),
                   args, args.epochs, args.lr, seed)
    return best, evaluate("test")


def run(args):
    from tqdm import tqdm

    if args.task not in TASKS:
        raise ValueError(f"ssfn.run: task must be one of {TASKS}, got {args.task!r}")
    set_up_device(args.device, args.threads)
    device = torch.device(args.device)
    out = args.out or os.path.join("runs", args.task)
    os.makedirs(out, exist_ok=True)
    data = (load_digits_task if args.task == "ssfn-digits" else load_mfeat_task)(args)
    tokens = "all" if args.attention == "sample" else "first"
    encoders, stacks, encoder_accuracy = [], [], {}
    for modality, name in enumerate(data.names):
        with tqdm(total=args.encoder_epochs, desc=f"encoder {name}", disable=args.no_progress) as progress:
            encoder, accuracy = train_encoder(data, modality, args, device, progress)
        encoders.append(encoder)
        encoder_accuracy[name] = accuracy
        stacks.append(layer_stacks(encoder, torch.from_numpy(data.items[modality]).to(device), tokens,
                                   autocast=args.autocast))
    torch.save({name: encoder.state_dict() for name, encoder in zip(data.names, encoders)},
               os.path.join(out, "encoders.pt"))
    sets = pair_sets(args, args.layers)
    jobs = [(name, "fusion") for name in sets] + [(name, "unimodal") for name in data.names]
    results, runs_of = {}, {}
    with tqdm(total=len(jobs) * args.repeats, desc="fusion heads", disable=args.no_progress) as progress:
        for name, kind in jobs:
            if kind == "fusion":
                d, count, pairs = sets[name]
                inputs = (stacks[0], stacks[1])
                key = name
            else:
                # Unimodal: the same block and pair (L-1, L-1), both inputs from one modality.
                modality = data.names.index(name)
                d, count, pairs = None, 1, torch.tensor([[args.layers - 1, args.layers - 1]])
                inputs = (stacks[modality], stacks[modality])
                key = f"unimodal {name}"
            head_data = data if kind == "fusion" else _unimodal(data, data.names.index(name))
            # A pair set met before (d = 0, D = 1 is late fusion) trains the same heads: reuse its runs.
            trained = ("fusion" if kind == "fusion" else key, tuple(map(tuple, pairs.tolist())))
            if trained not in runs_of:
                runs_of[trained] = [train_head(pairs.to(device), *inputs, head_data, args, device,
                                               seed=args.seed * 1000 + repeat) for repeat in range(args.repeats)]
            progress.update(args.repeats)
            val, test = np.array(runs_of[trained]).T
            results[key] = {"skew": d, "num_pairs": count, "pairs": pairs.tolist(),
                            "validation": val.tolist(), "test": test.tolist(),
                            "test_mean": float(test.mean()), "test_se": _se(test),
                            "validation_mean": float(val.mean())}
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    sizes = {name: len(split[2]) for name, split in data.splits.items()}
    report = {"task": args.task, "config": config, "modalities": list(data.names), "split_sizes": sizes,
              "data": data.description, "encoder_validation_accuracy": encoder_accuracy, "results": results}
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    table = format_table(report)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table)
    heatmap(report, os.path.join(out, "heatmap.png"))
    print(table)
    return report


def _unimodal(data, modality):
    """`data` with modality `modality` on both sides (its own index in both columns of every split)."""
    splits = {name: (split[modality], split[modality], split[2]) for name, split in data.splits.items()}
    return PairedData(data.names, data.items, data.labels, splits, data.description)


def _se(values):
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def format_table(report):
    results = report["results"]
    repeats = len(next(iter(results.values()))["test"])
    a, b = report["modalities"]
    lines = [f"**{report['task']}** (A = {a}, B = {b}; {report['config']['attention']} attention; test accuracy, "
             f"mean ± se over {repeats} head seeds; encoders' validation accuracy: "
             + ", ".join(f"{k} {v:.4f}" for k, v in report["encoder_validation_accuracy"].items()) + ")\n",
             "| head | pairs (i, j) | validation | test |", "|---|---|---|---|"]
    ranked = sorted(results.items(), key=lambda item: -item[1]["validation_mean"])
    for name, result in ranked:
        pairs = result["pairs"]
        shown = ", ".join(f"({i}, {j})" for i, j in pairs[:3]) + (", ..." if len(pairs) > 3 else "")
        lines.append(f"| {name} | {shown} | {result['validation_mean']:.4f} | "
                     f"{result['test_mean']:.4f} ± {result['test_se']:.4f} |")
    lines.append("")
    return "\n".join(lines)


def heatmap(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(r["skew"], r["num_pairs"]): r["test_mean"] for name, r in report["results"].items()
             if name.startswith("d=")}
    late = report["results"]["late fusion"]["test_mean"]
    skews = sorted({d for d, _ in cells}) or [0]
    counts = sorted({c for _, c in cells}) or [1]
    grid = np.full((len(counts), len(skews)), np.nan)
    for (d, c), value in cells.items():
        grid[counts.index(c), skews.index(d)] = value
    figure, axis = plt.subplots(figsize=(max(6.0, 0.55 * len(skews) + 2), 1.0 * len(counts) + 2))
    image = axis.imshow(grid, cmap="viridis", aspect="auto")
    for row in range(len(counts)):
        for column in range(len(skews)):
            if not np.isnan(grid[row, column]):
                axis.text(column, row, f"{100 * grid[row, column]:.1f}", ha="center", va="center", fontsize=7,
                          color="white" if grid[row, column] < np.nanmean(grid) else "black")
    axis.set_xticks(range(len(skews)), skews)
    axis.set_yticks(range(len(counts)), counts)
    axis.set_xlabel("skew d = i - j  (i: layer of A, j: layer of B)")
    axis.set_ylabel("pairs D")
    a, b = report["modalities"]
    axis.set_title(f"{report['task']}: test accuracy (%), A = {a}, B = {b}; late fusion {100 * late:.1f}%",
                   fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.03)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
