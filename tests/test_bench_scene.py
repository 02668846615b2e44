"""bench/scene.py: the development and confirmation seed sets, the transfer table's
"holds" rule on numbers worked by hand, the product's default config for the default_*
variants, and a tiny end-to-end run on the demo set (one training per seed scored four
ways, the seed sets in the JSON, results written after every seed)."""

from __future__ import annotations

import json

import pytest

import bench.scene as scene
from retdmctl.config import Config, validate

TINY = ["--set", "ingest.source=demo", "--set", "ingest.demo_images=60", "--set", "ingest.demo_classes=5",
        "--set", "ingest.workers=1", "--set", "model.backbone=tiny_cnn", "--set", "model.pretrained=false",
        "--set", "model.image_size=32", "--set", "model.batch_size=16", "--set", "runtime.workers=0",
        "--set", "runtime.device=cpu", "--set", "classifier.epochs=1", "--set", "metric.epochs=1",
        "--set", "joint.epochs=1", "--set", "decision.folds=0"]
DEFAULTS = ["default", "default_joint_plain", "default_classifier_vote", "default_classifier_plain"]
RECHOSEN = ["default_val_only", "default_val_map"]


# --- the seed sets and the variants asked --------------------------------------------------


def test_development_and_confirmation_seeds_by_default_and_the_four_default_scorings_run():
    args = scene.parse_args([])
    assert args.seeds == [0, 1, 2, 3, 4] and args.confirm_seeds == [10, 11, 12, 13, 14]
    assert args.baseline == "bce" and args.variants[0] == "bce"
    assert set(DEFAULTS) <= set(args.variants) and "default_val_only" not in args.variants


def test_confirm_seeds_without_values_is_none_and_a_missing_baseline_is_added_first():
    args = scene.parse_args(["--confirm-seeds", "--variants", "default", "--baseline", "default_classifier_plain"])
    assert args.confirm_seeds == []
    assert args.variants == ["default_classifier_plain", "default"]


def test_a_seed_in_both_sets_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        scene.parse_args(["--seeds", "1", "2", "--confirm-seeds", "2", "3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "bench/scene.py: error: seed 2 is in both --seeds and --confirm-seeds: "
        "a confirmation seed must not be one the choices were made on")


@pytest.mark.parametrize(("seeds", "text"), [([0, 1, 2, 3, 4], "0-4"), ([10, 11, 12, 13, 14], "10-14"),
                                             ([0, 1, 2, 7, 8], "0-2, 7, 8"), ([3], "3"), ([], "")])
def test_seed_lists_as_headings_show_them(seeds, text):
    assert scene.seed_list(seeds) == text


def test_the_default_variants_get_the_products_config_and_the_others_the_benchs(tmp_path):
    """The default_* variants: Config() with only the dataset, the seed (set per run) and the
    frozen backbone set: auto tune_blocks and views made concrete as the product does,
    the product's epochs; the bench's variants keep pooled features and 40 metric epochs."""
    base, product = scene.configs(scene.parse_args(["--data", str(tmp_path)]))
    expected = Config()
    expected.ingest.source, expected.ingest.path, expected.model.frozen_backbone = "scene", str(tmp_path), True
    validate(expected)
    assert product.to_dict() == expected.to_dict()
    assert (product.model.tune_blocks, product.model.views) == (1, 10)  # efficientnet_lite0, frozen
    assert (base.model.tune_blocks, base.model.views, base.metric.epochs) == (0, 1, 40)
    assert product.metric.epochs == Config().metric.epochs != 40


# --- the transfer table -----------------------------------------------------------------------


def _results(diffs: dict[str, dict[int, tuple[float, float]]]) -> dict:
    """Per seed: bce at mAP = C-F1 = 0.5, each variant at bce + its (mAP, C-F1) differences."""
    seeds = next(iter(diffs.values()))
    out: dict = {}
    for seed in seeds:
        out[seed] = {"bce": {"test": {"per_class": {"mAP": 0.5, "C-F1": 0.5}}}}
        for variant, by_seed in diffs.items():
            d_map, d_f1 = by_seed[seed]
            out[seed][variant] = {"test": {"per_class": {"mAP": 0.5 + d_map, "C-F1": 0.5 + d_f1}}}
    return out


def test_holds_when_the_confirmation_mean_is_better_or_within_one_paired_sd():
    assert scene.holds(0.001, 0.0, "mAP")
    assert scene.holds(-0.01, 0.01, "mAP")  # on the edge: within one sd
    assert not scene.holds(-0.0101, 0.01, "mAP")
    assert scene.holds(0.0, 0.0, "C-F1")
    assert scene.holds(-0.02, 0.0, "one_error")  # lower is better
    assert not scene.holds(0.02, 0.01, "one_error")


def test_the_transfer_table_puts_dev_and_confirmation_side_by_side():
    dev = {0: (0.01, 0.0), 1: (0.02, 0.0), 2: (0.03, 0.0)}  # mAP +0.02 ± 0.01 (3/3), C-F1 0
    results = _results({
        # confirmation mAP +0.01 +0.01 +0.04: mean 0.02, sd sqrt((1 + 1 + 4) / 2) / 100 = 0.0173
        "better": {**dev, 10: (0.01, 0.0), 11: (0.01, 0.0), 12: (0.04, 0.0)},
        # -0.04 0 +0.01: mean -0.01, sd sqrt((9 + 1 + 4) / 2) / 100 = 0.0265 > 0.01: within
        "within": {**dev, 10: (-0.04, 0.02), 11: (0.0, 0.02), 12: (0.01, 0.02)},
        # -0.01 -0.02 -0.03: mean -0.02, sd 0.01: worse by two sds
        "worse_map": {**dev, 10: (-0.01, 0.01), 11: (-0.02, 0.02), 12: (-0.03, 0.03)},
        "worse_both": {**dev, 10: (-0.01, -0.01), 11: (-0.02, -0.02), 12: (-0.03, -0.03)},
    })
    got = scene.transfer_table(results, ["bce", "better", "within", "worse_map", "worse_both"], [0, 1, 2], [10, 11, 12], "bce")
    assert got.splitlines() == [
        "## Transfer: development seeds 0-2 -> confirmation seeds 10-12",
        "",
        "Paired difference from bce (variant − bce, mean ± sd, better on n seeds; thresholds: per class). "
        "Holds: on the confirmation seeds each mean is above 0 or within one paired sd of it.",
        "",
        "| variant | mAP dev | mAP confirmation | C-F1 dev | C-F1 confirmation | holds |",
        "|---|---|---|---|---|---|",
        "| better | +0.0200 ± 0.0100 (3/3) | +0.0200 ± 0.0173 (3/3) | +0.0000 ± 0.0000 (0/3) | +0.0000 ± 0.0000 (0/3) | yes |",
        "| within | +0.0200 ± 0.0100 (3/3) | -0.0100 ± 0.0265 (1/3) | +0.0000 ± 0.0000 (0/3) | +0.0200 ± 0.0000 (3/3) | yes |",
        "| worse_map | +0.0200 ± 0.0100 (3/3) | -0.0200 ± 0.0100 (0/3) | +0.0000 ± 0.0000 (0/3) | +0.0200 ± 0.0100 (3/3) | no (mAP) |",
        "| worse_both | +0.0200 ± 0.0100 (3/3) | -0.0200 ± 0.0100 (0/3) | +0.0000 ± 0.0000 (0/3) | -0.0200 ± 0.0100 (0/3) "
        "| no (mAP, C-F1) |",
    ]


def test_before_any_confirmation_seed_the_table_shows_dev_alone():
    results = _results({"asl": {0: (-0.01, 0.02), 1: (0.01, 0.04)}})
    got = scene.transfer_table(results, ["bce", "asl"], [0, 1], [], "bce").splitlines()
    assert got[0] == "## Transfer: development seeds 0, 1 -> confirmation seeds none"
    assert got[-1] == "| asl | +0.0000 ± 0.0141 (1/2) | — | +0.0300 ± 0.0141 (2/2) | — | — |"


# --- end to end on the tiny demo set ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One dev seed and one confirmation seed: bce, the four default scorings and the two
    decisions chosen again on validation (default_val_only, default_val_map), with every
    training, scoring and write recorded."""
    root = tmp_path_factory.mktemp("scene-bench")
    out = root / "out"
    trained: list[tuple[str, str]] = []  # (workspace, last stage)
    scored: list[tuple[str, str, bool, int, int]] = []  # (workspace, checkpoint, fusion, mtimes)
    written: list[list[str]] = []
    run_until, test_metrics, write = scene.run_until, scene.test_metrics, scene.write

    def spy_train(ws, cfg, last):
        trained.append((ws.root.name, last))
        return run_until(ws, cfg, last)

    def spy_score(ws, cfg, stage):
        paths = [ws.layout.stage_dir(s) / "checkpoint.pt" for s in ("classifier", "joint")]
        mtimes = [p.stat().st_mtime_ns if p.exists() else None for p in paths]
        scored.append((ws.root.name, stage, cfg.eval.fusion, *mtimes))
        return test_metrics(ws, cfg, stage)

    def spy_write(*args, **kwargs):
        write(*args, **kwargs)
        written.append(list(json.loads(out.with_suffix(".json").read_text())["results"]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scene, "run_until", spy_train)
        mp.setattr(scene, "test_metrics", spy_score)
        mp.setattr(scene, "write", spy_write)
        scene.main(["--seeds", "0", "--confirm-seeds", "10", "--variants", "bce", *DEFAULTS, *RECHOSEN,
                    "--workdir", str(root / "ws"), "--out", str(out), *TINY])
    return {"root": root, "out": out, "trained": trained, "scored": scored, "written": written}


@pytest.mark.slow
def test_the_json_says_which_set_each_seed_belongs_to_and_is_written_after_every_seed(tiny_run):
    saved = json.loads(tiny_run["out"].with_suffix(".json").read_text())
    assert saved["seed_sets"] == {"development": [0], "confirmation": [10]}
    assert saved["seed_set"] == {"0": "development", "10": "confirmation"}
    assert list(saved["results"]) == ["0", "10"]
    assert list(saved["results"]["10"]) == ["bce", *DEFAULTS, *RECHOSEN]
    assert tiny_run["written"] == [["0"], ["0", "10"]]


@pytest.mark.slow
def test_the_markdown_has_a_section_per_seed_set_and_the_transfer_table(tiny_run):
    md = tiny_run["out"].with_suffix(".md").read_text().splitlines()
    assert md[0] == "# scene: variants compared on development seeds 0 and confirmation seeds 10"
    assert md[2].startswith("Protocol: every choice") and "Test is read once per variant per seed." in md[2]
    assert [line for line in md if line.startswith("## ")] == [
        "## Development seeds 0", "## Confirmation seeds 10", "## Transfer: development seeds 0 -> confirmation seeds 10"]
    assert md.count("### Paired difference from bce (variant − bce; thresholds: per class)") == 2
    rows = [line.split(" | ")[0] for line in md[md.index("| variant | mAP dev | mAP confirmation | C-F1 dev | "
                                                           "C-F1 confirmation | holds |") + 2:] if line.startswith("| ")]
    assert rows == [f"| {v}" for v in [*DEFAULTS, *RECHOSEN]]


@pytest.mark.slow
def test_the_default_scorings_come_from_one_training_per_seed(tiny_run):
    """Per seed: bce in the bench's workspace, one training in WORKDIR/default (the
    re-chosen decisions train nothing); the four scorings read the one checkpoint pair,
    unchanged (same mtimes) from the first scoring to the last."""
    assert tiny_run["trained"] == [("ws", "classifier"), ("default", "joint")] * 2
    scored = tiny_run["scored"]
    assert [s[:3] for s in scored] == [
        ("ws", "classifier", False),
        ("default", "joint", True), ("default", "joint", False),
        ("default", "classifier", True), ("default", "classifier", False)] * 2
    for seed in range(2):
        four = scored[5 * seed + 1: 5 * seed + 5]
        assert len({s[3:] for s in four}) == 1


@pytest.mark.slow
def test_each_default_scoring_records_its_checkpoints_decision(tiny_run):
    saved = json.loads(tiny_run["out"].with_suffix(".json").read_text())["results"]
    ws = tiny_run["root"] / "ws" / "default"
    from retdmctl.runtime import load_checkpoint

    last = saved["10"]  # the workspace holds the last seed's training
    for stage, variants in (("joint", DEFAULTS[:2]), ("classifier", DEFAULTS[2:])):
        ckpt = load_checkpoint(ws / stage / "checkpoint.pt")
        vote = {k: ckpt["fusion"][k] for k in ("k", "temp", "w", "val_mAP", "plain_val_mAP")}
        for v in variants:
            assert last[v]["decision"]["fusion"] == vote
            assert last[v]["decision"].get("decision") == ckpt.get("decision")
            assert last[v]["train_seconds"] == last["default"]["train_seconds"]
    # the plain scorings apply no vote; the test scores of the joint and the classifier differ
    assert last["default_joint_plain"]["chosen"] == {} and last["default_classifier_plain"]["chosen"] == {}
    assert last["default_joint_plain"]["test"] != last["default_classifier_plain"]["test"]
    manifest = json.loads((ws / ".retdm" / "manifests" / "classifier.json").read_text())
    assert (manifest["config"]["model"]["tune_blocks"], manifest["config"]["model"]["views"]) == (1, 10)


def test_an_unknown_setting_of_a_variant_stops_the_bench_before_the_first_seed(tmp_path, monkeypatch):
    monkeypatch.setitem(scene.FAMILIES, "default", ["nosuch.key=0"])
    with pytest.raises(SystemExit) as exit_:
        scene.main(["--variants", "bce", "default", "--workdir", str(tmp_path / "ws"),
                    "--out", str(tmp_path / "out"), *TINY])
    assert str(exit_.value).startswith("bench/scene.py: variant default: ")
    assert not (tmp_path / "ws").exists() and not (tmp_path / "out.json").exists()


def test_the_docstring_names_every_variant():
    assert all(f"    {name} " in scene.__doc__ for name in scene.VARIANTS)


@pytest.mark.slow
def test_a_decision_chosen_again_on_validation_scores_as_the_product_does_with_no_folds(tmp_path):
    """With decision.folds = 0 the product itself chooses on validation alone: the bench's
    default_val_only, chosen again from the trained model, must give exactly its test
    metrics and vote."""
    out = tmp_path / "out"
    scene.main(["--seeds", "0", "--confirm-seeds", "--variants", "default", "default_val_only",
                "--baseline", "default", "--workdir", str(tmp_path / "ws"), "--out", str(out), *TINY,
                "--set", "decision.folds=0", "--set", "ingest.demo_images=120"])
    got = json.loads(out.with_suffix(".json").read_text())["results"]["0"]
    assert got["default_val_only"]["test"] == got["default"]["test"]
    assert got["default_val_only"]["chosen"] == {k: got["default"]["chosen"][k] for k in ("k", "temp", "w")} \
        if got["default"]["chosen"] else got["default_val_only"]["chosen"] == {}


def test_the_choices_table_pairs_two_variants_on_both_seed_sets():
    def result(m, c):
        return {"test": {"per_class": {"mAP": m, "C-F1": c}}}

    results = {0: {"a": result(0.90, 0.80), "b": result(0.89, 0.81)}, 1: {"a": result(0.92, 0.82), "b": result(0.90, 0.82)},
               10: {"a": result(0.91, 0.80), "b": result(0.92, 0.82)}, 11: {"a": result(0.93, 0.84), "b": result(0.93, 0.83)}}
    lines = scene.choices_table(results, [("a", "b")], [0, 1], [10, 11]).splitlines()
    assert lines[0] == "## The choices, pair by pair"
    # dev mAP diffs 0.01, 0.02: mean 0.015, sd 0.0071; confirmation -0.01, 0: mean -0.005, sd 0.0071 (holds);
    # C-F1 dev -0.01, 0: -0.005 ± 0.0071; confirmation -0.02, 0.01: -0.005 ± 0.0212 (holds)
    assert lines[-1] == ("| a over b | +0.0150 ± 0.0071 (2/2) | -0.0050 ± 0.0071 (0/2) | -0.0050 ± 0.0071 (0/2) | "
                         "-0.0050 ± 0.0212 (1/2) | yes |")


def test_render_rewrites_the_tables_from_the_json_with_other_comparisons(tiny_run, tmp_path):
    out = tmp_path / "again"
    scene.main(["--render", str(tiny_run["out"].with_suffix(".json")), "--baseline", "default_classifier_plain",
                "--compare", "default", "default_val_only", "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "### Paired difference from default_classifier_plain" in md
    assert "| default over default_val_only | " in md
    assert json.loads(out.with_suffix(".json").read_text())["results"] == \
        json.loads(tiny_run["out"].with_suffix(".json").read_text())["results"]
