"""Rankings: the top and bottom videos by mean gate, per gate and per gate kind over all layers."""
import math

import numpy as np
import pandas as pd

from qd_detr.gates import ALL_LAYERS, gate_name

from .stats_csv import CSV_COLUMNS, CSV_FILES, empty_frame

__all__ = ["rank_rows"]


def rank_rows(means, keys, layers, kinds, qids, vids, n_queries, n=10):
    """The rankings table (``CSV_COLUMNS['gate_rankings.csv']``).

    Args:
        means: [V, G] float64 mean gate of each row (a video) and gate; NaN rows are skipped.
        keys: the G gates ``(layer, kind)`` in column order; ``layers``, ``kinds``: their layers and kinds.
        qids, vids, n_queries: [V] each row's first query id, video and number of queries.
        n: at most this many rows at each end.

    Per gate the value is the mean; per kind over all layers (``layer == "all"``) it is the mean over layers
    of |layer mean|, so layers of opposite sign never cancel. With N ranked rows, "top" has
    ``min(n, ceil(N/2))`` rows and "bottom" ``min(n, N - n_top)`` rows, from the two ends of one ordering
    (value descending, ties by row order); a row tied with a top row is never listed as bottom."""
    if len(qids) == 0 or n < 1:
        return empty_frame(CSV_FILES["rankings"])
    out = []

    def rank(layer, kind, m):
        valid = np.flatnonzero(~np.isnan(m))
        order = valid[np.argsort(-m[valid], kind="stable")]
        n_top = min(n, math.ceil(order.size / 2))
        top = order[:n_top]
        bottom = [i for i in order[::-1][:min(n, order.size - n_top)] if not (m[top] == m[i]).any()]
        for rank_type, sel in (("top", top), ("bottom", bottom)):
            for r, i in enumerate(sel, start=1):
                out.append((layer, kind, gate_name(layer, kind), rank_type, r, str(vids[i]), int(n_queries[i]),
                            int(qids[i]), float(m[i])))

    for layer in layers:
        for kind in kinds:
            rank(layer, kind, means[:, keys.index((layer, kind))])
    for kind in kinds:
        rank(ALL_LAYERS, kind, np.abs(means[:, [keys.index((l, kind)) for l in layers]]).mean(axis=1))
    df = pd.DataFrame(out, columns=list(CSV_COLUMNS[CSV_FILES["rankings"]]))
    df["layer"] = df["layer"].astype(object)
    df["vid"] = df["vid"].astype(str)
    return df
