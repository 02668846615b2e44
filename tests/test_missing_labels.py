"""Learning from incomplete labels: the ``[labels]`` protocols through the stages, the
loss options (``labels.unknown``, LL-R, CLML) and their validation."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from retdmctl.config import Config, apply, validate
from retdmctl.data.dataset import DatasetInfo, read_dataset
from retdmctl.errors import ConfigError
from retdmctl.knn import read_graph
from retdmctl.pipeline import Context, run_stage
from retdmctl.training.labels import Classification, EpochCounter, observed_labels, training_view
from retdmctl.runtime import load_checkpoint
from retdmctl.workspace import Workspace
from stages import BY_NAME, PIPELINE
from tests.conftest import run_all, run_stages, tiny_config

TRAINING = ("knn", "classifier", "metric", "joint")


def toy_info(n: int = 60, num_classes: int = 5, seed: int = 0, known: bool = False) -> DatasetInfo:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, num_classes)) < 0.4).astype(np.uint8)
    labels[np.arange(n), rng.integers(0, num_classes, n)] = 1  # every row has a positive
    rows = np.arange(n)
    mask = None
    if known:
        mask = np.ones_like(labels, dtype=bool)
        mask[::7, 0] = False
        labels[~mask] = 0
    return DatasetInfo(
        ids=[f"i{i}" for i in rows], labels=labels, class_names=[f"c{c}" for c in range(num_classes)],
        splits={"train": rows[: n // 2], "val": rows[n // 2 : 3 * n // 4], "test": rows[3 * n // 4 :]}, known=mask,
    )


def labels_cfg(protocol: str = "full", fraction: float = 1.0, seed: int = 0, unknown: str = "negative") -> Config:
    cfg = Config()
    cfg.labels.protocol, cfg.labels.fraction, cfg.labels.seed, cfg.labels.unknown = protocol, fraction, seed, unknown
    return cfg


# --- the observed matrix ----------------------------------------------------------------
@pytest.mark.parametrize("protocol,fraction", [("keep", 0.5), ("single", 1.0), ("hide", 0.3)])
def test_protocols_hide_training_labels_only_and_are_deterministic(protocol, fraction):
    info = toy_info()
    cfg = labels_cfg(protocol, fraction, seed=3)
    obs = observed_labels(info, cfg)
    train, rest = info.split("train"), np.concatenate([info.split("val"), info.split("test")])
    assert obs.dtype == np.int8 and obs.shape == info.labels.shape
    assert (obs[rest] == info.labels[rest]).all()  # val and test: full labels
    assert (obs[train] == -1).any()
    assert (obs[train][obs[train] == 1] == 1).all() and (info.labels[train][obs[train] == 1] == 1).all()
    assert np.array_equal(obs, observed_labels(info, cfg))  # same seed, same matrix
    assert not np.array_equal(obs, observed_labels(info, labels_cfg(protocol, fraction, seed=4)))


def test_full_protocol_keeps_everything_and_the_datasets_own_unknowns():
    info = toy_info(known=True)
    assert np.array_equal(observed_labels(info, labels_cfg()), info.observed())
    obs = observed_labels(info, labels_cfg("keep", 0.5))
    assert (obs[~info.known] == -1).all()  # a csv ?label stays unknown, in every split


def test_training_view_changes_only_the_training_rows():
    info = toy_info()
    cfg = labels_cfg("single")
    cfg.labels.val_protocol = "full"  # validation under "same": test_val_protocol_same_...
    view, obs, summary = training_view(info, cfg)
    train = info.split("train")
    assert np.array_equal(view.labels[train], (obs[train] == 1).astype(np.uint8))
    assert (view.labels[train].sum(axis=1) == 1).all()
    other = np.setdiff1d(np.arange(len(info.ids)), train)
    assert np.array_equal(view.labels[other], info.labels[other]) and view.labels is not info.labels
    s = summary["labels"]
    assert s["protocol"] == "single" and s["train_positives"] == int(info.labels[train].sum())
    assert s["hidden_positives"] == s["train_positives"] - len(train)


@pytest.mark.parametrize("protocol,fraction", [("keep", 0.5), ("single", 1.0), ("hide", 0.3)])
def test_val_protocol_same_hides_validation_labels_as_negatives_and_keeps_test_full(protocol, fraction):
    from retdmctl.training.labels import validation_labels

    info = toy_info(n=200)
    train, val, test = info.split("train"), info.split("val"), info.split("test")
    cfg = labels_cfg(protocol, fraction, seed=3)
    assert cfg.labels.val_protocol == "same"  # the default once a protocol is set
    view, obs, summary = training_view(info, cfg)
    seen = validation_labels(info, cfg)
    assert np.array_equal(view.labels[val], seen) and set(np.unique(seen)) <= {0, 1}
    assert (seen <= info.labels[val]).all() and seen.sum() < info.labels[val].sum()  # hidden positives read as 0
    if protocol != "hide":
        assert (seen.sum(axis=1) >= 1).all()  # a row keeps at least one positive, as training rows do
    assert np.array_equal(view.labels[test], info.labels[test])  # test: always full
    assert np.array_equal(view.labels[train], (obs[train] == 1).astype(np.uint8))  # training draw unchanged
    assert np.array_equal(seen, validation_labels(info, cfg))  # deterministic
    assert not np.array_equal(seen, validation_labels(info, labels_cfg(protocol, fraction, seed=4)))
    s = summary["labels"]
    assert s["val_protocol"] == "same" and s["val_hidden_positives"] == int(info.labels[val].sum() - seen.sum()) > 0
    cfg.labels.val_protocol = "full"
    view, _, summary = training_view(info, cfg)
    assert np.array_equal(view.labels[val], info.labels[val]) and summary["labels"]["val_hidden_positives"] == 0


def test_val_protocol_is_what_the_kept_epoch_and_thresholds_are_chosen_on(tmp_path):
    """The classifier's validation mAP (the epoch kept) and its thresholds are scored on
    the validation labels of ``labels.val_protocol``: under ``same`` the protocol's draw,
    under ``full`` every label; training is the same either way."""
    from retdmctl import thresholds
    from retdmctl.metrics import compute_metrics
    from retdmctl.training.labels import validation_labels

    runs = {}
    for val_protocol in ("same", "full"):
        ws, cfg = Workspace(tmp_path / val_protocol), tiny_config(frozen=True)
        cfg.classifier.epochs, cfg.classifier.select = 2, "last"
        cfg.labels.protocol, cfg.labels.val_protocol = "single", val_protocol
        cfg.eval.checkpoint, cfg.eval.split, cfg.eval.fusion, cfg.eval.report = "classifier", "val", False, "none"
        run_stages(ws, cfg, "ingest", "classifier", "eval")
        ckpt = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")
        with h5py.File(ws.stage_dir("eval") / "scores.h5") as h5:
            scores = h5["scores"][()]
        info = read_dataset(ws.dataset)
        runs[val_protocol] = (ckpt, scores, validation_labels(info, cfg), info.labels[info.split("val")])
    same, full = runs["same"], runs["full"]
    assert [r["train_total"] for r in same[0]["history"]] == pytest.approx([r["train_total"] for r in full[0]["history"]])
    assert np.allclose(same[1], full[1], atol=1e-6)  # the same model
    assert not np.array_equal(same[2], same[3])  # single hides validation positives
    for ckpt, scores, labels, _ in (same, full):
        kept = ckpt["history"][-1]
        assert kept["val_mAP"] == pytest.approx(compute_metrics(labels, scores)["mAP"], abs=1e-5)
        assert ckpt["threshold_choice"] == thresholds.choose(labels, scores, None)
    assert same[0]["history"][-1]["val_mAP"] != pytest.approx(full[0]["history"][-1]["val_mAP"], abs=1e-4)


# --- the losses -------------------------------------------------------------------------
def _observed_batch():
    obs = np.array([[1, -1, 0, -1], [-1, 1, -1, 0], [0, 0, 1, -1]], dtype=np.int8)
    y = torch.from_numpy((obs == 1).astype(np.float32))
    return obs, y, np.arange(3)


@pytest.mark.parametrize("base", ["bce", "asl"])
def test_unknown_ignore_masks_the_unknown_entries_out_of_the_loss(base):
    obs, y, rows = _observed_batch()
    logits = torch.randn(3, 4)
    moved = logits.clone()
    moved[obs == -1] += 5.0  # only the unknown entries change
    for unknown, same in (("ignore", True), ("negative", False)):
        cfg = labels_cfg(unknown=unknown)
        cfg.loss.base = base
        loss = Classification(cfg, obs, EpochCounter(), "cpu")
        a, _ = loss(logits, y, rows)
        b, _ = loss(moved, y, rows)
        assert (float(a) == pytest.approx(float(b))) is same, unknown
    # ignore: the gradient at unknown entries is exactly zero
    cfg = labels_cfg(unknown="ignore")
    cfg.loss.base = base
    z = logits.clone().requires_grad_()
    Classification(cfg, obs, EpochCounter(), "cpu")(z, y, rows)[0].backward()
    assert (z.grad[torch.from_numpy(obs == -1)] == 0).all()


def test_llr_follows_the_epoch_and_rejects_only_unknown_entries():
    from retdmctl.losses.llr import llr_loss

    obs, y, rows = _observed_batch()
    cfg = labels_cfg()
    cfg.loss.base = "llr"
    counter = EpochCounter()
    loss = Classification(cfg, obs, counter, "cpu")
    logits = torch.randn(3, 4)
    unknown = torch.from_numpy(obs == -1)
    counter(1)
    assert float(loss(logits, y, rows)[0]) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y)))
    counter(60)  # rate 0.118: ceil(12 * 0.118) = 2 rejected
    assert float(loss(logits, y, rows)[0]) == pytest.approx(float(llr_loss(logits, y, 60, mask_unobserved=unknown)))
    assert float(loss(logits, y, rows)[0]) != pytest.approx(float(llr_loss(logits, y, 1)))
    cfg.loss.llr_delta_rel = 0.05  # a faster schedule: epoch 3 rejects ceil(12 * 0.1) = 2
    counter(3)
    faster = float(loss(logits, y, rows)[0])
    assert faster == pytest.approx(float(llr_loss(logits, y, 3, 0.05, mask_unobserved=unknown)))
    assert faster != pytest.approx(float(llr_loss(logits, y, 3, mask_unobserved=unknown)))


def test_clml_term_only_when_on():
    obs, y, rows = _observed_batch()
    f, logits = torch.randn(3, 8), torch.randn(3, 4)
    cfg = labels_cfg()
    assert Classification(cfg, obs, EpochCounter(), "cpu")(logits, y, rows, f)[1] is None
    cfg.loss.clml = 0.5
    term = Classification(cfg, obs, EpochCounter(), "cpu")(logits, y, rows, f)[1]
    assert term is not None and torch.isfinite(term)


def test_lazy_clml_runs_every_kth_step_at_k_times_the_weight():
    from retdmctl.losses.clml import clml_loss

    obs, y, rows = _observed_batch()
    f, logits = torch.randn(3, 8), torch.randn(3, 4)
    cfg = labels_cfg()
    cfg.loss.clml, cfg.loss.clml_every = 0.5, 3
    once = float(clml_loss(f, logits, y, epoch=1, lam=0.5))
    counter = EpochCounter(steps_per_epoch=4)
    loss = Classification(cfg, obs, counter, "cpu")

    def epoch(e: int) -> list:
        counter(e)
        return [loss(logits, y, rows, f)[1] for _ in range(4)]

    # global steps 0-3, then 4-7: the term on 0, 3 and 6, weighted 3x
    first, second = epoch(1), epoch(2)
    assert [t is not None for t in first + second] == [True, False, False, True, False, False, True, False]
    assert float(first[0]) == pytest.approx(3 * once, rel=1e-6)
    # a run resumed at epoch 2 runs the term on the same steps
    resumed = Classification(cfg, obs, EpochCounter(steps_per_epoch=4), "cpu")
    resumed.counter(2)
    assert [resumed(logits, y, rows, f)[1] is not None for _ in range(4)] == [t is not None for t in second]


def test_lazy_clml_through_the_classifier_stage(tmp_path, monkeypatch):
    import retdmctl.training.labels as labels

    calls = []
    original = labels.clml_loss
    monkeypatch.setattr(labels, "clml_loss", lambda *a, **k: (calls.append(k["lam"]), original(*a, **k))[1])
    ws, cfg = Workspace(tmp_path), tiny_config(frozen=True)
    cfg.classifier.epochs, cfg.loss.clml, cfg.loss.clml_every = 2, 0.1, 2
    run_stages(ws, cfg, "ingest", "classifier")
    info = read_dataset(ws.dataset)
    steps = -(-len(info.split("train")) // cfg.model.batch_size)
    assert steps > 1 and len(calls) == (2 * steps + 1) // 2 and all(lam == pytest.approx(0.2) for lam in calls)
    assert ws.read_manifest("classifier")["config"]["loss"]["clml_every"] == 2
    cfg.loss.clml_every = 1  # a different schedule is a different model: the stage runs again
    assert run_stage(Context(ws, cfg, Console(file=io.StringIO())), BY_NAME["classifier"], PIPELINE)
    assert len(calls) == (2 * steps + 1) // 2 + 2 * steps


def test_fit_passes_the_epoch(tmp_path, monkeypatch):
    ws, cfg = Workspace(tmp_path), tiny_config(frozen=True)
    cfg.classifier.epochs = 3
    seen = []
    import retdmctl.training.labels as labels

    original = labels.EpochCounter.__call__
    monkeypatch.setattr(labels.EpochCounter, "__call__", lambda self, e: (seen.append(e), original(self, e)))
    run_stages(ws, cfg, "ingest", "classifier")
    assert seen == [1, 2, 3]


# --- through the stages -----------------------------------------------------------------
@pytest.fixture(scope="module")
def keep_run(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("keep"))
    cfg = tiny_config(frozen=True)
    cfg.labels.protocol, cfg.labels.fraction, cfg.labels.seed = "keep", 0.5, 1
    ran = run_all(ws, cfg)
    return ws, cfg, ran


def test_every_training_stage_records_the_protocol(keep_run):
    ws, cfg, ran = keep_run
    assert all(ran.values())
    hidden = set()
    for name in TRAINING:
        manifest = ws.read_manifest(name)
        assert manifest["config"]["labels"] == {"protocol": "keep", "fraction": 0.5, "seed": 1, "unknown": "negative",
                                                "val_protocol": "same"}
        summary = manifest["summary"]["labels"]
        assert summary["protocol"] == "keep" and summary["fraction"] == 0.5
        hidden.add(summary["hidden_positives"])
    info = read_dataset(ws.dataset)
    expected = int(info.labels[info.split("train")].sum() - (observed_labels(info, cfg)[info.split("train")] == 1).sum())
    assert hidden == {expected} and expected > 0
    page = (ws.stage_dir("eval") / "report.html").read_text()
    train_positives = int(info.labels[info.split("train")].sum())
    assert f"keep 0.5 (seed 1): {expected} of {train_positives} training positives hidden" in page
    s = ws.read_manifest("classifier")["summary"]["labels"]
    assert s["val_protocol"] == "same" and 0 < s["val_hidden_positives"] < s["val_positives"]
    assert (f"validation under the same protocol: {s['val_hidden_positives']} of {s['val_positives']} positives "
            "hidden, read as negative") in page


def test_knn_graph_is_built_from_the_observed_training_sets(keep_run):
    ws, cfg, _ = keep_run
    info = read_dataset(ws.dataset)
    train = info.split("train")
    obs = (observed_labels(info, cfg)[train] == 1).astype(np.uint8)
    graph = read_graph(ws.knn)
    assert np.array_equal(graph.label_sets, np.unique(obs, axis=0))
    assert np.array_equal(graph.label_sets[graph.image_set[train]], obs)
    assert not np.array_equal(obs, info.labels[train])


def test_val_and_test_keep_their_full_labels(keep_run):
    ws, _, _ = keep_run
    info = read_dataset(ws.dataset)
    with h5py.File(ws.stage_dir("eval") / "scores.h5") as h5:
        rows, labels = h5["rows"][()], h5["labels"][()]
    assert np.array_equal(labels, info.labels[rows])
    ckpt = load_checkpoint(ws.stage_dir("joint") / "checkpoint.pt")
    assert len(ckpt["thresholds"]) == info.num_classes


def test_a_protocol_change_reruns_the_training_stages_only(keep_run):
    ws, cfg, _ = keep_run
    cfg.labels.seed = 2
    ran = run_all(ws, cfg)
    assert ran == {"ingest": False, **dict.fromkeys(TRAINING, True), "eval": True}
    assert run_all(ws, cfg) == dict.fromkeys(ran, False)


def _classifier_weights(tmp_path, **loss) -> tuple[dict, list]:
    ws, cfg = Workspace(tmp_path), tiny_config(frozen=True)
    cfg.classifier.epochs = 2
    cfg.labels.protocol, cfg.labels.fraction = "keep", 0.5
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    run_stages(ws, cfg, "ingest", "classifier")
    ckpt = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")
    return ckpt["model"], ckpt["history"]


def test_clml_changes_the_trained_weights(tmp_path):
    off, history_off = _classifier_weights(tmp_path / "off")
    on, history_on = _classifier_weights(tmp_path / "on", clml=1.0)
    assert "train_clml" in history_on[0] and "train_clml" not in history_off[0]
    assert any(not torch.equal(off[k], on[k]) for k in off)


def test_llr_trains_end_to_end(tmp_path):
    weights, history = _classifier_weights(tmp_path, base="llr")
    assert all(np.isfinite(r["train_total"]) for r in history)
    ws, cfg = Workspace(tmp_path / "joint"), tiny_config(frozen=True)
    cfg.labels.protocol, cfg.loss.base, cfg.loss.clml = "single", "llr", 0.5
    cfg.classifier.epochs = cfg.metric.epochs = cfg.joint.epochs = 1
    assert all(run_all(ws, cfg).values())
    assert "train_clml" in load_checkpoint(ws.stage_dir("joint") / "checkpoint.pt")["history"][0]


# --- validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values,message",
    [
        ({"labels": {"protocol": "half"}}, "labels.protocol must be one of full, keep, single, hide, got 'half'"),
        ({"labels": {"fraction": 0}}, "labels.fraction must be in (0, 1], got 0.0"),
        ({"labels": {"fraction": 1.5}}, "labels.fraction must be in (0, 1], got 1.5"),
        ({"labels": {"unknown": "positive"}}, "labels.unknown must be one of negative, ignore, got 'positive'"),
        ({"loss": {"base": "focal"}}, "loss.base must be one of bce, asl, llr, got 'focal'"),
        ({"loss": {"clml": -1}}, "loss.clml must be >= 0, got -1.0"),
        ({"loss": {"clml_tau": 1}}, "loss.clml_tau must be in (0, 1), got 1.0"),
        ({"loss": {"clml_start_epoch": 0}}, "loss.clml_start_epoch must be >= 1, got 0"),
        ({"loss": {"clml_delta": -0.5}}, "loss.clml_delta must be >= 0, got -0.5"),
        ({"loss": {"clml_every": 0}}, "loss.clml_every must be >= 1, got 0"),
        ({"loss": {"llr_delta_rel": 1}}, "loss.llr_delta_rel must be in [0, 1), got 1.0"),
        ({"labels": {"val_protocol": "half"}}, "labels.val_protocol must be one of same, full, got 'half'"),
        ({"labels": {"protocol": "keep", "fraction": 0.5, "unknown": "ignore"}},
         "labels.unknown = ignore with labels.protocol = keep trains on positives only: every entry not kept is "
         "unknown, true negatives included; use labels.unknown = negative or loss.base = llr"),
        ({"labels": {"protocol": "single", "unknown": "ignore"}},
         "labels.unknown = ignore with labels.protocol = single trains on positives only: every entry not kept is "
         "unknown, true negatives included; use labels.unknown = negative or loss.base = llr"),
    ],
)
def test_validation_messages(values, message):
    cfg = Config()
    apply(cfg, values, "test")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == message


def test_defaults_are_valid_and_off():
    cfg = Config()
    validate(cfg)
    assert (cfg.labels.protocol, cfg.labels.fraction, cfg.labels.seed, cfg.labels.unknown) == ("full", 1.0, 0, "negative")
    assert cfg.labels.val_protocol == "same"
    for protocol, base in (("hide", "bce"), ("single", "llr")):  # ignore is meaningful there, or does not apply
        cfg.labels.protocol, cfg.labels.fraction, cfg.labels.unknown, cfg.loss.base = protocol, 0.5, "ignore", base
        validate(cfg)
    assert (cfg.loss.clml, cfg.loss.clml_tau, cfg.loss.clml_start_epoch, cfg.loss.clml_delta) == (0.0, 0.75, 1, 1.0)


# --- command line -----------------------------------------------------------------------
def test_train_flags_set_the_protocol_and_status_shows_it(tmp_path):
    from typer.testing import CliRunner

    from retdmctl.cli import app
    from tests.test_faults import TINY

    runner = CliRunner()
    (tmp_path / "retdm.toml").write_text(TINY)
    invoke = lambda *args: runner.invoke(app, ["--workdir", str(tmp_path), *args])  # noqa: E731
    assert invoke("ingest", "demo").exit_code == 0
    result = invoke("train", "--stage", "classifier", "--epochs", "1", "--labels", "keep", "--labels-fraction", "0.5",
                    "--clml", "0.5")
    assert result.exit_code == 0, result.output
    assert "labels: keep 0.5 (seed 0):" in result.output and "training positives hidden" in result.output
    ws = Workspace(tmp_path)
    assert ws.read_manifest("classifier")["summary"]["labels"]["protocol"] == "keep"
    assert "train_clml" in load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["history"][0]
    status = " ".join(invoke("status").output.split())  # the console may wrap the line
    assert ("training labels: protocol keep 0.5 (seed 0), unknown read as negative; CLML weight 0.5; validation under "
            "the same protocol (hidden read as negative): epoch, thresholds and vote chosen on it") in status
    assert invoke("train", "--stage", "classifier", "--epochs", "1", "--set", "loss.base=llr", "--set",
                  "loss.llr_delta_rel=0.01", "--clml-every", "4").exit_code == 0
    status = " ".join(invoke("status").output.split())
    assert ("training labels: protocol keep 0.5 (seed 0), unknown read as negative, the largest-loss ones rejected "
            "(LL-R, 1 % more each epoch); CLML weight 0.5, every 4 steps; validation under the same protocol") in status
    assert invoke("train", "--stage", "classifier", "--epochs", "1", "--set", "labels.val_protocol=full").exit_code == 0
    assert "summary" in ws.read_manifest("classifier")
    assert ws.read_manifest("classifier")["summary"]["labels"]["val_protocol"] == "full"
    status = " ".join(invoke("status").output.split())
    assert "every 4 steps; validation on full labels" in status
    result = invoke("train", "--stage", "classifier", "--labels-fraction", "1.5")
    assert result.exit_code != 0 and "labels.fraction must be in (0, 1], got 1.5" in result.output
    result = invoke("train", "--stage", "classifier", "--set", "loss.base=bce", "--set", "labels.unknown=ignore")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == (
        "error: labels.unknown = ignore with labels.protocol = keep trains on positives only: every entry not kept is "
        "unknown, true negatives included; use labels.unknown = negative or loss.base = llr")


def test_the_protocol_is_printed_once_per_run(tmp_path):
    ws, cfg = Workspace(tmp_path), tiny_config(frozen=True)
    cfg.labels.protocol = "single"
    cfg.classifier.epochs = cfg.metric.epochs = cfg.joint.epochs = 1
    out = io.StringIO()
    ctx = Context(ws, cfg, Console(file=out, width=200))
    for stage in PIPELINE:
        run_stage(ctx, stage, PIPELINE)
    assert out.getvalue().count("labels: single (seed 0): ") == 1
