"""Training callbacks: what ``qd_detr.trainer.train`` calls around its epochs.

A callback is any object with these methods (subclass ``TrainCallback`` and override what you need):

* ``on_train_start(model, eval_dataset, opt, start_epoch, resuming)``: after the model, data and
  optimizer are set up and ``opt.json`` is written, before the first epoch (``start_epoch`` -1 with
  ``--eval_untrained``, else the first 0-based epoch to train).
* ``on_epoch_end(epoch, model, last) -> dict | None``: after the 0-based epoch ``epoch`` was trained,
  evaluated and saved; ``last`` is True for the run's final epoch. A dict is merged into that
  epoch's ``history`` entry of ``train_summary.json``.
* ``summary() -> dict``: entries merged into ``train_summary.json``.
* ``set_summary_writer(writer)`` (optional): called before ``on_train_start`` with the run's
  TensorBoard ``SummaryWriter`` (``RESULTS/tensorboard_log/``), or None when TensorBoard logging is
  off; a callback may add its own summaries (step = completed epochs) and must not close it.

``callbacks_from_options(opt)`` builds the callbacks the training options ask for: with
``gate_monitor_every`` N a ``GateMonitorCallback``, which drives the analysis package's gate
monitor (found by name, ``qd_detr.extensions.GATE_MONITOR``; ``qd_detr`` never imports it).
"""
import os

from .extensions import GATE_MONITOR, load_extension

__all__ = ["TrainCallback", "GateMonitorCallback", "callbacks_from_options"]


class TrainCallback:
    """No-op base of the callback protocol (see the module docstring)."""

    def on_train_start(self, model, eval_dataset, opt, start_epoch, resuming):
        pass

    def on_epoch_end(self, epoch, model, last):
        return None

    def summary(self):
        return {}

    def set_summary_writer(self, writer):
        pass


class GateMonitorCallback(TrainCallback):
    """Capture the fusion gates of fixed validation queries during training.

    ``results_dir/gate_monitor/epoch_{n}/`` (``n`` completed epochs; 0 = untrained, captured when the
    run starts from scratch) every ``every`` epochs and after the last epoch, plus the evolution table
    and figures (``gate_analysis.monitor.GateMonitor``). ``qids``: the validation qids to track, else
    the first ``n``; ``batch_size``: queries per capture batch; ``plots``: per-epoch figures.
    ``monitor_class``: the monitor to drive (default: the one ``GATE_MONITOR`` names, imported when
    training starts). With a TensorBoard writer (``set_summary_writer``) every capture also goes to
    TensorBoard (the monitor's ``writer``: gate histograms and statistics at step ``n``).
    """

    def __init__(self, out_dir, every, qids=None, n=16, batch_size=32, plots=True, monitor_class=None):
        self.out_dir = out_dir
        self.every = int(every)
        self.qids, self.n, self.batch_size, self.plots = qids, n, batch_size, plots
        self.monitor_class = monitor_class
        self.monitor = None
        self.writer = None

    def set_summary_writer(self, writer):
        self.writer = writer

    def on_train_start(self, model, eval_dataset, opt, start_epoch, resuming):
        cls = self.monitor_class or load_extension(GATE_MONITOR, "--gate_monitor_every")
        extra = {} if self.writer is None else {"writer": self.writer}
        self.monitor = cls.from_dataset(model, eval_dataset, self.out_dir, every=self.every, qids=self.qids,
                                        n=self.n, batch_size=self.batch_size, plots=self.plots,
                                        overwrite=not resuming, resume=resuming, **extra)
        if start_epoch <= 0:
            self.monitor.capture(0)

    def on_epoch_end(self, epoch, model, last):
        captured = self.monitor.step(epoch)
        if captured is None and last and not self.monitor.due(epoch):
            captured = self.monitor.capture(epoch + 1)
        return None if captured is None else {"gate_monitor": captured["dir"]}

    def summary(self):
        return {"gate_monitor": None if self.monitor is None else self.monitor.out_dir}


def callbacks_from_options(opt):
    """The callbacks training options ask for: ``[GateMonitorCallback]`` with ``gate_monitor_every``, else []."""
    if not getattr(opt, "gate_monitor_every", 0):
        return []
    return [GateMonitorCallback(os.path.join(opt.results_dir, "gate_monitor"), opt.gate_monitor_every,
                                qids=opt.gate_monitor_qids, n=opt.gate_monitor_n, batch_size=opt.eval_bsz,
                                plots=not opt.gate_monitor_no_plots)]
