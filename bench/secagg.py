"""SecAgg+ cost: masking and unmasking beside the bare keystream they need, in the same run.

    .venv/bin/python bench/secagg.py            # P ∈ {100k, 1.66M} × n ∈ {10, 50, 100} × drop
    .venv/bin/python bench/secagg.py --quick    # a subset, under a minute
    .venv/bin/python bench/secagg.py --params   # n up to 1000, (k, t) chosen for δ = 0.1, 0.3

Every configuration runs the real protocol end to end with `params_for`'s (k, t), for
SecureSpec's defaults (expected dropout 0.2, corrupt 0.1) or, with --params, for the
expected dropout of the row: n clients advertise, share, mask and unmask; a `dropout`
fraction of them drop after sharing (they never send a masked input), which is what makes
the server's work grow. The result is checked bit-exact against an int64 sum of the
survivors' inputs.

- client: `Client.mask`, the best over the surviving clients (each masks once), beside
  `Keystream.fill` of the same k+1 streams of P words (PRG(b) and one per neighbour),
  best of 3. Target: ratio <= 1.5.
- server: `Server.result` (Shamir reconstruction, key agreement for every dropped client,
  then Σ PRG(b) and the dangling pairwise streams removed), best of 3 — it leaves the
  server unchanged, so it can be repeated — beside `Keystream.fill` of as many streams.
- P(ok): the share of 1000 random drop sets of that size after which every needed secret
  still has t holders (bench/dropouts.py, which has more). Each row times the first
  recoverable drop set, to show the server's cost all the same; rows where P(ok) < 0.99
  are marked *.
- wire: bytes one client publishes in a round — its four stage messages (advert, sealed
  shares, masked vector, unmask shares) as signed envelopes sealed for the aggregator,
  split into 256 KiB chunks — as a multiple of 4P, and what is left after 4P (the
  key-exchange constant).

--params: n ∈ {10, 50, 100, 500, 1000} × expected dropout δ ∈ {0.1, 0.3} at P = 10,000
(-P), always 30 % dropout: a client's `Client.share` (key agreements, Shamir splits,
sealing; best of 5 clients) and `Client.mask` (best over the survivors), and the server's
`Server.result` (best of 3, of 1 from n = 500). A δ = 0.1 row under 30 % dropout is
marked * as above.

No shortcut is taken for n = 1000: every client really shares and every surviving one
masks (about two minutes for that row). Memory stays O(P) for the whole run: clients keep
no vector after masking, inputs are four shared encoded vectors, and the server sums as
they arrive.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dropouts  # noqa: E402 - bench/dropouts.py, beside this script
from timing import best  # noqa: E402 - bench/timing.py, beside this script

from hfl.crypto import secagg as sa  # noqa: E402
from hfl.crypto import secagg_wire as wire  # noqa: E402
from hfl.crypto.secagg_wire import WireStage  # noqa: E402
from hfl.wire import chunks, envelope  # noqa: E402
from hfl.wire.topics import Topics  # noqa: E402

FULL = [(p, n, d) for p in (100_000, 1_663_370) for n in (10, 50, 100) for d in (0.0, 0.1, 0.3)]
QUICK = [*FULL[:9], (1_663_370, 10, 0.0), (1_663_370, 50, 0.1), (1_663_370, 100, 0.1),
         (1_663_370, 100, 0.3)]
PARAMS = [(n, d) for n in dropouts.NS for d in dropouts.DROPOUTS]
INPUTS = 4  # distinct input vectors, shared round-robin by the clients


def bare(length: int, streams: int) -> float:
    """Keystream.fill of `streams` vectors of `length` words, best of 3."""
    ks, out = sa.Keystream(length), np.empty(length, np.uint32)
    keys = [os.urandom(32) for _ in range(streams)]
    return best(lambda: [ks.fill(k, out) for k in keys], repeat=3)


def run(P: int, n: int, dropout: float, rng: random.Random, expect: float = sa.DROPOUT,
        repeat: int = 3) -> dict[str, float]:
    """One round of n clients, (k, t) chosen for `expect`ed dropout, `dropout` of them
    dropping; the server's result is timed best of `repeat`."""
    params = sa.params_for("bench", 1, n, P, dropout=expect)
    fixed = sa.FixedPoint.for_sum(1.0, n)
    gen = np.random.default_rng(rng.getrandbits(32))
    inputs = []
    for _ in range(INPUTS):
        x = np.empty(P, np.uint32)
        fixed.encode(gen.uniform(-1, 1, P).astype(np.float32), x)
        inputs.append(x)

    ids = [f"edge-{i:03d}" for i in range(n)]
    keys = {i: Ed25519PrivateKey.generate() for i in ids}
    publics = {i: k.public_key() for i, k in keys.items()}
    clients = {i: sa.Client(i, params, keys[i]) for i in ids}
    x_of = {i: inputs[k % INPUTS] for k, i in enumerate(ids)}
    server = sa.Server(params, ids)

    for i in ids:
        server.add_advert(i, clients[i].advertise())
    server.freeze_adverts()
    table = server.key_table()
    sent, share_times = {}, []
    for i in ids:
        t = time.perf_counter()
        sent[i] = clients[i].share(table, publics.get)
        share_times.append(time.perf_counter() - t)
    for i in ids:
        server.add_shares(i, sent[i])
    server.freeze_shares()
    for i, row in server.routed().items():
        clients[i].receive(row)

    seed = hashlib.sha256(params.context()).digest()
    graph = sa.neighbours(ids, params.degree, seed)
    adj = dropouts.adjacency(ids, params.degree, seed)
    draws = np.random.default_rng(rng.getrandbits(32))
    alive = dropouts.drop_sets(draws, 1000, n, dropout, exact=True)
    ok = dropouts.recovered(adj, alive, params.threshold)
    p_ok = float(ok.mean())
    while not ok.any():
        alive = dropouts.drop_sets(draws, 1000, n, dropout, exact=True)
        ok = dropouts.recovered(adj, alive, params.threshold)
    dropped = {ids[i] for i in np.flatnonzero(~alive[np.flatnonzero(ok)[0]])}
    mask_times = []
    for i in ids:
        if i not in dropped:
            t = time.perf_counter()
            y = clients[i].mask(x_of[i])
            mask_times.append(time.perf_counter() - t)
            server.add_masked(i, y)
            del y
    server.freeze_survivors()
    survivors = server.survivors()
    unshares = {}
    for i in survivors:
        unshares[i] = clients[i].unmask(survivors)
        server.add_unmask(i, unshares[i])

    total = server.result()
    counts = np.bincount([ids.index(i) % INPUTS for i in survivors], minlength=INPUTS)
    want = sum(int(c) * inputs[k].astype(np.int64) for k, c in enumerate(counts))
    assert np.array_equal(total, (want % 2**32).astype(np.uint32)), "sum is not exact"
    t_server = best(server.result, repeat=repeat)

    # The PRG work each side must do, for the bare keystream baseline.
    k = len(graph[ids[0]])
    alive = set(survivors)
    server_streams = len(survivors) + sum(len(alive.intersection(graph[j])) for j in dropped)
    t_mask, t_mask_bare = min(mask_times), bare(P, k + 1)
    t_server_bare = bare(P, server_streams)

    me = survivors[0]
    # The masked vector went to the server already; one of the same size and type stands in.
    stages = [(WireStage.ADVERT, {}, wire.advert_out(table[me])),
              (WireStage.SHARES, *wire.shares_out(sent[me])),
              (WireStage.MASKED, {}, {"y": inputs[0]}),
              (WireStage.UNSHARES, *wire.unshares_out(unshares[me]))]
    sent_bytes = sum(on_the_wire(me, stage, meta, tensors) for stage, meta, tensors in stages)
    return {"k": k, "t": params.threshold, "mask": t_mask, "mask_bare": t_mask_bare,
            "share": min(share_times[:5]), "server": t_server, "server_bare": t_server_bare,
            "streams": server_streams, "wire": sent_bytes, "p_ok": p_ok, "forced": p_ok < 0.99}


_AGG = X25519PrivateKey.generate().public_key()
_SIGNER = Ed25519PrivateKey.generate()


def on_the_wire(me: str, stage: str, meta: dict, tensors: dict) -> int:
    """Bytes of one stage message as published: sealed, signed envelope in 256 KiB chunks."""
    topic = Topics().update("site-a", me)
    data = envelope.encode(type="update", topic=topic, job="bench-job", round=1, stage=stage,
                           sender=me, key=_SIGNER, tensors=tensors, meta=meta,
                           seal_to={"site-a": _AGG})
    return sum(len(f) for f in chunks.split(data, 256 * 1024))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def params_table(P: int, rng: random.Random) -> None:
    """--params: client and server cost with (k, t) chosen for δ = 0.1 and 0.3, at 30 %."""
    print("| n | params for | k | t | P(ok) at 30% | share ms | mask ms | client ms "
          "| result ms at 30% | streams |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, expect in PARAMS:
        r = run(P, n, 0.3, rng, expect, repeat=3 if n < 500 else 1)
        star = "*" if r["forced"] else ""
        print(f"| {n} | δ = {expect} | {r['k']} | {r['t']} | {r['p_ok']:.3f}{star} "
              f"| {r['share'] * 1e3:.1f} | {r['mask'] * 1e3:.2f} "
              f"| {(r['share'] + r['mask']) * 1e3:.1f} | {r['server'] * 1e3:,.0f} "
              f"| {r['streams']:,} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset, under a minute")
    ap.add_argument("--params", action="store_true", help="n up to 1000, (k, t) per dropout")
    ap.add_argument("-P", type=int, default=10_000, help="vector length for --params")
    args = ap.parse_args()
    rng = random.Random(2020)
    print(f"## SecAgg+ ({platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__}, "
          f"load {load()})")
    print()
    if args.params:
        params_table(args.P, rng)
        print(f"\nload after: {load()}")
        return
    print("| P | n | k | t | drop | P(ok) | mask ms | bare (k+1)·P ms | ratio | result ms "
          "| streams | bare ms | ratio | wire B/client | ÷ 4P | − 4P |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for P, n, dropout in QUICK if args.quick else FULL:
        r = run(P, n, dropout, rng)
        star = "*" if r["forced"] else ""
        print(f"| {P:,} | {n} | {r['k']} | {r['t']} | {dropout:.0%}{star} | {r['p_ok']:.3f} "
              f"| {r['mask'] * 1e3:.1f} | {r['mask_bare'] * 1e3:.1f} "
              f"| {r['mask'] / r['mask_bare']:.2f} "
              f"| {r['server'] * 1e3:.1f} | {r['streams']} | {r['server_bare'] * 1e3:.1f} "
              f"| {r['server'] / r['server_bare']:.2f} "
              f"| {r['wire']:,} | {r['wire'] / (4 * P):.4f} | {r['wire'] - 4 * P:,} |",
              flush=True)


if __name__ == "__main__":
    main()
