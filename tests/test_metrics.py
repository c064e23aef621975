"""Tests for rsviewer.retrieval.metrics (SPEC §3)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rsviewer.errors import RsviewerError
from rsviewer.retrieval.metrics import ranks_i2t, ranks_t2i, retrieval_metrics

# 3 images x 15 captions; captions 5i..5i+4 belong to image i.
HAND = np.array(
    [
        # own: c0..c4 = .9 .1 .2 .3 .4 -> best .9, nothing higher -> rank 0
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55],
        # own: c5..c9 = .3 .35 .1 .2 .25 -> best .35; higher: .8 .7 .6 .5 .4 .9 .45 .55 -> 8
        [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.35, 0.1, 0.2, 0.25, 0.9, 0.05, 0.15, 0.45, 0.55],
        # own: c10..c14 = .05 .15 .25 .35 .92 -> best .92; higher: .95 -> 1
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.05, 0.15, 0.25, 0.35, 0.92],
    ]
)
HAND_I2T = [0, 8, 1]
# Per column: how many of the 3 images score strictly above the caption's own image.
# c4 = (.4, .4, .5) with own image 0: the tie with image 1 does not count -> 1.
# c13 = (.45, .45, .35), own image 2 -> 2.
HAND_T2I = [0, 2, 2, 2, 1, 2, 2, 2, 2, 1, 2, 1, 1, 2, 0]


def test_hand_made_ranks():
    assert ranks_i2t(HAND).tolist() == HAND_I2T
    assert ranks_t2i(HAND).tolist() == HAND_T2I


def test_hand_made_metrics():
    m = retrieval_metrics(HAND)
    assert m["i2t"]["R@1"] == pytest.approx(100 / 3)
    assert m["i2t"]["R@5"] == pytest.approx(200 / 3)
    assert m["i2t"]["R@10"] == pytest.approx(100.0)
    assert m["t2i"]["R@1"] == pytest.approx(200 / 15)
    assert m["t2i"]["R@5"] == pytest.approx(100.0)
    assert m["t2i"]["R@10"] == pytest.approx(100.0)
    assert m["mR"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 200 / 15 + 100 + 100) / 6)
    # 1-based: floor(median) + 1, mean + 1
    assert m["i2t"]["medR"] == 2.0 and m["i2t"]["meanR"] == pytest.approx(4.0)
    # c4 ties image 0 with image 1: expected rank 1.5 under random tie-breaking
    assert m["t2i"]["medR"] == 3.0 and m["t2i"]["meanR"] == pytest.approx(22.5 / 15 + 1)
    assert retrieval_metrics(HAND, ties="optimistic")["t2i"]["meanR"] == pytest.approx(22 / 15 + 1)
    assert all(isinstance(v, float) for d in (m["i2t"], m["t2i"]) for v in d.values())
    assert isinstance(m["mR"], float)


def test_two_matrix_form_uses_rows_and_columns_separately():
    other = np.zeros_like(HAND)
    other[np.arange(15) // 5, np.arange(15)] = 1.0  # perfect for t2i
    m = retrieval_metrics(HAND, other)
    assert m["i2t"]["R@1"] == pytest.approx(100 / 3)
    assert m["t2i"]["R@1"] == pytest.approx(100.0)


def test_ties_count_only_strictly_greater():
    s = np.zeros((2, 10))
    s[0, 7] = 1.0  # image 0: a foreign caption strictly above -> rank 1
    s[1, 5] = 1.0
    s[1, 0] = 1.0  # image 1's own caption 5 ties with foreign caption 0 -> rank 0
    assert ranks_i2t(s).tolist() == [1, 0]
    # Caption 0: images (0, 1) score (0, 1) -> own image 0 has one above -> 1.
    # Caption 5: (0, 1), own image 1 -> 0. All-zero columns: ties -> 0.
    t2i = ranks_t2i(s)
    assert t2i[0] == 1 and t2i[5] == 0 and t2i[7] == 1
    assert t2i[[1, 2, 3, 4, 6, 8, 9]].tolist() == [0] * 7
    const = np.full((4, 20), 0.3)
    assert retrieval_metrics(const, ties="optimistic")["mR"] == 100.0


def test_ties_default_to_expected_random_tie_breaking():
    # A constant matrix: every order is equally likely. t2i: own image uniform over 4
    # positions -> R@1 = 25 %. i2t: 5 own among 20 tied captions -> P(first own is
    # first) = 5/20.
    const = np.full((4, 20), 0.3)
    m = retrieval_metrics(const)
    assert m["t2i"]["R@1"] == pytest.approx(25.0)
    assert m["i2t"]["R@1"] == pytest.approx(25.0)
    # P(first own within 5 slots) = 1 - C(15, 5)/C(20, 5)
    from math import comb

    assert m["i2t"]["R@5"] == pytest.approx(100 * (1 - comb(15, 5) / comb(20, 5)))
    assert m["t2i"]["R@5"] == pytest.approx(100.0)


def test_expected_ties_match_monte_carlo():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 3, (8, 40)).astype(float)
    exact = retrieval_metrics(s)
    ci = np.arange(40) // 5
    runs = []
    for _ in range(1500):
        i2t = [np.flatnonzero(ci[np.lexsort((rng.random(40), -s[i]))] == i).min() for i in range(8)]
        t2i = [np.flatnonzero(np.lexsort((rng.random(8), -s[:, j])) == ci[j])[0] for j in range(40)]
        runs.append([np.mean(np.array(i2t) < 5), np.mean(np.array(t2i) < 1)])
    mc = 100 * np.mean(runs, axis=0)
    assert exact["i2t"]["R@5"] == pytest.approx(mc[0], abs=1.5)
    assert exact["t2i"]["R@1"] == pytest.approx(mc[1], abs=1.5)


def test_identical_captions_ceiling_is_below_100():
    # SPEC §3: a model perfect except among identical strings cannot reach 100.
    # Two images whose captions are the same string: their columns are identical.
    s = np.zeros((2, 10))
    s[:, :] = 0.0
    s[0, :5] = s[1, :5] = 1.0  # image 0's captions equal image 1's strings
    s[0, 5:] = s[1, 5:] = 1.0
    m = retrieval_metrics(s)
    assert m["t2i"]["R@1"] == pytest.approx(50.0)
    assert m["mR"] < 100.0


def test_perfect_matrix_is_100():
    n = 50
    s = np.random.default_rng(0).uniform(0, 0.5, (n, 5 * n))
    s[np.arange(5 * n) // 5, np.arange(5 * n)] += 1.0
    m = retrieval_metrics(s)
    for d in ("i2t", "t2i"):
        assert m[d]["R@1"] == m[d]["R@5"] == m[d]["R@10"] == 100.0
        assert m[d]["medR"] == 1.0 and m[d]["meanR"] == 1.0
    assert m["mR"] == 100.0


def _ref_ranks(s, ci):
    """Argsort-position reference (the field's code) for distinct scores."""
    n, m = s.shape
    i2t = []
    for i in range(n):
        order = list(np.argsort(-s[i]))
        i2t.append(min(order.index(c) for c in range(m) if ci[c] == i))
    t2i = []
    for c in range(m):
        order = list(np.argsort(-s[:, c]))
        t2i.append(order.index(ci[c]))
    return i2t, t2i


def test_random_matches_argsort_reference():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((12, 60))
    ci = np.arange(60) // 5
    i2t, t2i = _ref_ranks(s, ci)
    assert ranks_i2t(s).tolist() == i2t
    assert ranks_t2i(s).tolist() == t2i


def test_non_five_per_image_caption_map():
    rng = np.random.default_rng(2)
    ci = np.array([0, 0, 1, 2, 2, 2, 3, 1, 3, 3, 3])  # 4 images, 2/2/3/4 captions, unordered
    s = rng.standard_normal((4, ci.size))
    i2t, t2i = _ref_ranks(s, ci)
    assert ranks_i2t(s, ci).tolist() == i2t
    assert ranks_t2i(s, ci).tolist() == t2i
    m = retrieval_metrics(s, caption_image=ci)
    assert m["t2i"]["R@1"] == pytest.approx(100 * np.mean(np.array(t2i) < 1))
    # a list works too
    assert ranks_i2t(s, ci.tolist()).tolist() == i2t


def test_random_matrix_gives_chance_values():
    n, m = 1000, 5000
    s = np.random.default_rng(3).standard_normal((n, m))
    res = retrieval_metrics(s)
    for k in (1, 5, 10):
        # i2t: probability that one of the 5 own captions is among the top k of m.
        p = 1 - math.comb(m - 5, k) / math.comb(m, k)
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(res["i2t"][f"R@{k}"] / 100 - p) < 5 * sd + 1e-9
        q = k / n  # t2i: the own image among n images
        sd = math.sqrt(q * (1 - q) / n)  # captions of one image are correlated: use n
        assert abs(res["t2i"][f"R@{k}"] / 100 - q) < 5 * sd
    assert res["t2i"]["meanR"] == pytest.approx((n + 1) / 2, rel=0.05)


def test_custom_ks():
    m = retrieval_metrics(HAND, ks=(1, 2))
    assert set(m["i2t"]) == {"R@1", "R@2", "medR", "meanR"}
    assert m["i2t"]["R@2"] == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ranks_i2t(np.zeros((3, 14))), "5 captions per image"),
        (lambda: ranks_t2i(np.zeros(15)), "2-D"),
        (lambda: ranks_t2i(np.zeros((0, 0))), "empty"),
        (lambda: ranks_i2t(np.full((3, 15), np.nan)), "NaN"),
        (lambda: ranks_i2t(np.zeros((3, 4)), [0, 1, 2]), "one entry per caption"),
        (lambda: ranks_i2t(np.zeros((3, 4)), [0, 1, 2, 3]), r"\[0, 2\]"),
        (lambda: ranks_i2t(np.zeros((3, 4)), [0, 1, 1, 1]), "no caption"),
        (lambda: ranks_t2i(np.zeros((3, 4)), [0, 1, 1.5, 2]), "integer"),
        (lambda: retrieval_metrics(HAND, HAND[:, :10]), "same shape"),
        (lambda: retrieval_metrics(HAND, ks=(0,)), "positive integers"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, RsviewerError)
