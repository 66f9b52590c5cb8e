"""Train QD-DETR (optionally with audio fusion) on QVHighlights-format data.

    python -m qd_detr.train --train_path train.jsonl --eval_path val.jsonl \
        --v_feat_dirs slowfast_features clip_features --t_feat_dir clip_text_features \
        --a_feat_dir pann_features --v_feat_dim 2816 --t_feat_dim 512 --a_feat_dim 2050 \
        --results_dir results/run1 --use_avigate_custom --gating_type clipwise \
        [--gate_monitor_every 5]

Option names and defaults are the original ``qd_detr/config.py`` ones (``DEFAULT_OPTIONS``);
``--v_feat_dim`` is given without the 2 temporal endpoint features (TEF), ``--a_feat_dim`` with them,
exactly as in the original scripts. The training recipe is the original one: AdamW (``lr``, ``wd``),
StepLR every ``lr_drop`` epochs, gradient clipping at ``grad_clip``, Hungarian matching and the
``SetCriterion`` losses (``qd_detr.losses``), evaluation every ``eval_epoch`` (5) epochs with the
official metrics, best model chosen on ``MR-full-mAP``.

Outputs in ``--results_dir`` (original names and formats):
- ``opt.json``: the options with ``v_feat_dim`` *without* the +2 (as the original ``display_save``);
- ``model_best.ckpt`` / ``model_latest.ckpt``: ``{model, optimizer, lr_scheduler, epoch, opt}``,
  ``epoch`` 0-based, ``opt`` an ``argparse.Namespace`` with the final dims (``v_feat_dim`` + 2 with
  TEF) and ``device`` a ``torch.device``; ``model_e{epoch:04d}.ckpt`` every 50 epochs (10 when the
  train path contains "subs_train") and at each ``lr_drop``, without ``lr_scheduler``;
- ``train.log.txt`` / ``eval.log.txt`` (original line formats), ``latest_hl_val_preds.jsonl`` and
  ``..._metrics.json`` (renamed to ``best_...`` when the model improves), ``train_summary.json``;
- ``tensorboard_log/``: TensorBoard event files (when the tensorboard package is installed; off with
  ``--no_tensorboard``) with the original tags, step = completed epochs: ``Train/lr``,
  ``Train/{loss}``, ``Eval/{loss}``, ``Eval/{metric}`` and the text ``hyperparameters``
  (``qd_detr.summary_writer``);
- with ``--gate_monitor_every N``: ``gate_monitor/epoch_{n}/`` gate analyses (``n`` = completed
  epochs, 0 = untrained), ``gate_monitor/gate_evolution.csv`` and evolution plots
  (``gate_analysis.monitor``, driven through
  ``qd_detr.callbacks.GateMonitorCallback``), and in ``tensorboard_log/`` at step ``n`` one histogram
  per gate (``gates/layers.{l}.gate_{kind}``) and its clip-weighted statistics
  (``gates/layers.{l}.gate_{kind}/mean``, ...; ``gate_analysis.tensorboard_log``).

Deviations from the original, each because the original cannot run here or to make runs usable:
the device defaults to ``auto`` (``--device`` also takes ``cpu``, ``cuda[:N]`` and the original
integers, -1 = cpu); ``--num_workers`` defaults to 0 (reproducible label sampling); no code copies
or ``code.zip``; TensorBoard is optional (without it training runs and says once that logging is off); the last epoch is always evaluated and saved; without ``--eval_path``
``model_latest.ckpt`` is still written at every evaluation interval; ``--batching query`` (default)
trains with padding-aware gate pooling and attention masks, ``--batching original`` with the
original batch-dependent behaviour; NMS (``--nms_thd``) and ``span_loss_type ce`` are not supported.
Runs are deterministic for a given ``--seed`` on CPU.

Modules: ``qd_detr.train_options`` (the parser and the saved options), ``qd_detr.trainer`` (the loop),
``qd_detr.callbacks`` (per-epoch hooks such as the gate monitor), ``qd_detr.summary_writer``
(TensorBoard), ``qd_detr.demo_model`` (the demo model). Their public names are importable from here too.
"""
import os

from .callbacks import GateMonitorCallback, TrainCallback, callbacks_from_options
from .cli import exit_process, run_main
from .demo_model import (
    DEMO_DATA_ARGS,
    DEMO_OPTIONS,
    demo_gate_structure,
    gate_structure,
    signal_clips,
    train_demo_model,
)
from .train_options import EVAL_LOG_FORMAT, TRAIN_LOG_FORMAT, get_args_parser, opt_json_from, options_from_args
from .trainer import (
    build_datasets,
    build_optimizer,
    checkpoint_dict,
    evaluate_model,
    save_checkpoint,
    set_seed,
    train,
    train_one_epoch,
)

__all__ = ["main",
           # re-exported from qd_detr.train_options, .trainer, .callbacks and .demo_model (their homes)
           "get_args_parser", "options_from_args", "opt_json_from", "build_datasets", "build_optimizer", "set_seed",
           "train_one_epoch", "evaluate_model", "checkpoint_dict", "save_checkpoint", "train", "train_demo_model",
           "demo_gate_structure", "gate_structure", "signal_clips", "DEMO_DATA_ARGS", "DEMO_OPTIONS",
           "TRAIN_LOG_FORMAT", "EVAL_LOG_FORMAT", "TrainCallback", "GateMonitorCallback", "callbacks_from_options"]


def main(argv=None):
    """``python -m qd_detr.train``: parse, train (with the callbacks the options ask for), print where
    the checkpoint, the gate evolution and the TensorBoard logs are."""
    args = get_args_parser().parse_args(argv)
    opt, opt_json = options_from_args(args)
    summary = train(opt, opt_json, progress=not args.quiet, tensorboard=not args.no_tensorboard)
    ckpt = summary["checkpoint_best"] or summary["checkpoint_latest"]
    print(f"trained {len(summary['history'])} epochs in {summary['seconds']} s; checkpoint: {ckpt}")
    if summary["gate_monitor"]:
        print(f"gate evolution: {os.path.join(summary['gate_monitor'], 'gate_evolution.csv')}")
    if summary["tensorboard_log"]:
        print(f"TensorBoard: tensorboard --logdir {summary['tensorboard_log']}")
    return 0


if __name__ == "__main__":
    exit_process(run_main(main))
