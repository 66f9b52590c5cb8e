"""The result tables of ``gate_analysis.stats.GateStatsAccumulator`` (a mixin of that class: it reads the
accumulator's sums and per-query rows): per query, per video, per layer, histograms, per clip position, per
feature dim, rankings, and the check whether gates depend on the query."""
import numpy as np
import pandas as pd

from qd_detr.gates import gate_name

from .rankings import rank_rows
from .stats_csv import CSV_COLUMNS, CSV_FILES, empty_frame

__all__ = ["StatsTables", "QUERY_STAT_NAMES", "VIDEO_TOLERANCE"]

QUERY_STAT_NAMES = ("count", "mean", "std", "min", "p5", "p25", "median", "p75", "p95", "max",
                    "frac_positive", "frac_negative", "frac_near_zero", "frac_saturated")
#: Queries of one video whose summary statistics differ by at most this fraction of the gate range are the
#: same gates (float rounding of different batches is about 1e-7).
VIDEO_TOLERANCE = 1e-5
_FRACS = ("frac_positive", "frac_negative", "frac_near_zero", "frac_saturated")


class StatsTables:
    """The tables of a ``GateStatsAccumulator`` (see its docstring for the conventions)."""

    def _id_frame(self, repeat=1):
        layers = np.repeat([l for l, _ in self.keys], repeat)
        kinds = np.repeat([k for _, k in self.keys], repeat)
        return pd.DataFrame({"layer": layers.astype(np.int64), "gate": kinds.astype(str),
                             "name": np.repeat([gate_name(*k) for k in self.keys], repeat).astype(str)})

    def query_stats(self):
        """One row per query x layer x gate: qid, vid, layer, gate, name, n_clips, count, mean, std
        (ddof=0), min, p5, p25, median, p75, p95, max, frac_positive, frac_negative, frac_near_zero,
        frac_saturated (see ``CSV_COLUMNS['gate_stats_per_query.csv']``)."""
        nr, g = self._n_rows, len(self.keys)
        if nr == 0:
            return empty_frame(CSV_FILES["per_query"])
        ids = self._id_frame()
        df = pd.DataFrame({
            "qid": np.repeat(self._row_qids[:nr], g),
            "vid": np.repeat(np.array(self._row_vids, dtype=object), g).astype(str),
            "layer": np.tile(ids["layer"].to_numpy(), nr),
            "gate": np.tile(ids["gate"].to_numpy(dtype=object), nr).astype(str),
            "name": np.tile(ids["name"].to_numpy(dtype=object), nr).astype(str),
            "n_clips": np.repeat(self._row_nclips[:nr], g),
        })
        vals = self._rows[:nr].reshape(nr * g, -1)
        for j, c in enumerate(QUERY_STAT_NAMES):
            df[c] = vals[:, j]
        df["count"] = df["count"].astype(np.int64)
        return df

    def layer_stats(self):
        """Two rows per layer x gate (weighting "video" and "clip"); columns in
        ``CSV_COLUMNS['gate_stats_per_layer.csv']``."""
        if self._nq == 0:
            return empty_frame(CSV_FILES["per_layer"])
        with np.errstate(invalid="ignore", divide="ignore"):
            nq = self._nq
            qmean = self._qsum / nq
            qstd = np.sqrt(np.maximum(self._qsumsq / nq - qmean ** 2, 0.0))
            n = self._n
            cmean = self._sum / n
            cstd = np.sqrt(np.maximum(self._sumsq / n - cmean ** 2, 0.0))
            cfrac = self._frac_counts / n[:, None] * self._frac_mask
            qfrac = self._qfrac_sum / nq
        frames = []
        for weighting, mean, std, mn, mx, fr in (("video", qmean, qstd, self._qmin, self._qmax, qfrac),
                                                 ("clip", cmean, cstd, self._min, self._max, cfrac)):
            df = self._id_frame()
            df["weighting"] = weighting
            df["n_queries"] = np.int64(self._n_rows)
            df["n_videos"] = np.int64(nq)
            df["n_values"] = n.astype(np.int64)
            df["mean"], df["std"] = mean, std
            df["min"] = np.where(np.isfinite(mn), mn, np.nan)
            df["max"] = np.where(np.isfinite(mx), mx, np.nan)
            for j, c in enumerate(_FRACS):
                df[c] = fr[:, j]
            df["n_underflow"] = self._hist[:, self.bins]
            df["n_overflow"] = self._hist[:, self.bins + 1]
            df["_order"] = np.arange(len(df))
            frames.append(df)
        df = pd.concat(frames, ignore_index=True).sort_values(["_order", "weighting"], ascending=[True, False],
                                                              kind="stable")
        return df.drop(columns="_order").reset_index(drop=True)

    def histograms(self):
        """Exact fixed-bin histograms per layer x gate: ``bins`` rows of bin_type "bin", then one
        "underflow", "overflow" and "nan" row each (see ``CSV_COLUMNS['gate_histograms.csv']``).
        The counts of all rows of a gate sum to the number of values. Edges are reported as
        ``np.linspace(lo, hi, bins + 1)`` (float64); values are binned exactly as np.histogram bins
        float32 input (float32 edges, which differ from these by less than one float32 ulp)."""
        nb = self.bins
        lefts, rights = [], []
        for key in self.keys:
            lo, hi = self.hist_ranges[key]
            edges = np.linspace(lo, hi, nb + 1)
            lefts.append(np.concatenate([edges[:-1], [-np.inf, hi, np.nan]]))
            rights.append(np.concatenate([edges[1:], [lo, np.inf, np.nan]]))
        types = np.array(["bin"] * nb + ["underflow", "overflow", "nan"], dtype=object)
        g = len(self.keys)
        df = self._id_frame(repeat=nb + 3)
        df["bin_type"] = np.tile(types, g).astype(str)
        df["bin_left"] = np.concatenate(lefts)
        df["bin_right"] = np.concatenate(rights)
        df["count"] = self._hist.reshape(-1)
        return df

    def clip_position_stats(self):
        """Per layer x gate x clip index t: n_queries, n_values, mean, std (ddof=0), min, max over the
        queries having clip t (and all dims). Empty (right columns) for per-query gating."""
        t = self._pos_nq.size
        if t == 0:
            return empty_frame(CSV_FILES["per_clip_position"])
        df = self._id_frame(repeat=t)
        g = len(self.keys)
        nv = np.tile(self._pos_nv, g).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self._pos_sum.reshape(-1) / nv
            std = np.sqrt(np.maximum(self._pos_sumsq.reshape(-1) / nv - mean ** 2, 0.0))
        df["clip"] = np.tile(np.arange(t), g)
        df["n_queries"] = np.tile(self._pos_nq, g)
        df["n_values"] = np.tile(self._pos_nv, g)
        df["mean"], df["std"] = mean, std
        df["min"], df["max"] = self._pos_min.reshape(-1), self._pos_max.reshape(-1)
        return df

    def dim_stats(self):
        """Per layer x gate x feature dim (elementwise): n_values, mean, std (ddof=0), min, max over all
        valid clips of all queries. Empty (right columns) otherwise."""
        if self._dim_sum is None:
            return empty_frame(CSV_FILES["per_dim"])
        d = self.hidden_dim
        g = len(self.keys)
        df = self._id_frame(repeat=d)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self._dim_sum.reshape(-1) / self._dim_n
            std = np.sqrt(np.maximum(self._dim_sumsq.reshape(-1) / self._dim_n - mean ** 2, 0.0))
        df["dim"] = np.tile(np.arange(d), g)
        df["n_values"] = np.int64(self._dim_n)
        df["mean"], df["std"] = mean, std
        df["min"], df["max"] = self._dim_min.reshape(-1), self._dim_max.reshape(-1)
        return df

    def _video_rows(self):
        """Row index of each video's first query, in recorded order (rows without a video count alone)."""
        return np.array([i for i in range(self._n_rows)
                         if not self._row_vids[i] or self._video_row.get(self._row_vids[i]) == i], dtype=np.int64)

    def video_stats(self):
        """One row per video x layer x gate: the statistics of the video's gates (its first query's; every layout
        computes them from video and audio only), with ``n_queries``, ``qids`` and ``query_spread`` (the largest
        difference of the mean between its queries); ``CSV_COLUMNS['gate_stats_per_video.csv']``."""
        q = self.query_stats()
        if not len(q):
            return empty_frame(CSV_FILES["per_video"])
        g = len(self.keys)
        first = self._video_rows()
        rows = q.iloc[np.concatenate([np.arange(i * g, (i + 1) * g) for i in first])].reset_index(drop=True)
        by_vid = q.groupby(["vid", "layer", "gate"], sort=False)["mean"]
        spread = (by_vid.max() - by_vid.min()).rename("query_spread")
        one = q[(q["layer"] == self.layers[0]) & (q["gate"] == self.kinds[0])]  # one row per query
        qids = one.groupby("vid", sort=False)["qid"]
        rows = rows.join(spread, on=["vid", "layer", "gate"])
        rows["n_queries"] = rows["vid"].map(qids.size()).astype(np.int64)
        rows["qids"] = rows["vid"].map(qids.agg(lambda s: " ".join(map(str, s))))
        no_vid = rows["vid"] == ""
        rows.loc[no_vid, "n_queries"] = 1
        rows.loc[no_vid, "qids"] = rows.loc[no_vid, "qid"].astype(str)
        rows.loc[no_vid, "query_spread"] = 0.0
        return rows[list(CSV_COLUMNS[CSV_FILES["per_video"]])]

    def query_dependence(self):
        """Whether gates depend on the query: {"videos", "videos_with_several_queries",
        "videos_with_query_dependent_gates", "max_relative_difference" (the largest difference of a summary
        statistic between queries of one video, as a fraction of the gate's range), "tolerance",
        "depends_on_query"}."""
        counts = {}
        for vid in self._row_vids:
            if vid:
                counts[vid] = counts.get(vid, 0) + 1
        return {"videos": len(counts), "videos_with_several_queries": sum(1 for c in counts.values() if c > 1),
                "videos_with_query_dependent_gates": len(self._videos_differing),
                "max_relative_difference": float(self._video_max_diff), "tolerance": VIDEO_TOLERANCE,
                "depends_on_query": bool(self._videos_differing)}

    def rankings(self, n=10):
        """Top and bottom videos by mean gate (``gate_analysis.rankings.rank_rows``; each video once, by its
        first query's gates): per layer x gate, and per gate kind over all layers (``layer == "all"``: the mean
        over layers of |the video's layer mean|, so layers of opposite sign do not cancel)."""
        first = self._video_rows()
        means = self._rows[first, :, QUERY_STAT_NAMES.index("mean")]  # [V, G]
        vids = [self._row_vids[i] for i in first]
        counts = {}
        for vid in self._row_vids[:self._n_rows]:
            counts[vid] = counts.get(vid, 0) + 1
        n_queries = [counts[v] if v else 1 for v in vids]
        return rank_rows(means, self.keys, self.layers, self.kinds, self._row_qids[first], vids, n_queries, n=n)


