"""The one loop: batches -> forward -> outputs, with predictions, metrics and gate capture on top.

Two entry points share the forward pass (``forward``, under ``torch.no_grad``):

* ``iterate_batches(model, dataset, batches, device, ...)``: index batches of a dataset, loaded by a
  ``DataLoader``; yields ``(metas, inputs, outputs)`` per batch. With per-query batching the rows whose
  predictions are not decided within batching noise are recomputed alone (exact re-runs). With
  ``sink`` the fusion gates of every batch are captured (``qd_detr.gates.GateRecorder``). ``predict``
  and ``evaluate`` turn its outputs into submission lines and the official metrics.
* ``run_batches(model, batches, ...)`` / ``capture_gates``: already collated ``(ids, kwargs)`` batches,
  run once in eval mode (restored afterwards) with a gate-tracking recorder the user enabled paused;
  for gate captures outside inference (the training monitor, the demo's gate structure, probes).

A sink is a callable receiving one list of ``GateRecord`` per fusion forward (one record per batch
element, named by its qid; see ``qd_detr.gates``).
"""
import contextlib
import inspect
import sys

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .annotations import has_labels
from .batching import collate, model_kwargs, move_to_device
from .eval import eval_submission
from .gates import GateRecorder
from .postprocess import ambiguous_rows, submission_lines

__all__ = ["forward", "iterate_batches", "predict", "evaluate", "run_batches", "capture_gates", "eval_mode"]


def forward(model, inputs, compute_neg=False):
    """``model(**inputs, compute_neg=compute_neg)`` under ``torch.no_grad``."""
    with torch.no_grad():
        return model(**inputs, compute_neg=compute_neg)


def iterate_batches(model, dataset, batches, device, num_workers=0, progress=True, desc="inference",
                    before_forward=None, compute_neg=False, exact=None, suspend=contextlib.nullcontext, stats=None,
                    sink=None, capture_contributions=False, with_targets=False, leave=True):
    """Yield ``(metas, inputs, outputs)`` per index batch of ``dataset`` (``with_targets``: also ``targets``).

    ``metas``: the batch's records; ``inputs``: model keyword arguments on ``device`` (``src_vid_mask``
    [B, L] float, 1 = valid clip); ``outputs``: ``pred_logits`` [B, nq, 2], ``pred_spans`` [B, nq, 2],
    ``saliency_scores`` [B, L], ... ; ``targets``: the collated labels on ``device`` (None without labels).
    ``before_forward(metas, inputs)`` runs right before each batch forward.
    ``exact`` (default: on for per-query batching): rows whose predictions are not decided within
    batching noise (``postprocess.ambiguous_rows``) get their ``pred_logits``, ``pred_spans`` and
    ``saliency_scores`` recomputed with the query alone, inside ``suspend()`` (and with gate capture
    paused); ``stats["exact_reruns"]`` counts them.
    ``sink``: capture the fusion gates of every batch forward into ``sink(records)``, one record per
    query named by its qid (``capture_contributions``: with the branch contributions).
    ``leave``: keep the progress bar on screen when done.
    """
    if exact is None:
        exact = getattr(model, "batching", "query") == "query"
    recorder = None
    if sink is not None:
        recorder = GateRecorder(model.fusion, sink, capture_contributions=capture_contributions)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    bar = tqdm(loader, total=len(batches), desc=desc, disable=not progress, file=sys.stderr, unit="batch",
               leave=leave)
    with recorder if recorder is not None else contextlib.nullcontext():
        for (metas, collated), indices in zip(bar, batches):  # the bar first: it reaches its total at the end
            inputs = move_to_device(model_kwargs(collated), device)
            targets = move_to_device(collated.get("targets"), device) if with_targets else None
            if before_forward is not None:
                before_forward(metas, inputs)
            if recorder is not None:
                recorder.set_ids([m["qid"] for m in metas])
            outputs = forward(model, inputs, compute_neg)
            rows = ambiguous_rows(metas, outputs) if exact and len(indices) > 1 else []
            with suspend(), recorder.paused() if recorder is not None else contextlib.nullcontext():
                for j in rows:
                    single = move_to_device(model_kwargs(collate([dataset[indices[j]]])[1]), device)
                    alone = forward(model, single, False)
                    n = int(single["src_vid_mask"].sum())
                    for key in ("pred_logits", "pred_spans"):
                        outputs[key][j] = alone[key][0]
                    outputs["saliency_scores"][j, :n] = alone["saliency_scores"][0, :n]
            if stats is not None:
                stats["exact_reruns"] = stats.get("exact_reruns", 0) + len(rows)
            yield (metas, inputs, outputs, targets) if with_targets else (metas, inputs, outputs)


def predict(model, dataset, batches, device, **kwargs):
    """Submission lines (``qd_detr.postprocess.submission_lines``) in dataset order; ``kwargs`` go to
    ``iterate_batches``."""
    by_qid = {}
    for metas, inputs, outputs in iterate_batches(model, dataset, batches, device, **kwargs):
        for line in submission_lines(metas, outputs, inputs["src_vid_mask"]):
            by_qid[line["qid"]] = line
    return [by_qid[r["qid"]] for r in dataset.records if r["qid"] in by_qid]


def evaluate(lines, records):
    """Official metrics of the predicted ``lines`` when every record has labels, else None (e.g. the
    test split); only the predicted records count."""
    if not records or not all(has_labels(r) for r in records):
        return None
    predicted = {line["qid"] for line in lines}
    return eval_submission(lines, [r for r in records if r["qid"] in predicted], verbose=False, match_number=True)


# ------------------------------------------------------------------------------- collated batches
@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block; the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_batches(model, batches, sink=None, device=None, capture_contributions=False, progress=False,
                desc="forward"):
    """Run already collated batches once; yield ``(ids, outputs)`` per batch.

    ``batches``: an iterable of ``(ids, kwargs)``: one id per batch element (e.g. qids) and the model's
    keyword arguments (a ``"targets"`` entry is dropped; tensors are moved to ``device``, default the
    model's). The model runs in eval mode (its mode is restored afterwards) under ``torch.no_grad``,
    with ``compute_neg=False`` when its forward takes it. With ``sink``, every fusion gate is captured:
    ``sink(records)`` per forward, records named by ``ids``. Gate tracking the user enabled
    (``enable_gate_tracking``) records nothing meanwhile.
    """
    device = device or next(model.parameters()).device
    neg = {"compute_neg": False} if "compute_neg" in inspect.signature(model.forward).parameters else {}
    fusion = getattr(model, "fusion", None)
    user_paused = getattr(fusion, "gate_tracking_paused", None)
    recorder = None
    if sink is not None:
        recorder = GateRecorder(fusion, sink, capture_contributions=capture_contributions)
    if progress:
        batches = tqdm(batches, desc=desc, file=sys.stderr, unit="batch", leave=False)
    with contextlib.ExitStack() as stack:
        if user_paused is not None:
            stack.enter_context(user_paused())
        stack.enter_context(eval_mode(model))
        if recorder is not None:
            stack.enter_context(recorder)
        for ids, kwargs in batches:
            if recorder is not None:
                recorder.set_ids(list(ids))
            inputs = move_to_device(model_kwargs(kwargs), device)
            with torch.no_grad():
                outputs = model(**inputs, **neg)
            yield ids, outputs


def capture_gates(model, batches, sink, device=None, capture_contributions=False, progress=False, desc="gates"):
    """``run_batches`` for its gates only: every fusion gate of every batch goes to ``sink``; returns the
    number of batches run."""
    n = 0
    for _ in run_batches(model, batches, sink, device=device, capture_contributions=capture_contributions,
                         progress=progress, desc=desc):
        n += 1
    return n
