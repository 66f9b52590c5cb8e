"""Streamed statistics of fusion gates: per query, per layer, per clip position, per feature dim,
exact fixed-bin histograms and rankings of queries.

``GateStatsAccumulator.update(qid, gates)`` is called once per query (e.g. from the recorder's sink
or while reading a gate store). It keeps only summaries whose size does not depend on the raw gate
arrays: fixed-bin integer histograms, float64 running sums (count, sum, sum of squares), per-clip-
position and per-dim sums, and one row of summary statistics per query x layer x gate (the
per-query table grows by ``G * 14`` float64 per query, G = layers * kinds, independent of T and D).
Accumulators are mergeable (``merge``) so shards, runs or epochs can be combined exactly.

Conventions
- A gate is ``(layer, kind)`` with the dotted name ``layers.{layer}.gate_{kind}``.
- Standard deviations are population std (ddof=0) everywhere, computed from float64 sums of the
  float32 values (count, sum, sum of squares), which is also what makes them mergeable.
- Percentiles use numpy's default "linear" interpolation (``np.percentile``).
- Every gate has a declared range (``gate_ranges``, ``qd_detr.gates.GateRange``; tanh [-1, 1] when
  none is given). Thresholds are fractions of its magnitude m around its reference value r (0; see
  ``gate_analysis.ranges``): positive ``g > r + 0.1 m``, negative ``g < r - 0.1 m`` (NaN for gates that
  cannot be negative, e.g. sigmoid), near zero ``|g - r| <= 0.1 m``, saturated ``g > high - 0.05 m``
  or ``g < low + 0.05 m``. For tanh gates: ``g > +0.1``, ``g < -0.1``, ``|g| <= 0.1``, ``|g| > 0.95``.
- Histograms: ``bins`` equal bins over each gate's declared range [low, high] (tanh [-1, 1]), or over
  ``value_range`` when given (``(lo, hi)`` for every gate, or ``{kind: (lo, hi)}``); every value goes
  to exactly one bin as ``np.histogram(values, bins, range=(lo, hi))`` would put it (the last bin
  includes its right edge). Values below/above the range are counted as underflow/overflow and NaN
  values as nan, never clipped.
- "query"-weighted layer statistics treat every query alike (statistics of the per-query means);
  "clip"-weighted statistics pool every gate value (a long video weighs more). For per-query gating
  (global) both pool one value per query, so they only differ in how std/min/max are defined.
"""
import math

import numpy as np

from qd_detr.gates import DEFAULT_KINDS, gate_name

from .binning import count_sorted, search_points, sorted_nan_counts, sorted_percentiles
from .gate_arrays import PER_CLIP_GATING_TYPES, as_qid, check_gating_type, validate_gates
from .ranges import resolve_ranges, thresholds
from .stats_tables import QUERY_STAT_NAMES, VIDEO_TOLERANCE, StatsTables

__all__ = ["GateStatsAccumulator", "QUERY_STAT_NAMES", "accumulate_gate_run"]

_PCTS = (0.0, 5.0, 25.0, 50.0, 75.0, 95.0, 100.0)  # min, p5, p25, median, p75, p95, max in one call


class GateStatsAccumulator(StatsTables):
    """Streamed gate statistics (see the module docstring).

    Args:
        gating_type: "global" | "clipwise" | "elementwise" (also "legacy": one gate per query).
        layers: list of layer indices, or an int n for ``range(n)``.
        kinds: gate kinds per layer (default ("mha", "ffn"); v2 FiLM adds "beta").
        gate_ranges: {gate name or (layer, kind): GateRange or its dict}: each gate's declared range
            (``qd_detr.gates.fusion_gate_ranges``, ``GateRun.gate_ranges``); gates not named are tanh [-1, 1].
            Histogram bins and thresholds follow it.
        bins, value_range: ``bins`` fixed histogram bins over each gate's declared range, or over
            ``value_range`` when given: ``(lo, hi)`` for every gate or ``{kind: (lo, hi)}`` per kind.
        pos_threshold, neg_threshold, near_zero_threshold, saturation_threshold: thresholds as fractions
            of each gate's range magnitude m around its reference r (``g > r + pos*m``, ``g < r + neg*m``,
            ``|g - r| <= near_zero*m``, ``g > high - (1 - saturation)*m`` or ``g < low + (1 - saturation)*m``;
            for tanh gates exactly ``g > pos``, ``g < neg``, ``|g| <= near_zero``, ``|g| > saturation``).
        hidden_dim: feature dims D of elementwise gates (inferred from the first query when None).

    Attributes ``gate_ranges`` ({gate name: GateRange}), ``hist_ranges`` ({(layer, kind): (lo, hi)})
    and ``value_range`` ((lo, hi) when every gate shares one histogram range, else {kind: (lo, hi)},
    the union over layers) describe the bins; ``value_range_given`` says whether ``value_range`` was
    passed (plots then use it as axis limits instead of the declared ranges).
    """

    def __init__(self, gating_type, layers, kinds=DEFAULT_KINDS, bins=200, value_range=None,
                 pos_threshold=0.1, neg_threshold=-0.1, near_zero_threshold=0.1, saturation_threshold=0.95,
                 hidden_dim=None, gate_ranges=None):
        self.gating_type = check_gating_type(gating_type)
        self.layers = list(range(layers)) if isinstance(layers, (int, np.integer)) else [int(l) for l in layers]
        self.kinds = tuple(kinds)
        self.keys = [(l, k) for l in self.layers for k in self.kinds]  # row order of every (G, ...) array
        self.bins = int(bins)
        if self.bins < 1:
            raise ValueError(f"need bins >= 1, got {bins}")
        self._ranges = resolve_ranges(gate_ranges, self.layers, self.kinds)  # (layer, kind) -> GateRange
        self.gate_ranges = {gate_name(*key): rng for key, rng in self._ranges.items()}
        self.value_range_given = value_range is not None
        if value_range is None:
            per_key = {key: (rng.low, rng.high) for key, rng in self._ranges.items()}
        else:
            per_kind = value_range if isinstance(value_range, dict) else {k: value_range for k in self.kinds}
            if set(per_kind) != set(self.kinds):
                raise ValueError(f"value_range dict must have one (lo, hi) per kind {list(self.kinds)}, "
                                 f"got {value_range}")
            per_key = {(l, k): per_kind[k] for l, k in self.keys}
        self.hist_ranges = {}
        for key, (lo, hi) in per_key.items():
            lo, hi = float(lo), float(hi)  # python floats, as np.histogram
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"value_range for {gate_name(*key)} must be finite with lo < hi, got {(lo, hi)}")
            self.hist_ranges[key] = (lo, hi)
        self.value_ranges = {k: (min(lo for (_, kk), (lo, _) in self.hist_ranges.items() if kk == k),
                                 max(hi for (_, kk), (_, hi) in self.hist_ranges.items() if kk == k))
                             for k in self.kinds} if self.layers else {}
        distinct = set(self.hist_ranges.values())
        #: (lo, hi) when every gate has the same range, else {kind: (lo, hi)}; plots accept both
        self.value_range = next(iter(distinct)) if len(distinct) == 1 else dict(self.value_ranges)
        self.pos_threshold = float(pos_threshold)
        self.neg_threshold = float(neg_threshold)
        self.near_zero_threshold = float(near_zero_threshold)
        self.saturation_threshold = float(saturation_threshold)
        self._magnitudes = np.array([max(self._ranges[k].magnitude, 1e-12) for k in self.keys])
        self.thresholds = {key: thresholds(rng, self.pos_threshold, self.neg_threshold, self.near_zero_threshold,
                                           self.saturation_threshold) for key, rng in self._ranges.items()}
        # fractions a gate cannot have (a sigmoid gate is never negative) are NaN, not 0
        self._frac_mask = np.array([[1.0 if t.has_positive else np.nan, 1.0 if t.has_negative else np.nan, 1.0, 1.0]
                                    for t in (self.thresholds[k] for k in self.keys)]).reshape(len(self.keys), 4)
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self._points = None
        g = len(self.keys)
        # exact histograms: columns 0..bins-1 bins, bins underflow, bins+1 overflow, bins+2 nan
        self._hist = np.zeros((g, self.bins + 3), dtype=np.int64)
        # clip-weighted (all values) running sums
        self._n = np.zeros(g, dtype=np.int64)
        self._sum = np.zeros(g)
        self._sumsq = np.zeros(g)
        self._min = np.full(g, np.inf)
        self._max = np.full(g, -np.inf)
        self._frac_counts = np.zeros((g, 4), dtype=np.int64)  # positive, negative, near zero, saturated
        # query-weighted running sums of per-query means and fractions
        self._nq = 0
        self._qsum = np.zeros(g)
        self._qsumsq = np.zeros(g)
        self._qmin = np.full(g, np.inf)
        self._qmax = np.full(g, -np.inf)
        self._qfrac_sum = np.zeros((g, 4))
        # per clip position (grows to the longest T seen, never with the number of queries)
        self._pos_nq = np.zeros(0, dtype=np.int64)
        self._pos_nv = np.zeros(0, dtype=np.int64)
        self._pos_sum = np.zeros((g, 0))
        self._pos_sumsq = np.zeros((g, 0))
        self._pos_min = np.zeros((g, 0))
        self._pos_max = np.zeros((g, 0))
        # per feature dim (elementwise)
        self._dim_n = 0
        self._dim_sum = self._dim_sumsq = self._dim_min = self._dim_max = None
        # per-query summary table: (capacity, G, len(QUERY_STAT_NAMES)) float64
        self._rows = np.zeros((0, g, len(QUERY_STAT_NAMES)))
        self._row_qids = np.zeros(0, dtype=np.int64)
        self._row_nclips = np.zeros(0, dtype=np.int64)
        self._row_vids = []
        self._n_rows = 0
        # videos: the row of each video's first query; repeats (same gates as that row) add no aggregate
        self._video_row = {}
        self._row_repeat = []          # per row: True when it repeats its video's first query
        self._video_max_diff = 0.0     # largest summary difference between queries of one video
        self._videos_differing = set()

    # -- accumulation ----------------------------------------------------------------------------
    @property
    def n_queries(self):
        return self._n_rows

    def _config(self):
        return (self.gating_type, tuple(self.layers), self.kinds, self.bins, tuple(self.hist_ranges.items()),
                tuple(self._ranges.items()), self.pos_threshold, self.neg_threshold, self.near_zero_threshold,
                self.saturation_threshold)

    def _grow_rows(self, need):
        cap = self._rows.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap, 64)
        rows = np.zeros((new,) + self._rows.shape[1:])
        rows[:self._n_rows] = self._rows[:self._n_rows]
        self._rows = rows
        self._row_qids = np.concatenate([self._row_qids[:self._n_rows], np.zeros(new - self._n_rows, np.int64)])
        self._row_nclips = np.concatenate([self._row_nclips[:self._n_rows],
                                           np.zeros(new - self._n_rows, np.int64)])

    def _grow_positions(self, t):
        cur = self._pos_nq.size
        if t <= cur:
            return
        extra, g = t - cur, len(self.keys)
        self._pos_nq = np.concatenate([self._pos_nq, np.zeros(extra, np.int64)])
        self._pos_nv = np.concatenate([self._pos_nv, np.zeros(extra, np.int64)])
        for name, fill in (("_pos_sum", 0.0), ("_pos_sumsq", 0.0), ("_pos_min", np.inf), ("_pos_max", -np.inf)):
            setattr(self, name, np.concatenate([getattr(self, name), np.full((g, extra), fill)], axis=1))

    def _init_dims(self, d):
        g = len(self.keys)
        self.hidden_dim = d
        self._dim_sum = np.zeros((g, d))
        self._dim_sumsq = np.zeros((g, d))
        self._dim_min = np.full((g, d), np.inf)
        self._dim_max = np.full((g, d), -np.inf)

    def _search_points(self):
        """Per gate row g: the float32 points (``binning.search_points``) searched in its sorted row."""
        if self._points is None:
            cache = {}
            self._points = []
            for key in self.keys:
                t, (lo, hi) = self.thresholds[key], self.hist_ranges[key]
                pos = t.positive if t.has_positive else np.inf    # counts nothing when the gate cannot reach it
                neg = t.negative if t.has_negative else -np.inf
                spec = (lo, hi, pos, neg, t.near_low, t.near_high, t.sat_low, t.sat_high)
                if spec not in cache:
                    cache[spec] = search_points(lo, hi, self.bins, pos, neg, t.near_low, t.near_high, t.sat_low,
                                                t.sat_high)
                self._points.append(cache[spec])
        return self._points

    def update(self, qid, gates, vid=None, n_clips=None):
        """Add one query. ``gates``: {(layer, kind): array} with global (1,), clipwise (T,) or
        elementwise (T, D) float32 arrays, padding excluded. ``n_clips`` is only needed for per-query
        gating (the gates do not reveal T).

        Vectorised over layers x kinds: the G = layers*kinds arrays are stacked to [G, n], sorted once
        per row (percentiles, min/max, fractions and exact histogram counts are then read off the
        sorted rows with ``np.searchsorted``), and sums are numpy reductions. NaN values propagate
        into mean/std/percentiles of their query and are counted in the histogram's "nan" row."""
        qid = as_qid(qid)
        checked, t, self.hidden_dim = validate_gates(gates, self.gating_type, self.layers, self.kinds,
                                                      self.hidden_dim, f"qid {qid}")
        if t is None:
            t = -1 if n_clips is None else int(n_clips)
        g = len(self.keys)
        x = np.stack([checked[k] for k in self.keys]).reshape(g, -1)  # [G, n] float32, n = 1 | T | T*D
        n = x.shape[1]
        row = np.full((g, len(QUERY_STAT_NAMES)), np.nan)
        row[:, 0] = n
        vid = "" if vid is None else str(vid)
        repeat = False
        if n:
            with np.errstate(invalid="ignore", over="ignore"):
                parts = self._summarise(x, row)
                repeat = self._is_repeat(vid, row)
                if not repeat:
                    self._aggregate(x, t, row, parts)
        if vid and vid not in self._video_row:
            self._video_row[vid] = self._n_rows
        self._row_repeat.append(repeat)
        self._grow_rows(self._n_rows + 1)
        self._rows[self._n_rows] = row
        self._row_qids[self._n_rows] = int(qid)
        self._row_nclips[self._n_rows] = t
        self._row_vids.append(vid)
        self._n_rows += 1
        return self

    def _is_repeat(self, vid, row):
        """True when ``row`` (a query's [G, stats] summary) equals that of its video's first query within
        ``VIDEO_TOLERANCE`` x each gate's range magnitude (the layouts compute gates from video and audio
        only; batching changes them by float rounding, about 1e-7). Records the differences."""
        first = self._video_row.get(vid) if vid else None
        if first is None:
            return False
        ref = self._rows[first]
        if ref[0, 0] != row[0, 0]:
            self._videos_differing.add(vid)
            return False
        diff = float(np.nanmax(np.abs(row[:, 1:10] - ref[:, 1:10]) / self._magnitudes[:, None], initial=0.0))
        self._video_max_diff = max(self._video_max_diff, diff)
        if diff > VIDEO_TOLERANCE:
            self._videos_differing.add(vid)
            return False
        return True

    def _summarise(self, x, row):
        """Fill ``row`` ([G, stats]) from ``x`` ([G, n] float32); returns the sums and counts ``_aggregate`` adds."""
        g, n = x.shape
        # float64 accumulation straight from float32 (no full-size float64 temporaries)
        f64 = np.float64
        s = x.sum(axis=1, dtype=f64)
        ss = np.einsum("gn,gn->g", x, x, dtype=f64)
        mean = s / n
        row[:, 1] = mean
        # population std (ddof=0) from float64 sums; exact products of float32 values, so the
        # cancellation error (~1e-16 absolute in the variance) is far below float32 resolution
        row[:, 2] = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
        # order statistics: sort each float32 row once (NaN last); interpolate in float64
        xs = np.sort(x, axis=1)
        n_nan = sorted_nan_counts(xs)
        pct = sorted_percentiles(xs, _PCTS, n_nan)
        row[:, 3:10] = pct
        # exact histogram counts and threshold fractions from the sorted rows
        hist, counts = count_sorted(xs, self._search_points(), self.bins, n_nan)
        row[:, 10:14] = counts / n * self._frac_mask
        return s, ss, hist, counts

    def _aggregate(self, x, t, row, parts):
        """Add one query's values (``x`` [G, n], ``t`` clips) and summaries to the layer, histogram, clip-position
        and dim aggregates."""
        s, ss, hist, counts = parts
        g, n = x.shape
        f64 = np.float64
        self._n += n
        self._sum += s
        self._sumsq += ss
        if self.gating_type in PER_CLIP_GATING_TYPES:
            d = n // t
            x3 = x.reshape(g, t, d)  # [G, T, D] (D = 1 clipwise)
            self._grow_positions(t)
            self._pos_nq[:t] += 1
            self._pos_nv[:t] += d
            self._pos_sum[:, :t] += x3.sum(axis=2, dtype=f64)
            self._pos_sumsq[:, :t] += np.einsum("gtd,gtd->gt", x3, x3, dtype=f64)
            self._pos_min[:, :t] = np.minimum(self._pos_min[:, :t], x3.min(axis=2))
            self._pos_max[:, :t] = np.maximum(self._pos_max[:, :t], x3.max(axis=2))
            if self.gating_type == "elementwise":
                if self._dim_sum is None:
                    self._init_dims(d)
                self._dim_n += t
                self._dim_sum += x3.sum(axis=1, dtype=f64)
                self._dim_sumsq += np.einsum("gtd,gtd->gd", x3, x3, dtype=f64)
                self._dim_min = np.minimum(self._dim_min, x3.min(axis=1))
                self._dim_max = np.maximum(self._dim_max, x3.max(axis=1))
        self._hist += hist
        self._min = np.minimum(self._min, row[:, 3])
        self._max = np.maximum(self._max, row[:, 9])
        self._frac_counts += counts
        # video-weighted sums of the per-video means (a repeated video is not added again)
        mean, fracs = row[:, 1], row[:, 10:14]
        self._nq += 1
        self._qsum += mean
        self._qsumsq += mean * mean
        self._qmin = np.minimum(self._qmin, mean)
        self._qmax = np.maximum(self._qmax, mean)
        self._qfrac_sum += fracs

    def merge(self, other):
        """Add everything ``other`` accumulated into ``self`` (exact for counts and histograms; sums are
        float64 additions). Query rows are concatenated (self's first). Returns ``self``."""
        if not isinstance(other, GateStatsAccumulator):
            raise TypeError(f"can only merge a GateStatsAccumulator, got {type(other).__name__}")
        if self._config() != other._config():
            raise ValueError(f"cannot merge accumulators with different settings: {self._config()} vs "
                             f"{other._config()}")
        if self.hidden_dim is not None and other.hidden_dim is not None and self.hidden_dim != other.hidden_dim:
            raise ValueError(f"cannot merge elementwise accumulators with hidden_dim {self.hidden_dim} and "
                             f"{other.hidden_dim}")
        for name in ("_hist", "_n", "_sum", "_sumsq", "_frac_counts", "_nq", "_qsum", "_qsumsq", "_qfrac_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name, pick in (("_min", np.minimum), ("_max", np.maximum), ("_qmin", np.minimum), ("_qmax", np.maximum)):
            setattr(self, name, pick(getattr(self, name), getattr(other, name)))
        t = other._pos_nq.size
        self._grow_positions(t)
        for name in ("_pos_nq", "_pos_nv", "_pos_sum", "_pos_sumsq"):
            getattr(self, name)[..., :t] += getattr(other, name)
        self._pos_min[:, :t] = np.minimum(self._pos_min[:, :t], other._pos_min)
        self._pos_max[:, :t] = np.maximum(self._pos_max[:, :t], other._pos_max)
        if other._dim_sum is not None:
            if self._dim_sum is None:
                self._init_dims(other.hidden_dim)
            for name in ("_dim_n", "_dim_sum", "_dim_sumsq"):
                setattr(self, name, getattr(self, name) + getattr(other, name))
            self._dim_min = np.minimum(self._dim_min, other._dim_min)
            self._dim_max = np.maximum(self._dim_max, other._dim_max)
        k = other._n_rows
        for vid, r in other._video_row.items():  # a video in both is aggregated once per accumulator
            self._video_row.setdefault(vid, r + self._n_rows)
        self._row_repeat.extend(other._row_repeat)
        self._video_max_diff = max(self._video_max_diff, other._video_max_diff)
        self._videos_differing |= other._videos_differing
        self._grow_rows(self._n_rows + k)
        self._rows[self._n_rows:self._n_rows + k] = other._rows[:k]
        self._row_qids[self._n_rows:self._n_rows + k] = other._row_qids[:k]
        self._row_nclips[self._n_rows:self._n_rows + k] = other._row_nclips[:k]
        self._row_vids.extend(other._row_vids)
        self._n_rows += k
        return self

    @classmethod
    def from_gate_run(cls, run, qids=None, **kwargs):
        """Accumulate every query of a ``GateRun`` (settings and declared gate ranges from the run;
        ``kwargs`` override bins, value_range, thresholds and gate_ranges)."""
        kwargs.setdefault("gate_ranges", getattr(run, "gate_ranges", None))
        acc = cls(run.gating_type, run.layers, kinds=run.kinds, hidden_dim=run.hidden_dim, **kwargs)
        for qid, vid, gates in run.iter_queries(qids):
            acc.update(qid, gates, vid=vid, n_clips=run.n_clips.get(qid, -1))
        return acc

    def state_nbytes(self):
        """Bytes held: {"aggregates": histograms and sums (independent of the number of queries),
        "per_query": the per-query summary table (grows by G * 14 float64 per query, never with T or D)}."""
        per_query = {"_rows", "_row_qids", "_row_nclips"}
        agg = sum(v.nbytes for k, v in vars(self).items() if isinstance(v, np.ndarray) and k not in per_query)
        return {"aggregates": int(agg),
                "per_query": int(sum(getattr(self, k).nbytes for k in per_query))}


def accumulate_gate_run(run, qids=None, **kwargs):
    """Shortcut for ``GateStatsAccumulator.from_gate_run``."""
    return GateStatsAccumulator.from_gate_run(run, qids=qids, **kwargs)
