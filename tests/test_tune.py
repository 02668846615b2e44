"""The middle way between a frozen and a fine-tuned backbone (model.tune_blocks), and
several cached views per image (model.views): the split of the network, the views, the
source that draws them, and a tuned run end to end."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from retdmctl.config import Config, validate
from retdmctl.data.dataset import read_dataset
from retdmctl.data.loaders import ViewsTransform, eval_transform
from retdmctl.data.store import ImageReader
from retdmctl.errors import ConfigError
from retdmctl.inference import load_predictor
from retdmctl.models.backbones import build_backbone
from retdmctl.pipeline import Context, run_stage
from retdmctl.inputs import backbone_cache_path, frozen_backbone
from retdmctl.runtime import load_checkpoint
from retdmctl.sources import CachedSource
from retdmctl.workspace import Workspace
from stages import BY_NAME, PIPELINE
from tests.conftest import run_all, tiny_config


@pytest.mark.parametrize("name,tails", [("tiny_cnn", (0, 1, 4)), ("efficientnet_lite0", (0, 1, 4, 16))])
def test_trunk_then_tail_is_the_whole_backbone(name, tails):
    torch.manual_seed(0)
    model, _ = build_backbone(name, pretrained=False)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        for tail in tails:
            split = model.forward_tail(model.forward_trunk(x, tail), tail)
            torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_tail_modules_are_the_last_blocks_and_the_head():
    model, _ = build_backbone("efficientnet_lite0", pretrained=False)
    names = {n for m in model.tail_modules(2) for n, _ in m.named_parameters()}
    tail = {id(p) for m in model.tail_modules(2) for p in m.parameters()}
    luke = model._to_lukemelas  # timm's parameter names -> the checkpoints' (lukemelas) names
    expected = [p for n, p in model.named_parameters()
                if luke.get(n, n).startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1."))]
    assert tail == {id(p) for p in expected} and names


def test_view_zero_is_the_eval_crop_and_view_one_its_flip():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    views = ViewsTransform(32, (0.5,) * 3, (0.5,) * 3, 10)(img)
    assert views.shape == (10, 3, 32, 32)
    torch.testing.assert_close(views[0], eval_transform(32, (0.5,) * 3, (0.5,) * 3)(img))
    torch.testing.assert_close(views[1], views[0].flip(-1))
    # ten different crops (a random image has no symmetric views)
    assert len({v.numpy().tobytes() for v in views}) == 10


def test_cached_views_train_on_every_view_and_eval_on_the_centre():
    class Info:
        labels = np.zeros((6, 2), dtype=np.uint8)

    feats = np.arange(6 * 3 * 2, dtype=np.float16).reshape(6, 3, 2)  # (N, V, F)
    src = CachedSource(feats, Info(), batch_size=4, views=3)
    rows = np.arange(6)
    x = torch.cat([b[0] for b in src.eval_batches(rows)])
    torch.testing.assert_close(x, torch.from_numpy(feats[:, 0].astype(np.float32)))
    seen: set[tuple[int, int]] = set()
    for seed in range(20):
        for xb, _, r in src.train_batches(rows, seed):
            for row, vec in zip(r, xb):
                view = int(vec[0]) // 2 - 3 * int(row)
                assert feats[row, view, 0] == vec[0]
                seen.add((int(row), view))
    assert seen == {(r, v) for r in range(6) for v in range(3)}
    first = [b[2].tolist() + b[0][:, 0].tolist() for b in src.train_batches(rows, 7)]
    assert first == [b[2].tolist() + b[0][:, 0].tolist() for b in src.train_batches(rows, 7)]


def test_options_that_need_a_frozen_backbone_say_so():
    cfg = Config()
    cfg.model.tune_blocks = 2
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value) == ("model.tune_blocks applies to --frozen-backbone (cached inputs); fine-tuning "
                              "trains the whole backbone on freshly augmented images")
    cfg.model.frozen_backbone, cfg.model.tune_blocks = True, 17
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value) == "model.tune_blocks must be <= 16 for efficientnet_lite0, got 17"
    cfg.model.tune_blocks, cfg.model.backbone = 1, "resnet50"
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value) == "model.tune_blocks: resnet50 has no blocks to tune, got 1"
    cfg.model.tune_blocks, cfg.model.views = 0, 11
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value) == "model.views must be in [1, 10], or 0 for auto, got 11"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("tuned"))
    cfg = tiny_config(frozen=True)
    cfg.model.tune_blocks, cfg.model.views = 2, 4
    ran = run_all(ws, cfg)
    return ws, cfg, ran


def test_a_tuned_run_trains_only_the_tail_and_skips_when_up_to_date(tuned):
    ws, cfg, ran = tuned
    assert all(ran.values())
    start = frozen_backbone(cfg)[0].state_dict()
    for stage in ("classifier", "joint"):
        state = load_checkpoint(ws.stage_dir(stage) / "checkpoint.pt")["model"]
        trunk = [k for k in start if k.startswith(("net.0.", "net.1.", "net.3.", "net.4."))]
        tail = [k for k in start if k.startswith(("net.6.", "net.9.")) and "num_batches" not in k]
        assert trunk and tail
        assert all(torch.equal(state[f"backbone.{k}"], start[k]) for k in trunk), stage
        assert not any(torch.equal(state[f"backbone.{k}"], start[k]) for k in tail), stage
    assert run_all(ws, cfg) == dict.fromkeys(ran, False)
    with h5py.File(backbone_cache_path(ws, cfg)) as h5:
        assert h5["features"].shape[:2] == (80, 4)  # every image, four views


def test_a_tuned_model_scores_pixels_as_eval_scored_its_cached_activations(tuned):
    from retdmctl.data.loaders import decode
    from retdmctl.inputs import image_source
    from retdmctl.model_io.checkpoint import build_model, restore_image_model
    from retdmctl.model_io.scoring import predict_scores

    ws, cfg, _ = tuned
    with h5py.File(ws.stage_dir("eval") / "scores.h5") as h5:
        rows, scores = h5["rows"][()], h5["scores"][()]
    predictor = load_predictor(ws.root, "joint", device="cpu")
    info, reader = read_dataset(ws.dataset), ImageReader(ws.lmdb)
    tf = eval_transform(cfg.model.image_size, (0.5,) * 3, (0.5,) * 3)
    x = torch.stack([tf(decode(reader.get(info.ids[r]))) for r in rows])
    reader.close()
    with torch.no_grad():
        _, probs = predictor.classifier(x)
        f = predictor.net.embed_images(x)
        plain = torch.sigmoid(predictor.net.classify(f)).numpy()
    # the classifier alone on cached activations (eval's path): the cache holds float16
    # activations, so pixels give the same scores up to that rounding
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    ckpt = load_checkpoint(ws.stage_dir("joint") / "checkpoint.pt")
    restore_image_model(model, ckpt, cfg, "joint")
    source = image_source(ws, cfg, info, spec)
    cached_plain, _ = predict_scores(model, source, rows, torch.device("cpu"))  # cached: no image store opened
    np.testing.assert_allclose(plain, cached_plain, atol=2e-3)
    if predictor.vote is None:  # validation chose no vote: eval's scores are the plain ones
        np.testing.assert_allclose(probs.numpy(), scores, atol=2e-3)
        return
    # fused with the neighbour vote: the same up to that rounding, except where it swaps a
    # near-tied k-th neighbour, which moves a score by at most w
    diff = np.abs(probs.numpy() - scores)
    assert (diff < 2e-3).mean() > 0.9 and diff.max() <= predictor.vote.w + 1e-5


def test_changing_the_views_reruns_from_the_classifier(tuned):
    ws, cfg, _ = tuned
    before = backbone_cache_path(ws, cfg)
    cfg.model.views = 2
    ctx = Context(ws, cfg, Console(file=io.StringIO()))
    assert run_stage(ctx, BY_NAME["classifier"], PIPELINE) is True
    after = backbone_cache_path(ws, cfg)
    assert after != before and after.is_file() and before.is_file()  # the other cache is kept


@pytest.mark.parametrize("frozen,backbone,want", [
    (True, "efficientnet_lite0", (1, 10)),  # the bench's best CPU variant (docs/bench-scene-views.md)
    (True, "resnet50", (0, 1)),  # nothing to tune: plain cached features
    (False, "efficientnet_lite0", (0, 1)),  # fine-tuning trains it all
])
def test_auto_tune_blocks_and_views_resolve_by_mode(frozen, backbone, want):
    cfg = Config()
    assert (cfg.model.tune_blocks, cfg.model.views) == (-1, 0)  # auto
    cfg.model.frozen_backbone, cfg.model.backbone = frozen, backbone
    validate(cfg)
    assert (cfg.model.tune_blocks, cfg.model.views) == want
    explicit = Config()
    explicit.model.frozen_backbone, explicit.model.tune_blocks, explicit.model.views = True, 2, 3
    validate(explicit)
    assert (explicit.model.tune_blocks, explicit.model.views) == (2, 3)


def test_retdm_toml_keeps_auto_so_fine_tuning_later_is_not_refused(tmp_path):
    from typer.testing import CliRunner

    from retdmctl.cli import app

    runner = CliRunner()
    w = ["-w", str(tmp_path)]
    assert runner.invoke(app, [*w, "ingest", "demo", "--images", "40"]).exit_code == 0
    tiny = ["--set", "model.backbone=tiny_cnn", "--set", "model.pretrained=false", "--set", "model.image_size=32",
            "--set", "runtime.workers=0"]
    assert runner.invoke(app, [*w, "knn", "--set", "model.frozen_backbone=true", *tiny]).exit_code == 0
    saved = (tmp_path / "retdm.toml").read_text()
    assert "tune_blocks = -1\n" in saved and "views = 0\n" in saved and "frozen_backbone = true\n" in saved
    result = runner.invoke(app, [*w, "train", "--stage", "classifier", "--finetune-backbone", "--set", "classifier.epochs=1"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "classifier" / "checkpoint.pt")
    assert not ckpt["frozen_backbone"] and ckpt["config"]["model"]["tune_blocks"] == 0  # resolved for fine-tuning
