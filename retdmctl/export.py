"""Exporting the image network (backbone + phi + W_c) to ONNX or TorchScript.

Both formats take ``images`` (N, 3, H, W) float32, NCHW, RGB, normalised as the metadata
says, with a dynamic batch dimension, and return ``logits`` and ``probabilities``
(sigmoid of the logits), each (N, L). The metadata (labels, thresholds, the exact
preprocessing, version, source checkpoint) goes into the ONNX file's ``metadata_props``
under the key ``retdmctl`` as one JSON string; for TorchScript into ``<output>.json``.

The neighbour vote (:mod:`retdmctl.fusion`) is exported where it searches exactly: its
bank and labels are constants of the graph (MatMul, TopK). Past
:data:`EXTERNAL_DATA_BYTES` of weights, the ONNX file keeps them in ``<output>.data``
beside it (protobuf caps a file at 2 GB), a file that must travel with the model. A
vote that searches an approximate (IVF) index cannot be exported: neither format can
reproduce the index, so export refuses and names ``--no-fusion``.

ONNX needs the optional extra: ``pip install "retdmctl[export]"`` (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from retdmctl.errors import RetdmError
from retdmctl.inference import Predictor
from retdmctl.workspace import atomic_path

OPSET = 17  # supported by every onnxruntime >= 1.13
METADATA_KEY = "retdmctl"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
EXTRA_HINT = 'ONNX export needs the optional extra: pip install "retdmctl[export]"'
# Weights (float32) beyond which ONNX keeps them in an external data file: protobuf caps
# a serialised model at 2 GB, and this leaves room for the graph. A vote's bank is
# 2.4 KB per training image at 512-d and 80 labels (bench/vote_scale.py): ~6 x 10^5 images.
EXTERNAL_DATA_BYTES = 1_500_000_000


def _example(predictor: Predictor, batch: int = 2) -> torch.Tensor:
    h, w = predictor.preprocess.input_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def _cpu_float_model(predictor: Predictor) -> torch.nn.Module:
    return predictor.classifier.to("cpu").float().eval()


def check_vote(predictor: Predictor, fmt: str) -> None:
    """Refuse a vote that ``fmt`` cannot reproduce (one that searches an approximate index)."""
    vote = predictor.vote
    if vote is not None and vote.kind != "exact":
        raise RetdmError(f"this model's neighbour vote searches an approximate index ({vote.kind}, {vote.size:,} "
                         f"training images) that {fmt} cannot reproduce: export with --no-fusion")


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def data_file(output: Path) -> Path:
    """Where an ONNX model at ``output`` keeps its external weights."""
    return output.with_name(output.name + ".data")


def export_onnx(predictor: Predictor, output: Path) -> dict:
    """Write ``output`` (ONNX, opset :data:`OPSET`), and ``<output>.data`` with its weights
    where they exceed :data:`EXTERNAL_DATA_BYTES`; returns the metadata written (its
    ``external_data``: that file's name, or None)."""
    try:
        import onnx
    except ImportError:
        raise RetdmError(EXTRA_HINT) from None
    check_vote(predictor, "ONNX")
    model = _cpu_float_model(predictor)
    data = data_file(output)
    external = weight_bytes(model) > EXTERNAL_DATA_BYTES
    meta = {**predictor.metadata(), "opset": OPSET, "input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES),
            "external_data": data.name if external else None}
    output.parent.mkdir(parents=True, exist_ok=True)
    # A model past 2 GB is written by the exporter as a file per tensor: in a folder of its own
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as work, warnings.catch_warnings():
        raw = Path(work) / "raw.onnx"
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        # dynamo=False: the TorchScript-based exporter works offline with onnx alone.
        torch.onnx.export(
            model,
            (_example(predictor),),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        proto.producer_name = "retdmctl"
        proto.doc_string = "retdmctl image classifier: images -> logits, probabilities; preprocessing in metadata_props['retdmctl']"
        if not external:
            onnx.checker.check_model(proto)
            with atomic_path(output) as tmp:
                onnx.save(proto, str(tmp))
            data.unlink(missing_ok=True)  # a previous export's weights would only mislead
            return meta
        staged = Path(work) / output.name
        onnx.save(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                  size_threshold=1024)
        del proto
        onnx.checker.check_model(str(staged))  # a path: the checker reads the external data itself
        with atomic_path(data) as tmp:  # the weights first, then the model that names them
            os.replace(Path(work) / data.name, tmp)
        with atomic_path(output) as tmp:
            os.replace(staged, tmp)
    return meta


def export_torchscript(predictor: Predictor, output: Path) -> dict:
    """Write ``output`` (a traced TorchScript module) and ``<output>.json``; returns the metadata."""
    check_vote(predictor, "TorchScript")
    model = _cpu_float_model(predictor)
    meta = {**predictor.metadata(), "input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, _example(predictor), check_trace=False)
    with atomic_path(output) as tmp:
        traced.save(str(tmp))
    sidecar = output.with_name(output.name + ".json")
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta


def onnx_parity(predictor: Predictor, output: Path, batch: int = 3) -> float | None:
    """Max |p_onnxruntime - p_torch| on random inputs, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = _example(predictor, batch)
    with torch.no_grad():
        _, ref = _cpu_float_model(predictor)(x)
    sess = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probabilities"], {INPUT_NAME: x.numpy()})
    return float(np.abs(probs - ref.numpy()).max())


def torchscript_parity(predictor: Predictor, output: Path, batch: int = 3) -> float:
    x = _example(predictor, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(output), map_location="cpu")
    with torch.no_grad():
        _, ref = _cpu_float_model(predictor)(x)
        _, got = loaded(x)
    return float((got - ref).abs().max())
