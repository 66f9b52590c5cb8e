"""The interactive guide behind ``legacy_model_guide.py``: from a trained checkpoint to its gate analysis.

Asks for the checkpoint (a folder is answered with the checkpoint files in it), the data and feature
folders (defaults: the checkpoint's saved ones as found from here; a saved one that is not found is
said, with the paths tried), the gating type only when the checkpoint does not state it, and what to
analyse, including the causal analyses (``--ablate``: one extra inference pass per intervention;
``--contributions``); checks each answer at once (``Asker``). Then runs the compatibility check
(``gate_analysis.compat``) and the analysis (``run_gate_analysis.py --legacy_model``, in this process)
and prints the equivalent non-interactive command.
"""
import datetime
import os
import shlex
import shutil
import sys
import traceback

from qd_detr.annotations import read_jsonl
from qd_detr.checkpoint import inspect_checkpoint
from qd_detr.cli import architecture_options
from qd_detr.dataset import build_dataset
from qd_detr.errors import CheckpointError, ConfigError, DataError, IncompatibleModelError, ToolkitError
from qd_detr.gates import DEFAULT_KINDS, GATE_KINDS
from qd_detr.keys import GATING_AMBIGUITY, LAYOUT_DESCRIPTIONS

from .compat import check_compatibility, display_command, format_report, locate_saved_path
from .interventions import AUDIO_INTERVENTIONS, GATE_VALUES, parse_interventions
from .legacy import no_fusion_error

__all__ = ["run_guide", "Asker", "saved_path", "checkpoints_in", "CHECKPOINT_SUFFIXES", "ABLATE_HELP"]

CHECKPOINT_SUFFIXES = (".ckpt", ".pth")
#: what the guide says about --ablate and --contributions before asking
ABLATE_HELP = (
    "  Causal analyses (optional). --ablate re-runs inference with the gates clamped (zero = branch off, one, "
    "minus_one, mean = the dataset mean) or the audio removed (audio_zero: audio features 0; audio_swap: another "
    "video's audio) and compares each re-run's predictions and metrics with the normal run (ablation.csv).",
    "  Cost: one extra inference pass over the analysed queries per intervention (each clamp value once per "
    "--ablate_layers x --ablate_gates item, each audio intervention once). zero alone switches audio off.",
)


class Asker:
    """Questions with defaults, validated at once; bad answers are asked again (interactive) or fatal."""

    def __init__(self, interactive, read=input, write=print, echo=False):
        self.interactive, self.read, self.write, self.echo = interactive, read, write, echo
        self.steps = 0

    def step(self, title):
        """Print the next numbered step."""
        self.steps += 1
        self.write(f"Step {self.steps}: {title}")

    def ask(self, question, parse, default=None, given=None, flag=None, hint=None, show_default=True, notes=()):
        """``parse(answer)`` of the flag's value (``given``), else of the answer (``default`` when empty).

        Not interactive: a missing or bad answer is a ConfigError naming ``flag``. ``hint`` opens a step;
        ``notes``: lines shown before the question is asked (not interactive: before a missing answer's error).
        """
        if given is not None:
            try:
                return parse(given)
            except (ValueError, ToolkitError) as exc:
                if not self.interactive:
                    if isinstance(exc, ToolkitError):
                        raise
                    raise ConfigError(f"{flag} {given}: {exc}") from None
                self.write(f"  {flag} {given!r} cannot be used: {exc}")
        if not self.interactive:
            if default is None:
                for line in notes:
                    self.write(line)
                raise ConfigError(f"{flag} is required with --non-interactive")
            try:
                return parse(default)
            except ValueError as exc:
                raise ConfigError(f"{flag} (default {default!r}): {exc}") from None
        if hint:
            self.step(hint)
        for line in notes:
            self.write(line)
        while True:
            shown = f" [{default}]" if show_default and default not in (None, "") else ""
            text = self.read(f"{question}{shown}: ").strip()
            if self.echo:  # answers piped on stdin: keep the transcript readable
                self.write(text)
            if not text:
                if default is None:
                    self.write("  an answer is needed here")
                    continue
                text = default
            try:
                return parse(text)
            except (ValueError, ToolkitError) as exc:
                self.write(f"  {exc}; please try again")

    def yes_no(self, question, default=False, given=None):
        """A y/n question (``default`` when not interactive or the answer is empty)."""
        if given is not None:
            return bool(given)
        if not self.interactive:
            return default

        def parse(text):
            t = text.strip().lower()
            if t in ("y", "yes"):
                return True
            if t in ("n", "no"):
                return False
            raise ValueError("answer y or n")
        return self.ask(question + (" [Y/n]" if default else " [y/N]"), parse, default="y" if default else "n",
                        show_default=False)


def saved_path(path, ckpt_path):
    """A path saved in the checkpoint's options (relative to the training repo's root), found from the
    current folder, the checkpoint's folder or one of its two parents (results/<run>/ -> the repo root);
    None when not found (``gate_analysis.compat.locate_saved_path`` also gives the paths tried)."""
    return locate_saved_path(path, ckpt_path)[0]


def _not_found_note(what, saved, ckpt_path):
    """A line saying which saved paths were not found and where they were looked for (None: all found)."""
    missing = []
    for p in ([saved] if isinstance(saved, str) else list(saved or [])):
        hit, tried = locate_saved_path(p, ckpt_path, folder=what != "eval_path")
        if hit is None:
            missing.append(f"{p} (tried {', '.join(tried)})")
    if not missing:
        return None
    return f"  the checkpoint's {what} not found from here: " + "; ".join(missing) + "; give the path"


def checkpoints_in(folder):
    """The checkpoint files (``CHECKPOINT_SUFFIXES``) directly in ``folder``: model_best.ckpt, model.ckpt and
    model_latest.ckpt first, then the others by name."""
    first = ("model_best.ckpt", "model.ckpt", "model_latest.ckpt")
    names = [n for n in os.listdir(folder) if n.endswith(CHECKPOINT_SUFFIXES)
             and os.path.isfile(os.path.join(folder, n))]
    names.sort(key=lambda n: (first.index(n) if n in first else len(first), n))
    return [os.path.join(folder, n) for n in names]


def _existing_dir(text, must_hold=None, what="folder"):
    path = os.path.expanduser(text)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: {what} not found")
    if must_hold and not os.path.isfile(os.path.join(path, must_hold)):
        raise ValueError(f"{path}: has no {must_hold} (the {what} of the first query)")
    return path


def _checkpoint_in_folder(asker, folder):
    """The checkpoint the user picks from a folder they gave (offered when there is one; a ValueError asks again)."""
    try:
        found = checkpoints_in(folder)
    except OSError as exc:
        found, problem = [], f"{folder}: cannot list the folder ({exc.strerror or exc})"
    else:
        problem = None
    if problem or not found:
        text = problem or (f"{folder}: is a folder with no checkpoint file "
                           f"({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) in it")
        if not asker.interactive:
            raise ConfigError(text)
        raise ValueError(text)
    if not asker.interactive:
        others = f" (also in it: {', '.join(os.path.basename(f) for f in found[1:])})" if found[1:] else ""
        raise ConfigError(f"{folder}: is a folder, not a checkpoint file; the checkpoint in it: --model_path "
                          f"{shlex.quote(found[0])}{others}")
    if len(found) == 1:
        if asker.yes_no(f"  {folder} is a folder; use the checkpoint in it, {found[0]}?", default=True):
            return found[0]
        raise ValueError("give the checkpoint file")
    asker.write(f"  {folder} is a folder with {len(found)} checkpoints:")
    for i, f in enumerate(found, 1):
        asker.write(f"    {i}. {os.path.basename(f)}")

    def pick(text):
        if text.isdigit() and 1 <= int(text) <= len(found):
            return found[int(text) - 1]
        for f in found:
            if text in (f, os.path.basename(f)):
                return f
        raise ValueError(f"answer a number from 1 to {len(found)} or one of the names")
    return asker.ask("  Which one (number or name)", pick, default="1")


def _ask_checkpoint(asker, args, state):
    def parse(text):
        path = os.path.expanduser(text)
        if os.path.isdir(path):
            return parse(_checkpoint_in_folder(asker, path))
        try:
            contents = inspect_checkpoint(path, trust_pickle=state["trust"])
        except CheckpointError as exc:
            if "--trust_checkpoint" in str(exc) and asker.interactive and not state["trust"] \
                    and not isinstance(exc, IncompatibleModelError):
                asker.write(f"  {exc}")
                if asker.yes_no("  Load it with full unpickling (only for a file you trust)?"):
                    state["trust"] = True
                    return parse(text)
            raise
        if contents.keys.layout not in ("custom", "avigate"):
            raise no_fusion_error(path, contents.keys.layout)
        stated, source = contents.stated_gating_type()
        if stated is not None and args.gating_type not in (None, stated):
            raise ConfigError(f"{path}: --gating_type {args.gating_type} conflicts with the checkpoint's gating_type "
                              f"{stated} ({source})")
        return path, contents
    return asker.ask("Checkpoint file", parse, given=args.model_path, flag="--model_path",
                     hint="the trained checkpoint (model_best.ckpt / model_latest.ckpt of a training run)")


def _parse_records(text):
    path = os.path.expanduser(text)
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no queries in this file")
    return path, records


def _saved_default(opt, name, ckpt_path, folder=True):
    """(default answer or None, notes): a saved option's path(s) as found from here, or a note saying which
    were not found and where they were looked for."""
    saved = getattr(opt, name, None) if opt is not None else None
    if not saved:
        return None, ()
    paths = [saved] if isinstance(saved, str) else list(saved)
    found = [locate_saved_path(p, ckpt_path, folder=folder)[0] for p in paths]
    if all(found):
        return (found[0] if isinstance(saved, str) else shlex.join(found)), ()
    return None, (_not_found_note(name, saved, ckpt_path),)


def _ask_data(asker, args, contents):
    opt = contents.opt
    default, notes = _saved_default(opt, "eval_path", contents.path, folder=False)
    data_path, records = asker.ask("Annotation file (JSONL)", _parse_records, default=default, given=args.data_path,
                                   flag="--data_path", hint="the queries to analyse (QVHighlights-style JSONL)",
                                   notes=notes)
    asker.write(f"  {len(records)} queries")
    first = records[0]
    audio = contents.keys.layout in ("custom", "avigate")
    hint = "feature folders (defaults: the ones saved in the checkpoint, as found from here)"
    while True:
        v_default, v_notes = _saved_default(opt, "v_feat_dirs", contents.path)
        v_dirs = asker.ask("Video feature folders (space-separated, training order)", _video_dirs_parser(first),
                           default=v_default, given=shlex.join(args.v_feat_dirs) if args.v_feat_dirs else None,
                           flag="--v_feat_dirs", hint=hint, notes=v_notes)
        hint = None
        t_default, t_notes = _saved_default(opt, "t_feat_dir", contents.path)
        t_dir = asker.ask("Text feature folder",
                          lambda t: _existing_dir(t, f"qid{first['qid']}.npz", "text feature folder"),
                          default=t_default, given=args.t_feat_dir, flag="--t_feat_dir", notes=t_notes)
        a_dir = None
        if audio:
            a_default, a_notes = _saved_default(opt, "a_feat_dir", contents.path)
            a_dir = asker.ask("Audio feature folder",
                              lambda t: _existing_dir(t, f"{first['vid']}.npy", "audio feature folder"),
                              default=a_default, given=args.a_feat_dir, flag="--a_feat_dir", notes=a_notes)
        dirs = {"v_feat_dirs": v_dirs, "t_feat_dir": t_dir, "a_feat_dir": a_dir}
        if opt is None:
            return data_path, records, dirs
        try:
            build_dataset(opt, records[:1], dirs)[0]
            return data_path, records, dirs
        except DataError as exc:
            if not asker.interactive:
                raise
            asker.write(f"  these folders do not fit the model: {exc}")
            args.v_feat_dirs = args.t_feat_dir = args.a_feat_dir = None


def _video_dirs_parser(first):
    def parse(text):
        dirs = [_existing_dir(d, f"{first['vid']}.npz", "video feature folder") for d in shlex.split(text)]
        if not dirs:
            raise ValueError("give at least one folder")
        return dirs
    return parse


def _ask_gating(asker, args, contents):
    stated, source = contents.stated_gating_type()
    if stated is not None:
        asker.write(f"  gating type: {stated} (from {source})")
        return None

    def parse(text):
        if text not in ("global", "clipwise"):
            raise ValueError("answer global or clipwise")
        return text
    return asker.ask("Gating type (global or clipwise)", parse, given=args.gating_type, flag="--gating_type",
                     hint=f"gating type ({GATING_AMBIGUITY}); give the --gating_type the model was trained with")


def _ask_analysis(asker, args, contents, records):
    n = len(records)

    def parse_count(text):
        if text.lower() in ("", "all"):
            return None
        if not text.isdigit():
            raise ValueError(f"expected a positive number, got {text!r}")
        value = int(text)
        if not 1 <= value <= n:
            raise ValueError(f"expected a number between 1 and {n}")
        return value
    max_samples = asker.ask(f"How many queries to analyse (all = {n})", parse_count, default="all",
                            given=str(args.max_samples) if args.max_samples is not None else None,
                            flag="--max_samples", hint="what to analyse")
    compare = None
    if not args.no_plots:
        known = {r["qid"] for r in records[:max_samples or n]}

        def parse_qids(text):
            if text.lower() in ("", "none", "top"):
                return None
            try:
                qids = [int(t) for t in text.replace(",", " ").split()]
            except ValueError:
                raise ValueError("give qids as whole numbers separated by spaces") from None
            bad = [q for q in qids if q not in known]
            if bad:
                raise ValueError(f"qid(s) {bad} are not among the analysed queries")
            return qids
        compare = asker.ask("Queries (qids) to compare in a plot (none = the top and bottom queries)", parse_qids,
                            default="none",
                            given=" ".join(map(str, args.compare_samples)) if args.compare_samples else None,
                            flag="--compare_samples")
    ablate, contributions = _ask_causal(asker, args, contents)
    stem = os.path.splitext(os.path.basename(contents.path))[0]
    default_out = os.path.join("gate_analysis_results", f"{stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}")
    state = {"overwrite": bool(args.overwrite)}

    def parse_out(text):
        path = os.path.expanduser(text)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path}: exists and is not a folder")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"{parent}: not writable")
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{path}: output folder is not writable")
        if os.path.isdir(path) and os.listdir(path) and not state["overwrite"]:
            if not asker.interactive:
                raise ValueError("folder exists and is not empty; pass --overwrite to replace its results")
            if not asker.yes_no(f"  {path} is not empty. Replace its results?"):
                raise ValueError("choose another output folder")
            state["overwrite"] = True
        return path
    out = asker.ask("Output folder", parse_out, default=default_out, given=args.output_dir, flag="--output_dir")
    return {"max_samples": max_samples, "compare": compare, "ablate": ablate, "contributions": contributions,
            "output_dir": out, "overwrite": state["overwrite"]}


def _ask_causal(asker, args, contents):
    """The causal analyses: ``(--ablate values or None, --contributions)``; the interventions are checked
    against the checkpoint's layers and gate kinds, and their number (= extra inference passes) is said."""
    num_layers = contents.info.get("fusion_layers") or None
    kinds = GATE_KINDS if contents.info.get("film") else DEFAULT_KINDS
    choices = " ".join([*GATE_VALUES, *AUDIO_INTERVENTIONS])

    def parse(text):
        values = text.replace(",", " ").split()
        if not values or values == ["none"]:
            return None
        found = parse_interventions(values, args.ablate_layers, args.ablate_gates, num_layers, kinds)
        asker.write(f"  {len(found)} intervention{'s' if len(found) != 1 else ''} "
                    f"({', '.join(iv.name for iv in found)}): {len(found)} extra inference "
                    f"pass{'es' if len(found) != 1 else ''} over the analysed queries")
        return values
    ablate = asker.ask(f"Interventions to run (space-separated from: {choices}; none = skip)", parse,
                       default="none", given=" ".join(args.ablate) if args.ablate else None, flag="--ablate",
                       notes=ABLATE_HELP)
    contributions = asker.yes_no("Record per-clip contributions ||gate * branch|| / ||residual|| (--contributions: "
                                 "measured during the main pass, no extra pass; gate_contributions.csv)?",
                                 given=True if args.contributions else None)
    return ablate, contributions


def _analysis_arguments(answers, args):
    a = ["--model_path", answers["model_path"], "--data_path", answers["data_path"],
         "--v_feat_dirs", *answers["dirs"]["v_feat_dirs"], "--t_feat_dir", answers["dirs"]["t_feat_dir"]]
    if answers["dirs"]["a_feat_dir"]:
        a += ["--a_feat_dir", answers["dirs"]["a_feat_dir"]]
    a += ["--output_dir", answers["output_dir"], "--legacy_model"]
    if answers["gating_type"]:
        a += ["--gating_type", answers["gating_type"]]
    for name, value in architecture_options(args).items():
        a += [f"--{name}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    if answers["max_samples"]:
        a += ["--max_samples", str(answers["max_samples"])]
    if answers["compare"]:
        a += ["--compare_samples", *map(str, answers["compare"])]
    if answers["ablate"]:
        a += ["--ablate", *answers["ablate"]]
        for flag, value, default in (("--ablate_layers", args.ablate_layers, ["all"]),
                                     ("--ablate_gates", args.ablate_gates, ["both"])):
            if list(value) != default:
                a += [flag, *map(str, value)]
        if args.ablate_seed:
            a += ["--ablate_seed", str(args.ablate_seed)]
    if answers["contributions"]:
        a.append("--contributions")
    if answers["overwrite"]:
        a.append("--overwrite")
    if answers["trust"]:
        a.append("--trust_checkpoint")
    for flag, value, default in (("--device", args.device, "auto"), ("--batching", args.batching, "query"),
                                 ("--batch_size", args.batch_size, None), ("--top_n", args.top_n, 10)):
        if value is not None and value != default:
            a += [flag, str(value)]
    for flag in ("no_plots", "skip_missing", "quiet"):
        if getattr(args, flag, False):
            a.append("--" + flag)
    return a


def _run_analysis(analyse, arguments, out_dir, write):
    """Run the analysis in this process; on failure or Ctrl-C remove an output folder that this run created.

    ``analyse(argv)``: the analysis entry point under the command-line error policy (returns the exit code).
    """
    created = not os.path.exists(out_dir)
    try:
        code = analyse(arguments)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:  # argparse: bad arguments
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except Exception:  # a crash: reported as the script would report it
        traceback.print_exc()
        code = 1
    if code != 0 and created and os.path.isdir(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)
        write(f"  removed the incomplete output folder {out_dir}")
    elif code != 0 and os.path.isdir(out_dir):
        write(f"  {out_dir} holds an incomplete run (its run.json says status 'running')")
    return code


def run_guide(args, script, read=input, write=print, *, analyse):
    """The guide's steps; ``args`` carries the run_gate_analysis.py flags given on the command line.

    ``script``: the analysis script the printed command names; ``analyse(argv)``: runs that script's
    analysis in this process and returns its exit code. Returns the exit code. EOFError and
    KeyboardInterrupt propagate to the caller (the script).
    """
    try:
        echo = read is input and not args.non_interactive and not sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        echo = False
    asker = Asker(not args.non_interactive, read=read, write=write, echo=echo)
    write("Gate analysis of a trained (legacy) QD-DETR + AVIGATE checkpoint: the guide asks for the checkpoint, "
          "the data and what to analyse, checks that the model loads unchanged, then runs the analysis.")
    state = {"trust": bool(args.trust_checkpoint)}
    model_path, contents = _ask_checkpoint(asker, args, state)
    summary = contents.summary()
    write(f"  {summary['format']}, epoch {summary['epoch']}, {summary['n_tensors']} tensors; layout "
          f"{contents.keys.layout}: {LAYOUT_DESCRIPTIONS[contents.keys.layout]}")
    data_path, records, dirs = _ask_data(asker, args, contents)
    gating = _ask_gating(asker, args, contents)
    answers = dict(model_path=model_path, data_path=data_path, dirs=dirs, gating_type=gating, trust=state["trust"],
                   **_ask_analysis(asker, args, contents, records))
    out_dir = answers["output_dir"]
    arguments = _analysis_arguments(answers, args)
    command = display_command(script, arguments)
    if args.no_run or not asker.yes_no("Run the compatibility check and the analysis now?", default=True):
        write("Nothing was run. The equivalent command:")
        write(command)
        return 0
    asker.step("compatibility check (loads the weights strictly, proves outputs unchanged with tracking on)")
    report, code = check_compatibility(model_path, gating_type=gating, trust_pickle=state["trust"],
                                       device=args.device or "auto", data={"data_path": data_path, **dirs},
                                       batch_size=2, options=architecture_options(args))
    for line in format_report(report, reason=code == 0, next_command=False)[1:]:  # the reason: on stderr
        write(line)
    if code != 0:
        print(f"{'incompatible' if code == 1 else 'error'}: {report['reason']}", file=sys.stderr)
        write("The analysis was not run. After fixing the problem, the command would be:")
        write(command)
        return code
    asker.step("gate analysis (run_gate_analysis.py --legacy_model)")
    sys.stdout.flush()
    code = _run_analysis(analyse, arguments, out_dir, write)
    if code == 130:
        raise KeyboardInterrupt
    write("The analysis finished." if code == 0 else f"The analysis failed (exit code {code}).")
    write("Equivalent non-interactive command:")
    write(command)
    return code
