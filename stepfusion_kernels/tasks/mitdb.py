"""MIT-BIH Arrhythmia beat classification into the AAMI classes N/S/V/F/Q, the two leads as the two
modalities. Beats are cut `before`/`after` samples around each reference R-peak annotation, decimated,
and centred per beat and lead (removing baseline wander). Split: de Chazal et al.'s inter-patient split
(train on DS1 records with a stratified validation share, test on DS2) when the directory holds records
of both; otherwise (for example the shared copy, record 100 only) a stratified split of all beats."""

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..data import resolve_data_path, wfdb
from ..models import StepFusionConfig, StepFusionNet
from .common import (CLASS_WEIGHTINGS, class_weights, classification_loss_with, classification_metrics,
                     classification_predict, confusion_plot, stratified_split)
from .training import TaskSetup

NAME = "mitdb"
DEFAULT_DATA = "mitdb"
MODEL_DEFAULTS = {"dim": 32, "heads": 4, "layers_a": 1, "layers_b": 1, "steps": 2, "window": 4,
                  "global_tokens": 2, "dropout": 0.1, "gate_init": 0.1}
TRAINING_DEFAULTS = {"epochs": 10, "batch_size": 64, "lr": 1e-3}
EVALUATION_FLAGS = ()  # the task's flags that `stepfusion-train --evaluate` takes from its own command line


def record_beats(directory, record, before, after, decimate):
    """(beats (n, (before + after) // decimate, 2) float32 centred per beat and lead, AAMI labels (n,))."""
    signals = wfdb.read_signals(os.path.join(directory, record + ".hea"))
    annotations = wfdb.read_annotations(os.path.join(directory, record + ".atr"))
    beats, labels = wfdb.aami_beats(signals[:, :2], annotations, before, after)
    beats = beats[:, ::decimate]
    return beats - beats.mean(axis=1, keepdims=True), labels


def split_records(records):
    """(DS1 records, DS2 records) present, or None when either set is absent."""
    ds1 = [r for r in records if r in wfdb.DS1]
    ds2 = [r for r in records if r in wfdb.DS2]
    return (ds1, ds2) if ds1 and ds2 else None


def load_beats(directory, before, after, decimate, validation_fraction, test_fraction, seed):
    """((beats, labels) of train, validation and test, split description)."""
    records = wfdb.list_records(directory)
    if not records:
        raise FileNotFoundError(f"{directory}: no WFDB record with a .hea and an .atr file")
    inter_patient = split_records(records)
    used = records if inter_patient is None else inter_patient[0] + inter_patient[1]  # paced records: never read
    per_record = {r: record_beats(directory, r, before, after, decimate) for r in used}

    def join(names):
        return (np.concatenate([per_record[r][0] for r in names]), np.concatenate([per_record[r][1] for r in names]))

    if inter_patient is not None:
        (train_beats, train_labels), test = join(inter_patient[0]), join(inter_patient[1])
        fit, held_out = stratified_split(train_labels, (1 - validation_fraction, validation_fraction), seed)
        splits = [(train_beats[fit], train_labels[fit]), (train_beats[held_out], train_labels[held_out]), test]
        return splits, {"split": "inter-patient DS1/DS2", "train_records": inter_patient[0],
                        "test_records": inter_patient[1]}
    beats, labels = join(records)
    parts = stratified_split(labels, (1 - validation_fraction - test_fraction, validation_fraction, test_fraction),
                             seed)
    return [(beats[p], labels[p]) for p in parts], {"split": "stratified over beats", "records": records}


def add_arguments(parser):
    parser.add_argument("--before", type=int, default=90, help="samples before the R peak")
    parser.add_argument("--after", type=int, default=110, help="samples after the R peak")
    parser.add_argument("--decimate", type=int, default=2, help="keep every n-th sample of a beat")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of beats in the test split when no DS1/DS2 records are present")
    parser.add_argument("--class-weights", default="none", choices=CLASS_WEIGHTINGS,
                        help="cross-entropy class weights from the training counts")
    parser.set_defaults(**MODEL_DEFAULTS, **TRAINING_DEFAULTS)


def build(args, model_kwargs):
    directory = resolve_data_path(args.data, DEFAULT_DATA)
    if not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    splits, description = load_beats(directory, args.before, args.after, args.decimate, args.validation_fraction,
                                     args.test_fraction, args.seed)

    def dataset(beats, labels):
        beats = torch.from_numpy(np.ascontiguousarray(beats))
        return TensorDataset(beats[..., :1].contiguous(), beats[..., 1:].contiguous(), torch.from_numpy(labels))

    train, validation, test = (dataset(*s) for s in splits)
    length = splits[0][0].shape[1]
    num_classes = len(wfdb.AAMI_CLASSES)
    config = StepFusionConfig(in_a=1, in_b=1, max_len_a=length, max_len_b=length, head="classify",
                              num_classes=num_classes, **model_kwargs)
    counts = [np.bincount(s[1], minlength=num_classes).tolist() for s in splits]
    return TaskSetup(name=NAME, model=StepFusionNet(config), train=train, validation=validation, test=test,
                     loss=classification_loss_with(class_weights(splits[0][1], num_classes, args.class_weights)),
                     predict=classification_predict,
                     evaluate=classification_metrics(num_classes),
                     plot=confusion_plot(list(wfdb.AAMI_CLASSES), "MIT-BIH test"),
                     selection="macro_f1", higher_is_better=True,
                     description={"data": directory, "class_counts": counts, "class_weights": args.class_weights,
                                  **description})
