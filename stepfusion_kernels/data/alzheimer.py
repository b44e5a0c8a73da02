"""The `ad_data` table (Craig-Schapiro et al. 2011, via modeldata) as CSV: a row name, 124 protein columns,
then age, tau, p_tau, Ab_42, male, Genotype (APOE, e.g. "E3E4") and Class ("Impaired" / "Control")."""

import csv

import numpy as np

CSF_CORE = ("tau", "p_tau", "Ab_42")
DEMOGRAPHICS = ("age", "male")
GENOTYPES = ("E2E2", "E2E3", "E2E4", "E3E3", "E3E4", "E4E4")
NON_PROTEIN = ("rownames",) + DEMOGRAPHICS + CSF_CORE + ("Genotype", "Class")


def read_ad_data(path):
    """({"demographics": (n, 8) age, male and the one-hot APOE genotype; "csf": (n, 3) tau, p_tau, Ab_42;
    "proteins": (n, 124)} float32, labels int64 (n,) with 1 = Impaired, 0 = Control, protein names)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    missing = [name for name in NON_PROTEIN if name not in header]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    column = {name: index for index, name in enumerate(header)}
    proteins = [name for name in header if name not in NON_PROTEIN]

    def numeric(names):
        return np.array([[float(row[column[name]]) for name in names] for row in body], dtype=np.float32)

    genotype = [row[column["Genotype"]] for row in body]
    unknown = sorted(set(genotype) - set(GENOTYPES))
    if unknown:
        raise ValueError(f"{path}: unknown APOE genotypes {unknown}, expected {GENOTYPES}")
    one_hot = np.array([[float(g == name) for name in GENOTYPES] for g in genotype], dtype=np.float32)
    classes = [row[column["Class"]] for row in body]
    if set(classes) - {"Impaired", "Control"}:
        raise ValueError(f"{path}: Class must be Impaired or Control, got {sorted(set(classes))}")
    modalities = {
        "demographics": np.concatenate([numeric(DEMOGRAPHICS), one_hot], axis=1),
        "csf": numeric(CSF_CORE),
        "proteins": numeric(proteins),
    }
    labels = np.array([c == "Impaired" for c in classes], dtype=np.int64)
    return modalities, labels, proteins
