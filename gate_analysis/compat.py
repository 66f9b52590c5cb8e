"""The compatibility check behind ``test_legacy_model.py``: can a checkpoint's gates be analysed unchanged?

``check_compatibility`` runs every stage on a checkpoint (read, strict load, the equivalence proof,
optionally one real batch and the re-run of the original run's predictions) and returns a
JSON-able report with the stage it reached; ``format_report`` renders it as text lines.
Exit codes (``exit_code_for``): 0 compatible, 1 incompatible, 2 unreadable or bad input.
"""
import os
import shlex
import time

import torch

from qd_detr.annotations import read_jsonl
from qd_detr.batching import collate, model_kwargs, move_to_device
from qd_detr.checkpoint import inspect_checkpoint
from qd_detr.config import FUSION_VARIANTS
from qd_detr.dataset import build_dataset
from qd_detr.errors import ToolkitError
from qd_detr.features import resolve_feature_dirs
from qd_detr.gates import fusion_gate_kinds
from qd_detr.keys import LAYOUT_DESCRIPTIONS, IncompatibleModelError
from qd_detr.model import NoFusionError

from .equivalence import EquivalenceError, compare_outputs, flatten_outputs, prove_checkpoint
from .legacy import load_inspected, no_fusion_error
from .reproduction import check_reproduction, format_reproduction

__all__ = ["check_compatibility", "format_report", "exit_code_for", "real_batch", "ARCH_REPORTED", "jsonable",
           "format_diff"]


def exit_code_for(exc):
    """Exit code of the legacy tools: 1 for an incompatible model, 2 for unreadable or bad input."""
    return 1 if isinstance(exc, (IncompatibleModelError, NoFusionError)) else 2


# the saved options shown in the report
ARCH_REPORTED = ("hidden_dim", "enc_layers", "dec_layers", "nheads", "dim_feedforward", "num_queries",
                 "v_feat_dim", "t_feat_dim", "a_feat_dim", "use_avigate_custom", "use_avigate", "gating_type",
                 "fusion_layers", "fusion_n_heads", "eval_path", "v_feat_dirs", "t_feat_dir", "a_feat_dir")


def jsonable(value):
    """``value`` as JSON can hold it: numbers, strings, None and lists as they are, anything else as str."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def real_batch(model, opt, model_path, data, batch_size):
    """One real batch through the tracked model; outputs compared with tracking off."""
    records = read_jsonl(data["data_path"])
    dirs = resolve_feature_dirs(opt, model_path, data.get("v_feat_dirs"), data.get("t_feat_dir"),
                                data.get("a_feat_dir"))
    dataset = build_dataset(opt, records[:batch_size], dirs)
    metas, inputs = collate([dataset[i] for i in range(len(dataset))])
    inputs = move_to_device(model_kwargs(inputs), next(model.parameters()).device)
    qids = [m["qid"] for m in metas]
    fusion = model.fusion
    with torch.no_grad():
        fusion.disable_gate_tracking()
        plain = model(**inputs)
        fusion.enable_gate_tracking()
        fusion.clear_gate_history()
        fusion.set_current_sample_id(qids)
        tracked = model(**inputs)
    history = dict(fusion.gate_history)
    fusion.clear_gate_history()
    cmp = compare_outputs(plain, tracked, None, None)
    gates = {}
    for qid in qids:
        rec = history[qid]
        gates[str(qid)] = {f"layers.{l}.gate_{k}": {"shape": list(g.shape), "mean": round(float(g.mean()), 6),
                                                   "min": round(float(g.min()), 6), "max": round(float(g.max()), 6)}
                           for l in range(len(fusion.fusion_layers)) for k in fusion_gate_kinds(fusion)
                           for g in [rec.gates[(l, k)]]}
    finite = all(bool(torch.isfinite(t).all()) for t in flatten_outputs(tracked).values())
    return {"data_path": os.path.abspath(data["data_path"]), "feature_dirs": dirs, "qids": qids,
            "video_clips": [int(n) for n in inputs["src_vid_mask"].sum(1).tolist()],
            "text_tokens": [int(n) for n in inputs["src_txt_mask"].sum(1).tolist()],
            "output_shapes": {k: list(v.shape) for k, v in flatten_outputs(tracked).items() if "aux_outputs" not in k},
            "outputs_finite": finite, "max_abs_diff_tracking_on_vs_off": cmp["max_abs_diff"],
            "passed": cmp["passed"] and finite, "gates": gates}


def check_compatibility(model_path, gating_type=None, trust_pickle=False, device="auto", data=None, batch_size=4,
                        options=None, reproduction=None):
    """Run every check on a checkpoint; returns ``(report, exit_code)`` (0 compatible, 1 incompatible,
    2 unreadable or bad input). ``data``: optional dict with ``data_path`` and feature folder overrides;
    ``options``: what a bare state dict cannot tell (``{"nheads": 8, "fusion_n_heads": 8}``);
    ``reproduction``: ``{"original_predictions": FILE or None}`` to re-run the original run's predictions
    (``gate_analysis.reproduction``; DIFFERS is incompatible)."""
    report = {"model_path": os.path.abspath(os.fspath(model_path)), "compatible": False, "status": None,
              "reason": None, "stage": "read"}

    def fail(exc, stage):
        code = exit_code_for(exc)
        report.update(status="incompatible" if code == 1 else "unreadable or bad input", reason=str(exc),
                      stage=stage)
        return report, code

    try:
        contents = inspect_checkpoint(model_path, trust_pickle=trust_pickle)
    except ToolkitError as exc:
        return fail(exc, "read")
    report["checkpoint"] = contents.summary()
    report["options"] = ({k: jsonable(getattr(contents.opt, k, None)) for k in ARCH_REPORTED}
                         if contents.opt is not None else None)
    report["keys"] = contents.keys.as_dict()
    report["layout"] = contents.keys.layout
    try:
        report["stage"] = "load"
        t0 = time.time()
        model, opt, load_report = load_inspected(contents, gating_type, device, options)
        report.update(layout=load_report["layout"], layout_description=LAYOUT_DESCRIPTIONS.get(load_report["layout"]),
                      fusion_variant=load_report.get("fusion_variant"),
                      fusion_variant_source=load_report.get("fusion_variant_source"),
                      gate_options=load_report.get("gate_options"), gate_ranges=load_report.get("gate_ranges"),
                      gating_type=load_report["gating_type"], gating_type_source=load_report["gating_type_source"],
                      fusion_layers=load_report["fusion_layers"], fusion_n_heads=load_report["fusion_n_heads"],
                      key_match=load_report["keys"], n_parameters=load_report["n_parameters"],
                      device=load_report["device"])
        if model.fusion is None:
            raise no_fusion_error(contents.path, model.layout)
        report["stage"] = "prove"
        adapter = prove_checkpoint(contents, model, opt, load_report, t0)
        report.update(weights=adapter["weights"], equivalence=adapter["equivalence"], gates=adapter["gates"],
                      summary=adapter["summary"])
        model.fusion.enable_gate_tracking()
        if data and data.get("data_path"):
            report["stage"] = "data"
            report["real_batch"] = real_batch(model, opt, model_path, data, batch_size)
            if not report["real_batch"]["passed"]:
                raise EquivalenceError("the real batch's outputs differ with gate tracking on, or are not finite")
        if reproduction is not None:  # proof against the original run's own predictions
            report["stage"] = "reproduce"
            report["reproduction"] = check_reproduction(model, opt, model_path, data, **reproduction)
            if report["reproduction"]["status"] == "differs":
                raise EquivalenceError(report["reproduction"]["message"])
    except ToolkitError as exc:
        return fail(exc, report["stage"])
    report.update(compatible=True, status="compatible", stage="done")
    return report, 0


def format_diff(value):
    """A difference for the text report (3 significant digits; "inf"/"nan" as given)."""
    return value if isinstance(value, str) else f"{value:.3g}"


def format_report(report):
    """The human-readable compatibility report (lines)."""
    lines = [f"Compatibility report for {report['model_path']}"]
    ck = report.get("checkpoint")
    if ck:
        lines.append(f"  format       {ck['format']} ({ck['size_bytes'] / 1e6:.1f} MB), entries "
                     f"{', '.join(ck['entries'] or []) or '-'}, epoch {ck['epoch']}")
        lines.append(f"  options      {ck['options_source'] or 'none stored (bare weights)'}")
        lines.append(f"  layout       {report.get('layout')}: {LAYOUT_DESCRIPTIONS.get(report.get('layout'), '')}")
        keys = report["keys"]
        groups = ", ".join(f"{g} {n}" for g, n in keys["groups"].items())
        lines.append(f"  keys         {ck['n_tensors']} tensors; {groups}; unmatched {len(keys['unmatched'])}; "
                     f"renames {ck['key_renames'] or 'none'}")
    if "key_match" in report:
        km = report["key_match"]
        lines.append(f"  strict load  {km['matched']} matched, {km['missing']} missing, {km['unexpected']} unexpected, "
                     f"{km['mis_shaped']} mis-shaped; {report['n_parameters']:,} parameters")
    if report.get("gating_type"):
        lines.append(f"  gating       {report['gating_type']} (from {report['gating_type_source']}); "
                     f"{report['fusion_layers']} fusion layers, {report['fusion_n_heads']} heads")
    if report.get("fusion_variant"):
        opts = "; ".join(f"{k} {v['value']} ({v['source']})" for k, v in (report.get("gate_options") or {}).items())
        lines.append(f"  variant      {report['fusion_variant']}: {FUSION_VARIANTS[report['fusion_variant']]}; "
                     f"told by {report['fusion_variant_source']}" + (f"; not in the weights: {opts}" if opts else ""))
    for name, rng in (report.get("gate_ranges") or {}).items():
        if name.startswith("layers.0."):
            lines.append(f"  range        {name}: {rng['formula']}; {rng['meaning']}")
    if "weights" in report:
        w = report["weights"]
        lines.append(f"  weights      {w['identical']}/{w['compared']} tensors identical to the checkpoint "
                     "(torch.equal)")
    if "equivalence" in report:
        eq = report["equivalence"]
        p = eq["probe"]
        modes = ", ".join(f"{m} {format_diff(r['max_abs_diff'])}" for m, r in eq["modes"].items())
        lines.append(f"  probe        {p['batch_size']} samples, clips {p['video_clips']}, text {p['text_tokens']}: "
                     f"max abs diff tracked vs untracked: {modes} (tolerance {eq['tolerance']:g})")
    if "gates" in report:
        for g in report["gates"]["layers"]:
            lines.append(f"  gates        layer {g['layer']} {g['kind']}: module output {g['module_output_shape']}, "
                         f"recorded {g['recorded_shapes']}")
    rb = report.get("real_batch")
    if rb:
        lines.append(f"  real batch   qids {rb['qids']}, clips {rb['video_clips']}: outputs finite "
                     f"{rb['outputs_finite']}, max abs diff tracking on vs off "
                     f"{format_diff(rb['max_abs_diff_tracking_on_vs_off'])}")
        first = rb["gates"][str(rb["qids"][0])]
        lines.append("  real gates   qid " + str(rb["qids"][0]) + ": "
                     + "; ".join(f"{k} {v['shape']} mean {v['mean']:+.4f}" for k, v in first.items()))
    if report.get("reproduction"):
        lines += format_reproduction(report["reproduction"])
    if report["compatible"]:
        lines.append("COMPATIBLE: gates can be analysed, e.g. python run_gate_analysis.py --legacy_model "
                     f"--model_path {shlex.quote(report['model_path'])} --data_path ... --output_dir ...")
    elif report["status"] == "incompatible":
        lines.append(f"INCOMPATIBLE (at stage {report['stage']}): {report['reason']}")
    else:
        lines.append(f"NOT CHECKED ({report['status']}, at stage {report['stage']}): {report['reason']}")
    return lines
