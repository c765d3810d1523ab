"""SecAgg+: the server learns the sum of the clients' vectors and nothing else. Sans-I/O core.

Secure aggregation after Bonawitz et al. (CCS 2017), with the sparse graph of SecAgg+
(Bell et al., CCS 2020): each client masks pairwise with k neighbours instead of all n-1
peers, so its work is O(k·P) rather than O(n·P). Plain objects in and out; the state
machines and the wire codecs (hfl.crypto.secagg_wire) live elsewhere.

Four stages, each ending when the server freezes the set of clients still in the round:

    1. advertise   client → server: Advert (two X25519 public keys, a commitment to the
                   self-mask seed b, all signed by the client's identity key).
                   server → all: the table of adverts of U1.
    2. share       each client verifies the table, computes the neighbour graph over U1,
                   Shamir-splits b and its mask secret key s_sk (t of them recover each) and
                   seals one share pair to each neighbour. The server routes them (U2).
    3. mask        y_i = x_i + PRG(b_i) + Σ_j ±PRG(s_ij) mod 2^32 over the neighbours j in U2,
                   + if i < j else −, so the pairwise terms cancel in the sum. The server
                   adds y's into one accumulator as they arrive (U3 = those it has).
    4. unmask      each survivor reveals, for each neighbour j, the share of b_j if j is in
                   U3 and the share of s_sk_j otherwise — never both. The server rebuilds
                   the b of every survivor and the s_sk of every dropped client, removes
                   the PRG(b)'s and the dangling pairwise terms: Σ_{U3} x_i, bit-exact.

Each client also keeps one share of its own b (x = its own index) and reveals it at unmask:
it is a survivor then, so b is about to be reconstructed anyway, and it lets a survivor's b
be rebuilt from t of the U3 ∪ {itself} shares rather than t from its neighbours alone.

Threat model: an honest-but-curious server and clients that may drop out at any point,
plus signed adverts so the server cannot swap keys between clients. Up to t-1 colluding
neighbours learn nothing of a client's secrets; `choose_params` picks k and t so that, with
a fraction of the clients colluding with the server and another dropping out, a round
leaks with probability below 2^-40 and fails (to be retried) below 2^-20 (for small groups
at high dropout, only as far as the complete graph allows). A fully malicious server could
still lie about U3 differently to different clients (the consistency check of Bonawitz et
al.'s active variant is not implemented); t > k/2 limits what one such lie can gain.

Determinism across boards: masks must cancel bit-for-bit between different machines, so
every stream is AES-256-CTR under HKDF-SHA256 keys bound to `Params.context()`, and the
graph comes from SHA-256; numpy's generators are never used (their streams vary by
version). Randomness comes only from os.urandom / secrets.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import secrets
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl.errors import Rejected

PRIME = 2**521 - 1  # Shamir field: a Mersenne prime, far above any 256-bit secret
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SECRET_BYTES = 32
_SHARE_PLAIN = struct.Struct(">II")  # (sender's x, recipient's x), then share_b, share_s
CT_BYTES = _SHARE_PLAIN.size + 2 * SHARE_BYTES + 16  # + the GCM tag: 156
_ZERO_NONCE = bytes(12)
_MAX_TRIES = 256  # t-subsets tried per secret when some share is wrong
_CHUNK = 1 << 15  # words per keystream pass: 128 KiB, so acc's chunk and the stream stay in L2


# ------------------------------------------------------------------ Shamir over GF(2^521 - 1)


def shamir_split(secret: bytes, xs: Sequence[int], threshold: int) -> list[int]:
    """One share (an int < PRIME) per x in `xs`; any `threshold` of them recover `secret`."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError("need 1 <= threshold <= len(xs)")
    if len(set(xs)) != len(xs) or not all(1 <= x < PRIME for x in xs):
        raise ValueError("xs must be distinct and in [1, PRIME)")
    # f(0) = secret; the other coefficients uniform, so t-1 points say nothing about f(0).
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


@functools.lru_cache(maxsize=4096)
def _weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange weights at 0: f(0) = Σ w_i·f(x_i). Cached, as the server rebuilds many
    secrets from the same set of responders."""
    nums, dens = [], []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        nums.append(num)
        dens.append(den)
    # One modular inversion for all the denominators (Montgomery's trick).
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        out[i] = nums[i] * inv * prefix[i] % PRIME  # inv = 1/(d_0…d_i) here
        inv = inv * dens[i] % PRIME
    return tuple(out)


def _interpolate0(points: Sequence[tuple[int, int]]) -> int:
    """f(0) of the polynomial through `points` (Lagrange)."""
    weights = _weights(tuple(x for x, _ in points))
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


def shamir_combine(points: Sequence[tuple[int, int]], threshold: int) -> bytes:
    """The 32-byte secret from the first `threshold` (x, y) shares.

    Points that are not shares of one secret (too few, or a wrong one) give a random field
    element, almost surely ≥ 2^256: that is a ValueError too.
    """
    if threshold < 1 or len(points) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(points)}")
    pts = list(points[:threshold])
    if len({x for x, _ in pts}) != len(pts) or not all(
            1 <= x < PRIME and 0 <= y < PRIME for x, y in pts):
        raise ValueError("shares must have distinct x in [1, PRIME) and y in [0, PRIME)")
    value = _interpolate0(pts)
    if value >> (8 * SECRET_BYTES):
        raise ValueError("the shares do not encode a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


# ------------------------------------------------------------------ the neighbour graph


def neighbours(ids: Sequence[str], degree: int, seed: bytes) -> dict[str, list[str]]:
    """A k-regular undirected graph over `ids`, the same for everyone with (ids, degree, seed).

    degree >= len(ids) - 1 gives the complete graph. Otherwise the ids are placed on a ring
    in the order of SHA-256(seed + id) (a permutation nobody picks) and each is linked to
    the ceil(degree/2) nearest on either side: a circulant graph, whose degree is `degree`
    rounded up to even (or the complete graph, if that reaches len(ids) - 1).
    """
    ring, half = _ring(ids, degree, seed)
    return dict(sorted((i, _around(ring, p, half)) for p, i in enumerate(ring)))


def neighbours_of(who: str, ids: Sequence[str], degree: int, seed: bytes) -> list[str]:
    """`neighbours(ids, degree, seed)[who]` without the rest of the graph: O(n) hashes and
    O(k) links, where a client needs only its own."""
    ring, half = _ring(ids, degree, seed)
    return _around(ring, ring.index(who), half)


def _ring(ids: Sequence[str], degree: int, seed: bytes) -> tuple[list[str], int]:
    """The ids in ring order and how many neighbours on each side (the complete graph: all
    of them, in id order)."""
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be distinct")
    if degree < 1:
        raise ValueError("degree must be >= 1")
    members = sorted(ids)
    half = (degree + 1) // 2
    if 2 * half >= len(members) - 1:
        return members, len(members)
    return sorted(members, key=lambda i: (hashlib.sha256(seed + i.encode()).digest(), i)), half


def _around(ring: list[str], p: int, half: int) -> list[str]:
    m = len(ring)
    if half >= m:  # the complete graph
        return [j for j in ring if j != ring[p]]
    return sorted(ring[(p + o) % m] for d in range(1, half + 1) for o in (d, -d))


# ------------------------------------------------------------------ the PRG


def _ctr(key: bytes):
    if len(key) != 32:
        raise ValueError("a keystream key is 32 bytes")
    # A zero nonce is safe: every key is derived for one purpose in one round (HKDF over
    # the round context) or drawn fresh, so no two different messages share a stream.
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


class Keystream:
    """AES-256-CTR keystream written into preallocated buffers (cryptography's `update_into`).

    PRG(key) is the AES-256-CTR encryption of zeros under `key`, read as little-endian
    uint32 words. `mix` adds many streams in one pass over the accumulator, a cache-sized
    chunk at a time, so the accumulator is read and written once whatever the count.
    """

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError("length must be >= 1")
        self.length = length
        chunk = min(length, _CHUNK)
        nbytes = 4 * chunk
        self._zeros = memoryview(bytes(nbytes))
        # update_into wants len(buf) >= len(data) + 15: 16 bytes of slack.
        self._scratch = np.empty(nbytes + 16, dtype=np.uint8)
        self._buf = self._scratch.data
        self._words = self._scratch[:nbytes].view("<u4")
        self._spans = [(a, min(a + chunk, length)) for a in range(0, length, chunk)]

    def _check(self, arr: np.ndarray) -> None:
        if (not isinstance(arr, np.ndarray) or arr.dtype != np.uint32
                or arr.shape != (self.length,) or not arr.flags.c_contiguous
                or not arr.flags.writeable):
            raise ValueError(f"want a writable contiguous uint32[{self.length}]")

    def fill(self, key: bytes, out: np.ndarray) -> np.ndarray:
        """out ← PRG(key); returns out."""
        self._check(out)
        enc = _ctr(key)
        raw = out.view(np.uint8).data
        for a, b in self._spans:
            nbytes = 4 * (b - a)
            if len(raw) - 4 * a >= nbytes + 15:  # room for update_into: straight into out
                enc.update_into(self._zeros[:nbytes], raw[4 * a :])
                if sys.byteorder == "big":
                    out[a:b].byteswap(inplace=True)
            else:  # the tail, through the scratch buffer
                enc.update_into(self._zeros[:nbytes], self._buf)
                out[a:b] = self._words[: b - a]
        return out

    def add(self, key: bytes, acc: np.ndarray, sign: int = 1) -> None:
        """acc += sign·PRG(key) mod 2^32, in place."""
        self.mix([(key, sign)], acc)

    def mix(self, terms: Sequence[tuple[bytes, int]], acc: np.ndarray) -> None:
        """acc += Σ sign·PRG(key) mod 2^32 over (key, sign) in `terms`, in one pass over acc."""
        self._check(acc)
        if any(sign not in (1, -1) for _, sign in terms):
            raise ValueError("sign must be +1 or -1")
        streams = [(_ctr(key), np.add if sign > 0 else np.subtract) for key, sign in terms]
        for a, b in self._spans:
            part, words, zeros = acc[a:b], self._words[: b - a], self._zeros[: 4 * (b - a)]
            for enc, op in streams:
                enc.update_into(zeros, self._buf)
                op(part, words, out=part)


# ------------------------------------------------------------------ fixed point


# With two clients, each would learn the other's input from the sum anyway.
MIN_CLIENTS = 3

@dataclass(frozen=True)
class FixedPoint:
    """Floats as uint32 two's complement fixed point, so sums of n inputs never wrap."""

    clip: float  # every coordinate is clipped to [-clip, clip]
    scale: int  # a power of two

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be finite and > 0")
        if self.scale < 1 or self.scale & (self.scale - 1):
            raise ValueError("scale must be a power of two >= 1")
        if self.clip * self.scale + 1 >= 2**31:
            raise ValueError("clip·scale must stay below 2^31 - 1: one input must fit int32")

    @classmethod
    def for_sum(cls, clip: float, n: int) -> FixedPoint:
        """The finest power-of-two scale with n·(clip·scale + 1) < 2^31.

        A stochastically rounded coordinate is at most clip·scale + 1 in magnitude, so the
        signed sum of n of them fits in an int32: the uint32 sum decodes without wrapping.
        """
        if n < 1 or not (math.isfinite(clip) and clip > 0):
            raise ValueError("need n >= 1 and a finite clip > 0")
        if n * (clip + 1) >= 2**31:
            raise ValueError(f"no scale keeps the sum of {n} inputs clipped at {clip} in int32")
        scale = 1
        while n * (clip * scale * 2 + 1) < 2**31:
            scale *= 2
        return cls(clip, scale)

    def encode(self, x: np.ndarray, out: np.ndarray) -> int:
        """out ← round(clip(x)·scale) as uint32, stochastically; returns how many were clipped.

        Stochastic rounding, floor(v + u) with u uniform in [0, 1), is unbiased, so the
        rounding errors of many clients average out instead of adding up. u comes from
        an AES-CTR stream under a fresh random key.
        """
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            raise ValueError("x must be a float array")
        if not isinstance(out, np.ndarray) or out.dtype != np.uint32 or out.shape != x.shape:
            raise ValueError(f"out must be uint32 of shape {x.shape}")
        if x.size == 0:
            return 0
        if not np.isfinite(x).all():
            raise ValueError("x has non-finite values")
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        v = x.astype(np.float64).ravel()
        np.clip(v, -self.clip, self.clip, out=v)
        v *= self.scale
        u = Keystream(x.size).fill(os.urandom(32), np.empty(x.size, np.uint32))
        v += u * 2.0**-32  # exact in float64: u < 2^32, |v| < 2^31
        np.floor(v, out=v)
        out[...] = v.astype(np.int32).view(np.uint32).reshape(x.shape)
        return clipped

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A uint32 (sum of) encoded vector(s) → float64."""
        if not isinstance(total, np.ndarray) or total.dtype != np.uint32:
            raise ValueError("total must be uint32")
        return total.view(np.int32) / self.scale


# ------------------------------------------------------------------ parameters

SECURITY_BITS = 40  # σ: a round leaks with probability below 2^-40 (Bell et al.'s choice)
CORRECTNESS_BITS = 20  # η: a round fails (and is retried) with probability below 2^-20
DROPOUT = 0.2  # δ: the expected fraction of clients that do not finish a round (and
CORRUPT = 0.1  # γ: the fraction that may collude with the server), as SecureSpec has them


@dataclass(frozen=True)
class Params:
    job: str
    round: int
    degree: int  # k, neighbours per client
    threshold: int  # t, shares needed to reconstruct a secret (2 <= t <= degree)
    length: int  # uint32 words in each masked vector

    def __post_init__(self) -> None:
        if not self.job or "\0" in self.job or self.round < 0 or self.length < 1:
            raise ValueError("need a job without NUL, round >= 0, length >= 1")
        # Each holder reveals one share of a client j: of b_j or of s_sk_j, never both. b_j
        # has k+1 holders (j keeps one), s_sk_j has k; 2t > k+1 means no split of them, even
        # one a lying server provokes, yields t of each: y_j can never be unmasked alone.
        if not (2 <= self.threshold <= self.degree and 2 * self.threshold > self.degree + 1):
            raise ValueError(f"need 2 <= t <= k and 2t > k+1, got t={self.threshold} "
                             f"k={self.degree}")

    def context(self) -> bytes:
        """Bound into every KDF, signature and AAD: nothing carries over between rounds."""
        return b"hfl/secagg/v1\0" + self.job.encode() + b"\0" + self.round.to_bytes(8, "big")


def params_for(job: str, round: int, n: int, length: int, threshold: float | None = None,
               degree: int = 0, dropout: float = DROPOUT, corrupt: float = CORRUPT) -> Params:
    """Protocol parameters for n selected clients: (k, t) from `choose_params`, for the
    expected dropout and corrupt fractions, or as given.

    Needs n >= 3: with two clients, each would learn the other's input from the sum anyway.
    """
    k, t = choose_params(n, dropout, corrupt, degree, threshold)
    return Params(job, round, k, t, length)


@functools.lru_cache(maxsize=1024)
def choose_params(n: int, dropout: float = DROPOUT, corrupt: float = CORRUPT, degree: int = 0,
                  threshold: float | None = None, sigma: float = SECURITY_BITS,
                  eta: float = CORRECTNESS_BITS) -> tuple[int, int]:
    """The degree k and threshold t for n clients, of which a fraction `dropout` (δ) are
    expected not to finish the round and a fraction `corrupt` (γ) may collude with the
    server, after Bell et al. (CCS 2020) for the Harary graph that `neighbours` builds: the
    smallest even k, and for it the smallest t, such that

    - a round leaks with probability at most 2^-sigma: half of that for `leak_bound` (some
      client's secrets rebuilt by corrupt neighbours), half for `split_bound` (the server
      learns the sums of parts of the group), and
    - a round fails with probability at most 2^-eta (`failure_bound`; it is retried).

    Where no sparse graph meets both, the complete graph (k = n-1) with the smallest t that
    meets the first: it tolerates the most dropout any t > k/2 allows, as the round then
    needs only t clients to finish. With the defaults that is n < 70 (δ = 0.1: n < 30;
    δ = 0.3: n < 190). Small rounds may then fail more often than 2^-eta: at n = 10,
    t = 6 of the 10 must finish, which independent 30 % dropout misses in 15 % of rounds.

    t > (k+1)/2 always (`Params`), which is what makes high dropout costly: every
    neighbourhood must keep more than half its members, so k grows quickly as δ nears 1/2
    (at n = 1000: k = 46 for δ = 0.1, 80 for 0.2, 206 for 0.3).

    An explicit `degree` fixes k (an odd one rounds up to even, as `neighbours` does; n-1
    or more is the complete graph) and t is chosen for it; an explicit `threshold` fraction
    in (1/2, 1] fixes t = ceil(threshold·k) (at least k/2 + 1) and k is chosen for it; both
    explicit: as given, whatever the bounds say. Cached, as both sides call it every round;
    they must agree, and do unless a bound lands within float rounding (~1e-12 relative)
    of 2^-sigma or 2^-eta.
    """
    if n < MIN_CLIENTS:
        raise ValueError(f"secure aggregation needs n >= {MIN_CLIENTS}")
    if not (0 <= dropout < 1 and 0 <= corrupt < 0.5 and sigma > 0 and eta > 0):
        # Half the clients corrupt would outnumber any t > k/2 of a client's neighbours.
        raise ValueError("need dropout in [0, 1), corrupt in [0, 1/2), sigma and eta > 0")
    if threshold is not None and not 0.5 < threshold <= 1:
        raise ValueError("threshold is a fraction in (1/2, 1]: t must exceed k/2")
    if degree < 0:
        raise ValueError("degree must be >= 0 (0 = auto)")
    c = math.ceil(corrupt * n - 1e-9)  # 0.1·30 must give 3 even if it rounds up
    half = 2.0 ** -(sigma + 1)
    if degree:
        k = min(degree + degree % 2, n - 1)
        return k, _threshold(n, k, c, threshold, half)
    for k in range(2, n - 1, 2):  # the sparse graphs, least work first
        # One term of failure_bound at the least t allowed: an O(1) lower bound that
        # skips the degrees too small for the dropout without changing the answer.
        least = _threshold(n, k, c, threshold, None)
        if n * dropout * _binom_pmf(k, 1 - dropout, least - 1) > 2.0**-eta:
            continue
        t = _threshold(n, k, c, threshold, half)
        if (failure_bound(n, k, t, dropout) <= 2.0**-eta and leak_bound(n, k, t, c) <= half
                and split_bound(n, k, c, dropout) <= half):
            return k, t
    return n - 1, _threshold(n, n - 1, c, threshold, half)  # the complete graph


def _threshold(n: int, k: int, c: int, fraction: float | None, budget: float | None) -> int:
    """t for degree k: ceil(fraction·k) if given, else the smallest t whose leak_bound is
    within `budget` (None: the smallest t allowed); never below k/2 + 1, never above k."""
    t = (k + 1) // 2 + 1  # 2t > k+1
    if fraction is not None:
        return max(t, math.ceil(fraction * k - 1e-9))  # 2/3·9 must give 6
    if budget is None:
        return t
    hi = k  # leak_bound falls as t grows: bisect, O(log k) tails
    while t < hi:
        mid = (t + hi) // 2
        t, hi = (mid + 1, hi) if leak_bound(n, k, mid, c) > budget else (t, mid)
    return t


# The bounds assume the graph independent of who is corrupt (c clients, fixed before the
# round) and of who drops (each client on its own with probability δ, at any stage), as
# Bell et al. do. `neighbours` places the ids on a ring in an order hashed from the round's
# context, so a client's k neighbours are a uniform k-subset of the others.


def leak_bound(n: int, k: int, t: int, c: int) -> float:
    """P(some honest client has t or more corrupt neighbours), of c corrupt among n: they
    and the server would hold both its secrets (b and s_sk) and so its input. A union
    bound over the honest clients of the hypergeometric tail; exact for the complete graph."""
    return min(1.0, (n - c) * _hyper_sf(n - 1, c, k, t))


def split_bound(n: int, k: int, c: int, dropout: float) -> float:
    """P(the honest clients in the sum fall into two or more components of the graph): the
    server would learn each component's sum. Removing nodes from a ring where each links
    to k/2 places on either side splits it only where k/2 consecutive places are removed
    (corrupt or dropped) between two kept ones, twice. A union bound over the pairs of such
    places: n(n-k-1)/2 of them."""
    h = k // 2
    if k >= n - 1:
        return 0.0
    kept, gone = 2, 2 * h  # two honest survivors, then h removed after each
    free = n - kept - gone
    # j of the removed places are corrupt, the other gone - j honest and dropped.
    p = sum(math.exp(_log_comb(gone, j) + _log_comb(free, c - j) - _log_comb(n, c))
            * dropout ** (gone - j) for j in range(max(0, c - free), min(c, gone) + 1))
    return min(1.0, n * (n - k - 1) / 2 * (1 - dropout) ** kept * p)


def failure_bound(n: int, k: int, t: int, dropout: float) -> float:
    """P(some secret the server needs has fewer than t shares from the clients that finish).

    A client that finishes needs t-1 of its k neighbours to finish (it holds a share of its
    own b); one that drops needs t of them (its s_sk, or its b when it drops after masking).
    A union bound over the clients; for the complete graph, exactly P(fewer than t finish).
    """
    q = 1 - dropout
    if k >= n - 1:
        return _binom_cdf(n, q, t - 1)
    return min(1.0, n * (q * _binom_cdf(k, q, t - 2) + dropout * _binom_cdf(k, q, t - 1)))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hyper_pmf(population: int, marked: int, draws: int, x: int) -> float:
    if not (0 <= x <= marked and 0 <= draws - x <= population - marked):
        return 0.0
    return math.exp(_log_comb(marked, x) + _log_comb(population - marked, draws - x)
                    - _log_comb(population, draws))


def _binom_pmf(k: int, p: float, x: int) -> float:
    if not 0 <= x <= k:
        return 0.0
    if p in (0.0, 1.0):
        return float(x == k * p)
    return math.exp(_log_comb(k, x) + x * math.log(p) + (k - x) * math.log1p(-p))


def _hyper_sf(population: int, marked: int, draws: int, x: int) -> float:
    """P(X >= x) for X hypergeometric: `draws` from `population` of which `marked`."""
    x = max(x, draws - (population - marked), 0)  # the least X can be
    return _series(_hyper_pmf(population, marked, draws, x), range(x, min(marked, draws)),
                   lambda i: (marked - i) * (draws - i)
                   / ((i + 1) * (population - marked - draws + i + 1)))


def _binom_cdf(k: int, p: float, x: int) -> float:
    """P(X <= x) for X ~ Bin(k, p)."""
    if x < 0 or p == 1 and x < k:
        return 0.0
    if x >= k or p == 0:
        return 1.0
    if x > k * p:  # above the mean: from the other tail, whose terms fall away from x
        return 1.0 - _binom_cdf(k, 1 - p, k - x - 1)
    odds = (1 - p) / p
    return _series(_binom_pmf(k, p, x), range(x, 0, -1), lambda i: i / (k - i + 1) * odds)


def _series(first: float, steps: range, ratio: Callable[[int], float]) -> float:
    """A tail of a unimodal distribution from its first term: each next term is the last
    times ratio(i), i along `steps`. Stops once the terms no longer change the sum (they
    only shrink, past the mode): O(1) terms far in a tail rather than O(k)."""
    total = term = first
    for i in steps:
        term *= ratio(i)
        if term <= total * 2**-60:
            break
        total += term
    return min(1.0, total)


# ------------------------------------------------------------------ key derivation


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def _exchange(sk: X25519PrivateKey, pk: bytes, who: str) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise Rejected("secagg-bad-advert", f"{who}: unusable X25519 key") from None


def _self_key(ctx: bytes, b: bytes) -> bytes:
    return _hkdf(b, ctx + b"self")


def _pair_key(ctx: bytes, s_sk: X25519PrivateKey, s_pk: bytes, who: str) -> bytes:
    return _hkdf(_exchange(s_sk, s_pk, who), ctx + b"mask")


def _share_key(ctx: bytes, agreed: bytes, sender: str, recipient: str) -> bytes:
    # One key per direction from the pair's one X25519 agreement: the info names sender
    # and recipient.
    info = ctx + b"share" + sender.encode() + b"\0" + recipient.encode()
    return _hkdf(agreed, info)


def _aad(ctx: bytes, sender: str, recipient: str) -> bytes:
    return ctx + sender.encode() + b"\0" + recipient.encode()


def _commit(ctx: bytes, b: bytes) -> bytes:
    return hashlib.sha256(ctx + b).digest()


def _x_index(members: Iterable[str]) -> dict[str, int]:
    """Each client's Shamir x: its 1-based place in sorted(U1)."""
    return {i: k + 1 for k, i in enumerate(sorted(members))}


def _graph_seed(ctx: bytes) -> bytes:
    return hashlib.sha256(ctx).digest()


def _sign(me: str, other: str) -> int:
    return 1 if me < other else -1


# ------------------------------------------------------------------ adverts


@dataclass(frozen=True)
class Advert:
    """What a client publishes first."""

    c_pk: bytes  # X25519 public key (32 B) for sealing shares
    s_pk: bytes  # X25519 public key (32 B) for pairwise mask agreement
    b_commit: bytes  # SHA-256(context + b): lets the server check a reconstructed b
    signature: bytes  # Ed25519 over context + id + NUL + c_pk + s_pk + b_commit

    def well_formed(self) -> bool:
        return all(isinstance(v, bytes) for v in (self.c_pk, self.s_pk, self.b_commit,
                                                  self.signature)) and (
            len(self.c_pk), len(self.s_pk), len(self.b_commit), len(self.signature)
        ) == (32, 32, 32, 64)

    def signed_bytes(self, ctx: bytes, client: str) -> bytes:
        # The id binds the keys to their owner: the server cannot swap one client's keys
        # for its own when it forwards the table.
        return ctx + client.encode() + b"\0" + self.c_pk + self.s_pk + self.b_commit


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


# ------------------------------------------------------------------ the client


def _check_id(id: str) -> None:
    if not isinstance(id, str) or not id or "\0" in id:
        raise ValueError("a client id is a non-empty str without NUL")


class ClientStage(IntEnum):
    """Where a client is in its round: each call moves it one stage on, once."""

    ADVERTISED = 1  # its advert is ready; share() comes next
    SHARED = 2  # U1's adverts verified, its shares sealed; receive() next
    RECEIVED = 3  # its neighbours' shares opened; mask() next
    MASKED = 4  # its masked input given out; unmask() next
    UNMASKED = 5  # its unmasking shares given out: done


# (stage, call) → the stage the call leaves the client in.
CLIENT_TRANSITIONS: dict[tuple[ClientStage, str], ClientStage] = {
    (ClientStage.ADVERTISED, "share"): ClientStage.SHARED,
    (ClientStage.SHARED, "receive"): ClientStage.RECEIVED,
    (ClientStage.RECEIVED, "mask"): ClientStage.MASKED,
    (ClientStage.MASKED, "unmask"): ClientStage.UNMASKED,
}


class Client:
    """One client's side of a round. Each stage answers once: share, receive and unmask
    repeat their answer for the same input (a retransmission) and refuse a different one;
    mask refuses any second call."""

    def __init__(self, id: str, params: Params, signing_key: Ed25519PrivateKey) -> None:
        _check_id(id)
        self.id, self.params = id, params
        self._ctx = params.context()
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b = os.urandom(SECRET_BYTES)
        c_pk, s_pk = _raw_public(self._c_sk), _raw_public(self._s_sk)
        unsigned = Advert(c_pk, s_pk, _commit(self._ctx, self._b), b"")
        self._advert = Advert(c_pk, s_pk, unsigned.b_commit,
                              signing_key.sign(unsigned.signed_bytes(self._ctx, id)))
        self._adverts: dict[str, Advert] | None = None  # U1, once shared
        self._shared: dict[str, bytes] = {}
        self._xs: dict[str, int] = {}
        self._open_keys: dict[str, bytes] = {}  # neighbour → key of its share to me
        self._mask_keys: dict[str, bytes] = {}
        self._own_b_share = 0
        self._received: dict[str, tuple[int, int]] | None = None  # sender → (b, s) shares
        self._receive_input: dict[str, bytes] = {}
        self._stage = ClientStage.ADVERTISED  # y is not kept: O(1) memory beyond the keys
        self._unmasked: tuple[list[str], dict[str, int]] | None = None

    @property
    def stage(self) -> ClientStage:
        return self._stage

    def _step(self, call: str) -> None:
        """Move on by the one transition `call` makes from the current stage."""
        nxt = CLIENT_TRANSITIONS.get((self._stage, call))
        if nxt is None:
            raise Rejected("secagg-wrong-stage", f"{call}() during stage {self._stage.name}")
        self._stage = nxt

    def advertise(self) -> Advert:
        return self._advert

    def share(self, adverts: dict[str, Advert],
              verify_key: Callable[[str], Ed25519PublicKey | None]) -> dict[str, bytes]:
        """Verify U1's adverts, split b and s_sk among my neighbours: neighbour → ciphertext.

        Every id must be enrolled and every advert well formed, but only my neighbours'
        signatures are checked: theirs are the only keys I use (to seal my shares and to
        mask), and each advert is checked by its own neighbours. That is O(k) signatures a
        client, not O(n), so O(n·k) a round rather than O(n²)."""
        if self._stage >= ClientStage.SHARED:
            if adverts == self._adverts:
                return dict(self._shared)
            raise Rejected("secagg-replay", "a second, different advert table")
        p, ctx = self.params, self._ctx
        if adverts.get(self.id) != self._advert:
            raise Rejected("secagg-bad-advert", "my own advert is missing or altered")
        if len(adverts) < p.threshold + 1:
            raise Rejected("secagg-too-few", f"{len(adverts)} adverts < t+1 = {p.threshold + 1}")
        keys: dict[str, Ed25519PublicKey] = {}
        for cid, ad in adverts.items():
            if not isinstance(cid, str) or not isinstance(ad, Advert) or not ad.well_formed():
                raise Rejected("secagg-bad-advert", f"{cid!r}: malformed")
            if (vk := verify_key(cid)) is None:
                raise Rejected("secagg-bad-advert", f"{cid}: unknown identity")
            keys[cid] = vk
        mine = neighbours_of(self.id, list(adverts), p.degree, _graph_seed(ctx))
        for cid in mine:
            try:
                keys[cid].verify(adverts[cid].signature, adverts[cid].signed_bytes(ctx, cid))
            except InvalidSignature:
                raise Rejected("secagg-bad-advert", f"{cid}: bad signature") from None
        xs = _x_index(adverts)
        # Derive every key first: a bad key in the table rejects it before anything leaks.
        agreed = {j: _exchange(self._c_sk, adverts[j].c_pk, j) for j in mine}
        seal = {j: _share_key(ctx, agreed[j], self.id, j) for j in mine}
        open_ = {j: _share_key(ctx, agreed[j], j, self.id) for j in mine}
        mask_keys = {j: _pair_key(ctx, self._s_sk, adverts[j].s_pk, j) for j in mine}
        # b also gets a share for me (x = my own index): revealed only once I survive.
        points = [xs[j] for j in mine]
        b_shares = shamir_split(self._b, [*points, xs[self.id]], p.threshold)
        s_shares = shamir_split(self._s_sk.private_bytes_raw(), points, p.threshold)
        out = {}
        for j, yb, ys in zip(mine, b_shares[:-1], s_shares, strict=True):
            plain = (_SHARE_PLAIN.pack(xs[self.id], xs[j]) + yb.to_bytes(SHARE_BYTES, "big")
                     + ys.to_bytes(SHARE_BYTES, "big"))
            # A zero nonce is safe: this key seals exactly one message (sender, recipient,
            # round are all in its HKDF info, and share() seals once).
            out[j] = AESGCM(seal[j]).encrypt(_ZERO_NONCE, plain, _aad(ctx, self.id, j))
        self._own_b_share = b_shares[-1]  # the self-share never leaves until unmask
        self._adverts, self._xs = dict(adverts), xs
        self._mask_keys, self._open_keys, self._shared = mask_keys, open_, out
        self._step("share")
        return dict(out)

    def receive(self, shares: dict[str, bytes]) -> None:
        """The ciphertexts addressed to me (sender → ct) from the neighbours in U2."""
        if self._stage < ClientStage.SHARED:
            raise Rejected("secagg-wrong-stage", "receive() before share()")
        if self._stage >= ClientStage.RECEIVED:
            if shares == self._receive_input:
                return
            raise Rejected("secagg-replay", "a second, different set of shares")
        ctx, me = self._ctx, self.id
        got: dict[str, tuple[int, int]] = {}
        for sender, ct in shares.items():
            key = self._open_keys.get(sender)
            if key is None:
                raise Rejected("secagg-bad-share", f"{sender!r} is not my neighbour")
            if not isinstance(ct, bytes) or len(ct) != CT_BYTES:
                raise Rejected("secagg-bad-share", f"{sender}: want {CT_BYTES} bytes")
            try:
                plain = AESGCM(key).decrypt(_ZERO_NONCE, ct, _aad(ctx, sender, me))
            except InvalidTag:
                raise Rejected("secagg-bad-share", f"{sender}: bad tag") from None
            x_from, x_to = _SHARE_PLAIN.unpack_from(plain)
            off = _SHARE_PLAIN.size
            yb = int.from_bytes(plain[off : off + SHARE_BYTES], "big")
            ys = int.from_bytes(plain[off + SHARE_BYTES :], "big")
            if (x_from, x_to) != (self._xs[sender], self._xs[me]) or max(yb, ys) >= PRIME:
                raise Rejected("secagg-bad-share", f"{sender}: wrong indices or values")
            got[sender] = (yb, ys)
        self._received, self._receive_input = got, dict(shares)
        self._step("receive")

    def mask(self, x: np.ndarray) -> np.ndarray:
        """y = x + PRG(b) + Σ ±PRG(s_ij) mod 2^32 over the neighbours that shared with me."""
        p = self.params
        if not isinstance(x, np.ndarray) or x.dtype != np.uint32 or x.shape != (p.length,):
            raise ValueError(f"x must be uint32[{p.length}]")
        if self._stage < ClientStage.RECEIVED:
            raise Rejected("secagg-wrong-stage", "mask() before receive()")
        if self._stage >= ClientStage.MASKED:
            # Two inputs under the same masks would reveal their difference; resending y
            # is the caller's business.
            raise Rejected("secagg-replay", "mask() answers once")
        assert self._received is not None
        y = np.array(x, dtype=np.uint32, order="C", copy=True)
        terms = [(_self_key(self._ctx, self._b), 1)]
        terms += [(self._mask_keys[j], _sign(self.id, j)) for j in sorted(self._received)]
        Keystream(p.length).mix(terms, y)
        self._step("mask")
        return y

    def unmask(self, survivors: Sequence[str]) -> dict[str, int]:
        """For each neighbour that shared with me: its b share if it survived, else its s share.

        Plus my own b share (I am a survivor). Never both shares of one neighbour: a second
        call with another survivor list is refused.
        """
        if self._stage < ClientStage.MASKED:
            raise Rejected("secagg-wrong-stage", "unmask() before mask()")
        assert self._received is not None and self._adverts is not None
        alive = [] if isinstance(survivors, str) else sorted(survivors, key=str)
        if isinstance(survivors, str) or not all(isinstance(s, str) for s in alive):
            raise Rejected("secagg-bad-survivors", "want a list of ids")
        if self._stage >= ClientStage.UNMASKED:
            assert self._unmasked is not None
            if alive == self._unmasked[0]:
                return dict(self._unmasked[1])
            raise Rejected("secagg-replay", "a second, different survivor list")
        if len(alive) < self.params.threshold:
            raise Rejected("secagg-too-few", f"{len(alive)} survivors < t")
        if len(set(alive)) != len(alive) or not set(alive) <= set(self._adverts):
            raise Rejected("secagg-bad-survivors", "duplicates or ids outside U1")
        if self.id not in alive:
            raise Rejected("secagg-bad-survivors", "I am not among the survivors")
        live = set(alive)
        out = {j: (yb if j in live else ys) for j, (yb, ys) in self._received.items()}
        out[self.id] = self._own_b_share
        self._unmasked = (alive, out)
        self._step("unmask")
        return dict(out)


# ------------------------------------------------------------------ the server


@dataclass
class _Secret:
    """What the server must rebuild for one client: b (survivor) or s_sk (dropped)."""

    owner: str
    is_b: bool
    points: list[tuple[int, int]] = field(default_factory=list)


def _subsets(m: int, t: int):
    """t-subsets of range(m), those leaving out the fewest of the first points first."""
    seen: set[tuple[int, ...]] = set()
    for drop in range(m - t + 1):
        for gone in itertools.combinations(range(m), drop):
            subset = tuple(k for k in range(m) if k not in gone)[:t]
            if subset not in seen:
                seen.add(subset)
                yield subset


def _seen(table: dict, sender: str, value: object, what: str) -> bool:
    """True when `sender` already gave this very `value` (a redelivery, ignored); a second,
    different one is a protocol violation."""
    old = table.get(sender)
    if old is None:
        return False
    if old == value:
        return True
    raise Rejected("secagg-duplicate", f"{sender}: a second, different {what}")


class Stage(IntEnum):
    """The server's stages: the set each collects, frozen by the event that ends it. The
    values are what a checkpoint stores ("stage": int)."""

    ADVERTS = 1  # collecting adverts; freeze_adverts() fixes U1
    SHARES = 2  # collecting sealed shares; freeze_shares() fixes U2
    MASKED = 3  # summing masked inputs; freeze_survivors() fixes U3
    UNMASK = 4  # collecting unmasking shares, until result()


# (stage, event) → the stage the event moves the server to: the only way it moves.
TRANSITIONS: dict[tuple[Stage, str], Stage] = {
    (Stage.ADVERTS, "freeze_adverts"): Stage.SHARES,
    (Stage.SHARES, "freeze_shares"): Stage.MASKED,
    (Stage.MASKED, "freeze_survivors"): Stage.UNMASK,
}
EVENTS = tuple(sorted({event for _, event in TRANSITIONS}))


class Server:
    """The server's side of a round: four stages, each frozen once, then the exact sum.

    The stage moves only by `TRANSITIONS`, through the commands freeze_adverts(),
    freeze_shares() and freeze_survivors(); key_table(), routed() and survivors() only read
    what a freeze fixed.

    Every add_* validates fully before it changes anything, so a rejected message leaves
    the state as it was. Stage 3 is a streaming sum: O(length) memory for any n, and no
    client's masked vector is ever stored.
    """

    def __init__(self, params: Params, selected: Sequence[str]) -> None:
        for i in selected:
            _check_id(i)
        if len(set(selected)) != len(selected):
            raise ValueError("selected ids must be distinct")
        self.params = params
        self._ctx = params.context()
        self._selected = set(selected)
        self._stage = Stage.ADVERTS
        self._probe = X25519PrivateKey.generate()  # to test advertised keys for low order
        self._adverts: dict[str, Advert] = {}
        self._graph: dict[str, list[str]] = {}
        self._xs: dict[str, int] = {}
        self._shares: dict[str, dict[str, bytes]] = {}
        self._routed: dict[str, dict[str, bytes]] = {}
        self._acc = np.zeros(params.length, dtype=np.uint32)
        self._masked: set[str] = set()
        self._u3: list[str] = []
        self._unmasks: dict[str, dict[str, int]] = {}

    # -- read-only views

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def u1(self) -> list[str]:
        return sorted(self._adverts)

    @property
    def u2(self) -> list[str]:
        return sorted(self._shares)

    @property
    def u3(self) -> list[str]:
        return list(self._u3) if self._stage >= Stage.UNMASK else sorted(self._masked)

    def answered(self, stage: Stage, sender: str) -> bool:
        """Whether `sender`'s message of `stage` (advert, shares, masked input, unmasking
        shares) is in the round already: a copy of it is a repeat."""
        return sender in (self._adverts, self._shares, self._masked, self._unmasks)[stage - 1]

    def key_table(self) -> dict[str, Advert]:
        """U1's adverts, for every client (once freeze_adverts() fixed U1)."""
        if self._stage < Stage.SHARES:
            raise Rejected("secagg-wrong-stage", "key_table() before freeze_adverts()")
        return dict(sorted(self._adverts.items()))

    def routed(self) -> dict[str, dict[str, bytes]]:
        """recipient → {sender: ct}, for every recipient in U2 (once freeze_shares() fixed
        U2)."""
        if self._stage < Stage.MASKED:
            raise Rejected("secagg-wrong-stage", "routed() before freeze_shares()")
        return {r: dict(row) for r, row in self._routed.items()}

    def survivors(self) -> list[str]:
        """U3: the clients whose masked input is in the sum (once freeze_survivors() fixed
        it)."""
        if self._stage < Stage.UNMASK:
            raise Rejected("secagg-wrong-stage", "survivors() before freeze_survivors()")
        return list(self._u3)

    @property
    def dropped(self) -> list[str]:
        """U2 \\ U3: clients whose masks were recovered (empty before U3 is frozen)."""
        return sorted(set(self._shares) - set(self._u3)) if self._stage >= Stage.UNMASK else []

    # -- checkpoints: the server holds nothing secret (public keys, ciphertexts it only
    # routes, masked inputs summed, shares revealed to it), so its state may go to disk.
    # It comes in two parts, so that a save after each message writes only what changed:
    # the round's own state, and what each client sent (written once, when it arrives).

    def export(self) -> dict:
        """The round's own state: its stage and who is in the sum (the sum itself, which
        changes only in stage 3, is `acc`)."""
        return {"stage": int(self._stage), "masked": sorted(self._masked), "u3": list(self._u3)}

    @property
    def acc(self) -> np.ndarray:
        """The running sum of the masked inputs (read-only for checkpoints)."""
        view = self._acc.view()
        view.flags.writeable = False
        return view

    def export_client(self, sender: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """What `sender` added to the round (advert, shares, unmasking shares), or None."""
        ad = self._adverts.get(sender)
        if ad is None:
            return None
        doc: dict = {"advert": [ad.c_pk.hex(), ad.s_pk.hex(), ad.b_commit.hex(),
                                ad.signature.hex()]}
        arrays: dict[str, np.ndarray] = {}
        row = self._shares.get(sender)
        if row is not None:
            doc["shares"] = sorted(row)
            cts = b"".join(row[r] for r in doc["shares"])
            arrays["cts"] = np.frombuffer(cts, np.uint8).reshape(len(row), CT_BYTES)
        unmask = self._unmasks.get(sender)
        if unmask is not None:
            doc["unmask"] = {j: format(y, "x") for j, y in sorted(unmask.items())}
        return doc, arrays

    @classmethod
    def restore(cls, params: Params, selected: Sequence[str], doc: dict,
                acc: np.ndarray | None,
                clients: Mapping[str, tuple[dict, dict[str, np.ndarray]]]) -> Server:
        """A server in the state `export`, `acc` (None: nothing summed yet) and
        `export_client` (sender → its record) saved (ValueError/KeyError if it does not
        fit)."""
        if "adverts" in doc:  # the whole state in one record, as hfl saved it before
            raise ValueError("a SecAgg+ round saved in an older format")
        server = cls(params, selected)
        for sender, (cdoc, carrays) in sorted(clients.items()):
            server._adverts[sender] = Advert(*(bytes.fromhex(v) for v in cdoc["advert"]))
            if "shares" in cdoc:
                cts = carrays["cts"]
                server._shares[sender] = {r: cts[k].tobytes()
                                          for k, r in enumerate(cdoc["shares"])}
            if "unmask" in cdoc:
                server._unmasks[sender] = {j: int(y, 16) for j, y in cdoc["unmask"].items()}
        server._stage = Stage(int(doc["stage"]))
        if server._stage >= Stage.SHARES:  # derived from U1, as freeze_adverts() derived them
            server._graph = neighbours(list(server._adverts), params.degree,
                                       _graph_seed(server._ctx))
            server._xs = _x_index(server._adverts)
        if server._stage >= Stage.MASKED:
            server._route()
        if acc is not None:
            if acc.shape != server._acc.shape or acc.dtype != np.uint32:
                raise ValueError(f"saved sum is {acc.dtype}{list(acc.shape)}")
            server._acc[...] = acc
        server._masked = set(doc["masked"])
        server._u3 = list(doc["u3"])
        return server

    # -- checks shared by the stages

    def _expect(self, stage: Stage, sender: str,
                members: Sequence[str] | set[str] | dict) -> None:
        if sender not in self._selected:
            raise Rejected("secagg-not-selected", f"{sender!r}")
        if self._stage != stage:
            raise Rejected("secagg-wrong-stage", f"stage {int(stage)} message during stage "
                           f"{int(self._stage)}")
        if sender not in members:
            raise Rejected("secagg-unexpected-sender", f"{sender} left the round earlier")

    def _next(self, event: str) -> Stage:
        """The stage `event` moves to from the current one; an event the table does not
        allow here is refused, and nothing changes."""
        nxt = TRANSITIONS.get((self._stage, event))
        if nxt is None:
            raise Rejected("secagg-wrong-stage",
                           f"{event}() during stage {int(self._stage)} ({self._stage.name})")
        return nxt

    # -- stage 1

    def add_advert(self, sender: str, advert: Advert) -> None:
        self._expect(Stage.ADVERTS, sender, self._selected)
        if not isinstance(advert, Advert) or not advert.well_formed():
            raise Rejected("secagg-bad-advert", f"{sender}: malformed")
        if _seen(self._adverts, sender, advert, "advert"):
            return
        _exchange(self._probe, advert.c_pk, sender)
        _exchange(self._probe, advert.s_pk, sender)
        self._adverts[sender] = advert

    def freeze_adverts(self) -> None:
        """Freeze U1 (its adverts, `key_table()`, go to every client)."""
        nxt = self._next("freeze_adverts")
        t = self.params.threshold
        if len(self._adverts) < t + 1:
            raise Rejected("secagg-too-few", f"{len(self._adverts)} adverts < t+1 = {t + 1}")
        self._graph = neighbours(list(self._adverts), self.params.degree,
                                 _graph_seed(self._ctx))
        self._xs = _x_index(self._adverts)
        self._stage = nxt

    # -- stage 2

    def add_shares(self, sender: str, cts: dict[str, bytes]) -> None:
        self._expect(Stage.SHARES, sender, self._adverts)
        if not isinstance(cts, dict) or sorted(cts) != self._graph[sender]:
            raise Rejected("secagg-bad-share", f"{sender}: recipients are not its neighbours")
        if not all(isinstance(c, bytes) and len(c) == CT_BYTES for c in cts.values()):
            raise Rejected("secagg-bad-share", f"{sender}: want {CT_BYTES}-byte ciphertexts")
        if not _seen(self._shares, sender, cts, "set of shares"):
            self._shares[sender] = dict(cts)

    def freeze_shares(self) -> None:
        """Freeze U2 and route its shares (`routed()`: each recipient's row)."""
        nxt = self._next("freeze_shares")
        t = self.params.threshold
        if len(self._shares) < t:
            raise Rejected("secagg-too-few", f"{len(self._shares)} shared < t = {t}")
        self._route()
        self._stage = nxt

    def _route(self) -> None:
        self._routed = {r: {} for r in sorted(self._shares)}
        for sender in sorted(self._shares):
            for r, ct in self._shares[sender].items():
                if r in self._routed:
                    self._routed[r][sender] = ct

    # -- stage 3

    def add_masked(self, sender: str, y: np.ndarray) -> None:
        self._expect(Stage.MASKED, sender, self._shares)
        if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.shape != self._acc.shape:
            raise Rejected("secagg-bad-masked", f"{sender}: want uint32[{self.params.length}]")
        if sender in self._masked:
            raise Rejected("secagg-duplicate", f"{sender}: a second masked input")
        np.add(self._acc, y, out=self._acc)
        self._masked.add(sender)

    def freeze_survivors(self) -> None:
        """Freeze U3: the clients whose masked input is in the sum (`survivors()`)."""
        nxt = self._next("freeze_survivors")
        if len(self._masked) < self.params.threshold:
            raise Rejected("secagg-too-few",
                           f"{len(self._masked)} survivors < t = {self.params.threshold}")
        self._u3 = sorted(self._masked)
        self._stage = nxt

    # -- stage 4

    def _expected_unmask(self, sender: str) -> list[str]:
        return sorted({j for j in self._graph[sender] if j in self._shares} | {sender})

    def add_unmask(self, sender: str, shares: dict[str, int]) -> None:
        self._expect(Stage.UNMASK, sender, set(self._u3))
        if not isinstance(shares, dict) or sorted(shares) != self._expected_unmask(sender):
            raise Rejected("secagg-bad-share", f"{sender}: not one share per neighbour in U2")
        if not all(type(v) is int and 0 <= v < PRIME for v in shares.values()):
            raise Rejected("secagg-bad-share", f"{sender}: a share outside the field")
        if not _seen(self._unmasks, sender, shares, "set of shares"):
            self._unmasks[sender] = dict(shares)

    def _secrets(self) -> list[_Secret]:
        """b of each survivor; s_sk of each dropped client that a survivor masked with."""
        u3 = set(self._u3)
        out = {j: _Secret(j, j in u3) for j in sorted(self._shares)
               if j in u3 or u3.intersection(self._graph[j])}
        for sender in sorted(self._unmasks):
            for j, y in self._unmasks[sender].items():
                if j in out:
                    out[j].points.append((self._xs[sender], y))
        return list(out.values())

    def ready(self) -> bool:
        """Whether every secret needed has at least t shares."""
        if self._stage != Stage.UNMASK:
            return False
        return all(len(s.points) >= self.params.threshold for s in self._secrets())

    def _rebuild(self, secret: _Secret) -> bytes:
        """The secret from some t-subset of its shares that passes its check.

        Subsets leaving out the fewest shares come first, so one bad share costs at most
        a few more interpolations.
        """
        t, pts, ad = self.params.threshold, secret.points, self._adverts[secret.owner]
        for subset in itertools.islice(_subsets(len(pts), t), _MAX_TRIES):
            value = _interpolate0([pts[k] for k in subset])
            if value >> (8 * SECRET_BYTES):
                continue
            raw = value.to_bytes(SECRET_BYTES, "big")
            if secret.is_b:
                if _commit(self._ctx, raw) == ad.b_commit:
                    return raw
            elif _raw_public(X25519PrivateKey.from_private_bytes(raw)) == ad.s_pk:
                return raw
        kind = "b" if secret.is_b else "s_sk"
        raise Rejected("secagg-bad-share", f"no {t} shares rebuild {kind} of {secret.owner}")

    def result(self) -> np.ndarray:
        """The uint32 sum of U3's inputs, bit-exact. Leaves the server unchanged: a call
        after more shares arrive (say, after a bad one) simply tries again."""
        if self._stage != Stage.UNMASK or not self.ready():
            raise Rejected("secagg-too-few", "not enough shares to unmask")
        terms: list[tuple[bytes, int]] = []
        u3 = set(self._u3)
        for secret in self._secrets():
            raw = self._rebuild(secret)
            if secret.is_b:
                terms.append((_self_key(self._ctx, raw), -1))
                continue
            # A dropped j: each surviving neighbour i added sign(i, j)·PRG(s_ij); take it out.
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            j = secret.owner
            for i in self._graph[j]:
                if i in u3:
                    key = _pair_key(self._ctx, s_sk, self._adverts[i].s_pk, i)
                    terms.append((key, -_sign(i, j)))
        out = self._acc.copy()
        Keystream(self.params.length).mix(terms, out)
        return out
