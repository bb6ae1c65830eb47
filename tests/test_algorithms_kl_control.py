"""KL-coefficient controllers (Ziegler et al. 2019; survey 3.2, 3.14)."""

import pytest

from algorithms import AdaptiveKLController, FixedKLController


def test_fixed_controller_is_constant_and_round_trips():
    ctl = FixedKLController(0.05)
    for kl, steps in [(100.0, 512), (0.0, 1), (3.0, 10_000)]:
        ctl.update(kl, steps)
        assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_hand_computed_sequence():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=256)  # 9/6 − 1 = 0.5 → clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # 0.100512
    ctl.update(current_kl=5.4, n_steps=100)  # 5.4/6 − 1 = −0.1, inside the clip
    assert ctl.value == pytest.approx(0.100512 * (1 - 0.1 * 100 / 10_000))  # 0.100411488
    ctl.update(current_kl=0.0, n_steps=1000)  # −1 → clipped to −0.2
    assert ctl.value == pytest.approx(0.100411488 * (1 - 0.2 * 1000 / 10_000))  # 0.0983...
    ctl.update(current_kl=6.0, n_steps=5000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.100411488 * 0.98)


def test_adaptive_controller_state_round_trip_and_validation():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    ctl.update(2.0, 50)
    restored = AdaptiveKLController(9.9, target=9.9, horizon=9.9)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value == pytest.approx(0.2 * 1.1)
    restored.update(0.5, 10)
    ctl.update(0.5, 10)
    assert restored.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
