"""ECG5000 (UCR archive) beat classification with two views of each beat: A = the beat itself (140
samples, one token per sample), B = its time-frequency view (log-magnitude STFT frames, one token per
frame). With the defaults Lb = 140 // hop + 1 = 36 != La = 140, so guidance attention's aligned centre
maps each sample to the frame around it. The archive's 500 training beats are split stratified into
train and validation; the 4,500 test beats are the test split."""

import os

import torch
from torch.utils.data import TensorDataset

from ..data import resolve_data_path, ucr
from ..models import StepFusionConfig, StepFusionNet
from .common import (CLASS_WEIGHTINGS, class_weights, classification_loss_with, classification_metrics,
                     classification_predict, confusion_plot, stratified_split)
from .training import TaskSetup

NAME = "ecg5000"
DEFAULT_DATA = "ucr"
FILES = ("ECG5000_TRAIN.tsv", "ECG5000_TEST.tsv")
MODEL_DEFAULTS = {"dim": 32, "heads": 4, "layers_a": 1, "layers_b": 1, "steps": 2, "window": 4,
                  "global_tokens": 2, "dropout": 0.2, "gate_init": 0.1}
# The augmented recipe of the README's results table.
TRAINING_DEFAULTS = {"epochs": 200, "batch_size": 32, "lr": 1e-3}
EVALUATION_FLAGS = ()  # the task's flags that `stepfusion-train --evaluate` takes from its own command line
AUGMENT_DEFAULT = 0.15
STD_FLOOR = 1e-6  # keeps a constant frequency bin's z-score finite
MAX_SHIFT = 10    # augmentation: largest time shift, in samples, at strength 1
NOISE = 0.5       # augmentation: noise standard deviation at strength 1 (the beats are z-normalised)


def read_ecg5000(path):
    """((train series, train labels), (test series, test labels)) with labels 0..4; `path` is the folder
    holding ECG5000_TRAIN.tsv and ECG5000_TEST.tsv, or either file."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    parts = [ucr.read_ucr_tsv(os.path.join(folder, name)) for name in FILES]
    smallest = min(int(labels.min()) for _, labels in parts)
    return [(series, labels - smallest) for series, labels in parts]


def spectrogram(series, n_fft, hop):
    """log(1 + |STFT|) frames of each series: (N, T) array or tensor -> (N, T // hop + 1, n_fft // 2 + 1)."""
    series = torch.as_tensor(series)
    frames = torch.stft(series, n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft, device=series.device),
                        center=True, return_complex=True)
    return torch.log1p(frames.abs()).transpose(1, 2).contiguous()


def augment_beats(beats, strength, generator=None):
    """Training-time augmentation of (N, T) beats at `strength` s: each beat is scaled by U(1 - s, 1 + s),
    shifted in time by up to round(MAX_SHIFT * s) samples (the edge sample repeated) and given
    N(0, (NOISE * s)^2) noise. s = 0 returns the beats unchanged."""
    if strength == 0:
        return beats
    count, length = beats.shape
    options = {"device": beats.device, "generator": generator}
    scale = 1 + strength * (2 * torch.rand(count, 1, **options) - 1)
    reach = round(MAX_SHIFT * strength)
    shift = torch.randint(-reach, reach + 1, (count, 1), **options)
    positions = (torch.arange(length, device=beats.device) - shift).clamp(0, length - 1)
    noise = NOISE * strength * torch.randn(count, length, **options)
    return scale * beats.gather(1, positions) + noise


def add_arguments(parser):
    parser.add_argument("--n-fft", type=int, default=32)
    parser.add_argument("--hop", type=int, default=4)
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of the training beats held out for choosing the checkpoint (0: train on "
                             "all of them and keep the final weights)")
    parser.add_argument("--class-weights", default="none", choices=CLASS_WEIGHTINGS,
                        help="cross-entropy class weights from the training counts")
    parser.add_argument("--augment", type=float, default=AUGMENT_DEFAULT,
                        help="training-time augmentation strength s: scale by U(1-s, 1+s), shift by up to "
                             f"{MAX_SHIFT}s samples, N(0, ({NOISE}s)^2) noise; the STFT view is recomputed (0: none)")
    parser.set_defaults(**MODEL_DEFAULTS, **TRAINING_DEFAULTS)


def build(args, model_kwargs):
    if args.augment < 0:
        raise ValueError(f"--augment must be >= 0, got {args.augment}")
    if not 0 <= args.validation_fraction < 1:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    path = resolve_data_path(args.data, DEFAULT_DATA)
    (train_series, train_labels), (test_series, test_labels) = read_ecg5000(path)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fit, held_out = stratified_split(train_labels, (1 - args.validation_fraction, args.validation_fraction),
                                     args.seed)
    train_frames, test_frames = spectrogram(train_series, args.n_fft, args.hop), spectrogram(test_series, args.n_fft,
                                                                                            args.hop)
    # Per-bin z-scores from the training beats only.
    mean = train_frames[fit].mean(dim=(0, 1))
    std = train_frames[fit].std(dim=(0, 1)) + STD_FLOOR
    train_frames, test_frames = (train_frames - mean) / std, (test_frames - mean) / std
    beats = torch.from_numpy(train_series).unsqueeze(-1)
    labels = torch.from_numpy(train_labels)

    def subset(indices):
        return TensorDataset(beats[indices], train_frames[indices], labels[indices])

    test = TensorDataset(torch.from_numpy(test_series).unsqueeze(-1), test_frames, torch.from_numpy(test_labels))
    config = StepFusionConfig(in_a=1, in_b=train_frames.shape[2], max_len_a=train_series.shape[1],
                              max_len_b=train_frames.shape[1], head="classify", num_classes=num_classes,
                              **model_kwargs)
    class_names = [str(c + 1) for c in range(num_classes)]  # the archive's own labels 1..5
    loss = classification_loss_with(class_weights(labels[fit], num_classes, args.class_weights))
    if args.augment > 0:
        def frames_of(series):  # on the device training runs on
            return (spectrogram(series, args.n_fft, args.hop) - mean.to(series.device)) / std.to(series.device)
        loss = augmented_loss(loss, args.augment, frames_of)
    return TaskSetup(name=NAME, model=StepFusionNet(config), train=subset(fit), validation=subset(held_out),
                     test=test, loss=loss, predict=classification_predict,
                     evaluate=classification_metrics(num_classes), plot=confusion_plot(class_names, "ECG5000 test"),
                     selection="accuracy", higher_is_better=True,
                     description={"data": path, "sizes": [len(fit), len(held_out), len(test_labels)],
                                  "n_fft": args.n_fft, "hop": args.hop, "class_weights": args.class_weights,
                                  "augment": args.augment})


def augmented_loss(loss, strength, frames_of):
    """`loss` on augmented (beat, frames, label) batches: the beats go through augment_beats and their
    time-frequency view is recomputed from the augmented beat with `frames_of`."""
    def augmented(model, batch):
        beats, _, labels = batch
        beats = augment_beats(beats.squeeze(-1), strength)
        return loss(model, (beats.unsqueeze(-1), frames_of(beats), labels))
    return augmented
