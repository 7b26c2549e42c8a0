"""Small-count disclosure control for what a site reports: at least k cases behind every number.

A metric computed on one test case gives that patient's label and predicted probability away, and so
does a score-histogram bin holding a single case. The rules, reusable by any site policy:

- :func:`enough_cases`: a site reports evaluation metrics only from at least ``k`` cases
  (node config ``min-report-cases``, default in :class:`shared.config.NodeConfig`);
- :func:`k_anonymous_rows`: a histogram is sent only with every non-empty bin holding at least ``k``
  cases: adjacent bins are merged (the merged count sits at the group's count-weighted mean bin), and
  a histogram with a non-empty row of fewer than ``k`` cases is not sent at all.
"""

from __future__ import annotations

import numpy as np


def enough_cases(n: int, k: int) -> bool:
    """True when ``n`` cases may back a reported metric (``k`` <= 1 disables the rule)."""
    return n >= max(int(k), 1)


def k_anonymous_row(counts: np.ndarray, k: int) -> np.ndarray | None:
    """``counts`` (1-D) with adjacent bins merged so that every non-empty bin holds >= ``k``.

    None when the row holds between 1 and ``k`` - 1 cases in all (no merge can hide them).
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    out = np.zeros_like(counts)
    if total == 0 or k <= 1:
        return counts.copy()
    if total < k:
        return None
    groups: list[list[int]] = []  # [start, end, count]
    start, acc = 0, 0
    for i, c in enumerate(counts):
        acc += int(c)
        if acc >= k:
            groups.append([start, i, acc])
            start, acc = i + 1, 0
    if acc:  # the tail (< k) joins the last group
        groups[-1][1], groups[-1][2] = len(counts) - 1, groups[-1][2] + acc
    bins = np.arange(len(counts))
    for lo, hi, n in groups:
        w = counts[lo:hi + 1]
        centre = round(float((bins[lo:hi + 1] * w).sum()) / max(int(w.sum()), 1))
        out[centre] += n
    return out


def k_anonymous_rows(hist: np.ndarray, k: int) -> np.ndarray | None:
    """:func:`k_anonymous_row` over the last axis of ``hist``; None if any row cannot be protected."""
    hist = np.asarray(hist, dtype=np.int64)
    flat = hist.reshape(-1, hist.shape[-1])
    rows = [k_anonymous_row(r, k) for r in flat]
    if any(r is None for r in rows):
        return None
    return np.stack(rows).reshape(hist.shape)
