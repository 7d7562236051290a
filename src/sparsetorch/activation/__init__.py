"""Activation sparsity for decoding: per-layer thresholds (TEAL, WINA) that zero the small entries
of every linear layer's input. See :mod:`.thresholds`."""

from .thresholds import (
    CRITERIA,
    ActivationThresholds,
    ThresholdHandle,
    apply_thresholds,
    calibrate_thresholds,
    default_targets,
    quantile_from_histogram,
    sparsify_activations,
)

__all__ = ["CRITERIA", "ActivationThresholds", "ThresholdHandle", "apply_thresholds", "calibrate_thresholds",
           "default_targets", "quantile_from_histogram", "sparsify_activations"]
