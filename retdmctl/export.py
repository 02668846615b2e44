"""Exporting the image network (backbone + phi + W_c) to ONNX or TorchScript.

Both formats take ``images`` (N, 3, H, W) float32, NCHW, RGB, normalised as the metadata
says, with a dynamic batch dimension, and return ``logits`` and ``probabilities``
(sigmoid of the logits), each (N, L). The metadata (labels, thresholds, the exact
preprocessing, version, source checkpoint) goes into the ONNX file's ``metadata_props``
under the key ``retdmctl`` as one JSON string; for TorchScript into ``<output>.json``.

ONNX needs the optional extra: ``pip install "retdmctl[export]"`` (onnx, onnxruntime).
"""

from __future__ import annotations

import json
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


def _example(predictor: Predictor, batch: int = 2) -> torch.Tensor:
    h, w = predictor.preprocess.input_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def _cpu_float_model(predictor: Predictor) -> torch.nn.Module:
    return predictor.classifier.to("cpu").float().eval()


def export_onnx(predictor: Predictor, output: Path) -> dict:
    """Write ``output`` (ONNX, opset :data:`OPSET`); returns the metadata written."""
    try:
        import onnx
    except ImportError:
        raise RetdmError(EXTRA_HINT) from None
    model = _cpu_float_model(predictor)
    meta = {**predictor.metadata(), "opset": OPSET, "input_name": INPUT_NAME, "output_names": list(OUTPUT_NAMES)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        # dynamo=False: the TorchScript-based exporter works offline with onnx alone.
        torch.onnx.export(
            model,
            (_example(predictor),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        proto.producer_name = "retdmctl"
        proto.doc_string = "retdmctl image classifier: images -> logits, probabilities; preprocessing in metadata_props['retdmctl']"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return meta


def export_torchscript(predictor: Predictor, output: Path) -> dict:
    """Write ``output`` (a traced TorchScript module) and ``<output>.json``; returns the metadata."""
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
