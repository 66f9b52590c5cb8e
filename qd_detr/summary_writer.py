"""TensorBoard event files of a training run, in the original layout (``RESULTS/tensorboard_log/``).

TensorBoard is optional: ``torch.utils.tensorboard`` (which needs the ``tensorboard`` package) is
imported only by ``open_summary_writer``, when a training starts, never when a ``qd_detr`` module is
imported. Without it ``open_summary_writer`` says so once (one line on stderr) and returns None, and
the training runs without event files.

Tags and steps as the original ``train.py`` writes them (step = completed training epochs):
``Train/lr`` (the learning rate of the epoch), ``Train/{loss}`` (the epoch's average losses, weighted
terms times their weight, plus ``loss_overall``), ``Eval/{loss}`` (validation losses) and
``Eval/{metric}`` (the official metrics' ``brief`` entries, e.g. ``Eval/MR-full-mAP``), and the text
``hyperparameters`` (the options as a markdown table). The gate monitor adds its ``gates/...``
histograms and scalars (``gate_analysis.tensorboard_log``).
"""
import math
import numbers
import os
import sys

__all__ = ["TENSORBOARD_DIR", "EVENT_FILE_PREFIX", "open_summary_writer", "remove_event_files", "write_scalars",
           "options_markdown"]

#: Folder of the event files inside a results folder (the original ``tensorboard_log_dir``).
TENSORBOARD_DIR = "tensorboard_log"
#: Name prefix of TensorBoard event files.
EVENT_FILE_PREFIX = "events.out.tfevents."


def remove_event_files(log_dir):
    """Delete the event files (``EVENT_FILE_PREFIX*``) directly in ``log_dir`` (an earlier run's, when a
    results folder is overwritten); other files stay. Returns how many were removed."""
    if not os.path.isdir(log_dir):
        return 0
    removed = 0
    for name in os.listdir(log_dir):
        path = os.path.join(log_dir, name)
        if name.startswith(EVENT_FILE_PREFIX) and os.path.isfile(path):
            os.remove(path)
            removed += 1
    return removed


def open_summary_writer(log_dir, note=None):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``log_dir`` (created), or None when
    TensorBoard cannot be imported; then ``note`` (default: a line on stderr) gets one message saying
    that TensorBoard logging is off and why."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        message = (f"note: TensorBoard logging is off ({exc}); training goes on without {log_dir} "
                   "(pip install tensorboard to get it)")
        (note or (lambda text: print(text, file=sys.stderr)))(message)
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir)


def write_scalars(writer, prefix, values, step):
    """``writer.add_scalar(f"{prefix}/{name}", value, step)`` for each finite number in ``values``
    ({name: number}); returns the tags written."""
    tags = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            continue
        tag = f"{prefix}/{name}"
        writer.add_scalar(tag, float(value), int(step))
        tags.append(tag)
    return tags


def options_markdown(options):
    """The options ({name: value}) as a two-column markdown table (``|`` escaped), for ``add_text``."""
    rows = ["| option | value |", "|---|---|"]
    for key in sorted(options):
        value = str(options[key]).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {key} | {value} |")
    return "\n".join(rows)
