"""Models built only from the package's public ops and modules."""

from .step_fusion import StepFusionConfig, StepFusionNet

__all__ = ["StepFusionConfig", "StepFusionNet"]
