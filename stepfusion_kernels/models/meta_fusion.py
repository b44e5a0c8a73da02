"""Meta Fusion (Liang, Qu, Shahbaba, arXiv 2507.20089): a cohort of students, one per combination of the
modalities' representations, trained together with a soft mutual-learning penalty towards the best students.

Read top to bottom as the method runs:
1. representations: each modality has a menu (raw, PCA with k components, a learned encoder), or is dropped;
   `build_cohort` makes one student per combination except all-dropped.
2. `CohortMLP`: every student's encoders and MLP head, with parameters of their own, evaluated for the whole
   cohort in one batched forward (the heads' first layers live in one (S, sum of slot widths, hidden) tensor;
   each group of students sharing a representation adds its term with one batched product, and the rows a
   student does not use stay zero, so each student computes exactly what it would alone).
3. stage 1: `train_cohort` with rho = 0; `select_teachers` clusters the students' validation losses with
   k-means (k by silhouette) and the lowest-loss cluster teaches.
4. stage 2: `train_cohort` again from the same initial weights with loss_i = task_i + rho * penalty_i, the
   penalty being `stepfusion_kernels.nn.CohortMutualLoss`; `fit_meta_fusion` picks rho by the teachers'
   mean validation loss. Each student keeps its best-validation checkpoint.
5. `greedy_ensemble`: the final model, a weighted ensemble of the cohort grown greedily on validation loss.

k-means, the silhouette score and PCA are small and written here in torch (no scikit-learn dependency).
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CohortMutualLoss

RHOS = (0.0, 0.99, 3.0)


# 1. Representations and the cohort -------------------------------------------------------------------------

@dataclass(frozen=True)
class Representation:
    """One entry of a modality's menu: kind "raw", "pca" (`components`) or "encoder" (`widths`: hidden,
    r1, r2, ...; the output is the last width, after its ReLU)."""

    kind: str
    components: int = 0
    widths: tuple = ()

    def __post_init__(self):
        if self.kind not in ("raw", "pca", "encoder"):
            raise ValueError(f"Representation: kind must be raw, pca or encoder, got {self.kind!r}")
        if self.kind == "pca" and self.components < 1:
            raise ValueError(f"Representation: pca needs components >= 1, got {self.components}")
        if self.kind == "encoder" and (len(self.widths) < 2 or min(self.widths) < 1):
            raise ValueError(f"Representation: an encoder needs widths (hidden, r1, ...) >= 1, got {self.widths}")

    def output_width(self, input_width):
        if self.kind == "raw":
            return input_width
        return self.components if self.kind == "pca" else self.widths[-1]

    def __str__(self):
        if self.kind == "pca":
            return f"pca{self.components}"
        if self.kind == "encoder":
            return "enc" + "-".join(map(str, self.widths))
        return "raw"


RAW = Representation("raw")


def pca(components):
    return Representation("pca", components=components)


def encoder(*widths):
    return Representation("encoder", widths=tuple(widths))


def build_cohort(menus):
    """Every combination of one menu entry or None (dropped) per modality, except all dropped, as tuples."""
    if not menus or any(len(menu) == 0 for menu in menus):
        raise ValueError(f"build_cohort: every modality needs a non-empty menu, got {menus}")
    for menu in menus:
        if len(set(menu)) != len(menu):
            raise ValueError(f"build_cohort: a menu lists an entry twice: {menu}")
    combinations = itertools.product(*[tuple(menu) + (None,) for menu in menus])
    return [student for student in combinations if any(entry is not None for entry in student)]


def student_name(student):
    return "+".join("-" if entry is None else str(entry) for entry in student)


def fit_pca(features, components):
    """(mean (p,), components (p, k)) of `features` (n, p): the top-k principal axes, each with its largest
    coordinate made positive so that the basis does not depend on the SVD's sign choice."""
    n, p = features.shape
    if not 1 <= components <= min(n, p):
        raise ValueError(f"fit_pca: components must be in 1..min(n, p) = {min(n, p)}, got {components}")
    mean = features.mean(dim=0)
    _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
    axes = vh[:components].T
    signs = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    return mean, axes * signs


# 2. The cohort as one batched module ------------------------------------------------------------------------

class BatchedMLP(nn.Module):
    """`students` independent MLPs of the same widths: input (N, in) shared or (S, N, in) per student ->
    (S, N, out), ReLU after every layer but the last unless `final_relu`. Initialised as nn.Linear, with
    each student's own first-layer fan-in `fan_in[s]` when its input is zero-padded (the owner then zeroes
    the padded rows)."""

    def __init__(self, students, widths, final_relu=False, fan_in=None):
        super().__init__()
        self.final_relu = final_relu
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            fans = fan_in if layer == 0 and fan_in is not None else [width_in] * students
            weight = torch.empty(students, width_in, width_out)
            bias = torch.empty(students, width_out)
            for student, fan in enumerate(fans):
                bound = 1.0 / math.sqrt(fan)
                weight[student].uniform_(-bound, bound)
                bias[student].uniform_(-bound, bound)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))

    def forward(self, inputs):
        return self.continue_from(torch.matmul(inputs, self.weights[0]) + self.biases[0].unsqueeze(1))

    def continue_from(self, first_layer):
        """The output given the first layer's pre-activation (S, N, width)."""
        hidden = first_layer
        for weight, bias in zip(self.weights[1:], self.biases[1:]):
            hidden = torch.matmul(F.relu(hidden), weight) + bias.unsqueeze(1)
        return F.relu(hidden) if self.final_relu else hidden


class CohortMLP(nn.Module):
    """The students of `build_cohort(menus)` on modalities of widths `input_widths`: forward(list of (N, p_m))
    -> (S, N, out_features). `pca_bases[m]` = (mean, axes (p_m, k_max)) from `fit_pca` for every modality
    whose menu has a PCA entry (a PCA entry with k components uses the first k axes). The head is an MLP
    with hidden widths `head_widths` on the concatenated representations."""

    def __init__(self, menus, input_widths, out_features, head_widths=(64,), pca_bases=None):
        super().__init__()
        if len(menus) != len(input_widths):
            raise ValueError(f"CohortMLP: {len(menus)} menus for {len(input_widths)} modalities")
        self.menus = [tuple(menu) for menu in menus]
        self.students = build_cohort(self.menus)
        self.input_widths = list(input_widths)
        pca_bases = pca_bases or {}
        num_students = len(self.students)
        self.slot_widths = []
        self.encoders = nn.ModuleDict()
        self._groups = []  # per modality: [(entry, key, student indices)]
        for modality, (menu, width) in enumerate(zip(self.menus, self.input_widths)):
            groups = []
            for option, entry in enumerate(menu):
                users = [i for i, student in enumerate(self.students) if student[modality] == entry]
                key = f"m{modality}_o{option}"
                if entry.kind == "encoder":
                    self.encoders[key] = BatchedMLP(len(users), (width,) + entry.widths, final_relu=True)
                if entry.kind == "pca":
                    if modality not in pca_bases or pca_bases[modality][1].shape[1] < entry.components:
                        raise ValueError(f"CohortMLP: modality {modality} needs a PCA basis of at least "
                                         f"{entry.components} axes in pca_bases")
                groups.append((entry, key, users))
                self.register_buffer(f"users_{key}", torch.tensor(users, dtype=torch.long), persistent=False)
            self._groups.append(groups)
            self.slot_widths.append(max(entry.output_width(width) for entry in menu))
            if modality in pca_bases:
                mean, axes = pca_bases[modality]
                self.register_buffer(f"pca_mean_{modality}", mean.detach().clone())
                self.register_buffer(f"pca_axes_{modality}", axes.detach().clone())
        offsets = [0] + list(itertools.accumulate(self.slot_widths))
        self.offsets = offsets
        fan_in = [sum(entry.output_width(w) for entry, w in zip(student, self.input_widths) if entry is not None)
                  for student in self.students]
        self.head = BatchedMLP(num_students, (offsets[-1],) + tuple(head_widths) + (out_features,), fan_in=fan_in)
        # Which head input rows each student uses: the rest are padding and held at zero.
        used = torch.zeros(num_students, offsets[-1], dtype=torch.bool)
        for i, student in enumerate(self.students):
            for modality, entry in enumerate(student):
                if entry is not None:
                    start = offsets[modality]
                    used[i, start:start + entry.output_width(self.input_widths[modality])] = True
        with torch.no_grad():
            self.head.weights[0].mul_(used.unsqueeze(-1))

    @property
    def num_students(self):
        return len(self.students)

    def representation(self, modality, entry, key, features):
        """Per-student (encoder: (S_o, N, width)) or shared (raw, PCA: (N, width)) representation."""
        if entry.kind == "encoder":
            return self.encoders[key](features)
        if entry.kind == "pca":
            mean = getattr(self, f"pca_mean_{modality}")
            axes = getattr(self, f"pca_axes_{modality}")[:, :entry.components]
            features = (features - mean) @ axes
        return features

    def forward(self, inputs):
        if len(inputs) != len(self.menus):
            raise ValueError(f"CohortMLP: expected {len(self.menus)} modalities, got {len(inputs)}")
        weight, bias = self.head.weights[0], self.head.biases[0]
        first_layer = bias.unsqueeze(1).expand(-1, inputs[0].shape[0], -1)
        for modality, groups in enumerate(self._groups):
            start = self.offsets[modality]
            for entry, key, users in groups:
                if not users:
                    continue
                index = getattr(self, f"users_{key}")
                features = self.representation(modality, entry, key, inputs[modality])
                rows = weight[index, start:start + features.shape[-1]]
                # A shared representation meets every student's rows in one product, never copied per student.
                term = (torch.bmm(features, rows) if features.dim() == 3
                        else torch.einsum("nd,sdh->snh", features, rows))
                first_layer = first_layer.index_add(0, index, term)
        return self.head.continue_from(first_layer)

    def parameter_students(self):
        """{parameter name: the students (LongTensor) its rows along dim 0 belong to}, for per-student
        checkpoints."""
        owners = {}
        everyone = torch.arange(self.num_students)
        for name, _ in self.named_parameters():
            if name.startswith("head."):
                owners[name] = everyone
            else:
                key = name.split(".")[1]
                groups = self._groups[int(key[1:key.index("_")])]
                users = next(users for _, group_key, users in groups if group_key == key)
                owners[name] = torch.tensor(users, dtype=torch.long)
        return owners


# 3-4. Training with and without mutual learning --------------------------------------------------------------

def student_losses(outputs, targets, task):
    """Every student's mean task loss (S,): cross entropy on logits (classification) or MSE (regression)."""
    students, batch, classes = outputs.shape
    if task == "classification":
        losses = F.cross_entropy(outputs.reshape(students * batch, classes), targets.repeat(students),
                                 reduction="none")
        return losses.view(students, batch).mean(dim=1)
    return ((outputs[..., 0] - targets) ** 2).mean(dim=1)


def cohort_objective(outputs, targets, task, rho, teacher_weights, penalty):
    """The sum over students of task_i + rho * penalty_i: the students' parameters are disjoint, so the sum
    trains each on its own loss."""
    losses = student_losses(outputs, targets, task)
    if rho > 0:
        losses = losses + rho * penalty(outputs, teacher_weights.to(outputs.dtype))
    return losses.sum()


@torch.no_grad()
def predict(cohort, inputs, batch_size=1024):
    cohort.eval()
    count = inputs[0].shape[0]
    outputs = [cohort([x[start:start + batch_size] for x in inputs]) for start in range(0, count, batch_size)]
    return torch.cat(outputs, dim=1)


def train_cohort(cohort, train, val, task, rho=0.0, teacher_weights=None, kind=None, epochs=20, max_steps=None,
                 batch_size=64, lr=1e-3, backend="auto", seed=0, progress=None):
    """Train every student of `cohort` together (Adam, one batched forward per step) on train = (inputs,
    targets), keeping each student's best-validation parameters; returns the students' best validation
    losses (S,). rho > 0 adds rho * CohortMutualLoss(kind)(outputs, teacher_weights) to each student."""
    inputs, targets = train
    val_inputs, val_targets = val
    penalty = CohortMutualLoss(kind or ("kl" if task == "classification" else "mse"), backend=backend)
    if rho > 0 and teacher_weights is None:
        raise ValueError("train_cohort: rho > 0 needs teacher_weights")
    owners = cohort.parameter_students()
    parameters = dict(cohort.named_parameters())
    best_state = {name: p.detach().clone() for name, p in parameters.items()}
    best_val = torch.full((cohort.num_students,), math.inf, dtype=torch.float64)
    optimizer = torch.optim.Adam(cohort.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    count = targets.shape[0]
    steps = 0
    for _ in range(epochs):
        cohort.train()
        order = torch.randperm(count, generator=generator).to(targets.device)
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            outputs = cohort([x[index] for x in inputs])
            loss = cohort_objective(outputs, targets[index], task, rho, teacher_weights, penalty)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if progress is not None:
                progress.update(1)
            if max_steps is not None and steps >= max_steps:
                break
        val_losses = student_losses(predict(cohort, val_inputs), val_targets, task).double().cpu()
        improved = val_losses < best_val
        best_val = torch.where(improved, val_losses, best_val)
        with torch.no_grad():
            for name, parameter in parameters.items():
                rows = improved[owners[name]].to(parameter.device)
                best_state[name][rows] = parameter[rows]
        if max_steps is not None and steps >= max_steps:
            break
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(best_state[name])
    return best_val


def kmeans(points, clusters, generator, restarts=10, iterations=100):
    """Lloyd's k-means with k-means++ seeding on points (S, d): the labels (S,) of the lowest-inertia restart."""
    best_labels, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = points[torch.randint(len(points), (1,), generator=generator)]
        while len(centres) < clusters:
            distance = torch.cdist(points, centres).min(dim=1).values ** 2
            if distance.sum() <= 0:
                break
            centres = torch.cat([centres, points[torch.multinomial(distance, 1, generator=generator)]])
        labels = None
        for _ in range(iterations):
            new_labels = torch.cdist(points, centres).argmin(dim=1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            centres = torch.stack([points[labels == c].mean(dim=0) if (labels == c).any() else centres[c]
                                   for c in range(len(centres))])
        inertia = ((points - centres[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def silhouette_score(points, labels):
    """Mean silhouette (b - a) / max(a, b) over points (S, d); a point alone in its cluster scores 0."""
    distance = torch.cdist(points, points)
    clusters = labels.unique()
    scores = torch.zeros(len(points), dtype=points.dtype)
    for i in range(len(points)):
        own = labels == labels[i]
        if own.sum() == 1:
            continue
        a = distance[i, own].sum() / (own.sum() - 1)
        b = min(distance[i, labels == c].mean() for c in clusters if c != labels[i])
        scores[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return scores.mean().item()


def select_teachers(val_losses, max_clusters=10, seed=0):
    """Teacher weights (S,) float64: k-means on the validation losses with k in 2..min(max_clusters, S - 1)
    chosen by silhouette; the cluster of the lowest mean loss teaches, each member with weight 1/|T|. With
    fewer than 3 students, or fewer than 2 distinct losses, the best student teaches alone (ties: all)."""
    losses = torch.as_tensor(val_losses, dtype=torch.float64).flatten()
    if not torch.isfinite(losses).all():
        raise ValueError(f"select_teachers: validation losses must be finite, got {losses.tolist()}")
    points = losses.unsqueeze(1)
    distinct = len(losses.unique())
    teachers = losses == losses.min()
    candidates = range(2, min(max_clusters, len(losses) - 1, distinct) + 1)
    generator = torch.Generator().manual_seed(seed)
    best_score = -math.inf
    for clusters in candidates:
        labels = kmeans(points, clusters, generator)
        if len(labels.unique()) < 2:
            continue
        score = silhouette_score(points, labels)
        if score > best_score:
            best_score = score
            teachers = labels == labels[losses.argmin()]
    return teachers.double() / teachers.sum()


def fit_meta_fusion(make_cohort, train, val, task, rhos=RHOS, seed=0, progress=None, **training):
    """Both stages. make_cohort() builds the cohort (seeded by the caller); every rho starts from the same
    initial weights and batch order. Returns {"cohorts": {rho: trained cohort}, "val_losses": {rho: (S,)},
    "teacher_weights": (S,), "teacher_loss": {rho: teachers' mean validation loss}, "rho": the chosen one,
    of the lowest teacher loss (ties within a relative 1e-6 go to the smallest rho)}."""
    if 0.0 not in rhos:
        raise ValueError(f"fit_meta_fusion: rhos must include 0 (stage 1), got {rhos}")
    initial = make_cohort()
    initial_state = {k: v.clone() for k, v in initial.state_dict().items()}
    cohorts, val_losses = {}, {}
    cohorts[0.0] = initial
    val_losses[0.0] = train_cohort(initial, train, val, task, rho=0.0, seed=seed, progress=progress, **training)
    teacher_weights = select_teachers(val_losses[0.0], seed=seed)
    device = train[1].device
    for rho in rhos:
        if rho == 0.0:
            continue
        cohort = make_cohort()
        cohort.load_state_dict(initial_state)
        val_losses[rho] = train_cohort(cohort, train, val, task, rho=rho, teacher_weights=teacher_weights.to(device),
                                       seed=seed, progress=progress, **training)
        cohorts[rho] = cohort
    teachers = teacher_weights > 0
    teacher_loss = {rho: losses[teachers].mean().item() for rho, losses in val_losses.items()}
    # A lone teacher's penalty is zero, so its loss is the same for every rho up to rounding: count losses
    # within a relative 1e-6 of the lowest as ties, and let the smallest rho win them.
    lowest = min(teacher_loss.values())
    chosen = min(rho for rho, loss in teacher_loss.items() if loss <= lowest + 1e-6 * abs(lowest))
    return {"cohorts": cohorts, "val_losses": val_losses, "teacher_weights": teacher_weights,
            "teacher_loss": teacher_loss, "rho": chosen}


# 5. The final model: greedy ensemble selection ---------------------------------------------------------------

def combine(outputs, members, weights, task):
    """The ensemble's prediction from outputs (S, N, C): the weighted mean of the members' class
    probabilities (classification) or predictions (regression)."""
    weights = torch.as_tensor(weights, dtype=outputs.dtype, device=outputs.device).view(-1, 1, 1)
    chosen = outputs[list(members)]
    if task == "classification":
        chosen = chosen.softmax(dim=-1)
    return (weights * chosen).sum(dim=0) / weights.sum()


def ensemble_loss(prediction, targets, task):
    """NLL of combined class probabilities (classification) or MSE of combined predictions (regression)."""
    if task == "classification":
        return F.nll_loss(prediction.clamp_min(1e-12).log(), targets).item()
    return ((prediction[:, 0] - targets) ** 2).mean().item()


def greedy_ensemble(val_losses, loss_of, drop_fraction=0.2, initial=3, max_size=30):
    """(members, weights): drop the worst `drop_fraction` of the students by validation loss, start from the
    best `initial`, then repeatedly add the remaining student that lowers loss_of(members, weights) most, while
    it lowers it, up to `max_size` members. Weights are proportional to 1 / validation loss."""
    losses = torch.as_tensor(val_losses, dtype=torch.float64).flatten()
    keep = max(1, len(losses) - int(math.floor(drop_fraction * len(losses))))
    ranked = torch.argsort(losses, stable=True)[:keep].tolist()

    def weights_of(members):
        inverse = 1.0 / losses[members].clamp_min(1e-12)
        return (inverse / inverse.sum()).tolist()

    members = ranked[:min(initial, max_size)]
    candidates = ranked[len(members):]
    current = loss_of(members, weights_of(members))
    while candidates and len(members) < max_size:
        trials = [loss_of(members + [c], weights_of(members + [c])) for c in candidates]
        best = min(range(len(trials)), key=trials.__getitem__)
        if not trials[best] < current:
            break
        current = trials[best]
        members.append(candidates.pop(best))
    return members, weights_of(members)
