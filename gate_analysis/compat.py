"""The compatibility check behind ``test_legacy_model.py``: can a checkpoint's gates be analysed unchanged?

``check_compatibility`` runs every part on a checkpoint and returns one JSON-able report with the
stage it reached; ``format_report`` renders that same dict as text lines and ``report_json`` as JSON,
so the two always say the same. The parts:

- checkpoint (stages ``read``, ``load``, ``prove``): the file, its saved options (each marked used or
  not used by the rebuilt model), key matches, the strict load and the equivalence proof;
- data (stage ``data``, with ``data_path``): one real batch through the model. A data problem (an
  unreadable JSONL, feature folders not found, a bad feature file) is recorded in ``report["data"]``
  and does not hide the checkpoint's report;
- reproduction (stage ``reproduce``): the re-run of the original run's predictions
  (``gate_analysis.reproduction``); a bad prediction file is recorded in ``report["reproduction"]``;
- ``next_command``: the ``run_gate_analysis.py --legacy_model`` command for this checkpoint, with the
  data and feature folders it needs (placeholders, with the paths tried, for those not found).

Exit codes (``report["exit_code"]``): 0 compatible, 1 incompatible (the model, a real batch whose
outputs change with tracking, or DIFFERS), 2 unreadable or bad input: the checkpoint or the options
(``problem`` "checkpoint"), or a compatible checkpoint with a data or prediction-file problem
(``problem`` "data" / "reproduction"; ``compatible`` stays true: the checkpoint itself is fine).
"""
import json
import os
import shlex
import time

import torch

from qd_detr.annotations import read_jsonl
from qd_detr.batching import collate
from qd_detr.checkpoint import inspect_checkpoint
from qd_detr.config import FUSION_VARIANTS
from qd_detr.dataset import build_dataset
from qd_detr.engine import run_batches
from qd_detr.errors import ConfigError, DataError, IncompatibleModelError, NoFusionError, ToolkitError
from qd_detr.features import resolve_feature_dirs
from qd_detr.gates import fusion_gate_kinds
from qd_detr.keys import LAYOUT_DESCRIPTIONS
from qd_detr.research_options import RESEARCH_OPTIONS

from .equivalence import compare_outputs, flatten_outputs, prove_checkpoint
from .legacy import load_inspected, no_fusion_error
from .reproduction import check_reproduction
from .reproduction_report import format_reproduction

__all__ = ["check_compatibility", "format_report", "report_json", "exit_code_for", "real_batch", "ARCH_REPORTED",
           "DATA_OPTIONS", "jsonable", "format_diff", "options_report", "locate_saved_path", "analysis_command",
           "display_command", "ANALYSIS_SCRIPT", "PLACEHOLDERS"]

ANALYSIS_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_gate_analysis.py")

# the saved options shown in the report
ARCH_REPORTED = ("hidden_dim", "enc_layers", "dec_layers", "nheads", "dim_feedforward", "num_queries",
                 "v_feat_dim", "t_feat_dim", "a_feat_dim", "use_avigate_custom", "use_avigate", "gating_type",
                 "fusion_layers", "fusion_n_heads", "eval_path", "v_feat_dirs", "t_feat_dir", "a_feat_dir")
#: saved options that name the data (defaults of the data part), not the architecture
DATA_OPTIONS = ("eval_path", "v_feat_dirs", "t_feat_dir", "a_feat_dir")
#: what stands in the next command for a path that was not found: flag -> placeholder
PLACEHOLDERS = {"--data_path": "DATA_JSONL", "--v_feat_dirs": "VIDEO_FEATURE_DIRS", "--t_feat_dir": "TEXT_FEATURE_DIR",
                "--a_feat_dir": "AUDIO_FEATURE_DIR"}


def exit_code_for(exc):
    """Exit code of the legacy tools: 1 for an incompatible model, 2 for unreadable or bad input."""
    return 1 if isinstance(exc, (IncompatibleModelError, NoFusionError)) else 2


def jsonable(value):
    """``value`` as JSON can hold it: numbers, strings, None and lists as they are, anything else as str."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def report_json(report):
    """The report as one line of JSON (what ``--json`` prints)."""
    return json.dumps(report, default=str)


def options_report(opt):
    """The saved options of ``ARCH_REPORTED`` that ``opt`` holds, each marked used or not by the model.

    Returns ``{name: {"value", "used", "why_not_used"}}`` (None without options). An architecture
    option is *not used* when the research code's ``build_model`` does not read it for this model
    (``qd_detr.research_options``: e.g. ``fusion_layers`` under the older one-layer ``AVIGATEFusion``).
    """
    if opt is None:
        return None
    saved = vars(opt)
    out = {}
    for name in ARCH_REPORTED:
        if name not in saved:
            continue
        value = jsonable(saved[name])
        option = RESEARCH_OPTIONS.get(name)
        condition = option.read_if if option is not None and option.kind == "arch" else None
        used = condition is None or condition(saved[name], saved)
        out[name] = {"value": value, "used": bool(used),
                     "why_not_used": None if used else f"read only with: {condition.text}"}
    return out


def locate_saved_path(path, model_path, folder=False):
    """Where a path saved in the checkpoint's options (relative to the training repo's root) is found:
    ``(path found or None, candidates tried)``, tried from the current folder, the checkpoint's folder
    and its two parents (results/<run>/ -> the repo root). ``folder``: look for a folder, else any file."""
    if not path:
        return None, []
    path = os.path.expanduser(os.fspath(path))
    ckpt_dir = os.path.dirname(os.path.abspath(model_path))
    bases = (ckpt_dir, os.path.dirname(ckpt_dir), os.path.dirname(os.path.dirname(ckpt_dir)))
    tried = [path] if os.path.isabs(path) else [path] + [os.path.normpath(os.path.join(b, path)) for b in bases]
    tried = list(dict.fromkeys(tried))
    exists = os.path.isdir if folder else os.path.exists
    return next((c for c in tried if exists(c)), None), tried


def display_command(script, arguments):
    """``python SCRIPT ARGS`` quoted with shlex; the script relative to the current folder when below it."""
    rel = os.path.relpath(script)
    return shlex.join(["python", rel if not rel.startswith("..") else script, *map(str, arguments)])


def real_batch(model, opt, model_path, data, batch_size):
    """One real batch through the tracked model; outputs compared with tracking off."""
    records = read_jsonl(data["data_path"])
    dirs = resolve_feature_dirs(opt, model_path, data.get("v_feat_dirs"), data.get("t_feat_dir"),
                                data.get("a_feat_dir"))
    dataset = build_dataset(opt, records[:batch_size], dirs)
    metas, inputs = collate([dataset[i] for i in range(len(dataset))])
    qids = [m["qid"] for m in metas]
    fusion = model.fusion
    history = {}

    def keep(records):
        history.update((rec.sample_id, rec) for rec in records)
    (_, plain), = run_batches(model, [(qids, inputs)])
    (_, tracked), = run_batches(model, [(qids, inputs)], sink=keep)
    cmp = compare_outputs(plain, tracked, None, None)
    gates = {}
    for qid in qids:
        rec = history[qid]
        gates[str(qid)] = {f"layers.{l}.gate_{k}": {"shape": list(g.shape), "mean": round(float(g.mean()), 6),
                                                   "min": round(float(g.min()), 6), "max": round(float(g.max()), 6)}
                           for l in range(len(fusion.fusion_layers)) for k in fusion_gate_kinds(fusion)
                           for g in [rec.gates[(l, k)]]}
    finite = all(bool(torch.isfinite(t).all()) for t in flatten_outputs(tracked).values())
    return {"data_path": os.path.abspath(data["data_path"]), "n_queries_in_file": len(records),
            "feature_dirs": dirs, "qids": qids,
            "video_clips": [int(n) for n in inputs["src_vid_mask"].sum(1).tolist()],
            "text_tokens": [int(n) for n in inputs["src_txt_mask"].sum(1).tolist()],
            "output_shapes": {k: list(v.shape) for k, v in flatten_outputs(tracked).items() if "aux_outputs" not in k},
            "outputs_finite": finite, "max_abs_diff_tracking_on_vs_off": cmp["max_abs_diff"],
            "passed": cmp["passed"] and finite, "gates": gates}


def _data_part(data):
    """The data part before it runs: what was given."""
    data = data or {}
    given = {k: jsonable(data.get(k)) for k in ("data_path", "v_feat_dirs", "t_feat_dir", "a_feat_dir")}
    return {"status": "not given" if not data.get("data_path") else None,
            "data_path": os.path.abspath(data["data_path"]) if data.get("data_path") else None,
            "given": given, "feature_dirs": None, "n_queries": None, "problem": None}


def _folder_arg(flag, given, saved, model_path, what):
    """The next command's value(s) for one feature flag: (values, why a placeholder stands there or None)."""
    many = flag == "--v_feat_dirs"
    if given:
        paths = list(given) if many else [given]
        missing = [p for p in paths if not os.path.isdir(os.path.expanduser(p))]
        if not missing:
            return paths, None
        return [PLACEHOLDERS[flag]], f"the given {what} {' '.join(missing)}: not found"
    if not saved:
        return [PLACEHOLDERS[flag]], f"the checkpoint names no {what}"
    found, why = [], []
    for p in (list(saved) if many else [saved]):
        hit, tried = locate_saved_path(p, model_path, folder=True)
        found.append(hit)
        if hit is None:
            why.append(f"{p} (tried {', '.join(tried)})")
    if all(found):
        return found, None
    return [PLACEHOLDERS[flag]], f"the checkpoint's {what} not found: " + "; ".join(why)


def analysis_command(report, model_path, data=None, gating_type=None, options=None, trust_pickle=False,
                     original_predictions=None, opt=None):
    """The ``run_gate_analysis.py --legacy_model`` command for this checkpoint, as the report holds it.

    Data and feature folders: the data part's (when its real batch ran), else the given ones, else
    those saved in the checkpoint's options (``locate_saved_path``); one not found is a placeholder
    (``PLACEHOLDERS``) with the reason in ``fill_in``. Also the flags the load needed (``--gating_type``,
    the architecture options, ``--trust_checkpoint``) and a given ``--original_predictions``.
    Returns ``{"argv", "text", "complete", "fill_in": {placeholder: why}}``.
    """
    data = data or {}
    saved = vars(opt) if opt is not None else {}
    args = ["--legacy_model", "--model_path", os.fspath(model_path)]
    fill = {}
    ran = (report.get("data") or {}).get("status") == "ok"
    if data.get("data_path") and (ran or os.path.isfile(os.path.expanduser(data["data_path"]))):
        args += ["--data_path", data["data_path"]]
    else:
        hit, tried = locate_saved_path(saved.get("eval_path"), model_path)
        args += ["--data_path", hit or PLACEHOLDERS["--data_path"]]
        if hit is None:
            fill[PLACEHOLDERS["--data_path"]] = (
                f"the given data file {data['data_path']}: not found" if data.get("data_path") else
                f"the checkpoint's eval_path {saved['eval_path']}: not found (tried {', '.join(tried)})"
                if saved.get("eval_path") else "the checkpoint names no data file (its eval_path)")
    audio = report.get("layout") in ("custom", "avigate")
    flags = [("--v_feat_dirs", "v_feat_dirs", "video feature folders"),
             ("--t_feat_dir", "t_feat_dir", "text feature folder")]
    flags += [("--a_feat_dir", "a_feat_dir", "audio feature folder")] if audio else []
    resolved = (report.get("data") or {}).get("feature_dirs") if ran else None
    for flag, key, what in flags:
        if resolved is not None:
            value = resolved[key]
            args += [flag, *(value if isinstance(value, list) else [value])]
            continue
        values, why = _folder_arg(flag, data.get(key), saved.get(key), model_path, what)
        args += [flag, *values]
        if why:
            fill[values[0]] = why
    if gating_type:
        args += ["--gating_type", gating_type]
    for name, value in (options or {}).items():
        args += [f"--{name}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    if trust_pickle:
        args.append("--trust_checkpoint")
    if original_predictions:
        args += ["--original_predictions", os.fspath(original_predictions)]
    argv = ["python", ANALYSIS_SCRIPT, *args]
    return {"argv": argv, "text": display_command(ANALYSIS_SCRIPT, args), "complete": not fill, "fill_in": fill}


def check_compatibility(model_path, gating_type=None, trust_pickle=False, device="auto", data=None, batch_size=4,
                        options=None, reproduction=None):
    """Run every part on a checkpoint; returns ``(report, exit_code)`` (see the module docstring).

    ``data``: optional dict with ``data_path`` and feature folder overrides; ``options``: what a bare
    state dict cannot tell (``{"nheads": 8, "fusion_n_heads": 8}``); ``reproduction``:
    ``{"original_predictions": FILE or None}`` to re-run the original run's predictions
    (``gate_analysis.reproduction``; DIFFERS is incompatible).
    """
    report = {"model_path": os.path.abspath(os.fspath(model_path)), "compatible": False, "status": None,
              "reason": None, "stage": "read", "problem": None, "exit_code": None}

    def finish(code, status, reason=None, problem=None, stage=None):
        report.update(status=status, reason=reason, problem=problem, exit_code=code,
                      stage=stage or report["stage"])
        return report, code

    def fail(exc):
        code = exit_code_for(exc)
        return finish(code, "incompatible" if code == 1 else "unreadable or bad input", str(exc), "checkpoint")

    try:
        contents = inspect_checkpoint(model_path, trust_pickle=trust_pickle)
    except ToolkitError as exc:
        return fail(exc)
    report["checkpoint"] = contents.summary()
    report["options"] = options_report(contents.opt)
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
    except ToolkitError as exc:
        return fail(exc)
    report["compatible"] = True  # the checkpoint itself: the data and reproduction parts follow
    model.fusion.enable_gate_tracking()
    report["data"] = part = _data_part(data)
    first_problem = None
    if part["status"] is None:
        report["stage"] = "data"
        try:
            batch = real_batch(model, opt, model_path, data, batch_size)
        except (DataError, ConfigError) as exc:
            part.update(status="problem", problem=str(exc))
            first_problem = ("data", f"data problem: {exc} (the checkpoint itself is compatible)")
        else:
            report["real_batch"] = batch
            part.update(status="ok", feature_dirs=batch["feature_dirs"], n_queries=batch["n_queries_in_file"])
            if not batch["passed"]:
                report["compatible"] = False
                report["next_command"] = None
                return finish(1, "incompatible", "the real batch's outputs differ with gate tracking on, or are not "
                              "finite", "data")
    original = (reproduction or {}).get("original_predictions")
    if reproduction is not None:  # proof against the original run's own predictions
        report["stage"] = "reproduce"
        if first_problem is not None:
            report["reproduction"] = {"status": "not_checked", "verdict": None, "predictions_path": original,
                                      "message": "not checked: the data could not be used (see the data part)"}
        else:
            try:
                report["reproduction"] = check_reproduction(model, opt, model_path, data, **reproduction)
            except (DataError, ConfigError) as exc:
                report["reproduction"] = {"status": "error", "verdict": None, "predictions_path": original,
                                          "message": str(exc)}
                first_problem = ("reproduction", f"{exc} (the checkpoint itself is compatible)")
    report["next_command"] = analysis_command(report, model_path, data, gating_type, options, trust_pickle,
                                              original, contents.opt)
    if (report.get("reproduction") or {}).get("status") == "differs":
        report["compatible"] = False
        return finish(1, "incompatible", report["reproduction"]["message"], "reproduction")
    if first_problem is not None:
        stage = "data" if first_problem[0] == "data" else "reproduce"
        return finish(2, "unreadable or bad input", first_problem[1], first_problem[0], stage)
    return finish(0, "compatible", stage="done")


def format_diff(value):
    """A difference for the text report (3 significant digits; "inf"/"nan" as given)."""
    return value if isinstance(value, str) else f"{value:.3g}"


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _option_items(items):
    return ", ".join(f"{name}={json.dumps(o['value'])}" for name, o in items)


def _options_lines(report):
    ck, opts = report["checkpoint"], report.get("options")
    lines = [f"  options      {ck['options_source'] or 'none stored (bare weights)'}"]
    if not opts:
        return lines
    arch = [(n, o) for n, o in opts.items() if n not in DATA_OPTIONS]
    used = [(n, o) for n, o in arch if o["used"]]
    if used:
        lines.append(f"  saved, used  {_option_items(used)}")
    by_reason = {}
    for name, o in arch:
        if not o["used"]:
            by_reason.setdefault(o["why_not_used"], []).append((name, o))
    for why, items in by_reason.items():
        lines.append(f"  not used     {_option_items(items)}: not read by this model ({why})")
    data = [(n, o) for n, o in opts.items() if n in DATA_OPTIONS]
    if data:
        lines.append(f"  saved data   {_option_items(data)}")
    return lines


def _data_lines(report):
    part = report.get("data")
    if not part:
        return []
    if part["status"] == "not given":
        return ["  data         not given (--data_path JSONL runs one real batch through the model)"]
    if part["status"] == "problem":
        return [f"  data         PROBLEM: {part['problem']}"]
    dirs = part["feature_dirs"]
    folders = f"video {' '.join(dirs['v_feat_dirs'])}, text {dirs['t_feat_dir']}" + (
        f", audio {dirs['a_feat_dir']}" if dirs.get("a_feat_dir") else "")
    n = part["n_queries"]
    return [f"  data         ok: {part['data_path']} ({n} {'query' if n == 1 else 'queries'}); features {folders}"]


def _reproduction_lines(res):
    if res["status"] == "error":
        return [f"  reproduction PROBLEM: {res['message']}"]
    return format_reproduction(res)


def format_report(report, reason=True, next_command=True):
    """The human-readable compatibility report (lines), rendered from the report dict alone.

    ``reason=False``: the verdict line leaves the reason out (the command line prints it on stderr);
    ``next_command=False``: no ``run_gate_analysis.py`` command (the guide prints its own).
    """
    lines = [f"Compatibility report for {report['model_path']}"]
    ck = report.get("checkpoint")
    if ck:
        lines.append(f"  format       {ck['format']} ({ck['size_bytes'] / 1e6:.1f} MB), entries "
                     f"{', '.join(ck['entries'] or []) or '-'}, epoch {ck['epoch']}")
        lines += _options_lines(report)
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
                     f"{_plural(report['fusion_layers'], 'fusion layer')}, {_plural(report['fusion_n_heads'], 'head')}")
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
    lines += _data_lines(report)
    rb = report.get("real_batch")
    if rb:
        lines.append(f"  real batch   qids {rb['qids']}, clips {rb['video_clips']}: outputs finite "
                     f"{rb['outputs_finite']}, max abs diff tracking on vs off "
                     f"{format_diff(rb['max_abs_diff_tracking_on_vs_off'])}")
        first = rb["gates"][str(rb["qids"][0])]
        lines.append("  real gates   qid " + str(rb["qids"][0]) + ": "
                     + "; ".join(f"{k} {v['shape']} mean {v['mean']:+.4f}" for k, v in first.items()))
    if report.get("reproduction"):
        lines += _reproduction_lines(report["reproduction"])
    cmd = report.get("next_command") if next_command else None
    if cmd:
        lines += [f"  fill in      {name}: {why}" for name, why in cmd["fill_in"].items()]
    run = ""
    if cmd:
        run = "; " + ("next: " if cmd["complete"] else f"next, with {', '.join(cmd['fill_in'])} filled in: ") + cmd["text"]
    why = f": {report['reason']}" if reason else "; the reason is on stderr"
    stage, problem = report["stage"], report.get("problem")
    if report["status"] == "compatible":
        lines.append("COMPATIBLE: gates can be analysed" + run)
    elif report["status"] == "incompatible":
        lines.append(f"INCOMPATIBLE (at stage {stage}){why}")
    elif problem in ("data", "reproduction"):
        part = "the data could not be used" if problem == "data" else "the original predictions could not be checked"
        lines.append(f"{problem.upper()} PROBLEM (at stage {stage}): the checkpoint is compatible, but {part} "
                     f"(see {problem} above)" + run.replace("; next", "; once fixed, next", 1))
    else:
        lines.append(f"NOT CHECKED ({report['status']}, at stage {stage}){why}")
    return lines
