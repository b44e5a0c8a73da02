"""The Meta Fusion data readers on the real shared files (the counts their own documentation states), and the
.ts reader's format rules on small files written here."""

import os

import numpy as np
import pytest

from stepfusion_kernels.data import alzheimer, data_root, mfeat, sktime_ts

DATA = data_root()
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"shared data directory {DATA} is absent")


@needs_data
def test_meg_ts_files_hold_10_channels_of_400_samples_and_4_directions():
    train, train_labels, classes = sktime_ts.read_ts(os.path.join(DATA, "meg", "HandMovementDirection_TRAIN.ts"))
    test, test_labels, _ = sktime_ts.read_ts(os.path.join(DATA, "meg", "HandMovementDirection_TEST.ts"))
    assert classes == ("right", "forward", "left", "backward")
    assert train.shape == (160, 10, 400) and test.shape == (74, 10, 400)
    assert len(train_labels) == 160 and set(train_labels) == set(classes)
    assert {label: test_labels.count(label) for label in classes} == {"right": 14, "forward": 30, "left": 15,
                                                                     "backward": 15}
    assert np.isfinite(train).all() and np.isfinite(test).all()
    # The first case's first values of channels 0 and 1, as written in the file.
    np.testing.assert_allclose(train[0, :2, 0], [152.472131, 12.392351], rtol=1e-6)


def test_ts_reader_parses_dimensions_missing_values_and_checks_the_header(tmp_path):
    path = tmp_path / "tiny.ts"
    path.write_text("# comment\n@problemName tiny\n@timeStamps false\n@univariate false\n@dimensions 2\n"
                    "@equalLength true\n@seriesLength 3\n@classLabel true a b\n@data\n"
                    "1,2,3:4,?,6:b\n0.5,0,-1:1e2,2,3:a\n")
    series, labels, classes = sktime_ts.read_ts(str(path))
    assert classes == ("a", "b") and labels == ["b", "a"]
    assert series.shape == (2, 2, 3) and np.isnan(series[0, 1, 1])
    np.testing.assert_array_equal(series[1], [[0.5, 0, -1], [100, 2, 3]])
    path.write_text("@dimensions 2\n@seriesLength 3\n@classLabel true a b\n@data\n1,2,3:4,5:a\n")
    with pytest.raises(ValueError, match="case 0"):
        sktime_ts.read_ts(str(path))
    path.write_text("@dimensions 1\n@seriesLength 2\n@classLabel true a b\n@data\n1,2:c\n")
    with pytest.raises(ValueError, match="label 'c'"):
        sktime_ts.read_ts(str(path))


@needs_data
def test_mfeat_six_views_of_2000_digits_with_aligned_labels():
    features, labels = mfeat.read_mfeat(os.path.join(DATA, "mfeat"))
    assert {view: block.shape for view, block in features.items()} == {
        "fou": (2000, 76), "fac": (2000, 216), "kar": (2000, 64), "pix": (2000, 240), "zer": (2000, 47),
        "mor": (2000, 6)}
    assert np.bincount(labels).tolist() == [200] * 10
    assert features["pix"].min() == 0 and features["pix"].max() == 6  # pixel averages on a 0..6 scale


def test_mfeat_rejects_views_whose_rows_are_not_aligned(tmp_path):
    (tmp_path / "mfeat-fou.csv").write_text("0,1,2\n0.1,0.2,0\n0.3,0.4,1\n")
    (tmp_path / "mfeat-mor.csv").write_text("0,1\n5,1\n6,0\n")
    with pytest.raises(ValueError, match="not aligned"):
        mfeat.read_mfeat(str(tmp_path), views=("fou", "mor"))


@needs_data
def test_alzheimer_modalities_and_class_counts():
    modalities, labels, proteins = alzheimer.read_ad_data(os.path.join(DATA, "alzheimer", "ad_data.csv"))
    assert {name: block.shape for name, block in modalities.items()} == {
        "demographics": (333, 8), "csf": (333, 3), "proteins": (333, 124)}
    assert int(labels.sum()) == 91 and len(labels) == 333
    assert len(proteins) == 124 and "age" not in proteins
    genotype_counts = modalities["demographics"][:, 2:].sum(axis=0).tolist()
    assert genotype_counts == [2, 37, 8, 167, 106, 13]  # E2E2 E2E3 E2E4 E3E3 E3E4 E4E4
    assert (modalities["demographics"][:, 2:].sum(axis=1) == 1).all()
