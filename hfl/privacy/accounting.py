"""Privacy accounting for client-level DP-FedAvg: (ε, δ) of Poisson-subsampled Gaussian rounds.

Every edge round releases one noised group sum; to an agent that was a candidate for it, it
is one Poisson-subsampled Gaussian mechanism (rate q = selected/candidates, multiplier z).
An agent's ε is that of the composition of its rounds; a job reports the worst agent's.

Accounting is Google's `dp-accounting`, behind one accountant (`_GaussianAccountant`) that
everything here uses, so `epsilon`, `calibrate`, `Ledger` and `epsilon_curve` agree exactly:

* RDP composes additively, so each distinct (q, z) is analysed once (cached) and a history
  is a weighted sum of those RDP curves: the coordinator re-evaluates ledgers every round.
* PLD (tighter) uses a 1e-3 loss grid instead of the library's 1e-4: ~10x faster, and the
  pessimistic rounding keeps it an upper bound (it moves ε by < 0.1%). Where RDP's bound
  already exceeds `PLD_RDP_LIMIT` the PLD grid would be huge (MemoryError for tiny z), and
  RDP's bound - still a valid one - is reported instead.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

Accountant = Literal["rdp", "pld"]

PLD_INTERVAL = 1e-3  # PLD loss discretisation (see the module doc)
PLD_RDP_LIMIT = 1e3  # above this RDP ε, "pld" reports RDP's bound
Z_MIN, Z_MAX = 1e-3, 1e3  # calibration range of the noise multiplier

_ORDERS = np.asarray(rdp_lib.DEFAULT_RDP_ORDERS, dtype=float)



class _QuietNonConvergence(logging.Filter):
    """dp-accounting warns for every RDP order below ~2 whose series fails to converge at
    large q; it then drops that order, which only loosens the bound. A calibration search
    would print hundreds of these, so they are dropped here and nothing else is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietNonConvergence())

# A history: the distinct (q, z) an agent was exposed to and how often, sorted.
History = tuple[tuple[float, float, int], ...]


def _check_accountant(accountant: str) -> None:
    if accountant not in get_args(Accountant):
        raise ValueError(f"accountant must be one of {get_args(Accountant)}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_step(sampling_rate: float, noise_multiplier: float) -> None:
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {sampling_rate}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")


def _check_count(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def step_event(sampling_rate: float, noise_multiplier: float,
               count: int = 1) -> dp_accounting.DpEvent:
    """`count` rounds of the Poisson-subsampled Gaussian mechanism, as a dp-accounting event."""
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), count)


def history_event(history: History) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([step_event(q, z, n) for q, z, n in history])


@functools.lru_cache(maxsize=1024)
def _rdp_step(q: float, z: float) -> np.ndarray:
    acc = dp_accounting.rdp.RdpAccountant()  # its orders are _ORDERS
    curve = acc.compose(step_event(q, z)).rdp
    curve.setflags(write=False)  # shared through the cache
    return curve


@functools.lru_cache(maxsize=16)  # small: a PLD for a tiny z holds ~1e6 floats
def _pld_step(q: float, z: float) -> pld_lib.PrivacyLossDistribution:
    return pld_lib.from_gaussian_mechanism(
        z, sampling_prob=q, value_discretization_interval=PLD_INTERVAL)


class _GaussianAccountant(dp_accounting.PrivacyAccountant):
    """dp-accounting's RDP or PLD accountant for (Poisson-sampled) Gaussian events, with the
    caching and the PLD fallback of the module doc. A real `PrivacyAccountant`, so that
    `calibrate_dp_mechanism` searches exactly the function the rest of the module reports."""

    def __init__(self, accountant: Accountant) -> None:
        _check_accountant(accountant)
        super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._kind = accountant
        self._rdp = np.zeros_like(_ORDERS)
        self._empty = True
        self._non_private = False
        self._pending: list[tuple[float, float, int]] = []  # not yet folded into the PLD
        self._pld: pld_lib.PrivacyLossDistribution | None = None

    def _maybe_compose(self, event: dp_accounting.DpEvent, count: int,
                       do_compose: bool) -> Any:
        if isinstance(event, dp_accounting.NoOpDpEvent):
            return None
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_accounting.ComposedDpEvent):
            for e in event.events:
                if (error := self._maybe_compose(e, count, do_compose)) is not None:
                    return error
            return None
        q, inner = 1.0, event
        if isinstance(event, dp_accounting.PoissonSampledDpEvent):
            q, inner = event.sampling_probability, event.event
        if not isinstance(inner, dp_accounting.GaussianDpEvent):
            return self.CompositionErrorDetails(event, "only (Poisson-sampled) Gaussian events")
        if do_compose and count > 0 and q > 0:  # q = 0: nobody's data was used
            self._add(float(q), float(inner.noise_multiplier), count)
        return None

    def _add(self, q: float, z: float, count: int) -> None:
        self._empty = False
        if z == 0:
            self._non_private = True
        elif not self._non_private:
            self._rdp += count * _rdp_step(q, z)
            self._pending.append((q, z, count))

    def get_epsilon(self, target_delta: float) -> float:
        if self._empty:
            return 0.0
        if self._non_private:
            return math.inf
        eps = float(rdp_lib.compute_epsilon(_ORDERS, self._rdp, target_delta)[0])
        if self._kind == "rdp" or eps > PLD_RDP_LIMIT:
            return eps
        for q, z, n in self._pending:
            part = _pld_step(q, z) if n == 1 else _pld_step(q, z).self_compose(n)
            self._pld = part if self._pld is None else self._pld.compose(part)
        self._pending.clear()
        assert self._pld is not None
        return float(self._pld.get_epsilon_for_delta(target_delta))


def epsilon(noise_multiplier: float, steps: int, delta: float, sampling_rate: float = 1.0,
            accountant: Accountant = "rdp") -> float:
    """ε after `steps` Poisson-subsampled Gaussian rounds (rate 1: no amplification);
    0 for no steps, inf for z = 0."""
    _check_step(sampling_rate, noise_multiplier)
    _check_count("steps", steps, 0)
    _check_delta(delta)
    acc = _GaussianAccountant(accountant)
    if steps:  # dp-accounting rejects a count of 0
        acc.compose(step_event(sampling_rate, noise_multiplier, steps))
    return acc.get_epsilon(delta)


def calibrate(target_epsilon: float, delta: float, steps: int, sampling_rate: float = 1.0,
              accountant: Accountant = "rdp", tol: float = 1e-3) -> float:
    """The smallest noise multiplier (within `tol`) whose ε over `steps` rounds is at most
    the target. ValueError when even z = Z_MAX is not enough; Z_MIN when any z would do."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {target_epsilon}")
    _check_step(sampling_rate, 1.0)
    _check_count("steps", steps, 1)
    _check_delta(delta)
    _check_accountant(accountant)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")

    def gap(z: float) -> float:
        return epsilon(z, steps, delta, sampling_rate, accountant) - target_epsilon

    if (g := gap(Z_MAX)) > 0:
        raise ValueError(
            f"target ε = {target_epsilon:g} (δ = {delta:g}) cannot be met over {steps} rounds "
            f"at sampling rate {sampling_rate:g}: even noise multiplier {Z_MAX:g} spends "
            f"ε = {g + target_epsilon:.4g}")
    # Bracket the root by doubling/halving from z = 1 (ε falls as z grows).
    hi = 1.0
    while gap(hi) > 0:
        hi = min(2 * hi, Z_MAX)
    lo = hi / 2
    while gap(lo) <= 0:
        if lo <= Z_MIN:
            return Z_MIN
        hi, lo = lo, max(lo / 2, Z_MIN)
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _GaussianAccountant(accountant),
        lambda z: step_event(sampling_rate, z, steps),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol)
    return float(z)


def epsilon_curve(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
                  accountant: Accountant = "rdp") -> list[float]:
    """ε after each of rounds 1..`rounds` (composed incrementally: one pass, not `rounds`)."""
    _check_step(sampling_rate, noise_multiplier)
    _check_count("rounds", rounds, 0)
    _check_delta(delta)
    acc = _GaussianAccountant(accountant)
    step = step_event(sampling_rate, noise_multiplier)
    return [acc.compose(step).get_epsilon(delta) for _ in range(rounds)]


@dataclass
class Ledger:
    """Per-agent participation ledger: the reported ε is the worst case over agents.

    Each edge round of a group records, for every agent that was a *candidate* (eligible to
    be sampled) in that round, one Poisson-subsampled Gaussian event with that round's
    sampling rate q and noise multiplier z. Agents that joined later or sat in a group
    sampled less often have fewer/lighter events and a lower ε.

    Composition does not depend on order, so an agent's history is kept as counts per
    distinct (q, z) - as small as the number of distinct rates, however many rounds - and
    agents with equal histories share one accountant evaluation.
    """

    delta: float
    accountant: Accountant = "rdp"
    _agents: dict[str, dict[tuple[float, float], int]] = field(
        default_factory=dict, init=False, repr=False)
    _cache: dict[History, float] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_delta(self.delta)
        _check_accountant(self.accountant)

    def record(self, candidates: Sequence[str], sampling_rate: float,
               noise_multiplier: float) -> None:
        """One edge round: every candidate takes one (q, z) event."""
        names = _check_candidates(candidates)
        _check_step(sampling_rate, noise_multiplier)
        if sampling_rate == 0:
            return  # nobody sampled: nothing of anyone's was released
        key = (float(sampling_rate), float(noise_multiplier))
        for name in names:
            counts = self._agents.setdefault(name, {})
            counts[key] = counts.get(key, 0) + 1

    def epsilon(self) -> float:
        """The worst ε over agents (0 with none)."""
        return max(self._epsilons(set(self._histories().values())).values(), default=0.0)

    def per_agent(self) -> dict[str, float]:
        histories = self._histories()
        eps = self._epsilons(set(histories.values()))
        return {name: eps[h] for name, h in histories.items()}

    def would_exceed(self, target_epsilon: float, candidates: Sequence[str],
                     sampling_rate: float, noise_multiplier: float, rounds: int = 1) -> bool:
        """Whether `rounds` more such rounds would push the worst ε over the target: asked
        *before* a block, so a job stops without ever exceeding its budget."""
        names = _check_candidates(candidates)
        _check_step(sampling_rate, noise_multiplier)
        _check_count("rounds", rounds, 1)
        if self.epsilon() > target_epsilon:
            return True
        if sampling_rate == 0:
            return False
        key = (float(sampling_rate), float(noise_multiplier))
        after = set()
        for name in names:
            counts = dict(self._agents.get(name, {}))
            counts[key] = counts.get(key, 0) + rounds
            after.add(_history(counts))
        return max(self._epsilons(after).values()) > target_epsilon

    def to_doc(self) -> dict[str, Any]:
        """JSON-able: {"delta", "accountant", "agents": {name: [[q, z, count], ...]}}."""
        return {"delta": self.delta, "accountant": self.accountant,
                "agents": {name: [list(e) for e in _history(counts)]
                           for name, counts in sorted(self._agents.items())}}

    @classmethod
    def from_doc(cls, doc: Any) -> Ledger:
        if not isinstance(doc, Mapping) or set(doc) != {"delta", "accountant", "agents"}:
            raise ValueError("a ledger document is an object with exactly the keys "
                             "'delta', 'accountant' and 'agents'")
        if not _is_number(doc["delta"]):
            raise ValueError(f"ledger delta must be a number, got {doc['delta']!r}")
        ledger = cls(float(doc["delta"]), doc["accountant"])
        if not isinstance(doc["agents"], Mapping):
            raise ValueError("ledger 'agents' must map agent ids to histories")
        for name, entries in doc["agents"].items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"ledger agent id must be a non-empty string, got {name!r}")
            ledger._agents[name] = _load_history(name, entries)
        return ledger

    def _histories(self) -> dict[str, History]:
        return {name: _history(counts) for name, counts in self._agents.items()}

    def _epsilons(self, histories: set[History]) -> dict[History, float]:
        """ε per distinct history, cached: a round changes histories, but the one a
        `would_exceed` looked at is usually the next round's."""
        if len(self._cache) > 4 * len(self._agents) + 64:  # drop what no agent has any more
            live = set(self._histories().values())
            self._cache = {h: e for h, e in self._cache.items() if h in live}
        for h in histories - self._cache.keys():
            acc = _GaussianAccountant(self.accountant)
            self._cache[h] = acc.compose(history_event(h)).get_epsilon(self.delta)
        return {h: self._cache[h] for h in histories}


def _history(counts: Mapping[tuple[float, float], int]) -> History:
    return tuple(sorted((q, z, n) for (q, z), n in counts.items()))


def _check_candidates(candidates: Sequence[str]) -> list[str]:
    if isinstance(candidates, str):
        raise ValueError("candidates must be a sequence of agent ids, not one string")
    names = list(candidates)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError("candidates must be non-empty strings")
    if len(set(names)) != len(names):
        raise ValueError("candidates of one round must be distinct")
    return names


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load_history(name: str, entries: Any) -> dict[tuple[float, float], int]:
    if not isinstance(entries, list):
        raise ValueError(f"ledger history of {name!r} must be a list of [q, z, count]")
    counts: dict[tuple[float, float], int] = {}
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and _is_number(e[0])
                and _is_number(e[1]) and isinstance(e[2], int) and not isinstance(e[2], bool)):
            raise ValueError(f"ledger entry of {name!r} must be [q, z, count], got {e!r}")
        q, z, n = float(e[0]), float(e[1]), e[2]
        if not (0 < q <= 1 and z >= 0 and n >= 1):
            raise ValueError(f"ledger entry of {name!r} out of range (0 < q <= 1, z >= 0, "
                             f"count >= 1): {e!r}")
        if (q, z) in counts:
            raise ValueError(f"ledger history of {name!r} repeats (q, z) = ({q}, {z})")
        counts[(q, z)] = n
    return counts
