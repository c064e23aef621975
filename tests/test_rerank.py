"""Tests for rsviewer.retrieval.rerank (SPEC §4).

The reference implementations below are deliberately naive: plain Python loops over
every query, sorting lists, one formula per paper equation, and an explicit t2i pass
over captions (not a transpose), so they share no code with the vectorized version.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from rsviewer.errors import RsviewerError
from rsviewer.retrieval.metrics import ranks_i2t, retrieval_metrics
from rsviewer.retrieval.rerank import (
    MR_CODE_SETTINGS,
    MR_PAPER_SETTINGS,
    SMR_PAPER_SETTINGS,
    mr_rerank,
    rerank,
    smr_rerank,
)

# 3 images x 6 captions, positive, all scores distinct.
S36 = np.array(
    [
        [0.81, 0.52, 0.33, 0.64, 0.27, 0.45],
        [0.58, 0.91, 0.22, 0.37, 0.71, 0.19],
        [0.62, 0.47, 0.86, 0.29, 0.55, 0.74],
    ]
)


# ------------------------------------------------------------- reference (loops)
def ref_mr(S, k, l, xi, w1, w2, relative):
    """GaLR eqs. 25-30, i2t and t2i, returns {(i, t): score} per direction."""
    S = [list(map(float, r)) for r in S]
    n, m = len(S), len(S[0])
    i2t, t2i = {}, {}
    # image -> text
    for i in range(n):
        order = sorted(range(m), key=lambda t: -S[i][t])
        cands = order[: min(k, m)]
        rev = {}
        for t in cands:  # eq. 27: t searches all images
            img_order = sorted(range(n), key=lambda x: -S[x][t])
            rev[t] = img_order.index(i)
        resorted = sorted(cands, key=lambda t: rev[t])
        for pos, t in enumerate(cands):
            c_i2t = math.exp(-xi * (pos + 1))  # eq. 26
            p = resorted.index(t) if relative else rev[t]
            c_t2i = math.exp(-xi * (p + 1)) if (l is None or rev[t] < l) else 0.0  # eq. 28
            c_s = S[i][t] / sum(S[x][t] for x in range(n))  # eq. 29: all images
            i2t[(i, t)] = c_i2t + w1 * c_t2i + w2 * c_s  # eq. 30
    # text -> image
    for t in range(m):
        order = sorted(range(n), key=lambda x: -S[x][t])
        cands = order[: min(k, n)]
        rev = {}
        for i in cands:
            txt_order = sorted(range(m), key=lambda y: -S[i][y])
            rev[i] = txt_order.index(t)
        resorted = sorted(cands, key=lambda i: rev[i])
        for pos, i in enumerate(cands):
            c_fwd = math.exp(-xi * (pos + 1))
            p = resorted.index(i) if relative else rev[i]
            c_rev = math.exp(-xi * (p + 1)) if (l is None or rev[i] < l) else 0.0
            c_s = S[i][t] / sum(S[i][y] for y in range(m))  # all texts
            t2i[(i, t)] = c_fwd + w1 * c_rev + w2 * c_s
    return i2t, t2i


def ref_smr(S, K, g1, g2):
    """CMPAGL eqs. 10-16, i2t and t2i."""
    S = [list(map(float, r)) for r in S]
    n, m = len(S), len(S[0])
    i2t, t2i = {}, {}
    for i in range(n):
        Kq = min(K, m)
        order = sorted(range(m), key=lambda t: -S[i][t])
        for j, t in enumerate(order[:Kq], start=1):  # j = 1..K
            w_i2t = 1 - j / Kq  # eq. 11
            img_order = sorted(range(n), key=lambda x: -S[x][t])
            kpos = img_order.index(i) + 1  # 1-based
            w_t2i = 1 - kpos / n  # eq. 13
            w_ed = S[i][t] / max(S[i]) + S[i][t] / max(S[x][t] for x in range(n))  # eq. 14
            i2t[(i, t)] = (w_i2t + g1 * w_t2i + g2 * w_ed) * S[i][t]  # eqs. 15-16
    for t in range(m):
        Kq = min(K, n)
        order = sorted(range(n), key=lambda x: -S[x][t])
        for j, i in enumerate(order[:Kq], start=1):
            w_fwd = 1 - j / Kq
            txt_order = sorted(range(m), key=lambda y: -S[i][y])
            kpos = txt_order.index(t) + 1
            w_rev = 1 - kpos / m
            w_ed = S[i][t] / max(S[x][t] for x in range(n)) + S[i][t] / max(S[i])
            t2i[(i, t)] = (w_fwd + g1 * w_rev + g2 * w_ed) * S[i][t]
    return i2t, t2i


def check_against(ref, out):
    ref_i2t, ref_t2i = ref
    a, b = out
    for (i, t), v in ref_i2t.items():
        assert a[i, t] == pytest.approx(v, rel=1e-12, abs=1e-12), ("i2t", i, t)
    for (i, t), v in ref_t2i.items():
        assert b[i, t] == pytest.approx(v, rel=1e-12, abs=1e-12), ("t2i", i, t)


# ------------------------------------------------------------------ (a) hand/reference
def test_mr_one_entry_by_hand():
    # Image 0, k = 2: top texts t0 (.81, P=0) and t3 (.64, P=1).
    # t3 searches images: (.64, .37, .29) -> image 0 first, P_in = 0.
    # c_s = .64 / (.64 + .37 + .29) = .64 / 1.30.
    a, _ = mr_rerank(S36, k=2, xi=0.05, w_reverse=0.5, w_significance=1.25)
    expected = math.exp(-0.05 * 2) + 0.5 * math.exp(-0.05 * 1) + 1.25 * 0.64 / 1.30
    assert a[0, 3] == pytest.approx(expected)
    # t0 (P=0): images (.81, .58, .62) -> image 0 first.
    assert a[0, 0] == pytest.approx(math.exp(-0.05) * 1.5 + 1.25 * 0.81 / (0.81 + 0.58 + 0.62))


def test_smr_one_entry_by_hand():
    # Image 1, K = 3: t1 (.91, j=1), t4 (.71, j=2), t0 (.58, j=3).
    # t4 over images (.27, .71, .55): image 1 first, k = 1 of N_i = 3.
    # w_ed = .71/.91 (row max) + .71/.71 (column max).
    a, _ = smr_rerank(S36, k=3, gamma1=0.9, gamma2=1.9)
    w = (1 - 2 / 3) + 0.9 * (1 - 1 / 3) + 1.9 * (0.71 / 0.91 + 1.0)
    assert a[1, 4] == pytest.approx(w * 0.71)
    # t0 for image 1: j = 3 -> w_i2t = 0; images (.81, .58, .62): image 1 third -> w_t2i = 0.
    assert a[1, 0] == pytest.approx(1.9 * (0.58 / 0.91 + 0.58 / 0.81) * 0.58)


@pytest.mark.parametrize("k", [1, 2, 4, 6, 10])
@pytest.mark.parametrize("l", [None, 1, 2])
@pytest.mark.parametrize("relative", [False, True])
def test_mr_matches_reference(k, l, relative):
    out = mr_rerank(S36, k=k, l=l, xi=0.07, w_reverse=0.8, w_significance=1.3,
                    reverse_position="relative" if relative else "absolute")
    check_against(ref_mr(S36, k, l, 0.07, 0.8, 1.3, relative), out)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 10])
def test_smr_matches_reference(k):
    out = smr_rerank(S36, k=k, gamma1=0.9, gamma2=1.9)
    check_against(ref_smr(S36, k, 0.9, 1.9), out)


def test_presets_match_reference_on_larger_matrix():
    s = np.random.default_rng(0).uniform(0.05, 1.0, (20, 100))
    p = MR_PAPER_SETTINGS
    check_against(ref_mr(s, p["k"], p["l"], p["xi"], p["w_reverse"], p["w_significance"], False),
                  mr_rerank(s, **p))
    c = MR_CODE_SETTINGS  # the released code: relative reverse position, raw scores
    check_against(ref_mr(s, c["k"], c["l"], c["xi"], c["w_reverse"], c["w_significance"], True),
                  mr_rerank(s, shift=None, **c))
    q = SMR_PAPER_SETTINGS
    check_against(ref_smr(s, q["k"], q["gamma1"], q["gamma2"]), smr_rerank(s, **q))


def test_defaults_are_the_papers():
    a = mr_rerank(S36)
    b = mr_rerank(S36, **MR_PAPER_SETTINGS)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    a = smr_rerank(S36)
    b = smr_rerank(S36, **SMR_PAPER_SETTINGS)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert MR_PAPER_SETTINGS["k"] == 25 and MR_PAPER_SETTINGS["w_reverse"] == 0.5
    assert MR_PAPER_SETTINGS["w_significance"] == 1.25
    assert MR_CODE_SETTINGS == dict(k=30, l=None, xi=0.05, w_reverse=1.1,
                                    w_significance=0.30, reverse_position="relative")
    assert SMR_PAPER_SETTINGS["gamma1"] == 0.9 and SMR_PAPER_SETTINGS["gamma2"] == 1.9


# ------------------------------------------------------------ (b) fixes a wrong top-1
def _wrong_top1():
    """6 images x 30 captions; image 0's top caption A=7 belongs to image 1 and is
    an even better match for images 1-4 (reverse search puts image 0 fifth); its own
    caption B=0 is second but B's reverse search puts image 0 first."""
    rng = np.random.default_rng(5)
    s = rng.uniform(0.1, 0.3, (6, 30))
    a, b = 7, 0
    s[0, a], s[0, b] = 0.95, 0.93
    s[1:5, a] = [0.96, 0.97, 0.98, 0.99]
    return s, a, b


@pytest.mark.parametrize(
    "method, params",
    [("mr", {}), ("mr", MR_CODE_SETTINGS), ("smr", {}), ("smr", {"k": 5})],
)
@pytest.mark.parametrize("offset", [0.0, -0.5])  # -0.5: negative scores, shift="auto"
def test_rerank_fixes_wrong_top1(method, params, offset):
    s, a, b = _wrong_top1()
    s = s + offset
    assert np.argmax(s[0]) == a
    i2t, _ = rerank(s, method, **params)
    assert np.argmax(i2t[0]) == b
    assert ranks_i2t(s)[0] == 1 and ranks_i2t(i2t)[0] == 0


# --------------------------------------------------------- (c) the ordering contract
def _check_contract(orig_rows, new_rows, k):
    for o, r in zip(orig_rows, new_rows):
        kth = np.sort(o)[::-1][min(k, o.size) - 1]
        cand = np.flatnonzero(o >= kth)
        order = np.argsort(-r, kind="stable")
        assert set(order[: cand.size]) == set(cand)
        rest = order[cand.size:]
        # the others follow in their original order (strictly, for distinct scores)
        assert np.all(np.diff(o[rest]) <= 0)
        assert r[rest].max(initial=-np.inf) < r[cand].min()


@pytest.mark.parametrize("fn", [mr_rerank, smr_rerank])
def test_ordering_contract(fn):
    s = np.random.default_rng(6).uniform(-0.3, 1.0, (8, 40))
    i2t, t2i = fn(s, k=5)
    _check_contract(s, i2t, 5)
    _check_contract(s.T, t2i.T, 5)
    assert i2t.shape == t2i.shape == s.shape


@pytest.mark.parametrize("fn", [mr_rerank, smr_rerank])
def test_ties_at_the_boundary_join_and_duplicates_stay_equal(fn):
    s = np.random.default_rng(7).uniform(0.1, 1.0, (6, 30))
    s[:, 12] = s[:, 3]  # duplicate caption (UCM has many identical strings)
    s[0, 20] = s[0, 21] = np.sort(s[0])[::-1][3]  # three-way tie at 4th place, row 0
    i2t, t2i = fn(s, k=4)
    _check_contract(s, i2t, 4)
    _check_contract(s.T, t2i.T, 4)
    assert np.array_equal(i2t[:, 12], i2t[:, 3])
    assert np.array_equal(t2i[:, 12], t2i[:, 3])
    # the tied entries of row 0 are all candidates and score equally
    top = np.argsort(-i2t[0], kind="stable")[:6]
    assert {20, 21} <= set(top)


# ------------------------------------------------------- (d) t2i is i2t on transpose
@pytest.mark.parametrize("fn, kw", [(mr_rerank, {}), (mr_rerank, MR_CODE_SETTINGS),
                                    (smr_rerank, {}), (smr_rerank, {"k": 3})])
def test_t2i_is_i2t_on_transpose(fn, kw):
    s = np.random.default_rng(8).standard_normal((15, 75))
    a, b = fn(s, **kw)
    at, bt = fn(s.T, **kw)
    np.testing.assert_array_equal(b, at.T)
    np.testing.assert_array_equal(a, bt.T)


# --------------------------------------- (e) metrics improve on a structured matrix
def test_rerank_improves_hubby_matrix():
    """True matches + noise + 'hub' captions/images that score high with everything:
    the reverse search sees that a hub prefers other queries."""
    rng = np.random.default_rng(0)
    n = 100
    m = 5 * n
    ci = np.arange(m) // 5
    s = 0.25 * rng.standard_normal((n, m))
    s[ci, np.arange(m)] += 0.6
    s += np.abs(rng.normal(0, 0.4, m))[None, :]
    s += np.abs(rng.normal(0, 0.4, n))[:, None]
    base = retrieval_metrics(*rerank(s, "none"))
    assert base == retrieval_metrics(s)
    for method, kw in [("mr", {}), ("mr", MR_CODE_SETTINGS), ("smr", {})]:
        res = retrieval_metrics(*rerank(s, method, **kw))
        assert res["mR"] > base["mR"] + 3, (method, res["mR"], base["mR"])


def test_shift_handling():
    s = np.random.default_rng(9).uniform(0.2, 1.0, (5, 25))
    # all-positive: "auto" is the raw formula
    for fn in (mr_rerank, smr_rerank):
        a = fn(s)
        b = fn(s, shift=None)
        np.testing.assert_array_equal(a[0], b[0])
    # negative scores: "auto" == an explicit shift to min + delta
    neg = s - 0.6
    span = neg.max() - neg.min()
    for fn in (mr_rerank, smr_rerank):
        a = fn(neg)
        b = fn(neg, shift=1e-6 * span - neg.min())
        np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12)
    # a constant matrix does not divide by zero
    for fn in (mr_rerank, smr_rerank):
        a, b = fn(np.zeros((3, 15)))
        assert np.isfinite(a).all() and np.isfinite(b).all()


# --------------------------------------------------------- (f) validation errors
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rerank(S36, "foo"), "none, mr, smr"),
        (lambda: rerank(S36, "none", k=3), "no parameters"),
        (lambda: rerank(S36, "mr", gamma1=1.0), "gamma1"),
        (lambda: rerank(S36, "smr", xi=1.0), "xi"),
        (lambda: mr_rerank(S36[0]), "2-D"),
        (lambda: smr_rerank(np.zeros((0, 5))), "empty"),
        (lambda: mr_rerank(np.full((2, 10), np.nan)), "NaN"),
        (lambda: mr_rerank(S36, k=0), "k must be"),
        (lambda: smr_rerank(S36, k=2.5), "k must be"),
        (lambda: mr_rerank(S36, k=True), "k must be"),
        (lambda: mr_rerank(S36, l=0), "l must be"),
        (lambda: mr_rerank(S36, xi=-1), "xi"),
        (lambda: mr_rerank(S36, w_reverse=float("nan")), "w_reverse"),
        (lambda: mr_rerank(S36, reverse_position="after"), "reverse_position"),
        (lambda: smr_rerank(S36, gamma2="a"), "gamma2"),
        (lambda: smr_rerank(S36, shift="max"), "shift"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, RsviewerError)


def test_accepts_float32_and_lists():
    a = mr_rerank(S36.astype(np.float32))[0]
    assert a.dtype == np.float64
    b = smr_rerank(S36.tolist())[0]
    assert b.shape == S36.shape
