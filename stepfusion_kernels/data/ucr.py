"""UCR Time Series Classification Archive .tsv files: one series per line, the label in column 0."""

import numpy as np


def read_ucr_tsv(path):
    """(series float32 (n, T), labels int64 (n,)) with the archive's own label values."""
    table = np.loadtxt(path, delimiter="\t", dtype=np.float64, ndmin=2)
    if table.shape[1] < 2:
        raise ValueError(f"{path}: a UCR row holds a label and at least one value, got {table.shape[1]} columns")
    labels = table[:, 0]
    if not np.all(labels == np.round(labels)):
        raise ValueError(f"{path}: column 0 must hold integer class labels")
    return table[:, 1:].astype(np.float32), labels.astype(np.int64)
