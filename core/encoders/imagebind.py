"""ImageBind as an encoder: the official preprocessing of each modality, the released weights
(found, or downloaded where the network allows), and one 1024-d space for images, audio, text,
video, depth, thermal and IMU, so inputs of different kinds mix in one bind network.

Preprocessing, as the released model was trained:
- image: RGB, shorter side to 224 (bicubic), centre crop 224, CLIP mean/std; the model repeats a
  still image to 2 frames.
- audio: 16 kHz mono, 3 clips of 2 s with evenly spaced starts, each clip's mean removed, Kaldi
  fbank (128 mel bins, 25 ms / 10 ms, Hanning, htk_compat, no energy, no dither; torchaudio's
  implementation: kaldi-native-fbank refuses 128 bins at 16 kHz as too many), padded or cut to 204
  frames, normalized with mean -4.268 and std 9.138.
- text: CLIP BPE ids, context 77 (open_clip's tokenizer gives the released tokenizer's ids; past 75
  tokens it keeps the end-of-text id at the end, which the released one drops).
- video: 5 clips of 2 s evenly spaced, 2 frames each, shorter side to 224, 3 spatial crops.
- depth, thermal: one channel, shorter side to 224, centre crop 224. IMU: 6 x 2000 samples.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.encoders import Encoder, embed_by_group, register
from core.errors import UserError, first_line
from core.files import cache_dir, cached_file

URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
FILE = "imagebind_huge.pth"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZE = 224
RATE, AUDIO_CLIPS, CLIP_SECONDS, MEL_BINS, MEL_FRAMES = 16_000, 3, 2.0, 128, 204
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138
VIDEO_CLIPS, VIDEO_FRAMES = 5, 2
IMU_SHAPE = (6, 2000)
# input kind (as records and the app name them) -> ImageBind modality
MODALITY = {"image": "vision", "video": "vision", "audio": "audio", "text": "text", "depth": "depth",
            "thermal": "thermal", "imu": "imu"}


# -- preprocessing ------------------------------------------------------------------------------
def image_tensor(image) -> torch.Tensor:
    """PIL image -> (3, 224, 224): shorter side 224 bicubic, centre crop, CLIP mean/std."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    image = TF.center_crop(TF.resize(image.convert("RGB"), SIZE, InterpolationMode.BICUBIC), SIZE)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


def clip_starts(duration: float, clip: float, n: int) -> list[float]:
    """n clip starts spread evenly from 0 to the last start that fits (all 0 when nothing fits)."""
    last = max(duration - clip, 0.0)
    return [last * i / max(n - 1, 1) for i in range(n)]


def audio_tensor(waveform: np.ndarray, rate: int = RATE) -> torch.Tensor:
    """16 kHz mono waveform -> (3, 1, 128, 204) normalized log-mel clips."""
    try:
        import torchaudio.compliance.kaldi as kaldi
    except ImportError:
        raise UserError("ImageBind audio needs `pip install --no-deps torchaudio==2.11.0` "
                        "(see requirements-nodeps.txt)") from None
    if rate != RATE:
        raise UserError(f"ImageBind audio must be resampled to {RATE} Hz first, got {rate}")
    wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).flatten()
    clips = []
    for start in clip_starts(len(wave) / RATE, CLIP_SECONDS, AUDIO_CLIPS):
        clip = wave[int(start * RATE):int((start + CLIP_SECONDS) * RATE)]
        clip = (clip - clip.mean())[None]
        fbank = kaldi.fbank(clip, htk_compat=True, sample_frequency=RATE, use_energy=False, window_type="hanning",
                            num_mel_bins=MEL_BINS, dither=0.0, frame_length=25, frame_shift=10).T
        fbank = F.pad(fbank, (0, MEL_FRAMES - fbank.shape[1])) if fbank.shape[1] < MEL_FRAMES else fbank[:, :MEL_FRAMES]
        clips.append((fbank[None] - AUDIO_MEAN) / AUDIO_STD)
    return torch.stack(clips)


def text_ids(texts: list[str]) -> torch.Tensor:
    import open_clip
    return open_clip.tokenize(texts, context_length=77)


def video_frame_indices(n_frames: int, fps: float) -> list[list[int]]:
    """For each of the 5 clips of 2 s (evenly spaced starts), the indices of its 2 frames,
    spread evenly over the clip's frames (first and last)."""
    picks = []
    for start in clip_starts(n_frames / fps, CLIP_SECONDS, VIDEO_CLIPS):
        first = int(start * fps)
        stop = max(first + 1, min(n_frames, int((start + CLIP_SECONDS) * fps)))
        picks.append([first + int(i) for i in torch.linspace(0, stop - first - 1, VIDEO_FRAMES).long()])
    return picks


def video_tensor(frames, fps: float) -> torch.Tensor:
    """Frames at `fps` ((T, H, W, 3) uint8, or anything indexable that gives such frames) ->
    (15, 3, 2, 224, 224): 5 clips of 2 frames, shorter side 224 (bilinear), CLIP mean/std,
    left/centre/right (or top/centre/bottom) crops."""
    if len(frames) == 0 or not fps > 0:
        raise UserError(f"a video needs frames and a positive frame rate, got {len(frames)} frames at {fps}")
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for picks in video_frame_indices(len(frames), fps):
        clip = np.stack([np.asarray(frames[i]) for i in picks])
        if clip.ndim != 4 or clip.shape[-1] != 3:
            raise UserError(f"video frames must be (height, width, 3), got {clip.shape[1:]}")
        clip = torch.as_tensor(clip).permute(3, 0, 1, 2).float() / 255  # C, T, H, W
        h, w = clip.shape[-2:]
        size = (SIZE, int(w / h * SIZE)) if h <= w else (int(h / w * SIZE), SIZE)
        clip = (F.interpolate(clip, size=size, mode="bilinear", align_corners=False) - mean) / std
        out += [_crop(clip, i) for i in range(3)]
    return torch.stack(out)


VIDEO_FORMATS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
VIDEO_ACCEPTED = "accepted: an MP4, WebM, MOV, AVI or MKV video"


class DecodedFrames:
    """A video's frames by index, holding only those decoded (the ones its clips use)."""
    def __init__(self, frames: dict[int, np.ndarray], count: int):
        self.frames, self.count = frames, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return self.frames[i]


def read_video(source) -> tuple[DecodedFrames, float]:
    """A video file -> (its frames, decoded only where the 5 clips need them; frames per second)."""
    from core.encoders import media_file
    path = media_file(source, VIDEO_FORMATS, "video", VIDEO_ACCEPTED)
    try:
        import av
    except ImportError:
        raise UserError("video files need `pip install av==18.1.0` (PyAV)") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path.name}: no video stream; {VIDEO_ACCEPTED}")
            stream = container.streams.video[0]
            fps, count = float(stream.average_rate or 0), stream.frames
        if not fps:
            raise UserError(f"{path.name}: no frame rate; {VIDEO_ACCEPTED}")
        frames, decoded, complete = _decode_picks(path, count, fps)
        if not count or not complete:  # the header did not say, or overstated, how many frames there are
            count = decoded
            frames, decoded, complete = _decode_picks(path, count, fps)
    except av.error.FFmpegError as e:
        raise UserError(f"{path.name}: unreadable video ({str(e)[:120]}); {VIDEO_ACCEPTED}") from None
    if not frames:
        raise UserError(f"{path.name}: no frames; {VIDEO_ACCEPTED}")
    return DecodedFrames(frames, count), fps


def _decode_picks(path, count: int, fps: float) -> tuple[dict[int, np.ndarray], int, bool]:
    """The frames the clips of a `count`-frame video use, how many frames were decoded (every one
    when count is 0), and whether all the needed ones were there."""
    import av
    needed = {i for picks in video_frame_indices(count, fps) for i in picks} if count else set()
    frames, decoded = {}, 0
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            decoded = i + 1
            if i in needed:
                frames[i] = frame.to_ndarray(format="rgb24")
            if needed and i >= max(needed):
                break
    return frames, decoded, len(frames) == len(needed)


def _crop(clip: torch.Tensor, where: int) -> torch.Tensor:
    """A 224 crop of (C, T, H, W) along its longer side: 0 start, 1 centre, 2 end."""
    h, w = clip.shape[-2:]
    y, x = math.ceil((h - SIZE) / 2), math.ceil((w - SIZE) / 2)
    if h > w:
        y = {0: 0, 1: y, 2: h - SIZE}[where]
    else:
        x = {0: 0, 1: x, 2: w - SIZE}[where]
    return clip[..., y:y + SIZE, x:x + SIZE]


def single_channel_tensor(image) -> torch.Tensor:
    """A depth or thermal image (PIL, or an (H, W) array) -> (1, 224, 224): shorter side 224, centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.ndim == 3:  # a greyscale image read as RGB
        x = x.mean(-1)
    if x.ndim != 2 or not torch.isfinite(x).all():
        raise UserError(f"a depth or thermal map must be one finite (height, width) channel, got {tuple(x.shape)}")
    if not isinstance(image, np.ndarray):
        x = x / 255
    return TF.center_crop(TF.resize(x[None], SIZE, InterpolationMode.BICUBIC), SIZE)


def imu_tensor(series: np.ndarray) -> torch.Tensor:
    """(6, N) or (N, 6) accelerometer + gyroscope samples -> (6, 2000), cut or zero-padded."""
    x = torch.as_tensor(np.asarray(series, dtype=np.float32))
    if x.ndim == 2 and x.shape[0] != 6 and x.shape[1] == 6:
        x = x.T
    if x.ndim != 2 or x.shape[0] != 6 or not torch.isfinite(x).all() or x.shape[1] == 0:
        raise UserError(f"IMU data must be 6 finite channels (6 x N or N x 6), got {tuple(x.shape)}")
    return F.pad(x, (0, max(IMU_SHAPE[1] - x.shape[1], 0)))[:, :IMU_SHAPE[1]]


# -- weights -------------------------------------------------------------------------------------
def missing_weights(reason: str, file: str = FILE, url: str | None = URL, what: str = "ImageBind") -> UserError:
    where = f"download {url} and pass" if url else "pass"
    size = ", 4.5 GB" if file == FILE else ""
    return UserError(f"{what} needs its released weights ({file}{size}) and {reason}: {where} --encoder-weights PATH "
                     f"(or put it at {cache_dir() / file}); the embedded encoders (efficientnet-lite0, "
                     "whisper-tiny, pointnet) need nothing")


def find_weights(path: str | os.PathLike | None = None, url: str | None = URL, download: bool = True,
                 file: str = FILE, what: str = "ImageBind") -> Path:
    """The checkpoint: `path` if given, else the cached copy, else downloaded into the cache (with
    a progress bar, into a temporary file renamed when complete; its SHA-256 kept beside it and
    checked on later loads)."""
    if path:
        if not Path(path).is_file():
            raise missing_weights(f"{path} is not a file", file, url, what)
        return Path(path)
    return cached_file(file, url if download else None, lambda reason: missing_weights(reason, file, url, what))


def read_state_dict(path: Path) -> dict:
    """A released checkpoint's tensors (weights only: nothing in it is ever executed)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt, truncated, or not a weights-only pickle
        raise UserError(f"{Path(path).name}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{Path(path).name}: holds a {type(state).__name__}, not a state dict")
    return state


def load_checkpoint(path: Path, dtype: torch.dtype | None = None):
    """The ImageBind model from a released-format checkpoint (a plain state dict)."""
    from core.encoders.imagebind_model import build
    return build(state_dict=read_state_dict(path), dtype=dtype)


@register("imagebind")
class ImageBindEncoder(Encoder):
    """All of ImageBind's modalities in one 1024-d space. `load` takes the kind ("image", "audio",
    "text", "video", "depth", "thermal", "imu") and returns (modality, tensor); `embed` runs each
    modality's items (of one shape) as one batch and returns the rows in input order."""
    name = "imagebind"
    modality = "image"
    kinds = tuple(MODALITY)
    dim = 1024

    def __init__(self, weights: str | None = None, dtype: str | None = None, model=None):
        self.model = model or load_checkpoint(find_weights(weights), getattr(torch, dtype) if dtype else None)
        self.dim = self.model.args.out_dim

    def load(self, source, kind: str | None = None):
        kind = kind or self.modality
        if kind not in MODALITY:
            raise UserError(f"ImageBind reads no {kind!r}; accepted: {', '.join(MODALITY)}")
        if kind == "image":
            from core.encoders.image import read_image
            return "vision", image_tensor(read_image(source))
        if kind == "audio":
            from core.encoders.audio import read_audio
            return "audio", audio_tensor(read_audio(source))
        if kind == "text":
            if not isinstance(source, str) or not source.strip():
                raise UserError("text for ImageBind must be a non-empty string")
            return "text", text_ids([source])[0]
        if kind == "video":
            frames, fps = read_video(source) if isinstance(source, (str, Path)) else source
            return "vision", video_tensor(frames, fps)
        if kind in ("depth", "thermal"):
            return kind, single_channel_tensor(_array_or_image(source))
        return "imu", imu_tensor(np.load(source) if isinstance(source, (str, Path)) else source)

    def encode(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.embed(modality, batch if modality == "text" else batch.to(dtype))

    @torch.no_grad()
    def embed(self, inputs: list) -> torch.Tensor:
        return embed_by_group(inputs, self.encode)


def _array_or_image(source):
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".npy":
        return np.load(source, allow_pickle=False)
    if isinstance(source, (str, Path)):
        from core.encoders.image import read_image
        return read_image(source).convert("L")
    return source
