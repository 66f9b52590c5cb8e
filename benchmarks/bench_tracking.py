#!/usr/bin/env python3
"""Benchmark: what gate tracking costs in memory, per gating type (CPU), against plain forwards and the
predecessor's tracking.

    python benchmarks/bench_tracking.py                 # 1,550 queries, 3 gating types
    python benchmarks/bench_tracking.py --quick         # smoke run: 256 queries, 1 repetition
    python benchmarks/bench_tracking.py --gating_types elementwise --repeats 5 --threads 1

Per gating type (``--gating_types``): the same random-weight model at the original default size and the
same pre-collated batches (length-grouped as the pipeline batches them; data from ``common.BenchData``),
``torch.no_grad``, ``compute_neg=False``. Modes, interleaved batch by batch (every batch runs once in each
mode, the order rotated from batch to batch): ``plain`` forward; ``tracking``: forward with
``qd_detr.gates.GateRecorder`` attached (per-query records built, padding trimmed; the sink only counts
them); ``tracking+stats``: the recorder feeding ``gate_analysis.stats.GateStatsAccumulator``;
``predecessor``: ``common.PredecessorTracker`` (SPEC 4.1: whole (B, L, D) gates to numpy, global gates
broadcast to (B, L, 256) copies, every forward's arrays kept, a Python loop over the positions of batch
element 0). Reported: per mode the median over repetitions of the time of a whole pass, and the median
of the per-batch paired ratios (robust when other processes share the CPU).

Target (elementwise gating, batch 32): tracking / plain <= 1.05; a miss is profiled (cProfile) unless
``--no_profile``.
"""
import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from common import GATING_TYPES, TARGET_GATING, TARGETS, PredecessorTracker, fmt_bytes, load_note, log  # noqa: E402

MODES = ("plain", "tracking", "tracking+stats", "predecessor")


def add_arguments(p):
    p.add_argument("--gating_types", nargs="+", choices=GATING_TYPES, default=list(GATING_TYPES),
                   help="gating types of the in-memory comparison (default: all three)")
    return p


# ------------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------------

class Mode:
    """One way of running a forward: ``begin`` starts a repetition's state, ``attach``/``detach`` its hooks,
    ``before(qids)`` names the next batch, ``info`` describes what it kept."""

    def __init__(self, fusion, gating_type):
        self.fusion, self.gating_type = fusion, gating_type

    def begin(self):
        pass

    def attach(self):
        pass

    def detach(self):
        pass

    def before(self, qids):
        pass

    def info(self):
        return {}


class Tracking(Mode):
    """``GateRecorder`` whose sink only counts the per-query records."""

    def begin(self):
        from qd_detr.gates import GateRecorder
        self.n = 0
        self.recorder = GateRecorder(self.fusion, self.sink)

    def sink(self, records):
        self.n += len(records)

    def attach(self):
        self.recorder.attach()

    def detach(self):
        self.recorder.detach()

    def before(self, qids):
        self.recorder.set_ids(qids)

    def info(self):
        return {"records": self.n}


class TrackingStats(Tracking):
    """``GateRecorder`` feeding ``GateStatsAccumulator``."""

    def begin(self):
        from gate_analysis.stats import GateStatsAccumulator
        from qd_detr.gates import fusion_gate_kinds
        super().begin()
        self.acc = GateStatsAccumulator(self.gating_type, len(self.fusion.fusion_layers),
                                        kinds=fusion_gate_kinds(self.fusion))

    def sink(self, records):
        for r in records:
            self.acc.update(r.sample_id, r.gates, n_clips=r.n_clips)

    def info(self):
        return {"records": self.acc.n_queries, "state_bytes": sum(self.acc.state_nbytes().values())}


class Predecessor(Mode):
    """``PredecessorTracker``, a fresh one per repetition."""

    def begin(self):
        self.tracker = None
        gc.collect()
        self.tracker = PredecessorTracker(self.fusion)

    def attach(self):
        self.tracker.attach()

    def detach(self):
        self.tracker.detach()

    def before(self, qids):
        self.tracker.current_sample_id = qids[0]

    def info(self):
        return {"kept_bytes": self.tracker.nbytes(), "details": len(self.tracker.query_gate_details)}


def make_modes(model, gating_type):
    f = model.fusion
    return {"plain": Mode(f, gating_type), "tracking": Tracking(f, gating_type),
            "tracking+stats": TrackingStats(f, gating_type), "predecessor": Predecessor(f, gating_type)}


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------

def preload_batches(opt, data_path, dirs, batch_size):
    """[(qids, model kwargs)] of the pipeline's batches, collated once."""
    from qd_detr.dataset import collate, model_kwargs, read_jsonl
    from qd_detr.inference import build_dataset, make_batches
    dataset = build_dataset(opt, read_jsonl(data_path), dirs)
    out = []
    for b in make_batches(dataset, "query", batch_size, opt):
        metas, inputs = collate([dataset[i] for i in b])
        out.append(([m["qid"] for m in metas], model_kwargs(inputs)))
    return out


def run_pass(model, mode, batches):
    """One pass of ``mode`` over ``batches`` without timing (for profiling)."""
    mode.begin()
    mode.attach()
    try:
        with torch.no_grad():
            for qids, inputs in batches:
                mode.before(qids)
                model(**inputs, compute_neg=False)
    finally:
        mode.detach()
    return mode.info()


def bench_inmemory(ckpt, batches, repeats):
    """{mode: {"times", "median", "paired_ratio", ...info}} of ``repeats`` interleaved passes."""
    from qd_detr.checkpoint import load_checkpoint
    model, opt, _ = load_checkpoint(ckpt, device="cpu", batching="query")
    modes = make_modes(model, opt.gating_type)
    names = list(modes)
    with torch.no_grad():
        for m in modes.values():  # warm-up: allocator, oneDNN primitives, first-call costs
            m.begin()
            m.attach()
            m.before(batches[0][0])
            model(**batches[0][1], compute_neg=False)
            m.detach()
    totals = {n: [] for n in names}
    paired = {n: [] for n in names}
    infos = {}
    for r in range(repeats):
        for m in modes.values():
            m.begin()
        t_rep = {n: 0.0 for n in names}
        for b, (qids, inputs) in enumerate(batches):
            k = (b + r) % len(names)
            t_batch = {}
            for name in names[k:] + names[:k]:
                m = modes[name]
                m.attach()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    m.before(qids)
                    model(**inputs, compute_neg=False)
                    t_batch[name] = time.perf_counter() - t0
                m.detach()
            for name, t in t_batch.items():
                t_rep[name] += t
                paired[name].append(t / t_batch["plain"])
        for name in names:
            totals[name].append(t_rep[name])
            infos[name] = modes[name].info()
        log(f"    rep {r + 1}/{repeats}: " + ", ".join(f"{n} {t_rep[n]:.1f} s" for n in names) + f"  {load_note()}")
        for m in modes.values():  # free the predecessor's arrays before the next repetition
            m.begin()
    return {n: {"times": totals[n], "median": statistics.median(totals[n]),
                "paired_ratio": statistics.median(paired[n]), **infos[n]} for n in names}


def run(args, data, scratch, results):
    """The in-memory comparison for every ``--gating_types``; fills ``results["inmemory"]``."""
    s = results["settings"]
    s["gating_types"] = args.gating_types
    log("== in memory: same model and batches, no_grad, compute_neg=False, modes interleaved per batch")
    data_path = data.jsonl(s["n_queries"])
    ckpts = {gt: data.checkpoint(gt) for gt in args.gating_types}
    log(f"  {data.describe()}")
    t0 = time.perf_counter()
    batches = preload_batches(common.bench_options(args.gating_types[0], data.dirs), data_path, data.dirs,
                              s["batch_size"])
    log(f"  collated {len(batches)} batches in {time.perf_counter() - t0:.1f} s  {load_note()}")
    results["inmemory"] = {}
    for gt in args.gating_types:
        log(f"  -- {gt}")
        reps = s["repeats"] if gt == TARGET_GATING else s["other_repeats"]
        results["inmemory"][gt] = bench_inmemory(ckpts[gt], batches, reps)
    r = results["inmemory"].get(TARGET_GATING)
    if r and not args.no_profile and min(r["tracking"]["median"] / r["plain"]["median"],
                                         r["tracking"]["paired_ratio"]) > TARGETS["tracking"]:
        from qd_detr.checkpoint import load_checkpoint
        model, _, _ = load_checkpoint(ckpts[TARGET_GATING], device="cpu")
        total, text = common.profile_call(lambda: run_pass(model, make_modes(model, TARGET_GATING)["tracking"],
                                                           batches))
        results["profile_tracking"] = text
        log(f"  tracking missed its target: cProfile of one pass ({total:.1f} s under the profiler)\n{text}")


def report(results):
    n = results["settings"]["n_queries"]
    log("")
    log("In memory: one pass over all batches (median s over repetitions), ratio to plain; "
        "'paired' = median over batches of the per-batch ratio")
    rows = []
    for gt, r in results["inmemory"].items():
        base = r["plain"]["median"]
        for mode in MODES:
            m = r[mode]
            note = ""
            if mode == "tracking":
                note = f"{m['records']} per-query records per pass (sink counts them)"
            elif mode == "tracking+stats":
                note = f"statistics state {fmt_bytes(m['state_bytes'])}"
            elif mode == "predecessor":
                note = f"keeps {fmt_bytes(m['kept_bytes'])} of gate arrays per pass, {m['details']:,} per-position dicts"
            rows.append([gt, mode, f"{m['median']:.2f}", f"{m['median'] / base:.3f}", f"{m['paired_ratio']:.3f}",
                         f"{m['median'] / n * 1e3:.1f}", len(m["times"]), note])
    common.print_table(["gating", "mode", "median s", "x plain", "paired", "ms/query", "reps", "notes"], rows)


def targets(results):
    """[(name, value, target)] of the tracking target (when the target gating type ran)."""
    r = results.get("inmemory", {}).get(TARGET_GATING)
    if not r:
        return []
    return [("tracking / plain (median pass)", r["tracking"]["median"] / r["plain"]["median"], TARGETS["tracking"]),
            ("tracking / plain (paired per batch)", r["tracking"]["paired_ratio"], TARGETS["tracking"])]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                parents=[common.base_arguments(), common.timing_arguments()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with common.bench_run(args, "bench_tracking_") as (data, scratch, results):
        run(args, data, scratch, results)
        report(results)
        log("")
        log(f"Target ({TARGET_GATING} gating):")
        results["targets"] = common.check_targets(targets(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
