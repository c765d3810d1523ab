"""Foundation benchmarks: each figure beside a baseline measured in the same run.

    make bench            # or: .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py sealed      # one section: sum, memory, decode, sealed

1. Streaming aggregation: `WeightedSum.add` against a bare `numpy.add` of the same vectors,
   as a bandwidth ratio (target ≥ 0.5), with equal weights (one add per vector) and with a
   different weight per vector (a fused scale-and-add over cache-sized chunks).
2. Aggregation memory: peak traced memory of summing N = 10 vs N = 1000 updates (O(P)).
3. Envelope decode: our zero-copy body parse against `safetensors.numpy.load` (copies),
   and the full verified decode (SHA-256 + Ed25519) per MB.
4. A sealed update, what every agent sends each round and its aggregator opens: encode
   (serialize, seal, sign) and decode (verify, unseal, parse) against the bare AES-GCM and
   SHA-256 over the same bytes, and each side's peak traced memory in bodies (4·P bytes).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tracemalloc
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.numpy import load as st_load
from timing import best  # bench/timing.py (the script's folder is on the path)

from hfl.models.aggregate import WeightedSum
from hfl.wire import envelope, tensors
from hfl.wire.messages import Metrics

SIZES = [100_000, 1_663_370, 10_000_000]
M = Metrics(samples=10)


def bench_sum() -> None:
    print("## streaming aggregation (10 updates per run, best of 7)")
    print(f"{'P':>10} {'numpy.add GB/s':>15} {'equal w GB/s':>13} {'ratio':>6} "
          f"{'varied w GB/s':>14} {'ratio':>6}")
    for p in SIZES:
        xs = [np.random.default_rng(i).random(p, dtype=np.float32) for i in range(10)]
        acc = np.zeros(p, np.float32)
        weights = [10.0] * 10, [float(7 + 3 * i) for i in range(10)]

        def baseline(xs: list = xs, acc: np.ndarray = acc) -> None:
            for x in xs:
                np.add(acc, x, out=acc)

        def ours(ws: list, acc: WeightedSum, xs: list = xs) -> None:
            for x, w in zip(xs, ws, strict=True):
                acc.add(x, w, M)

        nbytes = 10 * p * 4
        b = nbytes / best(baseline) / 1e9
        eq, var = (nbytes / best(lambda w=w, a=WeightedSum(p): ours(w, a)) / 1e9
                   for w in weights)
        print(f"{p:>10} {b:>15.2f} {eq:>13.2f} {eq / b:>6.2f} {var:>14.2f} {var / b:>6.2f}")


def bench_memory() -> None:
    print("\n## aggregation peak memory (tracemalloc), P = 1,663,370")
    p = 1_663_370
    x = np.ones(p, np.float32)
    peaks = {}
    for n in (10, 1000):
        tracemalloc.start()
        ws = WeightedSum(p)
        for _ in range(n):
            ws.add(x, 1.0, M)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"N=10: {peaks[10] / 2**20:.1f} MiB, N=1000: {peaks[1000] / 2**20:.1f} MiB, "
          f"ratio {peaks[1000] / peaks[10]:.3f}")


def bench_decode() -> None:
    print("\n## envelope decode (best of 7)")
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    print(f"{'P':>10} {'MB':>6} {'tensors.load ms':>16} {'safetensors.load ms':>20} "
          f"{'verified decode ms':>19}")
    for p in SIZES:
        body = {"delta": np.ones(p, np.float32)}
        raw = tensors.dump(body)
        data = envelope.encode(type="update", topic="t", job="j", round=0, stage="update",
                               sender="a", key=key, tensors=body)
        ours = best(lambda raw=raw: tensors.load(raw)) * 1e3
        theirs = best(lambda raw=raw: st_load(raw)) * 1e3
        full = best(lambda data=data: envelope.decode(
            data, topic="t", public_key=lambda s: pub, known_types={"update"})) * 1e3
        print(f"{p:>10} {len(data) / 1e6:>6.1f} {ours:>16.3f} {theirs:>20.3f} {full:>19.2f}")


def peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    fn()
    top = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return top


def bench_sealed() -> None:
    print("\n## sealed update: encode and decode against bare AES-GCM + SHA-256 (best of 7)")
    sign, box = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    aes, nonce = AESGCM(AESGCM.generate_key(256)), os.urandom(12)
    print(f"{'P':>10} {'encode ms':>10} {'bare ms':>8} {'ratio':>6} {'peak bodies':>12} "
          f"{'decode ms':>10} {'bare ms':>8} {'ratio':>6} {'peak bodies':>12}")
    for p in SIZES:
        body = {"delta": np.ones(p, np.float32)}
        raw = np.ones(p, np.float32).tobytes()
        ct = aes.encrypt(nonce, raw, b"")

        def enc(body: dict = body) -> bytes:
            return envelope.encode(type="update", topic="t", job="j", round=0, stage="update",
                                   sender="a", key=sign, tensors=body,
                                   seal_to={"agg": box.public_key()})

        def dec(data: bytes) -> envelope.Envelope:
            env = envelope.decode(data, topic="t", public_key=lambda s: sign.public_key(),
                                  known_types={"update"})
            return envelope.unseal(env, "agg", box)

        data = enc()
        e, d = best(enc) * 1e3, best(lambda data=data: dec(data)) * 1e3
        be = best(lambda raw=raw: hashlib.sha256(aes.encrypt(nonce, raw, b"")).digest()) * 1e3
        bd = best(lambda ct=ct: (hashlib.sha256(ct).digest(), aes.decrypt(nonce, ct, b""))) * 1e3
        pe, pd = peak(enc) / len(raw), peak(lambda data=data: dec(data)) / len(raw)
        print(f"{p:>10} {e:>10.2f} {be:>8.2f} {e / be:>6.2f} {pe:>12.2f} {d:>10.2f} {bd:>8.2f} "
              f"{d / bd:>6.2f} {pd:>12.2f}")


if __name__ == "__main__":
    print(f"# hfl foundation benchmarks on {platform.node()} ({platform.machine()}, "
          f"{platform.processor() or 'cpu'}), numpy {np.__version__}\n")
    sections = {"sum": bench_sum, "memory": bench_memory, "decode": bench_decode,
                "sealed": bench_sealed}
    for name in sys.argv[1:] or sections:
        sections[name]()
