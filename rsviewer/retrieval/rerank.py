"""Post-processing rerankers of a full image-text similarity matrix (SPEC §4).

Both methods use the *reverse* search: if caption t is a good answer for image i, then
i should also rank high when t searches the images. They rewrite the scores of the
top-K candidates of every query, in both directions, and return the pair
``(sim_i2t, sim_t2i)`` of N x M matrices that ``metrics.retrieval_metrics`` takes:

* for every image row of ``sim_i2t``, sorting descending gives the reranked caption
  order: the top-K captions by original score come first, in their reranked order,
  and every other caption follows in its original order;
* symmetrically for every caption column of ``sim_t2i``.

Non-candidates get ``original - max(original) + min(candidate scores) - 1``: a monotone
map of the original score that lies below every reranked candidate.

Conventions shared by both methods (documented once here):

* **Candidates** of a query are its K best items by original score. If scores tie
  across the K-th place, all tied items are candidates (the set is larger than K), so
  the result never depends on item order. UCM-style data has many identical captions,
  whose columns are identical: they always get identical reranked scores.
* **Positions** are 0-based counts of strictly higher scores ("optimistic", the rule of
  ``metrics.py``); for distinct scores they equal the argsort positions of the field's
  code.
* **The t2i direction is the i2t algorithm applied to the transpose** (GaLR's code does
  exactly this; CMPAGL describes only i2t and calls t2i symmetric), so
  ``mr_rerank(S)[1] == mr_rerank(S.T)[0].T``.
* **Non-positive scores** (``shift``): both methods divide by sums or maxima of raw
  scores (GaLR eq. 29, CMPAGL eq. 14) and CMPAGL multiplies the weights into the raw
  scores (eq. 16). With negative cosines these flip meaning (a larger weight pushes a
  negative score *down*; a negative maximum inverts a ratio). ``shift="auto"`` (default)
  uses the raw matrix when all scores are > 0 (the papers' case, unchanged) and
  otherwise the matrix shifted by a constant, ``S - min(S) + delta`` with
  ``delta = 1e-6 * (max - min)``, in those ratio/product terms only; ranks always
  come from the original scores. ``shift=None`` uses raw scores as the papers and the
  GaLR code do (a zero denominator then gives a ratio of 0); a float adds that constant.

Everything is vectorized over queries: candidates by ``np.partition``, reverse
positions by one sort of the reverse axis and a batched binary search, so a
1,000 x 5,000 matrix reranks in both directions in well under a second.
"""
from __future__ import annotations

import numbers

import numpy as np

from .metrics import RetrievalInputError, as_sim_matrix

__all__ = [
    "MR_CODE_SETTINGS",
    "MR_PAPER_SETTINGS",
    "RERANK_METHODS",
    "SMR_PAPER_SETTINGS",
    "mr_rerank",
    "rerank",
    "smr_rerank",
]

RERANK_METHODS = ("none", "mr", "smr")

#: GaLR paper (Sec. IV-E, Table III: "k is 25, ... w_c1 and w_c2 ... 0.5 and 1.25").
#: The paper gives no value for the ranking coefficient xi (eq. 26) nor for l (eq. 27);
#: xi = 0.05 is the released code's, l = None (the full reverse list) as in the code.
MR_PAPER_SETTINGS = dict(k=25, l=None, xi=0.05, w_reverse=0.5, w_significance=1.25,
                         reverse_position="absolute")

#: GaLR released code (postprocessing/rerank.py, ``i2t_rerank_optim`` with
#: ``K = 30; Wp1, Wp2 = 0.30, 1.1``): p2 = exp(-0.05 (j + 1)) forward, significance
#: weight 0.30, reverse weight 1.1 applied to the candidate's position among the K
#: candidates after re-sorting them by reverse rank. Use with ``shift=None`` to
#: reproduce the code on any matrix (it uses raw scores).
MR_CODE_SETTINGS = dict(k=30, l=None, xi=0.05, w_reverse=1.1, w_significance=0.30,
                        reverse_position="relative")

#: CMPAGL (Sec. IV-E: "best performance when gamma1 = 0.9 and gamma2 = 1.9"). The text
#: gives no K; Fig. 6a compares SMR with MR "under the same K value conditions", so the
#: default is MR's published k = 25.
SMR_PAPER_SETTINGS = dict(k=25, gamma1=0.9, gamma2=1.9)


# --------------------------------------------------------------------------- helpers
def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise RetrievalInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise RetrievalInputError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise RetrievalInputError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _as_float64(sim) -> np.ndarray:
    return np.asarray(as_sim_matrix(sim), dtype=np.float64)


def _positive(s: np.ndarray, shift) -> np.ndarray:
    """The matrix used in the ratio/product terms (see the module doc, "shift")."""
    if shift is None:
        return s
    if isinstance(shift, str):
        if shift != "auto":
            raise RetrievalInputError(f"shift must be 'auto', None or a number, got {shift!r}")
        lo = float(s.min())
        if lo > 0:
            return s
        span = float(s.max()) - lo
        delta = 1e-6 * span if span > 0 else 1.0
        return s + (delta - lo)
    return s + _check_float("shift", shift)


def _group_rank(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For each element, how many elements of its group have a strictly larger key."""
    n = group.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-key, group))
    g = group[order]
    k = key[order]
    idx = np.arange(n)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.copy()
    new_run[1:] |= k[1:] != k[:-1]
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = run_start - group_start
    return out


def _count_greater_in_columns(colsorted: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Per (column, value): how many entries of that column exceed the value.

    ``colsorted`` has every column sorted ascending; a binary search runs for all
    queries at once (ceil(log2(rows + 1)) vectorized steps).
    """
    rows = colsorted.shape[0]
    lo = np.zeros(cols.size, dtype=np.int64)  # becomes #entries <= value
    hi = np.full(cols.size, rows, dtype=np.int64)
    for _ in range(int(np.ceil(np.log2(rows + 1))) + 1):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        le = colsorted[np.minimum(mid, rows - 1), cols] <= vals
        lo = np.where(active & le, mid + 1, lo)
        hi = np.where(active & ~le, mid, hi)
    return rows - lo


class _Direction:
    """Candidates of every query (row) of ``s`` (queries x gallery) and their ranks.

    q, g: candidate (query, gallery) index pairs; fwd: 0-based forward position of g
    in q's list; rev: 0-based position of q when g searches all queries (the reverse
    search, eq. 27 GaLR / eq. 12 CMPAGL).
    """

    def __init__(self, s: np.ndarray, k: int):
        nq, ng = s.shape
        kk = min(k, ng)
        if kk == ng:
            mask = np.ones(s.shape, dtype=bool)
        else:
            kth = np.partition(s, ng - kk, axis=1)[:, ng - kk]  # K-th largest per row
            mask = s >= kth[:, None]  # ties at the K-th place all join
        self.k = kk
        self.all_candidates = kk == ng
        self.q, self.g = np.nonzero(mask)
        v = s[self.q, self.g]
        self.fwd = _group_rank(self.q, v)
        self.rev = _count_greater_in_columns(np.sort(s, axis=0), self.g, v)


def _assemble(s: np.ndarray, d: _Direction, scores: np.ndarray) -> np.ndarray:
    """Candidates get their reranked score; the rest keep their order below them."""
    if d.all_candidates:
        out = np.empty_like(s)
    else:
        out = s - s.max() + (scores.min() - 1.0)
    out[d.q, d.g] = scores
    return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ------------------------------------------------------------------------------ MR
def _mr_direction(s, sp, k, l, xi, w_reverse, w_significance, reverse_position):
    d = _Direction(s, k)
    c_i2t = np.exp(-xi * (d.fwd + 1))  # eq. 26
    if reverse_position == "absolute":
        pos = d.rev  # P_in, eq. 28
    else:
        # GaLR code: position among the candidates after re-sorting them by reverse
        # rank (``np.argsort(address)``). Equal reverse ranks are common (several
        # captions all rank the query first); the code's default (unstable) argsort
        # orders them arbitrarily, here deterministically by forward position
        # (exact duplicates share a position).
        key = d.rev * (int(d.fwd.max()) + 1) + d.fwd
        pos = _group_rank(d.q, -key)
    c_t2i = np.exp(-xi * (pos + 1))
    if l is not None:
        c_t2i = np.where(d.rev < l, c_t2i, 0.0)  # eq. 28, "other" -> 0
    # eq. 29: share of the candidate's similarity to the query among its similarities
    # to all queries (for i2t: column sum over all images; the code does the same).
    colsum = sp.sum(axis=0)
    c_s = _safe_div(sp[d.q, d.g], colsum[d.g])
    scores = c_i2t + w_reverse * c_t2i + w_significance * c_s  # eq. 30
    return _assemble(s, d, scores)


def mr_rerank(
    sim,
    k: int = 25,
    l: int | None = None,
    xi: float = 0.05,
    w_reverse: float = 0.5,
    w_significance: float = 1.25,
    reverse_position: str = "absolute",
    shift="auto",
) -> tuple[np.ndarray, np.ndarray]:
    """GaLR multivariate rerank (Yuan et al., TGRS 2022, Sec. III-D, eqs. 25-30).

    For query image i and its top-k captions t_m at forward position P_tm:
    ``S_mr = c_i2t + w_c1 c_t2i + w_c2 c_s`` (eq. 30) with c_i2t = exp(-xi (P_tm + 1))
    (eq. 26); c_t2i = exp(-xi (P_in + 1)) where P_in is the position of i when t_m
    searches the images, or 0 if i is not in t_m's top l (eq. 28); and the significance
    c_s = cos(t_m, i) / sum_n cos(t_m, i_n) over all N images (eq. 29). t2i: the same
    on the transpose.

    Parameters (paper defaults; ``MR_CODE_SETTINGS`` holds the released code's):
      k: candidates per query. Paper 25 (Sec. IV-E); code 30.
      l: reverse-list cut-off of eq. 27-28. Not given in the paper; None = all
         queries (the code's behaviour, it has no cut-off). Applies to the absolute
         reverse position in both ``reverse_position`` modes.
      xi: ranking coefficient of eqs. 26/28. Not given in the paper; 0.05 in the code.
      w_reverse: w_c1. Paper 0.5; code 1.1 (``Wp2``).
      w_significance: w_c2. Paper 1.25; code 0.30 (``Wp1``).
      reverse_position: "absolute" = P_in, the query's position in the candidate's
         full reverse list (eq. 28); "relative" = the code's: the candidate's position
         among the k candidates after re-sorting them by that reverse position
         (equal reverse positions in forward order).
      shift: handling of non-positive scores in eq. 29 (module doc).

    Deviations from the released code, by design: non-candidates keep their original
    order (the code zeroes them, leaving them tied); ties share positions (module
    doc); the code's silent ``K = max(10, K)`` is not copied.

    Returns (sim_i2t, sim_t2i), both N x M float64.
    """
    s = _as_float64(sim)
    k = _check_int("k", k)
    if l is not None:
        l = _check_int("l", l)
    xi = _check_float("xi", xi, minimum=0.0)
    w_reverse = _check_float("w_reverse", w_reverse)
    w_significance = _check_float("w_significance", w_significance)
    if reverse_position not in ("absolute", "relative"):
        raise RetrievalInputError(
            f"reverse_position must be 'absolute' (paper) or 'relative' (GaLR code), got {reverse_position!r}"
        )
    sp = _positive(s, shift)
    args = (k, l, xi, w_reverse, w_significance, reverse_position)
    i2t = _mr_direction(s, sp, *args)
    t2i = _mr_direction(s.T, sp.T, *args).T
    return i2t, t2i


# ----------------------------------------------------------------------------- SMR
def _smr_direction(s, sp, k, gamma1, gamma2):
    d = _Direction(s, k)
    nq = s.shape[0]
    w_fwd = 1.0 - (d.fwd + 1) / d.k  # eq. 11, j = 1..K
    w_rev = 1.0 - (d.rev + 1) / nq  # eq. 13, k = 1..N_i
    x = sp[d.q, d.g]
    # eq. 14: the score over the best score of the query's row and of the candidate's
    # column (the best answer in the forward and in the reverse search).
    w_ed = _safe_div(x, sp.max(axis=1)[d.q]) + _safe_div(x, sp.max(axis=0)[d.g])
    w_map = w_fwd + gamma1 * w_rev + gamma2 * w_ed  # eq. 15
    return _assemble(s, d, w_map * x)  # eq. 16


def smr_rerank(
    sim,
    k: int = 25,
    gamma1: float = 0.9,
    gamma2: float = 1.9,
    shift="auto",
) -> tuple[np.ndarray, np.ndarray]:
    """CMPAGL similarity-matrix-reweighting rerank (TGRS 2024, Sec. III-E, eqs. 10-16).

    For query image i_q and its top-K captions t_j (eq. 10, j = 1..K, 1-based):
    forward weight w_i2t = 1 - j/K (eq. 11; linear so that rank gaps keep their size);
    reverse weight w_t2i = 1 - k/N_i with k the 1-based position of i_q when t_j
    searches all N_i images (eqs. 12-13); extreme-difference ratio
    w_ed = s(t_j, i_q)/max(row of i_q) + s(t_j, i_q)/max(column of t_j) (eq. 14);
    W_map = w_i2t + gamma1 w_t2i + gamma2 w_ed (eq. 15); S_opt = W_map * S_raw for the
    candidates (eq. 16). The paper spells out i2t only; t2i is the same on the
    transpose (query caption, its top-K images, reverse over all captions).

    Parameters:
      k: K. The paper's text gives no value (module constant ``SMR_PAPER_SETTINGS``);
         25, the MR setting it is compared against. With ties across the K-th place
         the candidate set grows, j stays <= K so w_i2t >= 0.
      gamma1, gamma2: 0.9 and 1.9, the best of the paper's grid (0.5-2.0, step 0.1,
         RSITMD, Sec. IV-E).
      shift: handling of non-positive scores in eqs. 14/16 (module doc).

    Returns (sim_i2t, sim_t2i), both N x M float64.
    """
    s = _as_float64(sim)
    k = _check_int("k", k)
    gamma1 = _check_float("gamma1", gamma1)
    gamma2 = _check_float("gamma2", gamma2)
    sp = _positive(s, shift)
    i2t = _smr_direction(s, sp, k, gamma1, gamma2)
    t2i = _smr_direction(s.T, sp.T, k, gamma1, gamma2).T
    return i2t, t2i


# ------------------------------------------------------------------------ dispatch
def rerank(sim, method: str = "none", **params) -> tuple[np.ndarray, np.ndarray]:
    """Rerank ``sim`` (N images x M captions) with ``method`` in "none", "mr", "smr".

    Returns ``(sim_i2t, sim_t2i)`` for ``metrics.retrieval_metrics``. "none" returns
    the validated matrix twice (no copy) and takes no parameters.
    """
    if method not in RERANK_METHODS:
        raise RetrievalInputError(
            f"unknown rerank method {method!r}; choose one of: {', '.join(RERANK_METHODS)}"
        )
    if method == "none":
        if params:
            raise RetrievalInputError(f"rerank method 'none' takes no parameters, got {sorted(params)}")
        s = as_sim_matrix(sim)
        return s, s
    fn = mr_rerank if method == "mr" else smr_rerank
    try:
        return fn(sim, **params)
    except TypeError as exc:  # an unknown keyword
        if "unexpected keyword" in str(exc):
            raise RetrievalInputError(f"rerank method {method!r}: {exc}") from None
        raise
