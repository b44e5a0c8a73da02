"""UCI Multiple Features (mfeat) as CSV files `mfeat-<view>.csv`: a header row of column names, one
digit per row, the class label (0-9) in the last column, the same 2,000 digits in the same order in every view."""

import os

import numpy as np

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def read_mfeat_view(path):
    """(features float32 (n, d), labels int64 (n,)) of one view file."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    labels = table[:, -1]
    if table.shape[1] < 2 or not np.all(labels == np.round(labels)):
        raise ValueError(f"{path}: rows must hold features and an integer class label in the last column")
    return table[:, :-1].astype(np.float32), labels.astype(np.int64)


def read_mfeat(directory, views=VIEWS):
    """({view: features float32 (n, d_view)}, labels int64 (n,)); the views' labels must agree row by row."""
    features = {}
    labels = None
    for view in views:
        path = os.path.join(directory, f"mfeat-{view}.csv")
        features[view], view_labels = read_mfeat_view(path)
        if labels is None:
            labels = view_labels
        elif not np.array_equal(labels, view_labels):
            raise ValueError(f"{path}: labels differ from those of view {views[0]!r}; the rows are not aligned")
    return features, labels
