"""sktime / aeon `.ts` files: `#` comments, `@key value` header lines, then `@data` and one case per line with
its dimensions separated by `:`, the values of a dimension by `,` and the class label last."""

import numpy as np


def read_ts(path):
    """(series float32 (n, dims, length), labels list of str, class_labels tuple of str).

    Reads equal-length series (`@equalLength true`); `?` marks a missing value and becomes NaN. The header's
    `@dimensions`, `@seriesLength` and `@classLabel` are checked against every case."""
    header = {}
    cases = []
    labels = []
    in_data = False
    with open(path, "r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise ValueError(f"{path}:{number}: expected a header line starting with '@', got {line[:40]!r}")
                key, _, value = line[1:].partition(" ")
                key = key.lower()
                if key == "data":
                    in_data = True
                else:
                    header[key] = value.strip()
                continue
            *dimensions, label = line.split(":")
            cases.append([_parse_dimension(text, path, number) for text in dimensions])
            labels.append(label.strip())
    if not in_data:
        raise ValueError(f"{path}: no @data section")
    if header.get("classlabel", "false").split()[0].lower() != "true":
        raise ValueError(f"{path}: only classification files (@classLabel true ...) are supported")
    if header.get("equallength", "true").lower() != "true" or header.get("timestamps", "false").lower() != "false":
        raise ValueError(f"{path}: only equal-length series without timestamps are supported")
    class_labels = tuple(header["classlabel"].split()[1:])
    dims = int(header.get("dimensions", len(cases[0]) if cases else 0))
    length = int(header["serieslength"]) if "serieslength" in header else (len(cases[0][0]) if cases else 0)
    for index, (case, label) in enumerate(zip(cases, labels)):
        if len(case) != dims or any(len(values) != length for values in case):
            raise ValueError(f"{path}: case {index} has {len(case)} dimensions of lengths "
                             f"{sorted({len(v) for v in case})}, the header says {dims} x {length}")
        if class_labels and label not in class_labels:
            raise ValueError(f"{path}: case {index} has label {label!r}, not one of {class_labels}")
    series = np.array(cases, dtype=np.float32).reshape(len(cases), dims, length)
    return series, labels, class_labels


def _parse_dimension(text, path, number):
    try:
        return [float("nan") if value == "?" else float(value) for value in text.split(",")]
    except ValueError as error:
        raise ValueError(f"{path}:{number}: {error}") from None
