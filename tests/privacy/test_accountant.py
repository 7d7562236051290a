"""The accountant reproduces Opacus's own numbers; noise calibration inverts it; bad input."""

from __future__ import annotations

import pytest

from sparsetorch.errors import PrivacyError
from sparsetorch.privacy import PrivacyBudget, epsilon, noise_multiplier_for

pytest.importorskip("opacus")

# (q, sigma, steps, RDP eps, PRV eps) at delta 1e-5: run with opacus 1.6.0's accountants
# (../shared/ALGORITHMS-AFTER-PRUNING.md §5)
ORACLE = [
    (256 / 60000, 1.1, 14062, 2.597, 2.392),
    (0.01, 1.0, 1000, 2.101, 1.838),
    (0.004, 0.8, 10000, 3.940, 3.545),
    (256 / 60000, 1.0, 3515, 1.560, None),
    (1.0, 1.0, 1, 4.729, None),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "rdp", "prv"), ORACLE)
def test_epsilon_matches_opacus_reference_numbers_within_1_percent(q, sigma, steps, rdp, prv):
    assert epsilon(sigma, q, steps, 1e-5, "rdp") == pytest.approx(rdp, rel=0.01)
    if prv is not None:
        assert epsilon(sigma, q, steps, 1e-5, "prv") == pytest.approx(prv, rel=0.01)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_for_a_target_meets_it_and_is_nearly_tight(accountant):
    q, steps = 512 / 60000, 300
    sigma = noise_multiplier_for(3.0, 1e-5, q, steps, accountant)
    eps = epsilon(sigma, q, steps, 1e-5, accountant)
    assert eps <= 3.0 and eps >= 2.9  # opacus bisects to epsilon_tolerance 0.01
    assert epsilon(sigma * 0.9, q, steps, 1e-5, accountant) > 3.0  # less noise spends more
    b = PrivacyBudget.for_target(3.0, 1e-5, q, steps, accountant)
    assert b.noise_multiplier == sigma and b.epsilon == pytest.approx(eps)


def test_more_steps_or_a_larger_sample_rate_spend_more():
    base = epsilon(1.0, 0.01, 100, 1e-5, "rdp")
    assert epsilon(1.0, 0.01, 200, 1e-5, "rdp") > base
    assert epsilon(1.0, 0.02, 100, 1e-5, "rdp") > base
    assert epsilon(1.0, 0.01, 100, 1e-6, "rdp") > base


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "epsilon must be a positive"),
        ({"target_epsilon": -1.0}, "epsilon must be a positive"),
        ({"target_epsilon": float("nan")}, "epsilon must be a positive"),
        ({"delta": 1.0}, "delta must lie in"),
        ({"delta": 0.0}, "delta must lie in"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"sample_rate": 1.5}, "sample rate"),
        ({"steps": 0}, "steps must be a positive"),
        ({"accountant": "gdp"}, "unknown accountant"),
    ],
)
def test_bad_input_is_a_typed_error(kwargs, match):
    args = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 10, "accountant": "rdp"}
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=match):
        noise_multiplier_for(**args)


def test_an_unreachable_target_says_what_to_change():
    with pytest.raises(PrivacyError, match="raise epsilon or delta"):
        noise_multiplier_for(1e-4, 1e-5, 1.0, 100, "rdp")
