"""SecAgg+ core (hfl.crypto.secagg): real crypto end to end, expected values computed
independently."""

from __future__ import annotations

import itertools
import math
import os
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hfl.crypto import secagg as sa
from hfl.errors import Rejected

L = 512  # words per vector in protocol tests: small, so every test is fast


class Round:
    """n clients and a server taken through stages 1-2 (adverts, shares, routing)."""

    def __init__(self, n: int, length: int = L, params: sa.Params | None = None,
                 job: str = "job", degree: int = 0) -> None:
        self.params = params or sa.params_for(job, 7, n, length, degree=degree)
        self.ids = [f"c{i:02d}" for i in range(n)]
        self.keys = {i: Ed25519PrivateKey.generate() for i in self.ids}
        self.clients = {i: sa.Client(i, self.params, self.keys[i]) for i in self.ids}
        self.server = sa.Server(self.params, self.ids)
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(4), "big"))
        self.fixed = sa.FixedPoint.for_sum(1.0, n)
        self.floats: dict[str, np.ndarray] = {}
        self.inputs: dict[str, np.ndarray] = {}
        for i in self.ids:
            f = self.rng.uniform(-1, 1, self.params.length).astype(np.float32)
            x = np.empty(f.size, np.uint32)
            self.fixed.encode(f, x)
            self.floats[i], self.inputs[i] = f, x

    def verify(self, cid: str):
        key = self.keys.get(cid)
        return key.public_key() if key else None

    def keys_and_shares(self) -> dict[str, dict[str, bytes]]:
        for i in self.ids:
            self.server.add_advert(i, self.clients[i].advertise())
        self.server.freeze_adverts()
        table = self.server.key_table()
        for i in self.ids:
            self.server.add_shares(i, self.clients[i].share(table, self.verify))
        self.server.freeze_shares()
        routed = self.server.routed()
        for i, row in routed.items():
            self.clients[i].receive(row)
        return routed

    def mask(self, drop: set[str] = frozenset()) -> list[str]:
        for i in self.ids:
            if i not in drop:
                self.server.add_masked(i, self.clients[i].mask(self.inputs[i]))
        self.server.freeze_survivors()
        return self.server.survivors()

    def unmask(self, survivors: list[str], silent: set[str] = frozenset()) -> None:
        for i in survivors:
            if i not in silent:
                self.server.add_unmask(i, self.clients[i].unmask(survivors))

    def expected(self, ids: list[str]) -> np.ndarray:
        """The exact uint32 sum, computed in int64 apart from the protocol."""
        total = np.zeros(self.params.length, np.int64)
        for i in ids:
            total += self.inputs[i].astype(np.int64)
        return (total % 2**32).astype(np.uint32)


def reason(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.reason


def chi2_pvalue(data: np.ndarray) -> float:
    """Chi-square uniformity p-value of the bytes of `data` over 256 bins (Wilson–Hilferty)."""
    counts = np.bincount(data.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2).sum() / expected)
    k = 255
    z = ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


# ------------------------------------------------------------------ parameters


def test_params_for_ten_clients_is_complete_with_t6() -> None:
    p = sa.params_for("job", 1, 10, L)
    assert (p.degree, p.threshold) == (9, 6)
    sparse = sa.params_for("job", 1, 200, L)
    assert sparse.degree < 199 and sparse.degree % 2 == 0 and 2 * sparse.threshold > sparse.degree
    assert sa.params_for("job", 1, 30, L, degree=7).degree == 8  # rounded up to even
    assert sa.params_for("job", 1, 5, L, degree=50).degree == 4  # capped at n-1
    # 2t > k+1 (b has k+1 holders): an odd complete graph gets one more than ceil(2k/3).
    assert (sa.params_for("job", 1, 4, L).threshold, sa.params_for("job", 1, 3, L).threshold) \
        == (3, 2)
    with pytest.raises(ValueError):
        sa.Params("job", 1, 9, 5, L)
    with pytest.raises(ValueError):
        sa.params_for("job", 1, 2, L)
    with pytest.raises(ValueError):
        sa.params_for("job", 1, 10, L, threshold=0.4)  # t = 4 <= k/2
    assert sa.Params("a", 1, 4, 3, 8).context() != sa.Params("a", 2, 4, 3, 8).context()


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("dropped", [0, 1, 3, 4])
def test_exact_sum_with_dropouts_after_sharing(dropped: int) -> None:
    r = Round(10)
    assert (r.params.degree, r.params.threshold) == (9, 6)
    r.keys_and_shares()
    drop = set(r.rng.choice(r.ids, dropped, replace=False))
    survivors = r.mask(drop)
    assert survivors == sorted(set(r.ids) - drop)
    r.unmask(survivors)
    assert r.server.ready()
    total = r.server.result()
    np.testing.assert_array_equal(total, r.expected(survivors))
    assert r.server.dropped == sorted(drop)
    floats = sum(r.floats[i].astype(np.float64) for i in survivors)
    assert np.abs(r.fixed.decode(total) - floats).max() <= 10 / r.fixed.scale


def test_a_server_restored_from_its_records_gives_the_same_sum() -> None:
    """A checkpoint is the round's own record, the sum and one record per client; an older
    single-record checkpoint is refused rather than half-restored."""
    r = Round(10)
    r.keys_and_shares()
    survivors = r.mask({r.ids[0]})
    r.unmask(survivors)
    clients = {i: rec for i in r.ids if (rec := r.server.export_client(i)) is not None}
    assert set(clients) == set(r.ids)
    back = sa.Server.restore(r.params, r.ids, r.server.export(), r.server.acc.copy(), clients)
    np.testing.assert_array_equal(back.result(), r.expected(survivors))
    old = {"stage": 4, "adverts": {}, "shares": [], "masked": [], "u3": [], "unmasks": {}}
    with pytest.raises(ValueError, match="older format"):
        sa.Server.restore(r.params, r.ids, old, None, {})


def test_five_dropped_is_too_few_and_leaves_stage_open() -> None:
    r = Round(10)
    r.keys_and_shares()
    with pytest.raises(Rejected) as e:
        r.mask(set(r.ids[:5]))
    assert reason(e) == "secagg-too-few"
    assert r.server.u3 == r.ids[5:]
    # Nothing was frozen: a late masked input still counts and the round completes.
    r.server.add_masked(r.ids[0], r.clients[r.ids[0]].mask(r.inputs[r.ids[0]]))
    r.server.freeze_survivors()
    survivors = r.server.survivors()
    assert len(survivors) == 6
    r.unmask(survivors)
    np.testing.assert_array_equal(r.server.result(), r.expected(survivors))


def test_drops_at_unmask_stage() -> None:
    r = Round(10)
    r.keys_and_shares()
    survivors = r.mask({"c03"})
    r.unmask(survivors, silent={"c05", "c08"})  # masked, then went quiet
    assert r.server.ready()
    np.testing.assert_array_equal(r.server.result(), r.expected(survivors))


def test_too_few_unmask_answers_is_not_ready() -> None:
    r = Round(10)
    r.keys_and_shares()
    survivors = r.mask()
    r.unmask(survivors, silent=set(survivors[:5]))  # 5 answers < t = 6
    assert not r.server.ready()
    with pytest.raises(Rejected) as e:
        r.server.result()
    assert reason(e) == "secagg-too-few"


def test_sparse_graph_with_drops() -> None:
    r = Round(30, degree=16)
    assert r.params.degree < 29
    routed = r.keys_and_shares()
    graph = sa.neighbours(r.ids, r.params.degree, _seed(r.params))
    assert all(sorted(routed[i]) == graph[i] for i in r.ids)  # shares only along edges
    survivors = r.mask({"c01", "c11", "c17"})
    r.unmask(survivors, silent={"c20"})
    np.testing.assert_array_equal(r.server.result(), r.expected(survivors))
    assert r.server.dropped == ["c01", "c11", "c17"]


def _seed(params: sa.Params) -> bytes:
    import hashlib

    return hashlib.sha256(params.context()).digest()


# ------------------------------------------------------------------ what the server sees


def test_accumulator_never_shows_an_input_or_partial_sum() -> None:
    r = Round(10)
    r.keys_and_shares()
    plain = np.zeros(L, np.int64)
    for i in r.ids:
        r.server.add_masked(i, r.clients[i].mask(r.inputs[i]))
        plain += r.inputs[i]
        acc = r.server._acc  # the only copy of what the server holds mid-round
        # Even the full sum still carries every PRG(b) until the unmask stage.
        assert np.count_nonzero(acc == (plain % 2**32).astype(np.uint32)) < L // 100
        for x in r.inputs.values():
            assert np.count_nonzero(acc == x) < L // 100


def test_masked_vector_is_uniform_and_plaintext_is_not() -> None:
    P = 100_000
    r = Round(3, length=P)
    r.keys_and_shares()
    y = r.clients["c00"].mask(r.inputs["c00"])
    assert chi2_pvalue(y) > 1e-4
    assert chi2_pvalue(r.inputs["c00"]) < 1e-4


# ------------------------------------------------------------------ building blocks


def test_shamir_any_t_recover_and_t_minus_one_do_not() -> None:
    secret = os.urandom(32)
    xs = list(range(1, 10))
    shares = sa.shamir_split(secret, xs, 6)
    assert all(0 <= y < sa.PRIME for y in shares)
    points = list(zip(xs, shares, strict=True))
    for subset in itertools.combinations(points, 6):
        assert sa.shamir_combine(list(subset), 6) == secret
    for subset in itertools.islice(itertools.combinations(points, 5), 20):
        assert not _recovers(list(subset), 5, secret)
    with pytest.raises(ValueError):
        sa.shamir_combine(points[:5], 6)
    wrong = [(x, (y + 1) % sa.PRIME) if x == 3 else (x, y) for x, y in points]
    assert not _recovers(wrong, 6, secret)


def _recovers(points: list[tuple[int, int]], t: int, secret: bytes) -> bool:
    try:
        return sa.shamir_combine(points, t) == secret
    except ValueError:  # not a 32-byte value at all
        return False


def test_fixed_point_round_trip_and_clipping() -> None:
    fp = sa.FixedPoint.for_sum(2.0, 10)
    assert 10 * (2.0 * fp.scale + 1) < 2**31 <= 10 * (2.0 * 2 * fp.scale + 1)
    x = np.random.default_rng(1).uniform(-2, 2, 10_000).astype(np.float32)
    x[:7] = [5, -5, 2.5, -3, np.float32(1e9), -2.001, 2.0001]
    out = np.empty(x.size, np.uint32)
    assert fp.encode(x, out) == 7
    back = fp.decode(out)
    np.testing.assert_array_less(np.abs(back - np.clip(x.astype(np.float64), -2, 2)),
                                 1 / fp.scale)
    with pytest.raises(ValueError):
        fp.encode(np.array([1.0, np.nan], np.float32), np.empty(2, np.uint32))


def test_fixed_point_sum_of_extremes_does_not_wrap() -> None:
    n, clip = 100, 1.5
    fp = sa.FixedPoint.for_sum(clip, n)
    for sign in (1, -1):
        x = np.full(1000, sign * clip, np.float32)
        total = np.zeros(1000, np.uint32)
        enc = np.empty(1000, np.uint32)
        for _ in range(n):
            fp.encode(x, enc)
            total += enc  # wraps mod 2^32, as the protocol does
        np.testing.assert_allclose(fp.decode(total), sign * n * clip, atol=n / fp.scale)


def test_stochastic_rounding_is_unbiased() -> None:
    fp = sa.FixedPoint(1.0, 2**20)
    x = np.full(200_000, 0.3 / fp.scale, np.float32)
    out = np.empty(x.size, np.uint32)
    fp.encode(x, out)
    steps = out.view(np.int32)
    assert set(np.unique(steps)) == {0, 1}  # rounded down or up, never elsewhere
    assert abs(steps.mean() - 0.3) < 0.01  # std of the mean ≈ 0.001


@pytest.mark.parametrize("length", [1, 5, 2 * sa._CHUNK + 3, 3 * sa._CHUNK])
def test_keystream_is_aes_ctr_of_zeros(length: int) -> None:
    key = os.urandom(32)
    ref_bytes = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(
        bytes(4 * length))
    ref = np.frombuffer(ref_bytes, "<u4").astype(np.int64)
    ks = sa.Keystream(length)
    out = np.empty(length, np.uint32)
    np.testing.assert_array_equal(ks.fill(key, out), ref)
    base = np.random.default_rng(2).integers(0, 2**32, length, dtype=np.uint32)
    for sign in (1, -1):
        acc = base.copy()
        ks.add(key, acc, sign)
        np.testing.assert_array_equal(acc, (base.astype(np.int64) + sign * ref) % 2**32)
    with pytest.raises(ValueError):
        ks.fill(key, np.empty(length + 1, np.uint32))


def test_neighbours_regular_symmetric_deterministic() -> None:
    ids = [f"n{i}" for i in range(40)]
    seed = os.urandom(32)
    for degree, want in ((16, 16), (15, 16), (39, 39), (60, 39)):
        g = sa.neighbours(ids[::-1], degree, seed)
        assert sorted(g) == sorted(ids)
        for i, row in g.items():
            assert len(row) == want and i not in row and row == sorted(row)
            assert all(i in g[j] for j in row)
    g = sa.neighbours(ids, 16, seed)
    assert g == sa.neighbours(list(reversed(ids)), 16, seed)
    assert g != sa.neighbours(ids, 16, os.urandom(32))
    for degree in (1, 2, 16, 39, 60):  # a client's own row, without the whole graph
        g = sa.neighbours(ids, degree, seed)
        assert all(sa.neighbours_of(i, ids[::-1], degree, seed) == g[i] for i in ids)


# ------------------------------------------------------------------ bad input


def test_forged_or_foreign_adverts_are_refused() -> None:
    r = Round(5)
    for i in r.ids:
        r.server.add_advert(i, r.clients[i].advertise())
    r.server.freeze_adverts()
    table = r.server.key_table()
    forged = dict(table)
    forged["c01"] = sa.Advert(table["c03"].c_pk, table["c03"].s_pk, table["c01"].b_commit,
                              table["c01"].signature)  # keys swapped by the server
    with pytest.raises(Rejected) as e:
        r.clients["c00"].share(forged, r.verify)
    assert reason(e) == "secagg-bad-advert"
    with pytest.raises(Rejected) as e:
        r.clients["c00"].share(table, lambda cid: None if cid == "c02" else r.verify(cid))
    assert reason(e) == "secagg-bad-advert"
    with pytest.raises(Rejected) as e:
        r.clients["c00"].share({k: table[k] for k in r.ids[1:]}, r.verify)  # mine missing
    assert reason(e) == "secagg-bad-advert"
    with pytest.raises(Rejected) as e:
        r.clients["c00"].share({k: table[k] for k in r.ids[:3]}, r.verify)  # 3 < t+1
    assert reason(e) == "secagg-too-few"
    # The client is still in stage 2: the genuine table works.
    assert len(r.clients["c00"].share(table, r.verify)) == r.params.degree


def test_server_stage_and_sender_checks_leave_state_unchanged() -> None:
    r = Round(10)
    srv, c = r.server, r.clients
    with pytest.raises(Rejected) as e:
        srv.add_advert("mallory", c["c00"].advertise())
    assert reason(e) == "secagg-not-selected"
    with pytest.raises(Rejected) as e:
        srv.add_masked("c00", r.inputs["c00"])
    assert reason(e) == "secagg-wrong-stage"
    with pytest.raises(Rejected) as e:
        srv.add_advert("c00", sa.Advert(b"x" * 32, b"y" * 32, b"z" * 32, b"short"))
    assert reason(e) == "secagg-bad-advert"
    with pytest.raises(Rejected) as e:  # a low-order X25519 point
        srv.add_advert("c00", sa.Advert(bytes(32), *(
            getattr(c["c00"].advertise(), f) for f in ("s_pk", "b_commit", "signature"))))
    assert reason(e) == "secagg-bad-advert"
    assert srv.u1 == []
    routed = r.keys_and_shares()
    with pytest.raises(Rejected) as e:
        srv.add_advert("c00", c["c00"].advertise())
    assert reason(e) == "secagg-wrong-stage"
    with pytest.raises(Rejected) as e:
        srv.add_shares("c00", {})
    assert reason(e) == "secagg-wrong-stage"
    assert srv.u1 == srv.u2 == r.ids and srv.routed() == routed
    with pytest.raises(Rejected) as e:
        srv.add_masked("c00", r.inputs["c00"].astype(np.int32))
    assert reason(e) == "secagg-bad-masked"
    with pytest.raises(Rejected) as e:
        srv.add_masked("c00", r.inputs["c00"][:-1])
    assert reason(e) == "secagg-bad-masked"
    y = c["c01"].mask(r.inputs["c01"])
    srv.add_masked("c01", y)
    with pytest.raises(Rejected) as e:
        srv.add_masked("c01", y)
    assert reason(e) == "secagg-duplicate"
    with pytest.raises(Rejected) as e:
        srv.add_unmask("c01", {})
    assert reason(e) == "secagg-wrong-stage"
    assert srv.u3 == ["c01"]
    survivors = r.mask({"c00", "c01"})  # c01 already in; c00 never sent a valid one
    assert "c00" not in survivors and "c01" in survivors
    with pytest.raises(Rejected) as e:
        srv.add_unmask("c00", {})
    assert reason(e) == "secagg-unexpected-sender"
    r.unmask(survivors)
    np.testing.assert_array_equal(srv.result(), r.expected(survivors))


def test_shares_must_follow_the_graph() -> None:
    r = Round(30, degree=16)
    for i in r.ids:
        r.server.add_advert(i, r.clients[i].advertise())
    r.server.freeze_adverts()
    table = r.server.key_table()
    cts = r.clients["c00"].share(table, r.verify)
    outsider = next(j for j in r.ids if j != "c00" and j not in cts)
    bad = dict(cts)
    bad[outsider] = bad.pop(next(iter(bad)))
    with pytest.raises(Rejected) as e:
        r.server.add_shares("c00", bad)
    assert reason(e) == "secagg-bad-share"
    assert r.server.u2 == []
    # A client refuses a share from a non-neighbour even if the server routes one.
    for i in r.ids[1:]:
        r.clients[i].share(table, r.verify)
    mine = {j: ct for j, ct in _routed_to(r, "c00", table).items()}
    stranger = next(j for j in r.ids if j != "c00" and j not in mine)
    with pytest.raises(Rejected) as e:
        r.clients["c00"].receive({**mine, stranger: next(iter(mine.values()))})
    assert reason(e) == "secagg-bad-share"
    r.clients["c00"].receive(mine)  # the genuine set still goes through


def _routed_to(r: Round, me: str, table: dict[str, sa.Advert]) -> dict[str, bytes]:
    """The ciphertexts addressed to `me`, from each client's (cached) share() answer."""
    out = {}
    for i in r.ids:
        if i != me:
            cts = r.clients[i].share(table, r.verify)
            if me in cts:
                out[i] = cts[me]
    return out


def test_tampered_share_ciphertext_is_refused() -> None:
    r = Round(6)
    for i in r.ids:
        r.server.add_advert(i, r.clients[i].advertise())
    r.server.freeze_adverts()
    table = r.server.key_table()
    for i in r.ids:
        r.server.add_shares(i, r.clients[i].share(table, r.verify))
    r.server.freeze_shares()
    row = r.server.routed()["c00"]
    sender = "c02"
    ct = bytearray(row[sender])
    ct[secrets.randbelow(len(ct))] ^= 1 << secrets.randbelow(8)
    with pytest.raises(Rejected) as e:
        r.clients["c00"].receive({**row, sender: bytes(ct)})
    assert reason(e) == "secagg-bad-share"
    # A genuine ciphertext replayed to the wrong recipient fails its AAD/key too.
    other = r.server.routed()["c01"]
    with pytest.raises(Rejected) as e:
        r.clients["c00"].receive({**row, sender: other[sender]})
    assert reason(e) == "secagg-bad-share"
    r.clients["c00"].receive(row)
    with pytest.raises(Rejected) as e:
        r.clients["c00"].receive({})
    assert reason(e) == "secagg-replay"


def test_client_never_reveals_both_shares() -> None:
    r = Round(10)
    r.keys_and_shares()
    c = r.clients["c00"]
    with pytest.raises(Rejected) as e:
        c.unmask(r.ids)
    assert reason(e) == "secagg-wrong-stage"
    c.mask(r.inputs["c00"])
    for again in (r.inputs["c01"], r.inputs["c00"]):  # two inputs under one mask would leak
        with pytest.raises(Rejected) as e:           # their difference
            c.mask(again)
        assert reason(e) == "secagg-replay"
    first = c.unmask(r.ids[:8])
    assert c.unmask(list(reversed(r.ids[:8]))) == first
    with pytest.raises(Rejected) as e:
        c.unmask(r.ids[:7])
    assert reason(e) == "secagg-replay"
    assert sorted(first) == r.ids  # one share per neighbour, plus its own b share
    r.clients["c01"].mask(r.inputs["c01"])
    with pytest.raises(Rejected) as e:
        r.clients["c01"].unmask(r.ids[2:])  # not listing the client itself
    assert reason(e) == "secagg-bad-survivors"
    with pytest.raises(Rejected) as e:
        r.clients["c01"].unmask(r.ids[:5])
    assert reason(e) == "secagg-too-few"


def test_bad_share_value_is_caught_and_routed_around() -> None:
    r = Round(10)
    r.keys_and_shares()
    survivors = r.mask({"c09"})
    for i in survivors:
        shares = r.clients[i].unmask(survivors)
        if i == "c00":  # first in every point list: inside the first t-subset tried
            shares["c04"] = (shares["c04"] + 1) % sa.PRIME  # a survivor's b
            shares["c09"] = (shares["c09"] + 12345) % sa.PRIME  # the dropped one's s_sk
        r.server.add_unmask(i, shares)
    np.testing.assert_array_equal(r.server.result(), r.expected(survivors))


def test_bad_share_with_no_spare_is_rejected_then_recovers() -> None:
    r = Round(10)
    r.keys_and_shares()
    survivors = r.mask()
    answering = survivors[:6]  # exactly t shares of every b
    for i in answering:
        shares = r.clients[i].unmask(survivors)
        if i == "c00":
            shares["c07"] = (shares["c07"] + 1) % sa.PRIME
        r.server.add_unmask(i, shares)
    assert r.server.ready()
    with pytest.raises(Rejected) as e:
        r.server.result()
    assert reason(e) == "secagg-bad-share"
    late = survivors[6]
    r.server.add_unmask(late, r.clients[late].unmask(survivors))
    np.testing.assert_array_equal(r.server.result(), r.expected(survivors))


def test_a_client_checks_the_signatures_of_its_neighbours_only() -> None:
    # Sparse graph (n = 20, k = 16): each advert is checked by the clients that use its keys.
    r = Round(20, degree=16)
    for i in r.ids:
        r.server.add_advert(i, r.clients[i].advertise())
    r.server.freeze_adverts()
    table = r.server.key_table()
    graph = sa.neighbours(r.ids, r.params.degree, sa._graph_seed(r.params.context()))
    victim = "c05"
    assert 0 < len(graph[victim]) < len(r.ids) - 1
    forged = dict(table)
    forged[victim] = sa.Advert(table[victim].c_pk, table[victim].s_pk, table[victim].b_commit,
                               bytes(64))  # a signature nobody made
    for i in r.ids:
        if i == victim:
            continue
        if i in graph[victim]:  # would seal shares to, and mask with, the forged keys
            with pytest.raises(Rejected) as e:
                r.clients[i].share(forged, r.verify)
            assert reason(e) == "secagg-bad-advert"
        else:  # never uses them: the forged advert cannot hurt it
            assert set(r.clients[i].share(forged, r.verify)) == set(graph[i])
