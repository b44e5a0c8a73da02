"""Reference of `cohort_mutual_loss` (SPEC section 4), computed in at least float32.

Literal to the definition, O(S^2 N C): every (student i, teacher j) pair is its own term. The teacher side
reads `outputs.detach()` and the weights are detached, so gradient reaches outputs[i] only through student
i's own term and none reaches teacher_weights."""

import torch


def cohort_mutual_loss(outputs, teacher_weights, kind="kl"):
    compute_dtype = torch.promote_types(outputs.dtype, torch.float32)
    students = outputs.to(compute_dtype)
    weights = teacher_weights.detach().to(compute_dtype)
    # A student of weight 0 does not teach: its outputs are replaced by zeros on the teacher side, so that a
    # NaN or Inf there is not multiplied by 0 into every penalty (nor into their gradients).
    teachers = torch.where(weights[:, None, None] > 0, students.detach(), 0.0)
    num_students, batch, classes = outputs.shape
    total_weight = weights.sum()
    terms = []
    for i in range(num_students):
        penalty = students.new_zeros(())
        for j in range(num_students):
            if kind == "kl":
                log_p_teacher = torch.log_softmax(teachers[j], dim=-1)
                log_p_student = torch.log_softmax(students[i], dim=-1)
                divergence = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()
            else:
                divergence = ((teachers[j] - students[i]) ** 2).sum()
            penalty = penalty + weights[j] * divergence
        # An empty batch adds no penalty (the mean over zero samples would be 0 / 0).
        normaliser = batch * total_weight * (classes if kind == "mse" else 1)
        terms.append(penalty / normaliser if batch > 0 else penalty)
    if not terms:
        return outputs.sum(dim=(1, 2))  # S = 0: the empty (0,) penalty, still part of the autograd graph
    return torch.stack(terms).to(outputs.dtype)
