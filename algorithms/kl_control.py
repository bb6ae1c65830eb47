"""KL-penalty coefficient β controllers for the β·KL term of (survey 3.2, 3.14) (Ziegler et al. 2019)."""

from __future__ import annotations


class FixedKLController:
    """Constant β for the KL penalty (survey 3.2)."""

    def __init__(self, beta: float) -> None:
        self._beta = float(beta)

    @property
    def value(self) -> float:
        """Current β."""
        return self._beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume: β (and, adaptive, target and horizon)."""
        return {"beta": self._beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from state_dict()."""
        self._beta = float(state["beta"])


class AdaptiveKLController:
    """β ← β·(1 + e·n_steps/horizon), e = clip(KL/target − 1, ±0.2) (survey 2.4.2; Ziegler et al. 2019).

    The PPO paper's adaptive rule (halve / double β outside [target/1.5, target·1.5]) is not used:
    this is the smoother controller of Ziegler et al. 2019 that RLHF codebases (TRL, OpenRLHF) adopted.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self._beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    @property
    def value(self) -> float:
        """Current β."""
        return self._beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β toward the value that keeps the measured KL at target, over `n_steps` samples."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self._beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume: β (and, adaptive, target and horizon)."""
        return {"beta": self._beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from state_dict()."""
        self._beta = float(state["beta"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
