"""Privacy accounting for DP-SGD with Poisson sampling: epsilon from (sigma, q, steps) and the
noise multiplier that meets a target epsilon.

The numbers come from Opacus's accountants (``opacus.accountants``: RDP with its default order
grid, and PRV, which Opacus's ``PrivacyEngine`` uses by default and which is tighter). Only the
accountants are used; sparsetorch computes the per-sample gradients itself. The accountant sees
the same (sigma, q, steps) for a sparse model as for a dense one: masking gradients before
clipping and adding noise only on live coordinates does not change the privacy analysis, because
a fixed mask that does not depend on the private data is part of the model definition.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from ..errors import PrivacyError, require

ACCOUNTANTS = ("prv", "rdp")


def check_privacy_args(
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    clip: float | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    steps: int | None = None,
    accountant: str | None = None,
) -> None:
    """Raise :class:`PrivacyError` for any argument outside its valid range (only those given)."""

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if epsilon is not None and not (finite(epsilon) and epsilon > 0):
        raise PrivacyError(f"epsilon must be a positive number (e.g. 3), got {epsilon!r}.")
    if delta is not None and not (finite(delta) and 0 < delta < 1):
        raise PrivacyError(f"delta must lie in (0, 1), usually below 1/N for N training examples "
                           f"(e.g. 1e-5), got {delta!r}.")
    if clip is not None and not (finite(clip) and clip > 0):
        raise PrivacyError(f"the clipping norm must be a positive number (e.g. 1.0), got {clip!r}.")
    if noise_multiplier is not None and not (finite(noise_multiplier) and noise_multiplier > 0):
        raise PrivacyError(f"the noise multiplier must be a positive number, got {noise_multiplier!r}.")
    if sample_rate is not None and not (finite(sample_rate) and 0 < sample_rate <= 1):
        raise PrivacyError(f"the sample rate must lie in (0, 1] (expected batch size / training "
                           f"examples), got {sample_rate!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise PrivacyError(f"steps must be a positive integer, got {steps!r}.")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; available: {', '.join(ACCOUNTANTS)}.")


def _accountant(name: str):  # noqa: ANN202 - an opacus accountant class
    require("opacus", "privacy")
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "prv") -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps with Poisson sampling at ``sample_rate``
    and Gaussian noise of standard deviation ``noise_multiplier * clip``.

    ``"prv"`` returns Opacus's upper bound (eps_error 0.01); ``"rdp"`` the RDP bound over Opacus's
    default orders.
    """
    check_privacy_args(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                       delta=delta, accountant=accountant)
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():  # RDP warns when the best order is the grid's largest
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "prv", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose epsilon after ``steps``
    steps at ``sample_rate`` is at most ``target_epsilon`` (Opacus's bisection)."""
    check_privacy_args(epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                       accountant=accountant)
    require("opacus", "privacy")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps,
                                              accountant=accountant, epsilon_tolerance=tolerance))
        except ValueError as exc:  # opacus: "The target privacy budget is too low."
            raise PrivacyError(
                f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} with sample "
                f"rate {sample_rate:.3g} over {steps} steps ({exc}); raise epsilon or delta, or train "
                "fewer steps / with a smaller sample rate."
            ) from None


@dataclass(frozen=True)
class PrivacyBudget:
    """What a DP-SGD run spends: the accountant's inputs and its epsilon at ``delta``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str = "prv"

    @property
    def epsilon(self) -> float:
        """Epsilon of this run (computed by the accountant each time it is read)."""
        return epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant)

    @classmethod
    def for_target(cls, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                   accountant: str = "prv") -> PrivacyBudget:
        """The budget whose noise multiplier is calibrated to ``target_epsilon``."""
        sigma = noise_multiplier_for(target_epsilon, delta, sample_rate, steps, accountant)
        return cls(sigma, sample_rate, steps, delta, accountant)
