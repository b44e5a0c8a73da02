"""Models built only from the package's public ops and modules."""

from .ssfn import SSFN, HuggingFaceLayerStack, LayerStackEncoder, SkewPairFusionBlock
from .step_fusion import StepFusionConfig, StepFusionNet

__all__ = ["HuggingFaceLayerStack", "LayerStackEncoder", "SSFN", "SkewPairFusionBlock", "StepFusionConfig",
           "StepFusionNet"]
