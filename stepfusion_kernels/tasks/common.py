"""Pieces the tasks share: the device and thread set-up, a stratified split, the classification
loss/predict/evaluate functions and the confusion-matrix PNG."""

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import metrics  # noqa: E402


def set_up_device(device, threads):
    """Sets torch's CPU threads (0 or None: torch's default) and refuses --device cuda without a GPU, before
    any data is read."""
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")


def stratified_split(labels, fractions, seed):
    """Index arrays, one per fraction (which must sum to 1), each class divided in those proportions
    after a seeded shuffle; rounding leftovers go to the first part, so a class too small to divide stays
    there (with fractions (train, validation, test): in training)."""
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        sizes = [int(np.floor(f * len(members))) for f in fractions[1:]]
        bounds = np.cumsum([len(members) - sum(sizes)] + sizes)
        for part, chunk in zip(parts, np.split(members, bounds[:-1])):
            part.extend(chunk.tolist())
    return [np.sort(np.array(part, dtype=np.int64)) for part in parts]


CLASS_WEIGHTINGS = ("none", "inverse-sqrt", "inverse")


def class_weights(labels, num_classes, kind):
    """Cross-entropy weights from the training labels' counts n_c: none (None), 1/sqrt(n_c) or 1/n_c, scaled
    so that the mean weight over the training samples is 1 (the loss keeps its scale). An absent class gets
    the weight of a class seen once."""
    if kind not in CLASS_WEIGHTINGS:
        raise ValueError(f"class weighting must be one of {CLASS_WEIGHTINGS}, got {kind!r}")
    if kind == "none":
        return None
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    seen = counts.clamp(min=1)
    weights = seen.rsqrt() if kind == "inverse-sqrt" else seen.reciprocal()
    return (weights * counts.sum() / (weights * counts).sum()).float()


def classification_loss_with(weights=None):
    """The cross-entropy loss of a task's (a, b, labels) batches, with optional per-class weights."""
    def loss(model, batch):
        a, b, labels = batch
        return F.cross_entropy(model(a, b), labels, weight=None if weights is None else weights.to(labels.device))

    return loss


classification_loss = classification_loss_with()


def classification_predict(model, batch):
    """(class probabilities, labels): probabilities rather than classes, so that an ensemble can average them."""
    a, b, labels = batch
    return model(a, b).softmax(dim=-1), labels


def predicted_classes(predicted):
    """The classes of (N, C) class probabilities; (N,) classes as they are."""
    predicted = np.asarray(predicted)
    return predicted.argmax(axis=-1) if predicted.ndim == 2 else predicted


def classification_metrics(num_classes):
    def evaluate(predicted, labels):
        predicted = predicted_classes(predicted)
        return {"accuracy": metrics.accuracy(labels, predicted),
                "macro_f1": metrics.macro_f1(labels, predicted, num_classes)}
    return evaluate


def confusion_plot(class_names, title):
    def plot(path, predicted, labels):
        predicted = predicted_classes(predicted)
        matrix = metrics.confusion_matrix(labels, predicted, len(class_names))
        figure, axes = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
        axes.imshow(matrix, cmap="Blues")
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                axes.text(column, row, str(matrix[row, column]), ha="center", va="center",
                          color="white" if matrix[row, column] > matrix.max() / 2 else "black")
        axes.set_xticks(range(len(class_names)), class_names)
        axes.set_yticks(range(len(class_names)), class_names)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(f"{title}: accuracy {metrics.accuracy(labels, predicted):.4f}")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return plot
