"""A DP job's privacy budget: calibration before it starts, the ledger, the stop rule.

Each edge round of each group is one release of a noised sum; every agent that could have
been sampled in it (a candidate) takes a Poisson-subsampled Gaussian event at that round's
sampling rate (`hfl.privacy.accounting.Ledger`). The ε reported is the worst case over agents.
"""

from __future__ import annotations

from collections.abc import Callable

from hfl.privacy.accounting import Ledger, calibrate, epsilon
from hfl.wire.messages import ModelSpec, PrivacySpec, Release


def sampling_rate(spec: ModelSpec, group_size: int) -> float:
    """The share of a group an edge round samples (as the aggregator's `select` does)."""
    return spec.sample_size(group_size) / group_size if group_size > 0 else 1.0


class Budget:
    def __init__(self, spec: ModelSpec, group: Callable[[str], list[str]]) -> None:
        """Resolve the noise multiplier for `spec` (ValueError when its target is out of
        reach) over the job's rounds at the largest sampling rate of its groups."""
        assert spec.privacy is not None
        p = spec.privacy
        self.group = group
        q = max(sampling_rate(spec, len(group(a))) for a in spec.aggregators)
        steps = spec.rounds * spec.kappa1
        if p.noise_multiplier is None:
            z = calibrate(p.epsilon, p.delta, steps, q, p.accountant)
        else:
            z = p.noise_multiplier
            if epsilon(z, spec.kappa1, p.delta, q, p.accountant) > p.epsilon:
                raise ValueError(f"noise multiplier {z} cannot keep even one block within "
                                 f"ε = {p.epsilon}: raise it, or leave it empty to calibrate")
        self.spec = spec.model_copy(update={"privacy": p.model_copy(
            update={"noise_multiplier": z})})
        self.privacy: PrivacySpec = self.spec.privacy  # type: ignore[assignment]
        self.ledger = Ledger(p.delta, p.accountant)

    @classmethod
    def restore(cls, spec: ModelSpec, group: Callable[[str], list[str]],
                ledger: dict) -> Budget:
        """The budget of a checkpointed job: `spec` has its noise multiplier resolved."""
        budget = cls(spec, group)
        budget.ledger = Ledger.from_doc(ledger)
        return budget

    @property
    def z(self) -> float:
        assert self.privacy.noise_multiplier is not None
        return self.privacy.noise_multiplier

    def record(self, releases: list[Release]) -> None:
        for r in releases:
            if r.candidates:
                self.ledger.record(r.candidates, r.sampled / len(r.candidates), self.z)

    def next_block_exceeds(self) -> bool:
        """Whether one more block (κ1 edge rounds in every group) could exceed the budget."""
        return any(self.ledger.would_exceed(
            self.privacy.epsilon, members, sampling_rate(self.spec, len(members)), self.z,
            rounds=self.spec.kappa1) for a in self.spec.aggregators
            if (members := self.group(a)))

    def spent(self) -> float:
        return self.ledger.epsilon()
