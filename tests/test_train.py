"""Training: Hungarian matching, each loss term on hand-checkable cases, loss reduction, checkpoint
format (loadable by our strict loader and by the original loading rules), CLI and determinism."""
import argparse
import json
import math

import pandas as pd
import pytest
import torch

from conftest import SMALL_DIMS, demo_split_dataset, demo_train_args, run_python, small_options
from qd_detr.callbacks import TrainCallback
from qd_detr.checkpoint import load_checkpoint
from qd_detr.cli import run_main
from qd_detr.config import ARCH_OPTIONS, options_from_opt_json
from qd_detr.dataset import collate
from qd_detr.errors import ConfigError
from qd_detr.losses import SetCriterion, build_criterion, build_weight_dict, saliency_loss_terms
from qd_detr.matcher import HungarianMatcher
from qd_detr.model import build_model
from qd_detr.train import (
    build_optimizer,
    get_args_parser,
    main,
    opt_json_from,
    options_from_args,
    train,
    train_one_epoch,
)

V_RAW = SMALL_DIMS["slowfast_dim"] + SMALL_DIMS["clip_dim"]


def _logits_for(probs):
    """[B, nq, 2] logits whose softmax foreground probability is ``probs`` [B, nq]."""
    p = torch.tensor(probs, dtype=torch.float32)
    return torch.stack([torch.log(p), torch.log1p(-p)], dim=-1)


def _targets(*span_lists):
    return {"span_labels": [{"spans": torch.tensor(s, dtype=torch.float32).reshape(-1, 2)} for s in span_lists]}


# ------------------------------------------------------------------------------------------ matcher
def test_matcher_l1_cost_matrix_and_optimal_not_greedy_assignment():
    # centres only differ; widths equal. q0 is nearest to t0, but the optimum gives t0 to q1.
    outputs = {"pred_spans": torch.tensor([[[0.55, 0.1], [0.45, 0.1], [0.05, 0.1]]]),
               "pred_logits": torch.zeros(1, 3, 2)}
    targets = _targets([[0.5, 0.1], [0.9, 0.1]])
    m = HungarianMatcher(cost_class=0, cost_span=1, cost_giou=0)
    (cost,) = m.cost_matrices(outputs, targets)
    expected = torch.tensor([[0.05, 0.35], [0.05, 0.45], [0.45, 0.85]])
    assert torch.allclose(cost, expected, atol=1e-6)
    (rows, cols), = m(outputs, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]  # total 0.40 < greedy 0.50
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64


def test_matcher_full_cost_by_hand_and_per_element_split():
    spans = torch.tensor([[[0.5, 0.2], [0.2, 0.2]], [[0.3, 0.2], [0.8, 0.2]]])
    outputs = {"pred_spans": spans, "pred_logits": _logits_for([[0.9, 0.2], [0.5, 0.7]])}
    targets = _targets([[0.5, 0.4]], [[0.8, 0.2], [0.3, 0.2]])
    m = HungarianMatcher(cost_class=4, cost_span=10, cost_giou=1)
    c0, c1 = m.cost_matrices(outputs, targets)
    assert c0.shape == (2, 1) and c1.shape == (2, 2)
    # element 0, query 0: L1 = 0 + 0.2; pred [0.4, 0.6] in tgt [0.3, 0.7]: IoU 0.5, enclosing = union -> GIoU 0.5
    assert c0[0, 0].item() == pytest.approx(10 * 0.2 - 1 * 0.5 - 4 * 0.9, abs=1e-5)
    # element 0, query 1: pred [0.1, 0.3] vs [0.3, 0.7]: touching, IoU 0, enclosing 0.6, union 0.6 -> GIoU 0
    assert c0[1, 0].item() == pytest.approx(10 * (0.3 + 0.2) - 0.0 - 4 * 0.2, abs=1e-5)
    # element 1: identical spans cost GIoU -1 and L1 0
    assert c1[1, 0].item() == pytest.approx(-1 - 4 * 0.7, abs=1e-5)
    (r0, t0), (r1, t1) = m(outputs, targets)
    assert (r0.tolist(), t0.tolist()) == ([0], [0])
    assert (r1.tolist(), t1.tolist()) == ([0, 1], [1, 0])  # target indices are local to the element


def test_matcher_rejects_all_zero_costs_and_nan():
    with pytest.raises(ConfigError):
        HungarianMatcher(0, 0, 0)
    m = HungarianMatcher(1, 1, 1)
    outputs = {"pred_spans": torch.tensor([[[float("nan"), 0.1]]]), "pred_logits": torch.zeros(1, 1, 2)}
    with pytest.raises(ValueError, match="NaN"):
        m(outputs, _targets([[0.5, 0.1]]))


# ------------------------------------------------------------------------------------------ losses
def _criterion(**kw):
    weights = {"loss_span": 10, "loss_giou": 1, "loss_label": 4, "loss_saliency": 1}
    return SetCriterion(HungarianMatcher(4, 10, 1), weights, **kw)


def test_span_and_giou_losses_by_hand():
    crit = _criterion()
    outputs = {"pred_spans": torch.tensor([[[0.9, 0.1], [0.5, 0.2]]])}
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    out = crit.loss_spans(outputs, _targets([[0.5, 0.4]]), indices)
    assert out["loss_span"].item() == pytest.approx((0.0 + 0.2) / 2)  # mean over the 2 coordinates
    assert out["loss_giou"].item() == pytest.approx(1 - 0.5)


def test_label_loss_uses_eos_weight_and_plain_mean():
    crit = _criterion(eos_coef=0.1)
    outputs = {"pred_logits": torch.zeros(1, 2, 2)}
    out = crit.loss_labels(outputs, None, [(torch.tensor([0]), torch.tensor([0]))])
    # matched query: CE log 2 with weight 1; unmatched: log 2 with weight 0.1; mean over the 2 queries
    assert out["loss_label"].item() == pytest.approx((1 + 0.1) * math.log(2) / 2, rel=1e-6)
    logits = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    out = crit.loss_labels({"pred_logits": logits}, None, [(torch.tensor([1]), torch.tensor([0]))])
    assert out["class_error"].item() == pytest.approx(100.0)  # the matched query predicts background


def test_saliency_terms_by_hand_and_padding_ignored():
    scores = torch.tensor([[1.0, 0.0, 0.5, -1.0]])
    mask = torch.ones(1, 4)
    pos, neg = torch.tensor([[1, 2]]), torch.tensor([[0, 3]])
    labels = torch.zeros(1, 4)
    parts = saliency_loss_terms(scores, torch.zeros(1, 4), mask, pos, neg, labels, margin=0.2)
    # pairs: max(0, 0.2 + 1 - 0) = 1.2 and max(0, 0.2 - 1 - 0.5) = 0 -> 1.2 / 2 * 2
    assert parts["margin"].item() == pytest.approx(1.2)
    assert parts["neg_pair"].item() == pytest.approx(4 * math.log(2))  # -log(1 - sigmoid(0)) per valid clip
    assert parts["rank_contrastive"].item() == 0.0  # no clip labelled >= 1

    # rank contrastive: clip 0 labelled 12 (positive at every level 1..11), all scores 0 over 2 + 2 clips
    zeros2 = torch.zeros(1, 2)
    parts = saliency_loss_terms(zeros2, zeros2, torch.ones(1, 2), torch.tensor([[0, 0]]), torch.tensor([[1, 1]]),
                                torch.tensor([[12.0, 0.0]]), margin=0.2)
    assert parts["rank_contrastive"].item() == pytest.approx(11 / 12 * math.log(4), rel=1e-5)
    # a padded third clip with a huge score (own and negative pass) changes nothing
    padded = saliency_loss_terms(torch.tensor([[0.0, 0.0, 50.0]]), torch.tensor([[0.0, 0.0, 50.0]]),
                                 torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0, 0]]), torch.tensor([[1, 1]]),
                                 torch.tensor([[12.0, 0.0]]), margin=0.2)
    for key in ("rank_contrastive", "neg_pair", "margin"):
        assert padded[key].item() == pytest.approx(parts[key].item(), rel=1e-5)
    # labels longer than the clips (the original's ctx_l + 1 corner case) are cut
    longer = saliency_loss_terms(zeros2, zeros2, torch.ones(1, 2), torch.tensor([[0, 0]]), torch.tensor([[1, 1]]),
                                 torch.tensor([[12.0, 0.0, 5.0]]), margin=0.2)
    assert longer["rank_contrastive"].item() == pytest.approx(parts["rank_contrastive"].item())


def test_criterion_keys_weights_and_total():
    opt = small_options(dec_layers=3)
    weights = build_weight_dict(opt)
    assert weights["loss_span_1"] == opt.span_loss_coef and "loss_saliency_0" not in weights
    assert set(weights) == {f"{k}{s}" for k in ("loss_span", "loss_giou", "loss_label")
                            for s in ("", "_0", "_1")} | {"loss_saliency"}
    crit = build_criterion(opt)
    torch.manual_seed(0)
    model = build_model(opt).eval()
    b, length = 3, 6
    inputs = dict(src_txt=torch.randn(b, 4, opt.t_feat_dim), src_txt_mask=torch.ones(b, 4),
                  src_vid=torch.randn(b, length, opt.v_feat_dim), src_vid_mask=torch.ones(b, length),
                  src_aud=torch.rand(b, length, opt.a_feat_dim), src_aud_mask=torch.ones(b, length))
    targets = _targets([[0.3, 0.2]], [[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.1]])
    targets.update(saliency_pos_labels=torch.tensor([[1, 2]] * b), saliency_neg_labels=torch.tensor([[4, 5]] * b),
                   saliency_all_labels=torch.tensor([[0, 8, 12, 0, 0, 0]] * b, dtype=torch.float32))
    with torch.no_grad():
        losses = crit(model(**inputs), targets)
    assert set(weights) <= set(losses)
    expected = sum(losses[k] * w for k, w in weights.items())
    assert crit.total(losses).item() == pytest.approx(expected.item())
    assert losses["loss_saliency"].item() == pytest.approx(
        sum(losses[f"saliency_{k}"].item() for k in ("margin", "rank_contrastive", "neg_pair")), rel=1e-6)


# ------------------------------------------------------------------------------------------ training
def test_training_steps_reduce_loss_on_a_fixed_batch(demo_data):
    root, _ = demo_data
    opt = small_options(lr=1e-4)
    torch.manual_seed(0)
    model = build_model(opt)
    crit = build_criterion(opt)
    optimizer, _ = build_optimizer(model, opt)
    ds = demo_split_dataset(root, "train", load_labels=True, training=True, seed=0)
    batch = collate([ds[i] for i in range(6)])

    def loss_on_batch():
        model.eval()
        inputs = dict(batch[1])
        targets = inputs.pop("targets")
        with torch.no_grad():
            return crit.total(crit(model(**inputs), targets)).item()

    before = loss_on_batch()
    opt.device = torch.device("cpu")
    opt.pin_memory = False
    logged = [train_one_epoch(model, crit, [batch], optimizer, opt)["loss_overall"] for _ in range(8)]
    after = loss_on_batch()
    print(f"fixed-batch loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before
    assert logged[-1] < logged[0]


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory):
    root, paths = demo_data
    results = tmp_path_factory.mktemp("train_run") / "run"
    code = run_main(main, demo_train_args(root, results, "--n_epoch", "2", "--eval_epoch", "1", "--lr_drop", "2",
                                    "--gate_monitor_every", "1", "--gate_monitor_n", "5", "--gate_monitor_no_plots"))
    assert code == 0
    return results, paths


def test_checkpoint_format_and_opt_json(trained_run):
    results, _ = trained_run
    for name in ("opt.json", "model_best.ckpt", "model_latest.ckpt", "model_e0001.ckpt", "train.log.txt",
                 "eval.log.txt", "best_hl_val_preds.jsonl", "train_summary.json"):
        assert (results / name).is_file(), name
    ckpt = torch.load(results / "model_latest.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch", "opt"}
    assert ckpt["epoch"] == 1
    assert set(torch.load(results / "model_e0001.ckpt", weights_only=False)) == {"model", "optimizer", "epoch", "opt"}
    opt = ckpt["opt"]
    assert type(opt) is argparse.Namespace and opt.device == torch.device("cpu")
    saved = json.loads((results / "opt.json").read_text())
    assert saved["v_feat_dim"] == V_RAW and opt.v_feat_dim == V_RAW + 2 and opt.a_feat_dim == saved["a_feat_dim"]
    assert saved["device"] == -1
    derived = opt_json_from(opt)  # what train() writes when called without the CLI's opt.json dict
    assert all(derived[k] == v for k, v in saved.items())
    lines = (results / "train.log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[1].split(" [Epoch] ")[1].startswith("002 [Loss] loss_overall")
    # optimizer and scheduler states restore into fresh ones (--resume_all)
    model = build_model(opt)
    optimizer, scheduler = build_optimizer(model, opt)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(opt.lr * 0.1)


def test_checkpoint_loads_strictly_in_our_loader_and_by_the_original_rules(trained_run):
    results, _ = trained_run
    path = results / "model_best.ckpt"
    model, opt, report = load_checkpoint(path)
    assert report["keys"]["missing"] == 0 and report["gating_type"] == "clipwise"
    assert report["fusion_n_heads"] == 4 and report["options_source"] == "checkpoint['opt']"
    # original rules: architecture from opt.json (v_feat_dim + 2), torch.load with only Namespace allowed
    json_opt = options_from_opt_json(results / "opt.json")
    ckpt_opt = torch.load(path, weights_only=False)["opt"]
    for key in ARCH_OPTIONS:  # v2 and ssm options are absent from a v1 run's options, in both
        assert getattr(json_opt, key, None) == getattr(ckpt_opt, key, None), key
    rebuilt = build_model(json_opt)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key]), key


def test_gate_monitor_outputs_of_training(trained_run):
    results, paths = trained_run
    mon = results / "gate_monitor"
    assert sorted(p.name for p in mon.iterdir() if p.is_dir()) == ["epoch_0", "epoch_1", "epoch_2"]
    evo = pd.read_csv(mon / "gate_evolution.csv")
    assert list(evo.columns) == ["epoch", "qid", "layer", "gate", "name", "mean", "std", "min", "max", "n_values"]
    qids = paths["qids"]["val"][:5]
    assert len(evo) == 3 * 5 * 2 * 2
    assert sorted(evo["qid"].unique()) == sorted(qids)
    assert set(evo.groupby(["epoch", "qid", "layer", "gate"]).size()) == {1}
    assert (mon / "evolution_layers.png").is_file() and (mon / "evolution_queries.png").is_file()
    assert not (mon / "epoch_1" / "plots").exists()  # --gate_monitor_no_plots
    # gates change with training
    pivot = evo.pivot_table(index=["qid", "layer", "gate"], columns="epoch", values="mean")
    assert (pivot[0] - pivot[2]).abs().max() > 1e-4


def test_training_is_deterministic_for_a_seed(demo_data, tmp_path):
    root, _ = demo_data
    states = []
    for name in ("a", "b"):
        args = demo_train_args(root, tmp_path / name, "--n_epoch", "1", "--eval_epoch", "5")
        args[args.index("--eval_path"):args.index("--eval_path") + 2] = []
        assert run_main(main, args) == 0
        states.append(torch.load(tmp_path / name / "model_latest.ckpt", weights_only=False)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("change, message", [
    (("--a_feat_dim", None), "--a_feat_dir given without --a_feat_dim"),
    (("--nms_thd", "0.7"), "NMS is not implemented"),
    (("--train_path", "/nonexistent/train.jsonl"), "annotation file not found"),
    (("--v_feat_dim", "99"), "video features have dim"),
    (("--gating_type", "global", "--eval_path", None, "--gate_monitor_every", "1"), "pass --eval_path"),
])
def test_cli_bad_input_is_one_line_exit_2(demo_data, tmp_path, capsys, change, message):
    root, _ = demo_data
    args = demo_train_args(root, tmp_path / "out", "--n_epoch", "1")
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            i = args.index(flag)
            args[i:i + 2] = [] if value is None else [flag, value]
        else:
            args += [flag, value]
    assert run_main(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_resume_all_continues_after_the_saved_epoch(trained_run, tmp_path):
    results, paths = trained_run
    root = paths["root"]
    out = tmp_path / "resumed"
    args = demo_train_args(root, out, "--n_epoch", "3", "--eval_epoch", "5", "--lr_drop", "2",
                     "--resume", str(results / "model_latest.ckpt"), "--resume_all")
    assert run_main(main, args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [2]
    ckpt = torch.load(out / "model_latest.ckpt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["lr_scheduler"]["last_epoch"] == 3


# ------------------------------------------------------------------------------------------ package boundary
def test_qd_detr_never_imports_the_analysis_package():
    """Every qd_detr module imports without gate_analysis (it is reached by name only, qd_detr.extensions)."""
    code = ("import importlib, pkgutil, sys, qd_detr\n"
            "for m in pkgutil.iter_modules(qd_detr.__path__):\n"
            "    importlib.import_module('qd_detr.' + m.name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'gate_analysis')\n"
            "assert not bad, bad\n")
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr


def test_train_calls_its_callbacks_and_records_what_they_return(demo_data, tmp_path):
    root, _ = demo_data
    calls = []

    class Spy(TrainCallback):
        def on_train_start(self, model, eval_dataset, opt, start_epoch, resuming):
            calls.append(("start", start_epoch, resuming, len(eval_dataset)))

        def on_epoch_end(self, epoch, model, last):
            calls.append(("epoch", epoch, last, model.training))
            return {"spy": epoch}

        def summary(self):
            return {"spy_calls": len(calls)}

    args = demo_train_args(root, tmp_path / "run", "--n_epoch", "2", "--eval_epoch", "1", "--gate_monitor_every", "1")
    opt, opt_json = options_from_args(get_args_parser().parse_args(args))
    summary = train(opt, opt_json, progress=False, log=lambda *a: None, callbacks=[Spy()])  # replaces the monitor
    assert [c[:3] for c in calls] == [("start", 0, False), ("epoch", 0, False), ("epoch", 1, True)]
    assert [h["spy"] for h in summary["history"]] == [0, 1] and summary["spy_calls"] == 3
    assert summary["gate_monitor"] is None and not (tmp_path / "run" / "gate_monitor").exists()
