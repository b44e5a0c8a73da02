from torch import nn

from ..ops.cohort_mutual_loss import KINDS, cohort_mutual_loss


class CohortMutualLoss(nn.Module):
    """Meta Fusion's mutual-learning penalty as a loss module: forward(outputs (S, N, C), teacher_weights (S,))
    returns every student's penalty (S,) (see `stepfusion_kernels.cohort_mutual_loss`). kind="kl" for logits,
    "mse" for predictions. No parameters: the teacher weights come with each call, as the cohort's ranking
    changes during training."""

    def __init__(self, kind="kl", backend="auto"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"CohortMutualLoss: kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.backend = backend

    def forward(self, outputs, teacher_weights):
        return cohort_mutual_loss(outputs, teacher_weights, kind=self.kind, backend=self.backend)

    def extra_repr(self):
        return f"kind={self.kind!r}, backend={self.backend!r}"
