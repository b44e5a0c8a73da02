"""Evaluation metrics on numpy arrays (computed once over a whole split, never averaged over batches)."""

import numpy as np


def mse(prediction, target):
    return float(np.mean((np.asarray(prediction, np.float64) - np.asarray(target, np.float64)) ** 2))


def mae(prediction, target):
    return float(np.mean(np.abs(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))))


def confusion_matrix(labels, predicted, num_classes):
    """(num_classes, num_classes) counts; row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def accuracy(labels, predicted):
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def macro_f1(labels, predicted, num_classes):
    """Mean F1 over the classes present in `labels` or `predicted` (a class absent from both has no F1)."""
    matrix = confusion_matrix(labels, predicted, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    support, claimed = matrix.sum(axis=1), matrix.sum(axis=0)
    present = (support + claimed) > 0
    f1 = 2 * true_positive[present] / (support[present] + claimed[present])
    return float(f1.mean())
