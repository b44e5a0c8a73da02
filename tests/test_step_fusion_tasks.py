"""The tasks around StepFusionNet: metrics against hand-computed values, the splits on the real shared
files, the training loop under DistributedDataParallel (2 gloo processes), and the CLI end to end on a
tiny budget."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stepfusion_kernels import train as cli
from stepfusion_kernels.data import data_root
from stepfusion_kernels.models import StepFusionConfig, StepFusionNet
from stepfusion_kernels.tasks import common, ecg5000, ett, metrics, mitdb
from stepfusion_kernels.tasks.training import TaskSetup, TrainingOptions, TrainingResult, evaluate_ensemble, train

DATA = data_root()
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"shared data directory {DATA} is absent")
TINY_MODEL = ["--dim", "8", "--heads", "2", "--steps", "1", "--backend", "cpu", "--no-progress", "--threads", "1"]


def test_regression_metrics_by_hand():
    prediction, target = np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.0, 2.0], [5.0, 4.0]])
    assert metrics.mse(prediction, target) == pytest.approx((1 + 0 + 4 + 1) / 4)
    assert metrics.mae(prediction, target) == pytest.approx((1 + 0 + 2 + 1) / 4)


def test_classification_metrics_by_hand():
    labels, predicted = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 0, 2])
    assert metrics.confusion_matrix(labels, predicted, 4).tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0],
                                                                       [0, 0, 0, 0]]
    assert metrics.accuracy(labels, predicted) == pytest.approx(4 / 6)
    # F1 per class: 0: 2*1/(2+2) = 0.5; 1: 2*2/(2+3) = 0.8; 2: 2*1/(2+1) = 2/3; class 3 absent from both.
    assert metrics.macro_f1(labels, predicted, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_stratified_split_keeps_class_proportions_and_tiny_classes_in_the_first_part():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    train_part, validation, test = common.stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    assert sorted(np.concatenate([train_part, validation, test]).tolist()) == list(range(16))
    assert np.bincount(labels[validation], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[train_part], minlength=3).tolist() == [6, 3, 1]
    with pytest.raises(ValueError, match="sum to 1"):
        common.stratified_split(labels, (0.5, 0.2), seed=0)


@needs_data
def test_ett_splits_on_etth1():
    (train_set, validation, test), table = ett.load_splits(os.path.join(DATA, "ett", "ETTh1.csv"), 96, 96)
    assert len(table.values) == 17420 and table.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    # 8640 training rows, 2880 + 96 rows each for validation and test; a window spans 96 + 96 rows.
    assert (len(train_set), len(validation), len(test)) == (8449, 2785, 2785)
    np.testing.assert_allclose(train_set.values.numpy().mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(train_set.values.numpy().std(axis=0), 1, atol=1e-4)
    history, calendar, future, phase = validation[0]
    # The daily phase of a window's first row: validation starts at row 8544, 2017-06-22 00:00.
    assert str(table.dates[8544]) == "2017-06-22T00:00" and phase == 0
    assert [test[k][3] for k in (0, 5, 23, 24)] == [0, 5, 23, 0] and train_set[13][3] == 13
    strided = ett.load_splits(os.path.join(DATA, "ett", "ETTh1.csv"), 96, 96, eval_stride=10)[0]
    assert (len(strided[0]), len(strided[1]), len(strided[2])) == (8449, 279, 279)
    torch.testing.assert_close(strided[2][5][2], test[50][2])
    assert history.shape == (96, 7) and calendar.shape == (96, 4) and future.shape == (96, 7)
    torch.testing.assert_close(history, validation.values[:96])
    torch.testing.assert_close(validation.values[:96], torch.from_numpy(
        ((table.values[8544:8640] - table.values[:8640].mean(0)) / table.values[:8640].std(0)).astype(np.float32)))


@pytest.mark.parametrize("scale", [True, False])
def test_ett_forecaster_is_equivariant_to_a_level_shift(scale):
    # RevIN: adding c to the whole history adds c to the forecast, whatever the weights.
    config = StepFusionConfig(in_a=3 * 8, in_b=3 + 4, max_len_a=3, max_len_b=16, head="forecast", horizon=6,
                              out_vars=3, skip_len=16, dim=8, heads=2, steps=1, dropout=0.0, backend="cpu")
    model = ett.RevinForecaster(config, 8, 4, scale=scale).eval()
    history, calendar = torch.randn(2, 16, 3), torch.rand(2, 16, 4) - 0.5
    forecast = model(history, calendar)
    assert forecast.shape == (2, 6, 3)
    torch.testing.assert_close(model(history + 5.0, calendar), forecast + 5.0, rtol=1e-4, atol=1e-4)
    # Only the scaling RevIN makes the forecast scale with the history.
    scaled = model(3.0 * history, calendar)
    if scale:
        torch.testing.assert_close(scaled, 3.0 * forecast, rtol=1e-4, atol=1e-4)
    else:
        assert not torch.allclose(scaled, 3.0 * forecast, rtol=1e-2, atol=1e-2)


def test_ett_forecaster_cycle_enters_at_the_window_phase():
    config = StepFusionConfig(in_a=3 * 8, in_b=3 + 4, max_len_a=3, max_len_b=16, head="forecast", horizon=6,
                              out_vars=3, skip_len=16, dim=8, heads=2, steps=1, dropout=0.0, backend="cpu")
    torch.manual_seed(0)
    model = ett.RevinForecaster(config, 8, 4, cycle_len=5).eval()
    with torch.no_grad():
        model.cycle.copy_(torch.randn(5, 3))
    history, calendar = torch.randn(2, 16, 3), torch.rand(2, 16, 4) - 0.5
    phase = torch.tensor([0, 3])
    with torch.no_grad():
        forecast = model(history, calendar, phase)
        # Rolling the cycle by k and moving the phase by k is the same model.
        rolled = ett.RevinForecaster(config, 8, 4, cycle_len=5).eval()
        rolled.load_state_dict(model.state_dict())
        rolled.cycle.copy_(torch.roll(model.cycle, 2, dims=0))
        torch.testing.assert_close(rolled(history, calendar, phase + 2), forecast)
        torch.testing.assert_close(model(history, calendar, phase + 5), forecast)
        # With the network silenced, the forecast is the mean of the history less its cycle, plus the cycle
        # at the 6 rows after the 16-row history.
        for parameter in model.net.parameters():
            parameter.zero_()
        cycle = model.cycle[(phase[:, None] + torch.arange(22)) % 5]
        expected = (history - cycle[:, :16]).mean(dim=1, keepdim=True) + cycle[:, 16:]
        torch.testing.assert_close(model(history, calendar, phase), expected)
    with pytest.raises(ValueError, match="phase"):
        model(history, calendar)


@needs_data
@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_ett_training_loss_is_the_chosen_one(loss):
    args = cli.parser().parse_args(["ett", "--loss", loss, "--eval-stride", "100", *TINY_MODEL])
    setup = ett.build(args, {flag: getattr(args, flag) for flag in cli.MODEL_FLAGS})
    history, calendar, future, phase = (torch.stack([torch.as_tensor(item[k]) for item in
                                                     (setup.train[0], setup.train[500])]) for k in range(4))
    setup.model.eval()
    prediction = setup.model(history, calendar, phase)
    expected = (prediction - future).square().mean() if loss == "mse" else (prediction - future).abs().mean()
    torch.testing.assert_close(setup.loss(setup.model, (history, calendar, future, phase)), expected)


@needs_data
def test_ecg5000_reader_and_views():
    (train_series, train_labels), (test_series, test_labels) = ecg5000.read_ecg5000(os.path.join(DATA, "ucr"))
    assert train_series.shape == (500, 140) and test_series.shape == (4500, 140)
    assert np.bincount(train_labels).tolist() == [292, 177, 10, 19, 2]
    assert set(np.unique(test_labels)) == {0, 1, 2, 3, 4}
    frames = ecg5000.spectrogram(train_series[:3], n_fft=32, hop=4)
    assert frames.shape == (3, 36, 17)
    expected = np.log1p(np.abs(np.fft.rfft(np.pad(train_series[0], 16, mode="reflect")[40:72] * np.hanning(33)[:32])))
    np.testing.assert_allclose(frames[0, 10].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ecg5000_augmentation():
    beats = torch.randn(64, 140, generator=torch.Generator().manual_seed(0))
    assert ecg5000.augment_beats(beats, 0.0) is beats
    # Without noise (NOISE 0) a beat comes back scaled within [1 - s, 1 + s] and shifted by at most
    # round(MAX_SHIFT * s) samples, its edge sample repeated.
    strength = 0.3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ecg5000, "NOISE", 0.0)
        out = ecg5000.augment_beats(beats, strength, torch.Generator().manual_seed(1))
    reach = round(ecg5000.MAX_SHIFT * strength)
    seen_shifts = set()
    for beat, augmented in zip(beats, out):
        matches = []
        for shift in range(-reach, reach + 1):
            positions = (torch.arange(140) - shift).clamp(0, 139)
            scale = augmented @ beat[positions] / (beat[positions] @ beat[positions])
            if torch.allclose(augmented, scale * beat[positions], atol=1e-5):
                matches.append((shift, float(scale)))
        assert len(matches) == 1 and abs(matches[0][1] - 1) <= strength + 1e-6
        seen_shifts.add(matches[0][0])
    assert len(seen_shifts) > 1
    # The noise has standard deviation NOISE * s.
    noisy = ecg5000.augment_beats(torch.zeros(200, 140), 0.2, torch.Generator().manual_seed(2))
    assert abs(noisy.std().item() - ecg5000.NOISE * 0.2) < 0.01


@needs_data
def test_cli_ecg5000_with_augmentation_recomputes_the_frames(tmp_path, monkeypatch):
    # The augmented loss recomputes the time-frequency view of the augmented beats with `frames_of`:
    # applied to a batch's stored beats, that must give exactly the batch's stored frames.
    seen = []
    original = ecg5000.augmented_loss

    def spy(loss, strength, frames_of):
        def checked(model, batch):
            beats, frames, labels = batch
            seen.append(torch.allclose(frames_of(beats.squeeze(-1)), frames, atol=1e-5))
            return original(loss, strength, frames_of)(model, batch)
        return checked

    monkeypatch.setattr(ecg5000, "augmented_loss", spy)
    report = _run_cli("ecg5000", tmp_path, "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--augment", "0.2")
    assert report["setup"]["augment"] == 0.2 and seen == [True, True]
    with pytest.raises(ValueError, match="--augment"):
        cli.main(["ecg5000", "--out", str(tmp_path), *TINY_MODEL, "--augment", "-1"])


@needs_data
def test_mitdb_record_100_falls_back_to_a_stratified_split():
    splits, description = mitdb.load_beats(os.path.join(DATA, "mitdb"), 90, 110, 2, 0.2, 0.2, seed=0)
    assert description["split"] == "stratified over beats"
    counts = [np.bincount(labels, minlength=5).tolist() for _, labels in splits]
    # 2237 N, 33 S (the A beats), 1 V: the V beat stays in training.
    assert counts == [[1343, 21, 1, 0, 0], [447, 6, 0, 0, 0], [447, 6, 0, 0, 0]]
    assert splits[0][0].shape == (1365, 100, 2)
    np.testing.assert_allclose(splits[0][0].mean(axis=1), 0, atol=1e-5)
    assert mitdb.split_records(["100", "101", "102"]) == (["101"], ["100"])
    assert mitdb.split_records(["100", "103"]) is None


def _copy_record(source_dir, target_dir, source, target):
    """Record `source` saved as `target`: its header names the new record and signal file."""
    header = (source_dir / f"{source}.hea").read_text().replace(f"{source}.dat", f"{target}.dat")
    header = "\n".join(f"{target} {line.split(' ', 1)[1]}" if line.startswith(f"{source} ") else line
                        for line in header.splitlines())
    (target_dir / f"{target}.hea").write_text(header + "\n")
    for extension in ("dat", "atr"):
        (target_dir / f"{target}.{extension}").write_bytes((source_dir / f"{source}.{extension}").read_bytes())


@needs_data
def test_mitdb_full_directory_uses_the_inter_patient_split(tmp_path, capsys):
    # A directory laid out like the full database: record 100 (DS2), a copy of it as 101 (DS1), and a
    # paced record 102 (in neither set) whose signal file is broken, so reading it would fail.
    source = type(tmp_path)(os.path.join(DATA, "mitdb"))
    directory = tmp_path / "mitdb"
    directory.mkdir()
    _copy_record(source, directory, "100", "100")
    _copy_record(source, directory, "100", "101")
    _copy_record(source, directory, "100", "102")
    (directory / "102.dat").write_bytes(b"\x00" * 7)
    splits, description = mitdb.load_beats(str(directory), 90, 110, 2, 0.2, 0.2, seed=0)
    assert description == {"split": "inter-patient DS1/DS2", "train_records": ["101"], "test_records": ["100"]}
    counts = [np.bincount(labels, minlength=5).tolist() for _, labels in splits]
    # Training and validation share record 101's 2237 N, 33 S, 1 V beats (20% of each class held out,
    # rounded down); the test split is all of record 100's, whatever its class.
    assert counts == [[1790, 27, 1, 0, 0], [447, 6, 0, 0, 0], [2237, 33, 1, 0, 0]]
    np.testing.assert_allclose(np.concatenate([splits[0][0], splits[1][0]]).sum(axis=0, dtype=np.float64),
                               splits[2][0].sum(axis=0, dtype=np.float64), rtol=1e-12)  # the same beats, redistributed
    report = _run_cli("mitdb", tmp_path / "run", "--data", str(directory), "--epochs", "1", "--max-steps", "2",
                      "--batch-size", "8")
    assert report["setup"]["split"] == "inter-patient DS1/DS2" and report["setup"]["class_counts"] == counts
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mitdb test: accuracy=")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _synthetic_setup(seed, head="classify", backend="cpu"):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 12, 2, generator=generator), torch.randn(48, 5, 3, generator=generator)
    torch.manual_seed(seed)  # different initial weights on each rank: DDP must broadcast rank 0's
    fields = dict(in_a=2, in_b=3, max_len_a=12, max_len_b=5, head=head, dim=8, heads=2, steps=1, dropout=0.0,
                  backend=backend)
    if head == "classify":
        data = torch.utils.data.TensorDataset(a, b, (a.mean(dim=(1, 2)) > 0).long())
        return TaskSetup(name="synthetic", model=StepFusionNet(StepFusionConfig(**fields, num_classes=2)),
                         train=data, validation=data, test=data, loss=common.classification_loss,
                         predict=common.classification_predict, evaluate=common.classification_metrics(2),
                         plot=lambda *args: None, selection="accuracy", higher_is_better=True)
    data = torch.utils.data.TensorDataset(a, b, a[:, -3:].flip(1))  # forecast: the last 3 steps, reversed
    model = StepFusionNet(StepFusionConfig(**fields, horizon=3, out_vars=2))

    def predict(model, batch):
        return model(batch[0], batch[1]), batch[2]

    return TaskSetup(name="synthetic", model=model, train=data, validation=data, test=data,
                     loss=lambda model, batch: torch.nn.functional.mse_loss(*predict(model, batch)), predict=predict,
                     evaluate=lambda prediction, target: {"mse": metrics.mse(prediction, target)},
                     plot=lambda *args: None, selection="mse", higher_is_better=False)


def test_ema_checkpoint_is_the_moving_average_of_the_trained_weights(tmp_path):
    setup = _synthetic_setup(seed=0)
    setup.validation = torch.utils.data.TensorDataset(*(t[:0] for t in setup.train.tensors))  # keep the last
    weights, loss = [], setup.loss

    def recording_loss(model, batch):  # called before every optimizer step: the weights after the previous one
        weights.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        return loss(model, batch)

    setup.loss = recording_loss
    decay = 0.6
    result = train(setup, TrainingOptions(epochs=2, batch_size=8, out=str(tmp_path), progress=False, ema_decay=decay))
    after_steps = weights[1:] + [result.last_state]
    assert len(after_steps) == result.steps == 12
    expected = after_steps[0]
    for current in after_steps[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * current[name] for name in expected}
    saved = torch.load(tmp_path / "best.pt")["model"]
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value)
    assert any(not torch.equal(saved[name], result.last_state[name]) for name in saved)
    with pytest.raises(ValueError, match="ema_decay"):
        train(_synthetic_setup(seed=0), TrainingOptions(epochs=1, out=str(tmp_path), progress=False, ema_decay=1.0))


@pytest.mark.parametrize(("autocast", "dtype", "backend"), [("off", torch.float32, "cpu"),
                                                            ("bf16", torch.bfloat16, "cpu"),
                                                            ("fp16", torch.float16, "reference")])
def test_autocast_runs_training_and_evaluation_forwards_in_its_dtype(tmp_path, autocast, dtype, backend):
    setup = _synthetic_setup(seed=0, backend=backend)
    initial = {name: value.clone() for name, value in setup.model.state_dict().items()}
    seen = []  # (training?, dtype of the classifier's logits) of every forward
    setup.model.register_forward_hook(lambda module, args, output: seen.append((module.training, output.dtype)))
    result = train(setup, TrainingOptions(epochs=1, batch_size=8, out=str(tmp_path), progress=False,
                                          autocast=autocast))
    assert {training for training, _ in seen} == {True, False}  # both training and evaluation were seen
    assert {seen_dtype for _, seen_dtype in seen} == {dtype}
    state = setup.model.state_dict()
    assert all(value.dtype == initial[name].dtype and value.isfinite().all() for name, value in state.items())
    assert any(not torch.equal(result.last_state[name], initial[name]) for name in initial)
    assert json.loads((tmp_path / "metrics.json").read_text())["options"]["autocast"] == autocast


def test_autocast_refuses_an_unknown_dtype_and_float16_on_the_cpu_backend(tmp_path):
    with pytest.raises(ValueError, match="autocast must be one of off, bf16, fp16"):
        train(_synthetic_setup(seed=0), TrainingOptions(epochs=1, out=str(tmp_path), progress=False,
                                                        autocast="fp8"))
    with pytest.raises(ValueError, match="backend 'cpu' supports .*bfloat16; got float16"):
        train(_synthetic_setup(seed=0), TrainingOptions(epochs=1, out=str(tmp_path), progress=False,
                                                        autocast="fp16"))


def _ddp_worker(rank, world_size, port, out, head):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(_synthetic_setup(seed=rank, head=head),
                   TrainingOptions(epochs=1, batch_size=8, out=out, progress=False))
    torch.save(result.last_state, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("head", ["classify", "forecast"])
def test_ddp_two_gloo_processes_end_with_the_same_weights(tmp_path, head):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), head), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = _synthetic_setup(seed=0, head=head).model.state_dict()
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0)
    assert any(not torch.equal(initial[name], value) for name, value in ranks[0].items())
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3  # 48 samples / 2 ranks / batch 8


def _run_cli(task, out, *extra):
    cli.main([task, "--out", str(out), *TINY_MODEL, *extra])
    report = json.loads((out / "metrics.json").read_text())
    assert (out / "best.pt").exists() and (out / f"{task}.png").stat().st_size > 0
    return report


@needs_data
@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_cli_ett_end_to_end(tmp_path, capsys, loss):
    report = _run_cli("ett", tmp_path, "--epochs", "1", "--max-steps", "3", "--batch-size", "4", "--eval-stride", "100",
                      "--loss", loss)
    assert report["steps"] == 3 and set(report["test"]) == {"mse", "mae"} and report["setup"]["loss"] == loss
    assert report["setup"]["windows"] == [8449, 28, 28]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ett test: mse=")


@needs_data
@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_cli_ecg5000_end_to_end(tmp_path, capsys, autocast):
    report = _run_cli("ecg5000", tmp_path, "--epochs", "1", "--max-steps", "2", "--batch-size", "8",
                      "--autocast", autocast)
    assert report["steps"] == 2 and 0 <= report["test"]["accuracy"] <= 1
    assert report["options"]["autocast"] == autocast
    # Validation: floor(20%) of each class (292, 177, 10, 19, 2 beats) = 58 + 35 + 2 + 3 + 0.
    assert report["setup"]["sizes"] == [402, 98, 4500]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ecg5000 test: accuracy=")


@needs_data
def test_cli_ecg5000_without_validation_keeps_the_final_weights(tmp_path):
    report = _run_cli("ecg5000", tmp_path, "--epochs", "2", "--max-steps", "3", "--batch-size", "8",
                      "--validation-fraction", "0")
    assert report["setup"]["sizes"] == [500, 0, 4500] and report["validation"] == {}
    assert report["best_step"] == report["steps"] == 3
    assert torch.load(tmp_path / "best.pt")["step"] == 3
    for fraction in ("-0.1", "1"):
        with pytest.raises(ValueError, match="validation-fraction"):
            cli.main(["ecg5000", "--out", str(tmp_path), *TINY_MODEL, "--validation-fraction", fraction])


def test_ensemble_tests_the_mean_of_the_members_probabilities(tmp_path, capsys):
    labels = np.array([0, 1, 1, 0])
    # Each member gets one beat wrong; their mean gets all four right (ties can't occur).
    first = np.array([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.8, 0.2]])
    second = np.array([[0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3]])
    members = [TrainingResult({}, {}, 0, 0, {}, probabilities, labels) for probabilities in (first, second)]
    assert [common.classification_metrics(2)(m.test_prediction, labels)["accuracy"] for m in members] == [0.75, 0.75]
    setup = _synthetic_setup(seed=0)
    assert evaluate_ensemble(setup, members, str(tmp_path), {"seeds": [0, 1]})["accuracy"] == 1.0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["test"]["accuracy"] == 1.0 and report["seeds"] == [0, 1] and len(report["members"]) == 2
    assert capsys.readouterr().out.strip().endswith("(mean of 2 members)")
    members[1].test_target = 1 - labels
    with pytest.raises(ValueError, match="different test splits"):
        evaluate_ensemble(setup, members, str(tmp_path), {})


@needs_data
def test_cli_members_train_seeded_models_and_test_their_mean(tmp_path, capsys):
    budget = ["--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--seed", "3"]
    cli.main(["ecg5000", "--out", str(tmp_path / "ensemble"), *TINY_MODEL, *budget, "--members", "2"])
    report = json.loads((tmp_path / "ensemble" / "metrics.json").read_text())
    assert (tmp_path / "ensemble" / "ecg5000.png").stat().st_size > 0
    assert report["seeds"] == [3, 4] and [m["steps"] for m in report["members"]] == [2, 2]
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("(mean of 2 members)")
    # Member 0 is the single run with the same seed, weights and all.
    single = _run_cli("ecg5000", tmp_path / "single", *budget)
    assert single["test"] == report["members"][0]["test"]
    saved = [torch.load(tmp_path / "ensemble" / f"member-{k}" / "best.pt") for k in range(2)]
    for name, value in torch.load(tmp_path / "single" / "best.pt")["model"].items():
        assert torch.equal(saved[0]["model"][name], value), name
    # The ensemble's accuracy, recomputed from the members' checkpoints.
    args = cli.parser().parse_args(["ecg5000", *TINY_MODEL, *budget])
    beats, frames, labels = ecg5000.build(args, {flag: getattr(args, flag) for flag in cli.MODEL_FLAGS}).test.tensors
    probabilities = 0
    for checkpoint in saved:
        model = StepFusionNet(StepFusionConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        with torch.no_grad():
            probabilities = probabilities + model.eval()(beats, frames).double().softmax(dim=-1)
    accuracy = (probabilities.argmax(dim=-1) == labels).double().mean().item()
    assert report["test"]["accuracy"] == pytest.approx(accuracy, abs=1.5 / len(labels))  # a near-tie may flip
    assert any(not torch.equal(value, saved[1]["model"][name]) for name, value in saved[0]["model"].items())
    # --evaluate of the two checkpoints tests the same ensemble.
    evaluated = _evaluate_cli("ecg5000", tmp_path / "evaluation", *(tmp_path / "ensemble" / f"member-{k}" / "best.pt"
                                                                     for k in range(2)))
    assert evaluated["test"] == report["test"] and len(evaluated["members"]) == 2
    with pytest.raises(ValueError, match="--members"):
        cli.main(["ecg5000", "--out", str(tmp_path), *TINY_MODEL, "--members", "0"])


def _evaluate_cli(task, out, *checkpoints_and_flags):
    cli.main([task, "--evaluate", *map(str, checkpoints_and_flags), "--out", str(out), "--no-progress",
              "--threads", "1"])
    assert (out / f"{task}.png").stat().st_size > 0
    return json.loads((out / "metrics.json").read_text())


@needs_data
def test_cli_evaluate_rebuilds_a_checkpoint_from_its_own_flags(tmp_path, capsys):
    """--evaluate with no flags but its own reproduces the run's validation and test metrics: the model, the
    STFT view, the split and its z-scores (seed 2) all come from the checkpoint."""
    trained = _run_cli("ecg5000", tmp_path / "run", "--epochs", "1", "--max-steps", "3", "--batch-size", "8",
                       "--seed", "2", "--n-fft", "16", "--hop", "8", "--dim", "12")
    checkpoint_path = tmp_path / "run" / "best.pt"
    evaluated = _evaluate_cli("ecg5000", tmp_path / "evaluation", checkpoint_path)
    for key in ("test", "validation", "best_step", "setup", "parameters"):
        assert evaluated[key] == trained[key], key
    # --backend is the evaluation's own (default auto: the cpu backend for CPU tensors).
    assert evaluated["config"] == {**trained["config"], "backend": "auto"}
    assert evaluated["checkpoint"] == str(checkpoint_path)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ecg5000 test: accuracy=")

    checkpoint = torch.load(checkpoint_path)
    with pytest.raises(ValueError, match="checkpoint of task 'ecg5000', not 'mitdb'"):
        cli.main(["mitdb", "--evaluate", str(checkpoint_path)])
    torch.save({**checkpoint, "flags": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="does not record the flags"):
        cli.main(["ecg5000", "--evaluate", str(tmp_path / "old.pt")])
    torch.save({**checkpoint, "config": {**checkpoint["config"], "dim": 99}}, tmp_path / "changed.pt")
    with pytest.raises(ValueError, match="different model: dim 99 -> 12"):
        cli.main(["ecg5000", "--evaluate", str(tmp_path / "changed.pt")])


@needs_data
def test_cli_evaluate_takes_the_data_and_eval_stride_of_its_command_line(tmp_path):
    """A forecaster trained on ETTh1 tested on another file (ETTh1 with a daily wave added to every variable),
    on every 50th window where training validated every 100th."""
    trained = _run_cli("ett", tmp_path / "run", "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                       "--eval-stride", "100", "--horizon", "192")
    table = np.genfromtxt(os.path.join(DATA, "ett", "ETTh1.csv"), delimiter=",", dtype=str)
    values = table[1:, 1:].astype(float) + np.sin(np.arange(len(table) - 1) * 2 * np.pi / 24)[:, None]
    other = tmp_path / "waves.csv"
    np.savetxt(other, np.column_stack([table[1:, 0], values]), fmt="%s", delimiter=",",
               header=",".join(table[0]), comments="")
    evaluated = _evaluate_cli("ett", tmp_path / "evaluation", tmp_path / "run" / "best.pt", "--data", other,
                              "--eval-stride", "50")
    assert evaluated["setup"]["data"] == str(other) and evaluated["setup"]["horizon"] == 192
    assert evaluated["setup"]["windows"][0] == trained["setup"]["windows"][0]
    # Validation and test: 2880 rows (4 months) each, started lookback rows early: 2880 - 192 + 1 windows.
    assert evaluated["setup"]["windows"][1:] == [(2689 - 1) // 50 + 1] * 2
    assert evaluated["test"] != trained["test"]


@needs_data
def test_cli_mitdb_end_to_end(tmp_path, capsys):
    report = _run_cli("mitdb", tmp_path, "--epochs", "1", "--max-steps", "2", "--batch-size", "8")
    assert report["setup"]["class_counts"][2] == [447, 6, 0, 0, 0]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("mitdb test: accuracy=")


def test_cli_rejects_an_unknown_task():
    with pytest.raises(SystemExit):
        cli.main(["imagenet"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("task", ["ecg5000", "ssfn-digits", "metafusion-sim"])
def test_cli_device_cuda_without_a_gpu_says_so_before_reading_data(task, tmp_path):
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device is available"):
        cli.main([task, "--device", "cuda", "--data", str(tmp_path / "absent"), "--out", str(tmp_path)])


def test_class_weights_from_training_counts():
    labels = np.array([0] * 8 + [1] * 2 + [3] * 1)  # class 2 absent
    assert common.class_weights(labels, 4, "none") is None
    inverse = common.class_weights(labels, 4, "inverse")
    # 1/n_c scaled so that the mean weight over the 11 samples is 1: each present class then carries 11/3.
    torch.testing.assert_close(inverse, torch.tensor([1 / 8, 1 / 2, 1.0, 1.0]) * 11 / 3)
    root = common.class_weights(labels, 4, "inverse-sqrt")
    expected = torch.tensor([8, 2, 1, 1], dtype=torch.float64).rsqrt()
    expected = expected * 11 / (expected * torch.tensor([8.0, 2, 0, 1], dtype=torch.float64)).sum()
    torch.testing.assert_close(root, expected.float())
    with pytest.raises(ValueError, match="class weighting"):
        common.class_weights(labels, 4, "balanced")
    # The weighted loss is the weighted cross-entropy of the model's logits.
    logits = torch.randn(5, 4)
    batch_labels = torch.tensor([0, 1, 3, 0, 1])
    loss = common.classification_loss_with(inverse)(lambda a, b: logits, (None, None, batch_labels))
    weights = inverse[batch_labels]
    manual = -(weights * torch.log_softmax(logits, -1)[torch.arange(5), batch_labels]).sum() / weights.sum()
    torch.testing.assert_close(loss, manual)


def test_ett_mean_cycle_recovers_a_daily_pattern():
    # Values = a pattern of period 24 plus noise: the mean value per phase follows the pattern.
    generator = np.random.default_rng(0)
    rows, lookback = 24 * 40 + 5, 48
    pattern = np.stack([np.sin(2 * np.pi * np.arange(24) / 24), np.cos(4 * np.pi * np.arange(24) / 24)], 1)
    phase0 = 7  # row 0 at 07:00
    values = (pattern[(phase0 + np.arange(rows)) % 24] + 0.05 * generator.standard_normal((rows, 2))).astype(np.float32)
    calendar = np.zeros((rows, 4), np.float32)
    windows = ett.EttWindows(values, calendar, (0, rows), lookback, 12, cycle_len=24, first_phase=phase0)
    cycle = ett.mean_cycle(windows).numpy()
    assert cycle.shape == (24, 2)
    np.testing.assert_allclose(cycle, pattern, atol=0.05)

