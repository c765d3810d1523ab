"""int8 update compression: unbiased stochastic rounding, bounded error, the spec rule, the
aggregator's checks, the bytes on the wire and a round through the machines."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError

from aggregator.machine import update_delta
from hfl.errors import Rejected
from hfl.wire import chunks, envelope
from hfl.wire.messages import Kind, ModelSpec
from hfl.wire.quantize import LEVELS, dequantize_int8, quantize_int8
from hfl.wire.topics import Topics
from tests.test_machines import GROUPS, build, fedavg, request, versions

BASE = dict(name="m", task="logreg", metrics=[{"name": "accuracy", "bound": 1.0}], dataset="d",
            aggregators=["site-a"])


def test_rounding_is_unbiased_and_within_one_level() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(2000) * 0.01).astype(np.float32)
    draws = 400
    total = np.zeros(x.size, np.float64)
    for _ in range(draws):
        q, scale = quantize_int8(x, rng)
        y = dequantize_int8(q, scale)
        assert q.dtype == np.int8 and np.abs(q).max() == LEVELS  # the extreme maps to ±127
        assert np.all(np.abs(y - x) <= scale[0] * 1.0001)  # one level at most
        total += y
    # Each draw's error has std ≤ scale/2 per coordinate: the mean's is ≤ scale/(2√draws).
    tol = 5 * scale[0] / (2 * np.sqrt(draws))
    assert np.abs(total / draws - x).max() < tol
    # Deterministic rounding to nearest would be biased for most coordinates: a sanity
    # check that the test could fail (the bias is up to half a level).
    nearest = np.round(x / scale[0]) * scale[0]
    assert np.abs(nearest - x).max() > tol


def test_zero_and_bad_input() -> None:
    rng = np.random.default_rng(0)
    q, scale = quantize_int8(np.zeros(5, np.float32), rng)
    assert scale[0] == 0 and not q.any()
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(np.array([1.0, np.nan], np.float32), rng)
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(np.zeros(3), rng)


def test_int8_is_for_plain_rounds_only() -> None:
    with pytest.raises(ValidationError, match="needs secagg.enabled = false"):
        ModelSpec(**BASE, compression="int8")
    assert ModelSpec(**BASE, compression="int8", secagg={"enabled": False}).compression == "int8"


def test_aggregator_takes_only_the_compressed_form_of_an_int8_job() -> None:
    spec = ModelSpec(**BASE, compression="int8", secagg={"enabled": False})
    q = np.array([127, -127, 3], np.int8)
    np.testing.assert_allclose(update_delta({"delta_q": q, "scale": np.float32([0.5])}, spec, 3),
                               [63.5, -63.5, 1.5])
    with pytest.raises(Rejected, match="missing tensor 'delta_q'"):
        update_delta({"delta": np.zeros(3, np.float32)}, spec, 3)
    with pytest.raises(Rejected, match="bad-shape|int8"):
        update_delta({"delta_q": q.astype(np.int16), "scale": np.float32([0.5])}, spec, 3)
    with pytest.raises(Rejected, match="< 0"):
        update_delta({"delta_q": q, "scale": np.float32([-0.5])}, spec, 3)
    plain = ModelSpec(**BASE, secagg={"enabled": False})
    with pytest.raises(Rejected, match="missing tensor 'delta'"):
        update_delta({"delta_q": q, "scale": np.float32([0.5])}, plain, 3)


@pytest.mark.parametrize("p", [100_000, 1_663_370])
def test_an_int8_update_is_about_p_bytes_on_the_wire(p: int) -> None:
    """Target: ≤ 1.02·P + 4 KB per agent and round, as published (signed, sealed, chunked)."""
    rng = np.random.default_rng(0)
    q, scale = quantize_int8(rng.standard_normal(p).astype(np.float32), rng)
    data = envelope.encode(
        type="update", topic=Topics().update("site-a", "agent-1"), job="job-1", round=1,
        stage="update", sender="agent-1", key=Ed25519PrivateKey.generate(),
        tensors={"delta_q": q, "scale": scale},
        meta={"metrics": {"samples": 600, "train_loss": 0.1, "eval_samples": 0,
                          "eval_loss": 0.0, "eval_metrics": {}}},
        seal_to={"site-a": X25519PrivateKey.generate().public_key()})
    wire = sum(len(f) for f in chunks.split(data, 256 * 1024))
    assert p < wire <= 1.02 * p + 4096


def test_an_int8_job_through_the_machines_averages_like_float32() -> None:
    # Every agent's delta is a constant vector: its levels are exactly ±127, so the
    # dequantized mean equals the float32 one; the rounding itself is tested above.
    net = build()
    request(net, ModelSpec(**{**BASE, "aggregators": sorted(GROUPS)}, rounds=2, min_agents=2,
                           deadline_s=10, compression="int8", secagg={"enabled": False}))
    vs = versions(net)
    everyone = [a for g in GROUPS.values() for a in g]
    np.testing.assert_allclose(vs[-1].params, 2 * fedavg(everyone), rtol=1e-6)
    sent = [s for _, s in net.sent if s.kind is Kind.UPDATE and s.stage == "update"]
    assert sent and all(set(s.tensors) == {"delta_q", "scale"} for s in sent)
    assert all(not net.rejections(p) for p in net.peers)
