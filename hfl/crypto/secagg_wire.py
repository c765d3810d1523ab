"""SecAgg+ on the wire: the stage messages of a secure edge round and the agent's input vector.

An edge round with secure aggregation runs these stages (DESIGN.md §5); the aggregator
speaks on the group's round topic (the routed shares go to each agent on its own level of
it, `Topics.round_to`, where only that agent may read), each agent on its own update topic:

    aggregator → agents   open (model)   keys (U1's adverts)   routed (shares)   unmask (U3)
    agent → aggregator         advert           shares             masked            unshares

Every codec here validates what a peer sent (shapes, sizes, ids) and raises `Rejected`.

The input vector of an agent is its weighted delta followed by a trailer of weighted metrics,
all in fixed point, so that the aggregator learns the group's metrics only as sums too:

    [ w·Δ (P) | w | w·train_loss/L | e | e·eval_loss/L | e·m_1/B_1 … e·m_k/B_k | clip bit ]

with w = min(samples, cap)/cap (1 in a DP job, whose analysis counts agents equally),
e = min(eval_samples, cap)/cap, losses clipped to the task's `loss_bound` L, the task's
named metrics m_i (squared for an RMS metric) clipped to their bound B_i (B_i² when
squared), and the adaptive-clipping bit (`hfl.privacy.dp.AdaptiveClip`, 0 when unused) summed like
the rest. In a DP job the delta arrives
clipped to L2 norm S and noised already (clip → noise → quantize → mask), and the
fixed-point range widens to hold an agent's noise share without clipping it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from hfl.crypto.secagg import PRIME, Advert, FixedPoint, Params, params_for
from hfl.errors import Rejected
from hfl.models.aggregate import fold, unfold
from hfl.privacy.dp import agent_noise_std
from hfl.wire.messages import Metrics, MetricSpec, ModelSpec, expect_tensor
from hfl.wire.topics import check_id

SHARE_BYTES = (PRIME.bit_length() + 7) // 8


class WireStage(str, Enum):
    """The `stage` of a SecAgg+ round message, as it goes on the wire (and into checkpoints):
    a str, so a member is its own wire string ("advert" == WireStage.ADVERT)."""

    # aggregator → agents (the round's own `open` is a plain round's too)
    KEYS = "keys"  # U1's adverts
    ROUTED = "routed"  # the shares addressed to one agent, on its own topic
    UNMASK = "unmask"  # U3, the survivors
    # agent → aggregator
    ADVERT = "advert"
    SHARES = "shares"
    MASKED = "masked"
    UNSHARES = "unshares"

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)

_ADVERT = {"c_pk": 32, "s_pk": 32, "b_commit": 32, "signature": 64}


def input_length(num_params: int, spec: ModelSpec) -> int:
    return num_params + 5 + len(spec.metrics)


def input_bound(spec: ModelSpec) -> float:
    """The range of an input coordinate: the delta clip (and at least 1, for the trailer);
    in a DP job, S plus six standard deviations of an agent's noise share."""
    bound = max(spec.secagg.clip, 1.0)
    p = spec.privacy
    if p is not None:
        share = 0.0
        if p.mode == "distributed" and p.noise_multiplier:
            share = agent_noise_std(p.noise_multiplier, p.clip, spec.min_agents)
        bound = max(1.0, p.clip + 6 * share)
    return bound


def round_params(job: str, round: int, selected: int, num_params: int,
                 spec: ModelSpec) -> tuple[Params, FixedPoint]:
    """What both sides derive from the round announcement: protocol and fixed-point settings."""
    sec = spec.secagg
    params = params_for(job, round, selected, input_length(num_params, spec), sec.threshold,
                        sec.degree, sec.dropout, sec.corrupt)
    return params, FixedPoint.for_sum(input_bound(spec), selected)


# ------------------------------------------------------------------ the input vector


def pack(delta: np.ndarray, metrics: Metrics, spec: ModelSpec, fixed: FixedPoint,
         clip_bit: float = 0.0) -> tuple[np.ndarray, int]:
    """An agent's fixed-point input and how many delta coordinates were clipped."""
    sec = spec.secagg
    dp = spec.privacy is not None
    w = 1.0 if dp else min(metrics.samples, sec.weight_cap) / sec.weight_cap
    e = min(metrics.eval_samples, sec.weight_cap) / sec.weight_cap
    clip = input_bound(spec) if dp else sec.clip
    x = np.empty(input_length(delta.size, spec), dtype=np.float32)
    np.multiply(delta, np.float32(w), out=x[: delta.size])
    clipped = int(np.count_nonzero(np.abs(x[: delta.size]) > clip))
    np.clip(x[: delta.size], -clip, clip, out=x[: delta.size])
    loss = spec.loss_bound
    named = [e * _scaled(m, metrics.eval_metrics.get(m.name, 0.0)) for m in spec.metrics]
    x[delta.size :] = [w, w * _scaled_loss(metrics.train_loss, loss), e,
                       e * _scaled_loss(metrics.eval_loss, loss), *named, clip_bit]
    out = np.empty(x.size, dtype=np.uint32)
    fixed.encode(x, out)
    return out, clipped


def _scaled_loss(v: float, bound: float) -> float:
    return min(max(v, 0.0), bound) / bound


def _scaled(m: MetricSpec, v: float) -> float:
    """A metric as its share of the bound, in [-1, 1] (squared ones in [0, 1])."""
    scale = m.bound * m.bound if m.reduce == "rms" else m.bound
    return min(max(fold(m, v) / scale, -1.0), 1.0)


def unpack(total: np.ndarray, num_params: int,
           spec: ModelSpec) -> tuple[np.ndarray, Metrics, float]:
    """The group's mean delta, summed metrics and clip-bit sum from the decoded sum."""
    trailer = [float(v) for v in total[num_params:]]
    w, wl, e, el = trailer[:4]
    named, bits = trailer[4:-1], trailer[-1]
    if w <= 0:
        raise Rejected("secagg-empty", "the unmasked sum carries no weight")
    mean = (total[:num_params] / w).astype(np.float32)
    cap, loss = spec.secagg.weight_cap, spec.loss_bound
    values = {}
    if e > 0:
        for m, v in zip(spec.metrics, named, strict=True):
            scale = m.bound * m.bound if m.reduce == "rms" else m.bound
            values[m.name] = unfold(m, v * scale / e)
    metrics = Metrics(
        samples=w * cap,
        train_loss=wl * loss / w,
        eval_samples=max(e, 0.0) * cap,
        eval_loss=el * loss / e if e > 0 else 0.0,
        eval_metrics=values,
    )
    return mean, metrics, bits


# ------------------------------------------------------------------ stage messages


def _ids(meta: dict[str, Any], key: str, limit: int = 100_000) -> list[str]:
    ids = meta.get(key)
    if not isinstance(ids, list) or len(ids) > limit or len(set(map(str, ids))) != len(ids):
        raise Rejected("bad-meta", f"{key}: a list of distinct ids")
    try:
        return [check_id(i) for i in ids]
    except ValueError as e:
        raise Rejected("bad-meta", f"{key}: {e}") from None


def advert_out(a: Advert) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(getattr(a, name), np.uint8) for name in _ADVERT}


def advert_in(tensors: dict[str, np.ndarray]) -> Advert:
    return Advert(**{name: expect_tensor(tensors, name, np.uint8, (size,)).tobytes()
                     for name, size in _ADVERT.items()})


def key_table_out(adverts: dict[str, Advert]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    ids = sorted(adverts)
    tensors = {name: np.frombuffer(b"".join(getattr(adverts[i], name) for i in ids),
                                   np.uint8).reshape(len(ids), size)
               for name, size in _ADVERT.items()}
    return {"ids": ids}, tensors


def key_table_in(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Advert]:
    ids = _ids(meta, "ids")
    cols = {name: expect_tensor(tensors, name, np.uint8, (len(ids), size))
            for name, size in _ADVERT.items()}
    return {i: Advert(**{name: cols[name][k].tobytes() for name in _ADVERT})
            for k, i in enumerate(ids)}


def _blob(items: list[bytes]) -> dict[str, np.ndarray]:
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in items], out=offsets[1:])
    return {"blob": np.frombuffer(b"".join(items), np.uint8), "offsets": offsets}


def _unblob(tensors: dict[str, np.ndarray], n: int, max_item: int = 4096) -> list[bytes]:
    """The n items of a blob, all offsets checked."""
    offsets = expect_tensor(tensors, "offsets", np.int64, (n + 1,))
    blob = tensors.get("blob")
    if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise Rejected("bad-shape", "blob: want a uint8 vector")
    sizes = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != blob.size or (sizes <= 0).any() or (
            sizes > max_item).any():
        raise Rejected("bad-shape", "offsets do not cut the blob into items")
    return [blob[offsets[k] : offsets[k + 1]].tobytes() for k in range(n)]


def shares_out(cts: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    to = sorted(cts)
    return {"to": to}, _blob([cts[t] for t in to])


def shares_in(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, bytes]:
    to = _ids(meta, "to")
    return dict(zip(to, _unblob(tensors, len(to)), strict=True))


def routed_out(to: str, row: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The shares addressed to one agent (sender → ciphertext), for its own topic: each
    agent downloads its k shares, not the group's n·k."""
    senders = sorted(row)
    return {"to": to, "from": senders}, _blob([row[s] for s in senders])


def routed_in(meta: dict[str, Any], tensors: dict[str, np.ndarray], me: str) -> dict[str, bytes]:
    """The shares addressed to `me`: sender → ciphertext; shares for anyone else are refused."""
    if meta.get("to") != me:
        raise Rejected("wrong-recipient", f"shares for {str(meta.get('to'))[:64]!r}, I am {me}")
    senders = _ids(meta, "from")
    return dict(zip(senders, _unblob(tensors, len(senders)), strict=True))


def unshares_out(shares: dict[str, int]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    owners = sorted(shares)
    raw = b"".join(shares[o].to_bytes(SHARE_BYTES, "big") for o in owners)
    return {"owners": owners}, {"shares": np.frombuffer(raw, np.uint8).reshape(-1, SHARE_BYTES)}


def unshares_in(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, int]:
    owners = _ids(meta, "owners")
    rows = expect_tensor(tensors, "shares", np.uint8, (len(owners), SHARE_BYTES))
    out = {o: int.from_bytes(rows[k].tobytes(), "big") for k, o in enumerate(owners)}
    if any(v >= PRIME for v in out.values()):
        raise Rejected("bad-shape", "a share outside the field")
    return out
