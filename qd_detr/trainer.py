"""The training loop: setup, epochs, evaluation, checkpoints (the original QD-DETR recipe).

AdamW (``lr``, ``wd``), StepLR every ``lr_drop`` epochs, gradient clipping at ``grad_clip``, Hungarian
matching and the ``SetCriterion`` losses (``qd_detr.losses``), evaluation every ``eval_epoch`` epochs
with the official metrics, best model chosen on ``MR-full-mAP``. Options come from
``qd_detr.train_options.options_from_args``; extra work per epoch (the gate monitor) comes through
callbacks (``qd_detr.callbacks``). Losses and metrics also go to TensorBoard when it is installed
(``qd_detr.summary_writer``). The output files are described in ``qd_detr.train``.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .annotations import has_labels, read_jsonl
from .batching import collate, make_batches, move_to_device
from .callbacks import callbacks_from_options
from .checkpoint import read_checkpoint, split_checkpoint, strict_load
from .cli import prepare_output_dir
from .dataset import build_dataset
from .engine import iterate_batches
from .errors import CheckpointError, DataError
from .eval import eval_submission, metrics_path_for
from .io import save_torch, write_json, write_jsonl
from .keys import normalize_state_dict
from .losses import build_criterion
from .model import build_model
from .postprocess import submission_lines
from .summary_writer import TENSORBOARD_DIR, open_summary_writer, options_markdown, remove_event_files, write_scalars
from .train_options import EVAL_LOG_FORMAT, TRAIN_LOG_FORMAT, opt_json_from

__all__ = ["set_seed", "build_datasets", "build_optimizer", "train_one_epoch", "evaluate_model", "checkpoint_dict",
           "save_checkpoint", "train", "BEST_METRIC"]

BEST_METRIC = "MR-full-mAP"


# ---------------------------------------------------------------------------------------- setup
def set_seed(seed):
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _dataset(opt, records, training, load_labels):
    dirs = dict(v_feat_dirs=opt.v_feat_dirs, t_feat_dir=opt.t_feat_dir, a_feat_dir=opt.a_feat_dir)
    return build_dataset(opt, records, dirs, load_labels=load_labels, max_windows=opt.max_windows,
                         training=training, txt_drop_ratio=opt.txt_drop_ratio if training else 0, seed=opt.seed)


def build_datasets(opt):
    """(train dataset, eval dataset or None). Training queries need labels; ``data_ratio`` keeps the
    first fraction of them (as the original)."""
    records = read_jsonl(opt.train_path)
    if opt.data_ratio != 1:
        records = records[:max(1, int(len(records) * opt.data_ratio))]
    unlabelled = [r["qid"] for r in records if not has_labels(r)]
    if unlabelled:
        raise DataError(f"{opt.train_path}: {len(unlabelled)} training queries have no labels "
                        f"(relevant_windows, relevant_clip_ids, saliency_scores), e.g. qid {unlabelled[0]}")
    train_ds = _dataset(opt, records, training=True, load_labels=True)
    eval_ds = None
    if opt.eval_path:
        eval_ds = _dataset(opt, read_jsonl(opt.eval_path), training=False, load_labels=None)
    return train_ds, eval_ds


def build_optimizer(model, opt):
    """AdamW over the trainable parameters and StepLR(lr_drop), as the original ``setup_model``."""
    params = [{"params": [p for _, p in model.named_parameters() if p.requires_grad]}]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.wd)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, opt.lr_drop)


def _reseed_worker(_):
    """DataLoader workers: a distinct, loader-seeded label-sampling generator per worker."""
    info = torch.utils.data.get_worker_info()
    ds = info.dataset
    ds.reseed(info.seed)


def _train_loader(dataset, opt):
    gen = torch.Generator().manual_seed(opt.seed)
    return DataLoader(dataset, batch_size=opt.bsz, shuffle=True, collate_fn=collate, num_workers=opt.num_workers,
                      pin_memory=opt.pin_memory, generator=gen, worker_init_fn=_reseed_worker)


# ---------------------------------------------------------------------------------------- epochs
class _Meter:
    def __init__(self):
        self.sum, self.n = 0.0, 0

    def update(self, value):
        self.sum += float(value)
        self.n += 1

    @property
    def avg(self):
        return self.sum / max(1, self.n)


def _log_value(key, value, weight_dict):
    value = value.detach().item() if torch.is_tensor(value) else float(value)
    return value * weight_dict[key] if key in weight_dict else value


def train_one_epoch(model, criterion, loader, optimizer, opt, epoch_i=0, progress=False):
    """One pass over ``loader``; returns {loss name: average} (weighted terms times their weight, as
    the original logs them, plus ``loss_overall``). Raises FloatingPointError on a non-finite loss."""
    model.train()
    criterion.train()
    meters = defaultdict(_Meter)
    bar = tqdm(loader, desc=f"epoch {epoch_i + 1} train", leave=False, file=sys.stderr, disable=not progress,
               unit="batch")
    for b, (metas, inputs) in enumerate(bar):
        inputs = move_to_device(inputs, opt.device, non_blocking=opt.pin_memory)
        targets = inputs.pop("targets")
        outputs = model(**inputs)
        loss_dict = criterion(outputs, targets)
        loss = criterion.total(loss_dict)
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
            raise FloatingPointError(f"non-finite loss at epoch {epoch_i + 1}, batch {b + 1} "
                                     f"(qids {[m['qid'] for m in metas][:8]}): {terms}")
        optimizer.zero_grad()
        loss.backward()
        if opt.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        meters["loss_overall"].update(loss.item())
        for k, v in loss_dict.items():
            meters[k].update(_log_value(k, v, criterion.weight_dict))
        bar.set_postfix(loss=f"{meters['loss_overall'].avg:.4f}")
    return {k: m.avg for k, m in meters.items()}


@torch.no_grad()
def evaluate_model(model, criterion, dataset, opt, progress=False):
    """Predictions and metrics on ``dataset``.

    Returns (submission lines in dataset order, official metrics or None when the dataset has no
    labels, {loss name: average} (empty without labels)). Batches follow ``opt.batching``: length-
    grouped ``eval_bsz`` batches (query) or ``eval_bsz`` batches in file order (original); no exact
    re-runs (the original evaluation)."""
    model.eval()
    criterion.eval()
    batches = make_batches(dataset, opt.batching, opt.eval_bsz, opt)
    meters = defaultdict(_Meter)
    by_qid = {}
    for metas, inputs, outputs, targets in iterate_batches(
            model, dataset, batches, opt.device, num_workers=opt.num_workers, progress=progress, desc="evaluate",
            compute_neg=dataset.load_labels, exact=False, with_targets=True, leave=False):
        for line in submission_lines(metas, outputs, inputs["src_vid_mask"]):
            by_qid[line["qid"]] = line
        if targets is not None:
            loss_dict = criterion(outputs, targets)
            meters["loss_overall"].update(float(criterion.total(loss_dict)))
            for k, v in loss_dict.items():
                meters[k].update(_log_value(k, v, criterion.weight_dict))
    lines = [by_qid[r["qid"]] for r in dataset.records]
    metrics = None
    if dataset.load_labels:
        metrics = eval_submission(lines, dataset.records, verbose=False, match_number=True)
    return lines, metrics, {k: m.avg for k, m in meters.items()}


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoint_dict(model, optimizer, lr_scheduler, epoch, opt):
    """The original checkpoint layout; ``lr_scheduler`` None leaves the entry out (``model_e*`` files)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if lr_scheduler is not None:
        ckpt["lr_scheduler"] = lr_scheduler.state_dict()
    ckpt["epoch"] = int(epoch)
    ckpt["opt"] = argparse.Namespace(**vars(opt))
    return ckpt


def save_checkpoint(ckpt, path):
    """``torch.save`` atomically (never a half-written checkpoint); returns ``path``."""
    return save_torch(ckpt, path)


def _restore(model, optimizer, lr_scheduler, opt):
    """Load ``opt.resume`` (weights strictly; with ``resume_all`` optimizer, scheduler, epoch)."""
    obj = read_checkpoint(opt.resume)
    sd, _, _, _ = split_checkpoint(obj, opt.resume)
    sd, _ = normalize_state_dict(sd)
    strict_load(model, sd, opt.resume)
    if not opt.resume_all:
        return None
    missing = [k for k in ("optimizer", "lr_scheduler", "epoch") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{opt.resume}: --resume_all needs the entries {missing}, which this checkpoint lacks")
    try:
        optimizer.load_state_dict(obj["optimizer"])
        lr_scheduler.load_state_dict(obj["lr_scheduler"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{opt.resume}: optimizer state does not fit this model ({exc})") from None
    return int(obj["epoch"]) + 1


def _append_text(path, text):
    with open(path, "a") as fh:
        fh.write(text)


def _time_str():
    return time.strftime("%Y_%m_%d_%H_%M_%S")


def _loss_str(losses):
    return " ".join(f"{k} {v:.4f}" for k, v in losses.items())


# ---------------------------------------------------------------------------------------- training
class _Run:
    """What one ``train`` call holds: model, optimisation state, data, and the bookkeeping of the best epoch."""

    def __init__(self, opt, progress, log):
        self.opt, self.progress, self.log = opt, progress, log
        self.writer = None  # TensorBoard SummaryWriter (or None: logging off)
        self.train_ds, self.eval_ds = build_datasets(opt)
        self.criterion = build_criterion(opt)
        self.model = build_model(opt)
        self.model.set_batching(opt.batching)
        self.model.to(opt.device)
        self.criterion.to(opt.device)
        self.optimizer, self.lr_scheduler = build_optimizer(self.model, opt)
        self.best_score, self.es_cnt = -math.inf, 0
        self.paths = {"best": None, "latest": None, "epochs": []}
        self.latest_preds = os.path.join(opt.results_dir, f"latest_{opt.dset_name}_{opt.eval_split_name}_preds.jsonl")

    def checkpoint(self, epoch_i, suffix, scheduler=True):
        ckpt = checkpoint_dict(self.model, self.optimizer, self.lr_scheduler if scheduler else None, epoch_i, self.opt)
        return save_checkpoint(ckpt, self.opt.ckpt_filepath.replace(".ckpt", f"_{suffix}.ckpt"))

    def evaluate(self, epoch_i, entry):
        """Evaluate, write the latest predictions and log; save ``model_best`` on improvement. Returns True
        when early stopping applies."""
        opt = self.opt
        lines, metrics, eval_loss = evaluate_model(self.model, self.criterion, self.eval_ds, opt, self.progress)
        write_jsonl(self.latest_preds, lines)
        latest_files = [self.latest_preds]
        if metrics is not None:
            write_json(metrics_path_for(self.latest_preds), metrics)
            latest_files.append(metrics_path_for(self.latest_preds))
        entry["eval_loss"] = eval_loss
        entry["metrics"] = None if metrics is None else metrics["brief"]
        if self.writer is not None:  # as the original: Eval/{loss}, then Eval/{metric}, step = completed epochs
            write_scalars(self.writer, "Eval", eval_loss, epoch_i + 1)
            write_scalars(self.writer, "Eval", entry["metrics"] or {}, epoch_i + 1)
        _append_text(opt.eval_log_filepath, EVAL_LOG_FORMAT.format(
            time_str=_time_str(), epoch=epoch_i, loss_str=_loss_str(eval_loss), eval_metrics_str=json.dumps(metrics)))
        if metrics is None:
            return False
        stop = False
        score = metrics["brief"].get(BEST_METRIC, -math.inf)
        if self.paths["best"] is None or score > self.best_score:
            self.best_score, self.es_cnt = score, 0
            self.paths["best"] = self.checkpoint(epoch_i, "best")
            for src in latest_files:
                folder, name = os.path.split(src)
                os.replace(src, os.path.join(folder, name.replace("latest", "best")))
            entry["best"] = True
        else:
            self.es_cnt += 1
            stop = opt.max_es_cnt != -1 and self.es_cnt > opt.max_es_cnt
        b = metrics["brief"]
        self.log(f"epoch {epoch_i + 1}: " + ", ".join(
            f"{k} {b[k]}" for k in (BEST_METRIC, "MR-full-R1@0.5", "HL-min-VeryGood-mAP") if k in b)
            + (" (best)" if entry.get("best") else ""))
        return stop


def _tensorboard_dir(opt):
    return getattr(opt, "tensorboard_log_dir", None) or os.path.join(opt.results_dir, TENSORBOARD_DIR)


def train(opt, opt_json=None, progress=True, log=print, callbacks=None, tensorboard=True):
    """Train with the options of ``options_from_args`` (``opt``, and ``opt_json`` for ``opt.json``;
    derived from ``opt`` when None); returns a summary dict (also written to ``train_summary.json``)
    with the checkpoint paths, per-epoch losses, metrics and timings.

    ``callbacks``: objects of the ``qd_detr.callbacks`` protocol; None = those the options ask for
    (``callbacks_from_options``: the gate monitor with ``gate_monitor_every``).
    ``tensorboard``: write TensorBoard event files into ``opt.tensorboard_log_dir`` (losses, metrics, and
    whatever the callbacks add; ``qd_detr.summary_writer``); without the tensorboard package one line
    on stderr says that logging is off and training goes on. A run that does not resume first removes
    an earlier run's event files there."""
    t0 = time.time()
    resuming = bool(opt.resume_all)
    results_dir = opt.results_dir
    prepare_output_dir(results_dir, overwrite=opt.overwrite or resuming)
    set_seed(opt.seed)
    run = _Run(opt, progress, log)
    start_epoch = 0
    if opt.resume:
        restored = _restore(run.model, run.optimizer, run.lr_scheduler, opt)
        if restored is not None:
            start_epoch = restored
    if opt.start_epoch is not None:
        start_epoch = opt.start_epoch
    if opt.eval_untrained and start_epoch == 0:
        start_epoch = -1
    opt_json = opt_json_from(opt) if opt_json is None else opt_json
    write_json(os.path.join(results_dir, "opt.json"), opt_json, default=str)
    if not resuming:
        for path in (opt.train_log_filepath, opt.eval_log_filepath):
            open(path, "w").close()
        remove_event_files(_tensorboard_dir(opt))
    callbacks = callbacks_from_options(opt) if callbacks is None else list(callbacks)
    if tensorboard:
        run.writer = open_summary_writer(_tensorboard_dir(opt))
    try:
        if run.writer is not None:
            run.writer.add_text("hyperparameters", options_markdown(opt_json))
        for cb in callbacks:
            hook = getattr(cb, "set_summary_writer", None)
            if hook is not None:
                hook(run.writer)
        for cb in callbacks:
            cb.on_train_start(run.model, run.eval_ds, opt, start_epoch, resuming)
        history = _epochs(run, callbacks, start_epoch)
    finally:
        if run.writer is not None:
            run.writer.close()

    summary = {
        "results_dir": results_dir,
        "checkpoint_best": run.paths["best"],
        "checkpoint_latest": run.paths["latest"],
        "checkpoints_epoch": run.paths["epochs"],
        "best_metric": BEST_METRIC,
        "best_score": None if run.best_score == -math.inf else run.best_score,
        "n_train_queries": len(run.train_ds),
        "n_eval_queries": 0 if run.eval_ds is None else len(run.eval_ds),
        "gate_monitor": None,
        "tensorboard_log": None if run.writer is None else _tensorboard_dir(opt),
        "seconds": None,
        "history": history,
    }
    for cb in callbacks:
        summary.update(cb.summary())
    summary["seconds"] = round(time.time() - t0, 2)
    write_json(os.path.join(results_dir, "train_summary.json"), summary)
    return summary


def _epochs(run, callbacks, start_epoch):
    """The epochs from ``start_epoch`` on: train, log, evaluate, save, callbacks; returns the history."""
    opt, progress, log, writer = run.opt, run.progress, run.log, run.writer
    loader = _train_loader(run.train_ds, opt)
    history = []
    for epoch_i in tqdm(range(start_epoch, opt.n_epoch), desc="epochs", file=sys.stderr, disable=not progress,
                        unit="epoch"):
        entry = {"epoch": epoch_i}
        if epoch_i > -1:
            te = time.time()
            lr = float(run.optimizer.param_groups[0]["lr"])  # the epoch's learning rate (before the scheduler step)
            entry["train_loss"] = train_one_epoch(run.model, run.criterion, loader, run.optimizer, opt, epoch_i,
                                                  progress)
            entry["train_seconds"] = round(time.time() - te, 3)
            run.lr_scheduler.step()
            _append_text(opt.train_log_filepath, TRAIN_LOG_FORMAT.format(
                time_str=_time_str(), epoch=epoch_i + 1, loss_str=_loss_str(entry["train_loss"])))
            if writer is not None:
                writer.add_scalar("Train/lr", lr, epoch_i + 1)
                write_scalars(writer, "Train", entry["train_loss"], epoch_i + 1)
        last = epoch_i == opt.n_epoch - 1
        if (epoch_i + 1) % opt.eval_epoch == 0 or last:
            stop = run.evaluate(epoch_i, entry) if run.eval_ds is not None else False
            if epoch_i > -1 or run.eval_ds is None:
                run.paths["latest"] = run.checkpoint(epoch_i, "latest")
            if stop:
                _append_text(opt.train_log_filepath, f"Early Stop at epoch {epoch_i}")
                log(f"early stop at epoch {epoch_i + 1} (best {BEST_METRIC} {run.best_score})")
                history.append(entry)
                break
        if epoch_i > -1:
            save_interval = 10 if "subs_train" in opt.train_path else 50
            if (epoch_i + 1) % save_interval == 0 or (epoch_i + 1) % opt.lr_drop == 0:
                run.paths["epochs"].append(run.checkpoint(epoch_i, f"e{epoch_i:04d}", scheduler=False))
            for cb in callbacks:
                entry.update(cb.on_epoch_end(epoch_i, run.model, last) or {})
        if writer is not None:
            writer.flush()  # events of the epoch on disk: TensorBoard shows them while training goes on
        history.append(entry)
    return history
