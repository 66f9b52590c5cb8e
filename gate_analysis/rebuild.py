"""``run_gate_analysis.py --report_only DIR``: report.html and summary.txt of a complete output folder, rebuilt
from its run.json and CSVs (nothing is re-run)."""
import json
import os

import pandas as pd

from qd_detr.errors import ConfigError, DataError

from .manifest import run_summary, write_summary
from .outputs import RUN_FILE, STATS_CSV_FILES

__all__ = ["rebuild_report"]


def rebuild_report(out, log=print):
    """``--report_only DIR``: report.html and summary.txt of a complete output folder, rebuilt from its run.json
    and CSVs (after the code that draws them changed, or the files were deleted); returns the report's path."""
    from .report import write_report
    out = os.path.abspath(out)
    try:
        with open(os.path.join(out, RUN_FILE)) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{out}: not an analysis output folder (no {RUN_FILE})") from None
    except ValueError as exc:
        raise DataError(f"{os.path.join(out, RUN_FILE)}: not valid JSON ({exc})") from None
    if manifest.get("status") != "complete":
        raise ConfigError(f"{os.path.join(out, RUN_FILE)}: the run is not complete (status "
                          f"{manifest.get('status')!r}); finish it with --resume first")
    tables = {}
    for key in ("per_layer", "rankings"):
        path = os.path.join(out, STATS_CSV_FILES[key])
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing; the report needs the statistics CSVs of the run")
        tables[key] = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"vid": str, "layer": str})
    path = write_report(out, run=manifest)
    layers = tables["per_layer"].astype({"layer": int})
    rankings = tables["rankings"]
    rankings = rankings[rankings["rank"] <= min(5, (manifest.get("arguments") or {}).get("top_n") or 10)]
    summary = run_summary(manifest, layers, rankings, out)
    write_summary(out, summary)
    log(summary)
    return path
