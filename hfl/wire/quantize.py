"""int8 update compression: a float32 delta travels as int8 levels and one float32 scale,
about P bytes instead of 4P.

The scale maps the largest |x| to 127 and each coordinate is rounded up or down at random
with the probability of its distance to the level below (stochastic rounding), so the
dequantized value is unbiased, E[q·s] = x: a sum of many agents' updates carries their
rounding as zero-mean noise of std ≤ s/2 per coordinate and agent, not a bias. Quantization
comes after clipping and DP noise (it is post-processing, so it costs no privacy).
"""

from __future__ import annotations

import numpy as np

LEVELS = 127  # symmetric: -127..127, so -x quantizes as the mirror of x
_CHUNK = 1 << 18  # floats per pass: the float32 scratch stays in cache


def quantize_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(int8 levels, float32 scale of shape (1,)) with x ≈ levels · scale, unbiased."""
    if x.dtype != np.float32 or x.ndim != 1:
        raise ValueError(f"quantize a flat float32 vector, got {x.dtype}{list(x.shape)}")
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.isfinite(amax):
        raise ValueError("cannot quantize a vector with NaN or infinity")
    scale = np.array([amax / LEVELS], np.float32)
    q = np.zeros(x.size, np.int8)
    if amax == 0.0:
        return q, scale
    inv = np.float32(1.0) / scale[0]
    y = np.empty(min(x.size, _CHUNK), np.float32)
    u = np.empty_like(y)
    for start in range(0, x.size, _CHUNK):
        part = x[start:start + _CHUNK]
        yy, uu = y[:part.size], u[:part.size]
        np.multiply(part, inv, out=yy)
        rng.random(dtype=np.float32, out=uu)
        yy += uu  # floor(y + u) is y rounded up with probability frac(y)
        np.floor(yy, out=yy)
        np.clip(yy, -LEVELS, LEVELS, out=yy)  # float32 rounding of x·inv can reach 127.00001
        q[start:start + part.size] = yy
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 vector levels · scale."""
    out = q.astype(np.float32)
    out *= scale[0]
    return out
