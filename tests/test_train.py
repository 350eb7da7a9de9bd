"""Training, evaluation, checkpoints and FLOPs on the tiny corpus with the tiny preset."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.cli import main as mmid
from engine.features import Tokenizer, collate
from training.dataset import PreparedDataset, read_split
from engine.model import late_fusion
from training.fusion_fit import fit_fusion_logits, refit
from training.metrics import confusion, macro_f1


def _json_out(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert mmid(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse"])
def test_tiny_preset_reaches_90_percent(name, tiny_runs, prepared_tiny, capsys):
    summary = _json_out(capsys, ["evaluate", "--run", str(tiny_runs[name]), "--data", str(prepared_tiny), "--json"])
    assert summary["n"] == len(read_split(prepared_tiny, "dialog", "test"))
    assert summary["accuracy"] >= 0.9, summary
    assert set(summary["per_modality"]) == {"text", "audio", "visual"}
    assert 0.0 <= summary["macro_f1"] <= 1.0
    assert (tiny_runs[name] / "confusion_test.png").stat().st_size > 0
    assert (tiny_runs[name] / "training_curves.png").stat().st_size > 0
    rows = [json.loads(x) for x in (tiny_runs[name] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    # early stopping (select_on = "fitted", early_stop = "f1"): each epoch is scored by its
    # validation macro-F1 with the fusion refitted; the run ends `patience` epochs after the
    # score last rose, or at `epochs`; the kept checkpoint is the best score, the lower
    # (refitted) validation loss among equals
    train_cfg = load_config(None).train
    assert (train_cfg.select_on, train_cfg.early_stop) == ("fitted", "f1")
    best, last_higher = -1.0, 0
    for r in rows:
        if r["valid_macro_f1_fitted"] > best:
            best, last_higher = r["valid_macro_f1_fitted"], r["epoch"]
    assert len(rows) == min(train_cfg.epochs, last_higher + train_cfg.patience)
    kept = max(rows, key=lambda r: (r["valid_macro_f1_fitted"], -r["valid_loss_fitted"]))
    assert json.loads((tiny_runs[name] / "train_summary.json").read_text())["best_epoch"] == kept["epoch"]


def test_checkpoint_is_pickle_free_and_round_trips(tiny_runs, prepared_tiny, monkeypatch):
    run = tiny_runs["mme2e_sparse"]
    assert not any(p.suffix in {".pt", ".pth", ".pkl", ".bin"} for p in run.rglob("*"))
    with safe_open(str(run / "model.safetensors"), framework="pt") as fh:
        assert len(list(fh.keys())) > 10
    model_a, meta = load_checkpoint(run)
    # Loading must never unpickle anything.
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickling during load"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickling during load"))
    model_b, _ = load_checkpoint(run)
    tok = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ds = PreparedDataset(prepared_tiny, read_split(prepared_tiny, "dialog", "test")[:6], tok, meta.features,
                         list(meta.persons))
    batch = collate([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        a, b = model_a(*batch.model_inputs()), model_b(*batch.model_inputs())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.embedding, b.embedding)


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_resume_continues_where_it_stopped(prepared_tiny, tmp_path, ema):
    base = ["train", "--data", str(prepared_tiny), "--model", "mme2e", "--preset", "tiny", "--set", f"train.ema_decay={ema}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert mmid(base + ["--out", str(straight), "--epochs", "3"]) == 0
    assert mmid(base + ["--out", str(resumed), "--epochs", "2"]) == 0
    assert mmid(base + ["--out", str(resumed), "--epochs", "3", "--resume"]) == 0
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5, abs=1e-6)
        assert ra["valid_macro_f1"] == pytest.approx(rb["valid_macro_f1"])
    names = ["model.safetensors"] + (["ema.safetensors"] if ema != "0" else [])
    for name in names:
        with safe_open(str(straight / "last" / name), framework="pt") as fa, \
                safe_open(str(resumed / "last" / name), framework="pt") as fb:
            for key in fa.keys():
                assert torch.allclose(fa.get_tensor(key).float(), fb.get_tensor(key).float(), atol=1e-5), key
    if ema != "0":  # the average differs from the trained weights, and it is what is kept
        best = json.loads((straight / "train_summary.json").read_text())["best_epoch"]
        with safe_open(str(straight / "model.safetensors"), framework="pt") as fk, \
                safe_open(str(straight / "last" / "ema.safetensors"), framework="pt") as fe, \
                safe_open(str(straight / "last" / "model.safetensors"), framework="pt") as fl:
            assert any(not torch.equal(fe.get_tensor(k), fl.get_tensor(k)) for k in fe.keys())
            if best == 3:
                assert all(torch.equal(fk.get_tensor(k), fe.get_tensor(k)) for k in fk.keys() if k != "fusion")


def test_flops_sparse_executes_less_feature_work(tiny_runs, prepared_tiny, capsys):
    dense = _json_out(capsys, ["flops", "--run", str(tiny_runs["mme2e"]), "--data", str(prepared_tiny),
                               "--limit", "8", "--json"])
    sparse = _json_out(capsys, ["flops", "--run", str(tiny_runs["mme2e_sparse"]), "--data", str(prepared_tiny),
                                "--limit", "8", "--json"])
    assert dense["feature_extraction_flops"] > 0 and dense["total_flops"] >= dense["feature_extraction_flops"]
    assert dense["active_fraction"] == {}
    assert set(sparse["active_fraction"]) == {"audio", "visual"}
    for fractions in sparse["active_fraction"].values():
        assert all(0.0 < f < 1.0 for f in fractions)
    assert sparse["feature_extraction_flops"] < dense["feature_extraction_flops"]


def test_fusion_fit_trusts_the_branch_that_holds_on_validation():
    # Hand-made validation logits: the text branch is confident and always names person 0
    # (a memorised transcript); audio is right but weak; visual is right on 7 of 10.
    n, persons = 10, 4
    labels = torch.arange(n) % persons
    onehot = torch.nn.functional.one_hot(labels, persons).float()
    text = torch.zeros(n, persons)
    text[:, 0] = 8.0
    audio = 1.5 * onehot
    visual = 3.0 * onehot
    visual[7:] = 3.0 * torch.nn.functional.one_hot((labels[7:] + 1) % persons, persons).float()
    logits = torch.stack([text, audio, visual], dim=1)  # (N, 3, P)
    present = torch.ones(n, 3, dtype=torch.bool)
    uniform = torch.zeros(3)
    assert (late_fusion(uniform, logits, present).argmax(1) == labels).float().mean() < 0.6
    w = fit_fusion_logits(logits, present, labels, uniform, l2=0.01)
    weights = w.softmax(0)
    assert weights[0] < weights[1] and weights[0] < weights[2], weights
    assert (late_fusion(w, logits, present).argmax(1) == labels).all()
    # the fusion rule masks an absent modality: text alone present -> text's logits, whatever w is
    text_only = torch.tensor([[True, False, False]]).expand(n, 3)
    assert torch.allclose(late_fusion(w, logits, text_only), text)


def test_kept_checkpoint_carries_the_fitted_fusion_weights(tiny_runs):
    for run in tiny_runs.values():
        fit = json.loads((run / "train_summary.json").read_text())["fusion_fit"]
        with safe_open(str(run / "model.safetensors"), framework="pt") as fh:
            kept = fh.get_tensor("fusion").float().softmax(0)
        assert kept.tolist() == pytest.approx([fit["weights_after"][m] for m in ("text", "audio", "visual")], abs=1e-3)
        assert fit["valid_accuracy_after"] >= fit["valid_accuracy_before"], fit


def test_fusion_fit_sees_windows_with_a_modality_missing():
    from training.fusion_fit import with_missing

    logits = torch.randn(4, 3, 5)
    present = torch.tensor([[True, True, True], [False, True, True], [True, False, False], [True, True, False]])
    labels = torch.arange(4)
    L, P, Y = with_missing(logits, present, labels)
    # window 0 three times more (one modality hidden each), windows 1 and 3 twice more, window 2 (text only) never
    assert len(Y) == 4 + 3 + 2 + 2 and Y[:4].tolist() == [0, 1, 2, 3]
    assert sorted(Y[4:].tolist()) == [0, 0, 0, 1, 1, 3, 3]
    assert (P[4:].sum(1) == present[Y[4:]].sum(1) - 1).all() and (P.sum(1) >= 1).all()
    assert all(torch.equal(L[i], logits[Y[i]]) for i in range(len(Y)))


def test_fusion_refit_that_loses_validation_accuracy_is_discarded():
    """Visual is right on every window by a small margin; text is right on nine by a
    large margin and wrong on one by as much. The loss-minimising refit leans on text
    and misclassifies that window: it must be discarded, the old weights kept."""
    labels = torch.zeros(10, dtype=torch.long)
    logits = torch.zeros(10, 3, 2)  # (windows, text/audio/visual, persons)
    logits[:, 2, 0] = 0.3
    logits[:9, 0, 0] = 6.0
    logits[9, 0, 1] = 6.0
    present = torch.ones(10, 3, dtype=torch.bool)
    old = torch.tensor([-4.0, -4.0, 4.0])
    assert (late_fusion(fit_fusion_logits(logits, present, labels, old, 0.01), logits, present).argmax(1) == labels).float().mean() < 1.0
    kept, report = refit(logits, present, labels, old, 0.01)
    assert torch.equal(kept, old) and not report.applied
    assert report.after == report.before and report.valid_accuracy_after == report.valid_accuracy_before == 1.0


def test_sparse_entropy_weights_per_modality():
    from training.train import sparse_entropy_weights

    cfg = lambda *o: load_config(None, list(o))  # noqa: E731
    assert sparse_entropy_weights(cfg(), "tiny") == {"visual": 0.0, "audio": 0.0}
    assert sparse_entropy_weights(cfg(), "default") == {"visual": 0.5, "audio": 0.2}
    assert sparse_entropy_weights(cfg("train.sparse_entropy_weight=1"), "paper") == {"visual": 1.0, "audio": 1.0}
    assert sparse_entropy_weights(cfg("train.sparse_entropy_weight_audio=0"), "paper") == {"visual": 0.5, "audio": 0.0}


def test_learning_rate_warms_up_then_holds_or_follows_a_cosine():
    from training.train import learning_rate_scale

    cfg = lambda *o: load_config(None, ["train.warmup_steps=10", *o])  # noqa: E731
    flat, cosine = cfg(), cfg('train.lr_decay="cosine"', "train.lr_min_ratio=0.1")
    assert [learning_rate_scale(flat, s, 100) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate_scale(flat, 99, 100) == 1.0
    assert learning_rate_scale(cosine, 4, 100) == pytest.approx(0.5)  # warm-up is the same
    scales = [learning_rate_scale(cosine, s, 100) for s in range(10, 100)]
    assert scales[0] == pytest.approx(1.0) and scales[-1] == pytest.approx(0.1)
    assert scales[44] == pytest.approx(0.55, abs=0.02)  # half-way: the mean of 1 and 0.1
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    assert learning_rate_scale(cosine, 500, 100) == pytest.approx(0.1)  # a resumed run past the end stays low


def test_weight_average_moves_towards_the_live_weights():
    from training.weight_average import WeightAverage

    live = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(live, decay=0.9)
    start = avg.model[0].weight.clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].num_batches_tracked.fill_(7)
    avg.update(step=1000)  # past the ramp: decay 0.9
    assert torch.allclose(avg.model[0].weight, start + 0.1)
    assert avg.model[1].num_batches_tracked.item() == 7  # integer buffers are copied
    assert not avg.model[0].weight.requires_grad and not avg.model.training
    avg.update(step=0)  # ramp: decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(avg.model[0].weight, start + 0.1 + 0.9 * 0.9)


def test_metrics_by_hand():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    cm = confusion(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # F1: class 0 = 0.5, class 1 = 0.8, class 2 = 0
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_train_refuses_a_folder_that_is_not_prepared(tmp_path, capsys):
    assert mmid(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().out


def test_int8_export_keeps_the_top_person_on_every_test_utterance(tiny_runs, prepared_tiny, tmp_path):
    """`mmid export --int8 --data`: the int8 graphs are compared with the fp32 graph on the
    whole test split, and the dense cached int8 engine names the same person on each."""
    from engine.runtime import Engine

    out = tmp_path / "engine"
    assert mmid(["export", "--run", str(tiny_runs["mme2e"]), "--out", str(out), "--int8", "--data", str(prepared_tiny)]) == 0
    check = json.loads((out / "engine.json").read_text())["int8_check"]
    n_test = len(read_split(prepared_tiny, "dialog", "test"))
    assert check["split"] == "test" and check["whole"]["windows"] == check["cached"]["windows"] == n_test
    assert check["cached"]["accuracy_fp32"] >= 0.9, check
    assert check["cached"]["top1_agreement"] == 1.0, check
    assert Engine.load(out, "onnx", int8=True, feature_cache=64).backend_name == "onnx-cached-int8"


def test_sparse_export_calibrates_a_budget_per_modality(tiny_runs, prepared_tiny, tmp_path):
    """`mmid export --data` on a sparse run: each CNN's fixed budget is the mean fraction of
    sites the CDF rule keeps in that CNN's sparse stages on the valid split (the visual one
    as sparse_budget, the audio one as sparse_budget_audio when they differ), and the engine
    serves with both."""
    from engine.runtime import Engine

    run = tiny_runs["mme2e_sparse"]
    out = tmp_path / "engine"
    assert mmid(["export", "--run", str(run), "--out", str(out), "--data", str(prepared_tiny)]) == 0
    info = json.loads((out / "engine.json").read_text())
    model, meta = load_checkpoint(run)
    model.eval()
    tokenizer = Tokenizer(run / "tokenizer.json", max_tokens=meta.features.max_tokens)
    ids = read_split(prepared_tiny, "dialog", "valid")
    ds = PreparedDataset(prepared_tiny, ids, tokenizer, meta.features, list(meta.persons))
    kept = {"visual": [], "audio": []}
    with torch.no_grad():
        for i in range(len(ds)):
            model(*collate([ds[i][0]]).model_inputs())
            for modality, fractions in model.last_active_fractions.items():
                kept[modality].append(fractions.numpy())
    want = {m: [round(float(f), 3) for f in np.clip(np.mean(v, axis=0), 0.01, 1.0)] for m, v in kept.items()}
    assert info["sparse_budget"] == want["visual"]
    assert (info["sparse_budget_audio"] or info["sparse_budget"]) == want["audio"]
    assert info["dims"]["sparse_budget"] == want["visual"]
    engine = Engine.load(out, "torch")
    assert engine.backend.model.budget_of("audio") == tuple(want["audio"])


def test_time_limit_stops_after_the_epoch_that_reaches_it(prepared_tiny, tmp_path):
    out = tmp_path / "timed"
    assert mmid(["train", "--data", str(prepared_tiny), "--model", "mme2e", "--preset", "tiny", "--out", str(out),
                 "--epochs", "5", "--set", "train.time_limit_s=0.001", "--set", "train.fusion_fit=\"valid\""]) == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    summary = json.loads((out / "train_summary.json").read_text())
    assert len(rows) == 1 and summary["epochs_run"] == 1 and summary["stopped_by"] == "time_limit"
    assert summary["fusion_fit"] is not None  # the kept checkpoint is finished as after any stop


def test_sparse_training_is_reproducible(prepared_tiny, tmp_path, monkeypatch):
    """One seed, one run: two sparse trainings give the same metrics and weights bit for
    bit (train.deterministic; without it the sparse convolutions' backward accumulates
    with parallel atomic adds on the CPU, whose order varies, and runs can drift apart
    within a few epochs, not in every pair of runs, so the test also checks that every
    training step ran with deterministic kernels), and the process's setting is restored
    after each."""
    from training import train as train_module

    runs = [tmp_path / "a", tmp_path / "b"]
    before = torch.are_deterministic_algorithms_enabled()
    modes = []
    loss_fn = train_module.loss_fn

    def recording_loss(*args, **kwargs):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train_module, "loss_fn", recording_loss)
    for out in runs:
        assert mmid(["train", "--data", str(prepared_tiny), "--model", "mme2e_sparse", "--preset", "tiny",
                     "--out", str(out), "--epochs", "6", "--set", "train.fusion_fit=\"none\""]) == 0
    rows = [[{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in (out / "metrics.jsonl").read_text().splitlines()]
            for out in runs]
    assert len(rows[0]) == 6 and rows[0] == rows[1]
    assert modes and all(modes)
    assert torch.are_deterministic_algorithms_enabled() == before
    with safe_open(str(runs[0] / "last" / "model.safetensors"), framework="pt") as fa, \
            safe_open(str(runs[1] / "last" / "model.safetensors"), framework="pt") as fb:
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def test_fitted_scores_judge_the_model_as_served():
    """select_on = "fitted": an epoch is scored with its fusion weights refitted on validation.
    Here the text branch names person 0 confidently (a memorised transcript) and the visual
    branch is right: with the weights as trained (uniform) the fused answer is mostly wrong,
    refitted it is right everywhere."""
    from training.train import fitted_scores

    n, persons = 12, 4
    labels = np.arange(n) % persons
    onehot = np.eye(persons, dtype=np.float32)[labels]
    text = np.zeros((n, persons), np.float32)
    text[:, 0] = 8.0
    pred = {"mod_logits": np.stack([text, 0.5 * onehot, 3.0 * onehot], axis=1), "present": np.ones((n, 3), bool),
            "label": labels}
    fused_uniform = late_fusion(torch.zeros(3), torch.from_numpy(pred["mod_logits"]), torch.from_numpy(pred["present"]))
    assert macro_f1(labels, fused_uniform.argmax(1).numpy(), persons) < 0.5
    cfg = load_config(overrides=["train.select_on=fitted"])
    f1, loss = fitted_scores(pred, torch.zeros(3), cfg, persons)
    assert f1 == 1.0 and loss < float(torch.nn.functional.cross_entropy(fused_uniform, torch.from_numpy(labels)))


def test_select_on_fitted_scores_each_epoch(prepared_tiny, tmp_path):
    out = tmp_path / "fitted"
    assert mmid(["train", "--data", str(prepared_tiny), "--model", "mme2e", "--preset", "tiny", "--out", str(out),
                 "--epochs", "2", "--set", "train.select_on=fitted"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_summary.json").read_text())
    assert len(rows) == 2 and all("valid_macro_f1_fitted" in r for r in rows)
    assert summary["best_valid_macro_f1"] == max(r["valid_macro_f1_fitted"] for r in rows)
