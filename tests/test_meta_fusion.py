"""Meta Fusion: the cohort's composition and batched forward, per-student checkpoints, teacher selection,
the mutual-learning objective against its O(S^2) definition, greedy ensemble selection, and every task end
to end on a tiny budget."""

import json
import math
import os

import pytest
import torch

from stepfusion_kernels.data import data_root
from stepfusion_kernels.models import meta_fusion as mf
from stepfusion_kernels.nn import CohortMutualLoss
from stepfusion_kernels.tasks import meta_fusion as tasks
from harness import host_backends

needs_data = pytest.mark.skipif(not os.path.isdir(data_root()), reason="shared data directory is absent")


def test_cohort_holds_every_combination_but_all_dropped():
    menus = [(mf.RAW, mf.pca(3), mf.encoder(8, 4)), (mf.RAW, mf.pca(2)), (mf.RAW,)]
    cohort = mf.build_cohort(menus)
    assert len(cohort) == 4 * 3 * 2 - 1
    assert len(set(cohort)) == len(cohort)
    assert (None, None, None) not in cohort
    assert (mf.RAW, mf.RAW, mf.RAW) in cohort  # early fusion
    assert {s for s in cohort if sum(e is not None for e in s) == 1} == {
        (mf.RAW, None, None), (mf.pca(3), None, None), (mf.encoder(8, 4), None, None),
        (None, mf.RAW, None), (None, mf.pca(2), None), (None, None, mf.RAW)}
    assert len(mf.build_cohort([(mf.RAW,)] * 6)) == 63  # mfeat: 6 views, raw or dropped
    assert mf.student_name((mf.pca(3), None, mf.encoder(8, 4))) == "pca3+-+enc8-4"
    with pytest.raises(ValueError, match="non-empty menu"):
        mf.build_cohort([(mf.RAW,), ()])


def _small_cohort(seed=0):
    torch.manual_seed(seed)
    first, second = torch.randn(40, 7), torch.randn(40, 5)
    menus = [(mf.RAW, mf.pca(3), mf.encoder(6, 4)), (mf.RAW, mf.encoder(5, 3, 2))]
    cohort = mf.CohortMLP(menus, [7, 5], 3, head_widths=(8,), pca_bases={0: mf.fit_pca(first, 3)})
    return cohort, [first, second]


def _alone(cohort, inputs, student):
    """Student `student` computed by itself from its own slices of the cohort's parameters."""
    owners = cohort.parameter_students()
    params = dict(cohort.named_parameters())
    pieces = []
    for modality, entry in enumerate(cohort.students[student]):
        features = inputs[modality]
        if entry is None:
            continue
        if entry.kind == "pca":
            features = (features - cohort.pca_mean_0) @ cohort.pca_axes_0[:, :entry.components]
        if entry.kind == "encoder":
            key = f"m{modality}_o{cohort.menus[modality].index(entry)}"
            row = owners[f"encoders.{key}.weights.0"].tolist().index(student)
            for layer in range(len(entry.widths)):
                weight = params[f"encoders.{key}.weights.{layer}"][row]
                bias = params[f"encoders.{key}.biases.{layer}"][row]
                features = torch.relu(features @ weight + bias)
        pieces.append(features)
    hidden = torch.cat(pieces, dim=1)
    used = (params["head.weights.0"][student].abs().sum(dim=1) > 0)
    hidden = torch.relu(hidden @ params["head.weights.0"][student][used] + params["head.biases.0"][student])
    return hidden @ params["head.weights.1"][student] + params["head.biases.1"][student]


def test_batched_cohort_equals_each_student_alone():
    cohort, inputs = _small_cohort()
    outputs = cohort(inputs)
    assert outputs.shape == (cohort.num_students, 40, 3) == (4 * 3 - 1, 40, 3)
    for student in range(cohort.num_students):
        torch.testing.assert_close(outputs[student], _alone(cohort, inputs, student), rtol=1e-5, atol=1e-5)


def test_padding_stays_zero_and_each_student_keeps_its_best_validation_checkpoint():
    cohort, inputs = _small_cohort(seed=1)
    labels = (inputs[0][:, 0] > 0).long() + (inputs[1][:, 1] > 0).long()
    train = ([x[:30] for x in inputs], labels[:30])
    val = ([x[30:] for x in inputs], labels[30:])
    padding = cohort.head.weights[0].detach() == 0
    best = mf.train_cohort(cohort, train, val, "classification", epochs=6, batch_size=8, lr=3e-2, seed=0)
    assert (cohort.head.weights[0].detach()[padding] == 0).all()
    restored = mf.student_losses(mf.predict(cohort, val[0]), val[1], "classification").double()
    torch.testing.assert_close(restored, best, rtol=1e-5, atol=1e-6)
    for student in range(cohort.num_students):
        torch.testing.assert_close(cohort(inputs)[student].detach(), _alone(cohort, inputs, student).detach(),
                                   rtol=1e-5, atol=1e-5)


def _literal_objective(outputs, targets, task, rho, weights):
    """sum_i [task_i + rho * (1/W) sum_j w_j D(teacher j || student i)], one (i, j) pair at a time."""
    total = 0.0
    for i in range(outputs.shape[0]):
        if task == "classification":
            task_loss = torch.nn.functional.cross_entropy(outputs[i], targets)
        else:
            task_loss = ((outputs[i, :, 0] - targets) ** 2).mean()
        penalty = 0.0
        for j in range(outputs.shape[0]):
            teacher = outputs[j].detach()
            if task == "classification":
                p = teacher.softmax(-1)
                divergence = (p * (p.log() - outputs[i].log_softmax(-1))).sum(-1).mean()
            else:
                divergence = ((teacher - outputs[i]) ** 2).mean()
            penalty = penalty + weights[j] * divergence
        total = total + task_loss + rho * penalty / weights.sum()
    return total


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_mutual_learning_objective_equals_the_pairwise_definition(task, backend):
    if backend not in host_backends(backend):
        pytest.skip(f"backend {backend} does not take CPU tensors here")
    # The Triton kernels take fp32 at most (SPEC); the others are checked in fp64.
    dtype, tolerance = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, 1e-9)
    torch.manual_seed(3)
    students, batch, classes = 6, 9, 4 if task == "classification" else 1
    outputs = torch.randn(students, batch, classes, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, classes, (batch,)) if task == "classification" else torch.randn(batch, dtype=dtype)
    weights = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.0], dtype=dtype)
    penalty = CohortMutualLoss("kl" if task == "classification" else "mse", backend=backend)
    loss = mf.cohort_objective(outputs, targets, task, 0.99, weights, penalty)
    expected = _literal_objective(outputs.double(), targets if task == "classification" else targets.double(),
                                  task, 0.99, weights.double())
    torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=tolerance)
    (grad,) = torch.autograd.grad(loss, outputs)
    (expected_grad,) = torch.autograd.grad(expected, outputs)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=tolerance, atol=tolerance)


def test_teachers_are_the_lowest_loss_cluster_with_equal_weights():
    losses = [0.50, 0.11, 0.90, 0.10, 0.52, 0.12, 0.93, 0.51, 0.95]
    weights = mf.select_teachers(losses)
    assert weights.tolist() == pytest.approx([0, 1 / 3, 0, 1 / 3, 0, 1 / 3, 0, 0, 0])
    # Two clear groups: the silhouette prefers k = 2 over splitting the upper group.
    weights = mf.select_teachers([0.2, 0.21, 0.22, 0.8, 0.85, 0.9, 0.95])
    assert (weights > 0).tolist() == [True, True, True, False, False, False, False]
    assert mf.select_teachers([0.4, 0.3]).tolist() == [0.0, 1.0]  # too few students to cluster
    assert mf.select_teachers([0.3, 0.3, 0.3, 0.3]).tolist() == [0.25] * 4  # one distinct loss: all tie
    with pytest.raises(ValueError, match="finite"):
        mf.select_teachers([0.1, float("nan"), 0.2])


def test_silhouette_matches_a_hand_computed_value():
    points = torch.tensor([[0.0], [1.0], [5.0], [6.0], [7.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1])
    # point 0: a = 1, b = 6 -> 5/6; point 1: a = 1, b = 5 -> 4/5; point 2: a = 1.5, b = 4.5 -> 2/3;
    # point 3: a = 1, b = 5.5 -> 9/11; point 4: a = 1.5, b = 6.5 -> 10/13.
    expected = (5 / 6 + 4 / 5 + 2 / 3 + 9 / 11 + 10 / 13) / 5
    assert mf.silhouette_score(points, labels) == pytest.approx(expected)


def test_greedy_ensemble_drops_the_worst_starts_from_the_best_three_and_stops_when_no_gain():
    # Ten students ranked by their index; the hand-made ensemble loss rewards students 5 and 7, penalises the
    # rest, and would reward student 9 too, but 9 is in the worst 20% and never considered.
    val_losses = [0.10 + 0.01 * i for i in range(10)]
    calls = []

    def loss_of(members, weights):
        calls.append(list(members))
        assert sum(weights) == pytest.approx(1.0)
        inverse = [1 / val_losses[m] for m in members]
        assert weights == pytest.approx([v / sum(inverse) for v in inverse])
        reward = {5: 0.2, 7: 0.3, 9: 0.5}
        return 1.0 - sum(reward.get(m, -0.01) for m in members)

    members, weights = mf.greedy_ensemble(val_losses, loss_of)
    assert calls[0] == [0, 1, 2]
    assert members == [0, 1, 2, 7, 5]
    assert all(9 not in call and 8 not in call for call in calls)
    assert weights[0] > weights[-1]
    members, _ = mf.greedy_ensemble(val_losses, lambda m, w: -len(m), max_size=5)
    assert members == [0, 1, 2, 3, 4]
    members, weights = mf.greedy_ensemble([0.3], lambda m, w: 0.0)
    assert members == [0] and weights == [1.0]


def test_fit_meta_fusion_trains_every_rho_from_the_same_start_and_picks_by_teacher_loss():
    cohort, inputs = _small_cohort(seed=2)
    labels = (inputs[0][:, 0] > 0).long()
    state = {k: v.clone() for k, v in cohort.state_dict().items()}

    def make():
        fresh, _ = _small_cohort(seed=2)
        fresh.load_state_dict(state)
        return fresh

    fitted = mf.fit_meta_fusion(make, ([x[:30] for x in inputs], labels[:30]), ([x[30:] for x in inputs], labels[30:]),
                                "classification", epochs=2, batch_size=10)
    assert set(fitted["cohorts"]) == set(mf.RHOS)
    teachers = fitted["teacher_weights"] > 0
    for rho, losses in fitted["val_losses"].items():
        assert fitted["teacher_loss"][rho] == pytest.approx(losses[teachers].mean().item())
    lowest = min(fitted["teacher_loss"].values())
    assert fitted["teacher_loss"][fitted["rho"]] <= lowest * (1 + 1e-6)
    assert all(rho >= fitted["rho"] or loss > lowest * (1 + 1e-6) for rho, loss in fitted["teacher_loss"].items())


def test_fit_pca_axes_are_orthonormal_and_sign_fixed():
    torch.manual_seed(4)
    features = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    mean, axes = mf.fit_pca(features, 3)
    torch.testing.assert_close(axes.T @ axes, torch.eye(3, dtype=torch.float64))
    _, again = mf.fit_pca(-features, 3)
    torch.testing.assert_close(again, axes)
    with pytest.raises(ValueError, match="components"):
        mf.fit_pca(features, 7)


def test_roc_auc_counts_ties_as_one_half():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    labels = torch.tensor([1, 1, 0, 0])
    assert tasks.roc_auc(scores, labels) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def _tiny(task, tmp_path, *extra):
    report = tasks.main([task, "--epochs", "1", "--max-steps", "1", "--repeats", "2", "--out", str(tmp_path),
                         "--threads", "2", *extra])
    with open(tmp_path / "metrics.json") as handle:
        saved = json.load(handle)
    assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "table.md").read_text().startswith("**")
    for result in saved["results"].values():
        assert len(result["repeats"]) == 2
        for method, metrics in result["summary"].items():
            for values in metrics.values():
                assert all(math.isfinite(v) for v in values["values"]), method
        assert {"Meta Fusion", "early fusion", "late fusion", "simple average"} <= set(result["summary"])
    return report


def test_sim_task_end_to_end(tmp_path):
    report = _tiny("metafusion-sim", tmp_path, "--samples", "100", "--feature-scale", "0.02")
    assert list(report["results"]) == [f"setting {s}" for s in tasks.SIM_SETTINGS]
    assert "mse" in report["results"]["setting 1.1"]["summary"]["Meta Fusion"]


def test_simulation_shapes_and_noise_ratio():
    spec = tasks.SIM_SETTINGS["2.2"]
    features, y = tasks.simulate(spec, (300, 40), 2000, seed=0)
    assert [f.shape for f in features] == [(2000, 300), (2000, 40)] and y.shape == (2000,)
    # Each feature is sqrt(1 - eta) * unit-variance signal + sqrt(eta) * unit noise: variance close to 1.
    assert features[0].var(dim=0).mean().item() == pytest.approx(1.0, abs=0.05)
    again, _ = tasks.simulate(spec, (300, 40), 2000, seed=0)
    torch.testing.assert_close(again[1], features[1])


@needs_data
@pytest.mark.parametrize("task", ["metafusion-alzheimer", "metafusion-meg", "metafusion-mfeat"])
def test_real_data_task_end_to_end(task, tmp_path):
    report = _tiny(task, tmp_path)
    summary = next(iter(report["results"].values()))["summary"]
    assert 0 <= summary["Meta Fusion"]["accuracy"]["mean"] <= 1
    if task == "metafusion-alzheimer":
        assert {"unimodal demographics", "unimodal csf", "unimodal proteins"} <= set(summary)
        assert "auc" in summary["Meta Fusion"]


def test_stepfusion_train_hosts_the_meta_fusion_tasks():
    from stepfusion_kernels import train

    for task in tasks.TASKS:
        args = train.parser().parse_args([task, "--repeats", "2", "--epochs", "1"])
        assert (args.task, args.repeats, args.epochs) == (task, 2, 1)
