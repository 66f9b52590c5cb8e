#!/usr/bin/env python3
"""How much each layout's gates and outputs depend on the other queries of a batch.

For every shared fixture with a fusion module, the 16 validation queries run once as one batch (as
the original inference does) and once one at a time, under both batching semantics; printed are the
largest differences (batch vs alone) of each gate kind, the logits and the saliency, over the valid
clips. ``query`` semantics should show only float rounding; ``original`` shows the research code's
own batch dependence (padded mean pooling, the SSM encoder's padding leak, the T2V mask bug).

Two extra rows use the v2 fixture's weights read as ``global`` v2 gating (global and clipwise v2
layers have identical weights), to measure the padded-pool dependence of global FiLM gating, which
has no fixture of its own.

    python benchmarks/measure_batch_dependence.py [--fixtures ../shared/fixtures]
"""
import argparse
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

from qd_detr.checkpoint import load_checkpoint, read_checkpoint, split_checkpoint, strict_load  # noqa: E402
from qd_detr.dataset import collate, model_kwargs, read_jsonl  # noqa: E402
from qd_detr.gates import GateRecorder  # noqa: E402
from qd_detr.inference import build_dataset  # noqa: E402
from qd_detr.model import build_model  # noqa: E402


def run(model, dataset, batches):
    """{qid: (outputs, gates)} for index batches; outputs trimmed to the valid clips."""
    found = {}
    gates = {}
    with GateRecorder(model.fusion, lambda recs: gates.update({r.sample_id: r.gates for r in recs})) as rec:
        for idx in batches:
            metas, inputs = collate([dataset[i] for i in idx])
            rec.set_ids([m["qid"] for m in metas])
            with torch.no_grad():
                out = model(**model_kwargs(inputs))
            for i, m in enumerate(metas):
                n = int(inputs["src_vid_mask"][i].sum())
                found[m["qid"]] = {"logits": out["pred_logits"][i].numpy(),
                                   "saliency": out["saliency_scores"][i, :n].numpy()}
    return {q: (o, gates[q]) for q, o in found.items()}


def compare(model, dataset, mode):
    model.set_batching(mode)
    together = run(model, dataset, [list(range(len(dataset)))])
    alone = run(model, dataset, [[i] for i in range(len(dataset))])
    worst = {}
    for qid, (out, gates) in alone.items():
        b_out, b_gates = together[qid]
        for key in ("logits", "saliency"):
            worst[key] = max(worst.get(key, 0.0), float(np.abs(b_out[key] - out[key]).max()))
        for (layer, kind), g in gates.items():
            name = f"L{layer} {kind}"
            worst[name] = max(worst.get(name, 0.0), float(np.abs(b_gates[(layer, kind)] - g).max()))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", default=os.path.join("..", "shared", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = os.path.join(args.fixtures, "data")
    dirs = common.fixture_dirs(data)
    records = read_jsonl(os.path.join(data, "highlight_val_release.jsonl"))
    cases = []
    for name in common.fusion_fixtures(args.fixtures):
        path = os.path.join(args.fixtures, name, "model.ckpt")
        model, opt, _ = load_checkpoint(path)
        cases.append((name, model, opt))
        if name == "ckpt_v2_clipwise_film":
            sd, saved_opt, _, _ = split_checkpoint(read_checkpoint(path), path)
            opt_global = copy.copy(opt)
            opt_global.gating_type = "global"
            other = build_model(opt_global)
            strict_load(other, sd, path)
            cases.append((name + " read as global v2 FiLM", other.eval(), opt_global))
    print(f"{'model':<44} {'batching':<9} " + "max |batched - alone| per output")
    for name, model, opt in cases:
        dataset = build_dataset(opt, records, dirs)
        for mode in ("query", "original"):
            worst = compare(model, dataset, mode)
            print(f"{name:<44} {mode:<9} " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
