#!/usr/bin/env python3
"""Batching noise per layout: how far a query's outputs in a batch lie from the same query run alone, under
``--batching query`` (the basis of ``qd_detr.postprocess.PROB_NOISE`` / ``SPAN_NOISE``, which decide the
exact re-runs of ``qd_detr.engine.iterate_batches``).

For each gating type of ``bench_scaling.py`` (random weights at the original default size, the synthetic
QVHighlights-layout data) and each shared fixture with a fusion module (trained weights, its 16 queries),
every query runs in batches of ``--batch_size`` and alone. Printed per layout: the largest difference of
the foreground probability and of the normalised span coordinates (batch vs alone), the share of queries
the current bounds send to an exact re-run, and the largest difference as a fraction of each bound.

    OMP_NUM_THREADS=1 python benchmarks/measure_batching_noise.py [--queries 512] [--fixtures ../shared/fixtures]
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_scaling  # noqa: E402
import common  # noqa: E402

from qd_detr.checkpoint import load_checkpoint  # noqa: E402
from qd_detr.dataset import collate, model_kwargs, read_jsonl  # noqa: E402
from qd_detr.engine import forward  # noqa: E402
from qd_detr.inference import build_dataset, make_batches  # noqa: E402
from qd_detr.postprocess import PROB_NOISE, SPAN_NOISE, ambiguous_rows  # noqa: E402


def noise(ckpt, data_path, dirs, batch_size):
    """(queries, max |d prob|, max |d span|, queries flagged by ambiguous_rows) of one checkpoint."""
    model, opt, _ = load_checkpoint(ckpt, device="cpu", batching="query")
    dataset = build_dataset(opt, read_jsonl(data_path), dirs)
    d_prob = d_span = 0.0
    flagged = 0
    for idx in make_batches(dataset, "query", batch_size, opt):
        metas, inputs = collate([dataset[i] for i in idx])
        out = forward(model, model_kwargs(inputs))
        flagged += len(ambiguous_rows(metas, out))
        prob = torch.softmax(out["pred_logits"].float(), -1)[..., 0]
        for j, i in enumerate(idx):
            alone = forward(model, model_kwargs(collate([dataset[i]])[1]))
            p = torch.softmax(alone["pred_logits"].float(), -1)[0, :, 0]
            d_prob = max(d_prob, float((prob[j] - p).abs().max()))
            d_span = max(d_span, float((out["pred_spans"][j] - alone["pred_spans"][0]).abs().max()))
    return len(dataset), d_prob, d_span, flagged


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=512, help="queries per benchmark layout (default 512)")
    ap.add_argument("--gating_types", nargs="+", choices=bench_scaling.GATING_TYPES, default=bench_scaling.GATING_TYPES)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--fixtures", default=os.path.join(common.ROOT, "..", "shared", "fixtures"),
                    help="folder of the shared fixtures (skipped when absent)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = common.BenchData(os.path.join(tmp, "data"), common.videos_for(args.queries))
        data_path = data.jsonl(args.queries)
        for gt in args.gating_types:
            rows.append((f"{gt} (random weights)",) + noise(bench_scaling.checkpoint(data, gt), data_path, data.dirs,
                                                              args.batch_size))
            common.log(f"{rows[-1][0]}: done")
    fx = args.fixtures
    if os.path.isdir(fx):
        d = os.path.join(fx, "data")
        dirs = common.fixture_dirs(d)
        for name in common.fusion_fixtures(fx):
            rows.append((f"{name} (fixture)",) + noise(os.path.join(fx, name, "model.ckpt"),
                                                       os.path.join(d, "highlight_val_release.jsonl"), dirs,
                                                       args.batch_size))
    print(f"bounds: PROB_NOISE {PROB_NOISE:.1e}, SPAN_NOISE {SPAN_NOISE:.1e}; batch {args.batch_size} vs alone")
    common.print_table(("layout", "queries", "max d prob", "of bound", "max d span", "of bound", "re-run"),
                       [(name, n, f"{dp:.2e}", f"{dp / PROB_NOISE:.2f}", f"{ds:.2e}", f"{ds / SPAN_NOISE:.2f}",
                         f"{flagged / n:.1%}") for name, n, dp, ds, flagged in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
