"""The readers on the real shared files (counts and values the files' own metadata states), and on small
files written here for the edge cases."""

import collections
import os

import numpy as np
import pytest

from stepfusion_kernels.data import data_root, ett, resolve_data_path, ucr, wfdb

DATA = data_root()
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"shared data directory {DATA} is absent")


@needs_data
def test_wfdb_header_of_record_100_with_comment_and_blank_lines():
    header = wfdb.read_header(os.path.join(DATA, "mitdb", "100.hea"))
    assert (header.record, header.num_signals, header.frequency, header.num_samples) == ("100", 2, 360.0, 650000)
    assert [s.description for s in header.signals] == ["MLII", "V5"]
    assert all(s.fmt == 212 and s.gain == 200 and s.baseline == 1024 for s in header.signals)


@needs_data
def test_format_212_matches_the_header_checksums_and_initial_values():
    path = os.path.join(DATA, "mitdb", "100.hea")
    header = wfdb.read_header(path)
    digital = wfdb.read_signals(path, physical=False)
    assert digital.shape == (650000, 2)
    for column, spec in enumerate(header.signals):
        assert digital[0, column] == spec.initial_value
        assert wfdb.signal_checksum(digital[:, column]) == spec.checksum
    physical = wfdb.read_signals(path)
    np.testing.assert_allclose(physical[0], (digital[0] - 1024) / 200.0)


@needs_data
def test_annotations_of_record_100_match_the_reference_counts():
    annotations = wfdb.read_annotations(os.path.join(DATA, "mitdb", "100.atr"))
    counts = collections.Counter(annotations.symbols)
    assert (counts["N"], counts["A"], counts["V"]) == (2239, 33, 1)
    assert np.all(np.diff(annotations.samples) > 0)
    assert annotations.aux[annotations.symbols.index("+")].startswith(b"(N")


@needs_data
def test_truncated_signal_file_is_an_error(tmp_path):
    header = open(os.path.join(DATA, "mitdb", "100.hea")).read()
    (tmp_path / "100.hea").write_text(header)
    with open(os.path.join(DATA, "mitdb", "100.dat"), "rb") as handle:
        (tmp_path / "100.dat").write_bytes(handle.read(3 * 1000))  # 1000 of the declared 650000 frames
    with pytest.raises(ValueError, match="100.dat: holds 1000 samples per signal, the header declares 650000"):
        wfdb.read_signals(str(tmp_path / "100.hea"))


@needs_data
def test_aami_beats_of_record_100():
    path = os.path.join(DATA, "mitdb", "100.hea")
    signals = wfdb.read_signals(path)
    annotations = wfdb.read_annotations(os.path.join(DATA, "mitdb", "100.atr"))
    beats, labels = wfdb.aami_beats(signals, annotations, before=90, after=110)
    counts = np.bincount(labels, minlength=len(wfdb.AAMI_CLASSES))
    # Two N beats lie within 90 samples of the record's start or 110 of its end and are dropped.
    assert counts.tolist() == [2237, 33, 1, 0, 0]
    assert beats.shape == (2271, 200, 2)
    first = int(np.flatnonzero([wfdb.AAMI_OF_SYMBOL.get(s) is not None for s in annotations.symbols])[0])
    start = annotations.samples[first] - 90
    if start >= 0:
        np.testing.assert_array_equal(beats[0], signals[start:start + 200])


def test_annotation_skip_num_chn_and_aux(tmp_path):
    # N at 5; SKIP of 70000 samples; V 3 samples later with NUM 2, CHN 1 and AUX "(AB"; N 10 later.
    raw = np.array([(1 << 10) | 5, wfdb.SKIP << 10], dtype="<u2").tobytes()
    raw += np.array([70000 >> 16, 70000 & 0xFFFF], dtype="<u2").tobytes()
    raw += np.array([(5 << 10) | 3, (wfdb.NUM << 10) | 2, (wfdb.CHN << 10) | 1, (wfdb.AUX << 10) | 3],
                    dtype="<u2").tobytes() + b"(AB\x00"
    raw += np.array([(1 << 10) | 10, 0], dtype="<u2").tobytes()
    path = tmp_path / "x.atr"
    path.write_bytes(raw)
    annotations = wfdb.read_annotations(str(path))
    assert annotations.symbols == ["N", "V", "N"]
    assert annotations.samples.tolist() == [5, 70008, 70018]
    assert annotations.nums.tolist() == [0, 2, 2]  # num and chan persist until changed
    assert annotations.channels.tolist() == [0, 1, 1]
    assert annotations.aux[1] == b"(AB" and annotations.aux[0] is None


def test_format_212_decodes_negative_samples():
    # Samples (-1, 2047) and (-2048, 5) for two signals, packed by hand.
    def pack(a, b):
        a, b = a & 0xFFF, b & 0xFFF
        return bytes([a & 0xFF, ((a >> 8) & 0x0F) | ((b >> 4) & 0xF0), b & 0xFF])

    raw = pack(-1, 2047) + pack(-2048, 5)
    assert wfdb.decode_format_212(raw, 2).tolist() == [[-1, 2047], [-2048, 5]]


@needs_data
def test_ett_reader_and_standard_splits():
    table = ett.read_ett(os.path.join(DATA, "ett", "ETTh1.csv"))
    assert table.values.shape == (17420, 7)
    assert table.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert ett.steps_per_hour(table.dates) == 1
    assert ett.split_bounds(96) == [(0, 8640), (8544, 11520), (11424, 14400)]
    assert ett.split_bounds(96, per_hour=4) == [(0, 34560), (34464, 46080), (46080 - 96, 57600)]
    features = ett.calendar_features(table.dates[:25])
    assert features.shape == (25, 4) and features[0, 0] == -0.5 and features[23, 0] == 0.5


@needs_data
def test_ucr_reader_on_ecg5000():
    series, labels = ucr.read_ucr_tsv(os.path.join(DATA, "ucr", "ECG5000_TRAIN.tsv"))
    assert series.shape == (500, 140) and labels.shape == (500,)
    assert set(labels.tolist()) == {1, 2, 3, 4, 5}
    test_series, _ = ucr.read_ucr_tsv(os.path.join(DATA, "ucr", "ECG5000_TEST.tsv"))
    assert test_series.shape == (4500, 140)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="STEPFUSION_DATA"):
        resolve_data_path(str(tmp_path / "nowhere.csv"), "ett/ETTh1.csv")
