"""The DP-FedAvg mechanisms (McMahan et al. 2018): clipping, Gaussian noise, adaptive clipping.

Pure numpy, no I/O. An agent clips its update delta to L2 norm S; Gaussian noise of std z·S
goes on each group sum - added by the aggregator (`edge_noise_std`) or as shares by the
agents (`agent_noise_std`: any m of them sum to std z·S). Noise is added in float32, before
fixed-point quantisation and secure-aggregation masking. Accounting is in `hfl.privacy.accounting`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

_CHUNK = 1 << 20  # floats per step when streaming over a vector
# Clipping scales by a hair under S/‖δ‖ so float32 rounding cannot leave a norm above S:
# the accounting assumes a sensitivity of exactly S.
_SHRINK = 1.0 - 2.0**-20


def _check_float32(x: np.ndarray, what: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"{what} must be a float32 numpy array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not (x.flags.c_contiguous and x.flags.writeable):
        raise ValueError(f"{what} must be C-contiguous and writeable (it is changed in place)")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def l2_norm(x: np.ndarray) -> float:
    """‖x‖₂ accumulated in float64 (a float32 sum drifts on millions of coordinates)."""
    flat = x.reshape(-1)
    return math.sqrt(float(np.einsum("i,i->", flat, flat, dtype=np.float64)))


def clip_l2(delta: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """Scale `delta` (float32) in place so its L2 norm is at most `bound`; returns it and its
    norm before clipping. A non-finite coordinate is a ValueError (its norm is meaningless)."""
    _check_float32(delta, "delta")
    _check_positive("clip bound", bound)
    norm = l2_norm(delta)  # float64 sum of float32 squares: finite iff every entry is
    if not math.isfinite(norm):
        raise ValueError("delta has non-finite entries: cannot clip it")
    if norm > bound:
        np.multiply(delta, np.float32(bound / norm * _SHRINK), out=delta)
    return delta, norm


class NoiseSource:
    """Gaussian noise from a cryptographically seeded generator: numpy's Generator(PCG64)
    seeded from os.urandom(32), never the global numpy RNG. The stream need not match
    across numpy versions, only be unpredictable."""

    def __init__(self, seed: bytes | None = None) -> None:
        """`seed`: None draws 32 bytes from os.urandom; fixed bytes are for tests only."""
        if seed is None:
            seed = os.urandom(32)
        elif not isinstance(seed, bytes) or not seed:
            raise ValueError("seed must be non-empty bytes (or None for os.urandom)")
        self._rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
        self._scratch = np.empty(0, dtype=np.float32)

    def add_gaussian(self, x: np.ndarray, std: float) -> None:
        """x += N(0, std²) per coordinate, in place, streaming through a float32 scratch
        buffer of at most 2^20 floats (never a float64 copy of x)."""
        _check_float32(x, "x")
        _check_nonnegative("noise std", std)
        if std == 0 or x.size == 0:
            return
        if self._scratch.size < min(x.size, _CHUNK):
            self._scratch = np.empty(min(x.size, _CHUNK), dtype=np.float32)
        flat, s = x.reshape(-1), np.float32(std)
        for start in range(0, flat.size, _CHUNK):
            part = flat[start:start + _CHUNK]
            noise = self._scratch[:part.size]
            self._rng.standard_normal(dtype=np.float32, out=noise)
            noise *= s
            part += noise


def agent_noise_std(z: float, clip: float, min_quorum: int) -> float:
    """Distributed mode: each agent's share, z·S/√m. Any sum of m or more shares (m = the
    round's minimum quorum) has variance at least z²S², whoever drops out."""
    _check_nonnegative("noise multiplier", z)
    _check_positive("clip", clip)
    if isinstance(min_quorum, bool) or not isinstance(min_quorum, int) or min_quorum < 1:
        raise ValueError(f"min_quorum must be an integer >= 1, got {min_quorum!r}")
    return z * clip / math.sqrt(min_quorum)


def edge_noise_std(z: float, clip: float) -> float:
    """Edge mode: the aggregator adds z·S to the group's sum."""
    _check_nonnegative("noise multiplier", z)
    _check_positive("clip", clip)
    return z * clip


@dataclass
class AdaptiveClip:
    """Adaptive clipping (Andrew et al. 2021, 'Differentially Private Learning with Adaptive
    Clipping'): the bound S follows a target quantile γ of the update norms, updated
    geometrically from the noised fraction b̄ of clients whose norm was <= S:
    S ← S·exp(−η·(b̄ − γ)).

    Each client contributes `bit(norm)` = [norm <= S] − ½: centred, so one client moves the
    sum by at most ½, the sensitivity behind the paper's privacy analysis. That sum gets
    N(0, σ_b²) (`bit_noise_std`; the paper suggests σ_b = m/20 for m expected clients a
    round), and the update's noise multiplier drops from z to
    z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (`update_noise_multiplier`) so that the pair costs what
    one Gaussian release with multiplier z does: the accounting in `hfl.privacy.accounting`
    holds as is.
    """

    bound: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    bit_noise_std: float = field(kw_only=True)  # no safe default: it depends on m

    def __post_init__(self) -> None:
        _check_positive("bound", self.bound)
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target quantile must be in (0, 1), got {self.target_quantile}")
        _check_positive("learning rate", self.learning_rate)
        _check_positive("bit noise std", self.bit_noise_std)

    def bit(self, norm: float) -> float:
        """A client's contribution to the bit sum, from its unclipped update norm."""
        return 0.5 if norm <= self.bound else -0.5

    def update(self, noised_bit_sum: float, clients: int) -> float:
        """Move the bound after a round; returns it. `noised_bit_sum`: the sum of `bit`s plus
        N(0, σ_b²); `clients`: the divisor - the expected number of clients a round, as in
        the paper (the actual count would be one more thing to protect)."""
        if not math.isfinite(noised_bit_sum):
            raise ValueError(f"noised bit sum must be finite, got {noised_bit_sum}")
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"clients must be an integer >= 1, got {clients!r}")
        below = noised_bit_sum / clients + 0.5  # b̄: the noised fraction with norm <= S
        self.bound *= math.exp(-self.learning_rate * (below - self.target_quantile))
        return self.bound

    @staticmethod
    def update_noise_multiplier(z: float, bit_noise_std: float) -> float:
        """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update's multiplier once the bit sum takes its
        share. Needs 2σ_b > z (else the bit sum alone would spend the whole budget)."""
        _check_positive("noise multiplier", z)
        _check_positive("bit noise std", bit_noise_std)
        if 2 * bit_noise_std <= z:
            raise ValueError(f"bit noise std {bit_noise_std} leaves no budget for the update "
                             f"at noise multiplier {z}: it must exceed z/2 = {z / 2}")
        return (z**-2 - (2 * bit_noise_std) ** -2) ** -0.5


def adaptive_noise(z: float, min_quorum: int) -> tuple[float, float]:
    """(σ_b, z_Δ) for adaptive clipping: the bit sum's noise std — the paper's m/20, but at
    least z so that z_Δ stays within 16 % of z — and the update's reduced multiplier."""
    bit_std = max(min_quorum / 20, z)
    return bit_std, AdaptiveClip.update_noise_multiplier(z, bit_std)
