"""Private training of sparse models: DP-SGD with masked per-sample clipping.

* :mod:`.grad_sample` -- per-sample gradients restricted to a mask, clipped on their live norm
  and summed, computed from each layer's input and output gradient (nn.Linear, nn.Conv1d/2d).
* :mod:`.dpsgd` -- :class:`DPSGD` steps (noise on live coordinates only), Poisson sampling,
  :func:`dp_fit` (the training loop of ``sparsetorch train --dp-epsilon``) and
  :func:`check_mask_privacy` (a mask computed from the private data is refused).
* :mod:`.accountant` -- epsilon from (noise multiplier, sample rate, steps) and the noise
  multiplier for a target epsilon, by Opacus's RDP and PRV accountants (``sparsetorch[privacy]``).
"""

from __future__ import annotations

from .accountant import (
    ACCOUNTANTS,
    PrivacyBudget,
    check_privacy_args,
    epsilon,
    noise_multiplier_for,
)
from .dpsgd import (
    DPSGD,
    DPFitResult,
    check_mask_privacy,
    cross_entropy_per_sample,
    dp_fit,
    poisson_batches,
)
from .grad_sample import PerSampleClipper, dp_layers

__all__ = [
    "ACCOUNTANTS",
    "DPFitResult",
    "DPSGD",
    "PerSampleClipper",
    "PrivacyBudget",
    "check_mask_privacy",
    "check_privacy_args",
    "cross_entropy_per_sample",
    "dp_fit",
    "dp_layers",
    "epsilon",
    "noise_multiplier_for",
    "poisson_batches",
]
