"""Generated audio clips with questions about them: spoken words (Debian's `espeak-ng`, random
voice, speed and pitch), tones at a low, medium or high pitch, 1 to 5 beeps to count, and white,
pink or brown noise; each with a random start, loudness and a faint noise floor. Questions ask
the kind of sound, then the word, the pitch, the number of beeps or the kind of noise, with
one-word answers. Clip i of a split comes from a seed no other split uses.

    python -m train.audioclips [--out data/audio] [--train 4000] [--test 400]
    python -m train.audioclips --examples assets/examples/audio
"""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np

from core.errors import UserError
from train.data import write_generated

RATE = 16_000
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "yes", "no", "up", "down", "left", "right", "stop", "go", "cat", "dog")
KINDS = {"speech": 0.4, "tone": 0.2, "beeps": 0.2, "noise": 0.2}  # share of clips
PITCHES = {"low": (180, 300), "medium": (420, 650), "high": (950, 1500)}  # Hz ranges
NOISES = ("white", "pink", "brown")
VOICES = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4")
SPLITS = {"train": 4000, "test": 400}
QUESTIONS = {"speech": "What word is spoken?", "tone": "Is the tone low, medium or high?",
             "beeps": "How many beeps are there?", "noise": "What kind of noise is this?"}


def _seed(split: str, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"audio/{split}/{i}".encode()).digest()[:8], "little")


def speak(word: str, rng: np.random.Generator) -> np.ndarray:
    """`word` spoken by espeak-ng with a random voice, speed and pitch, at 16 kHz."""
    import soundfile as sf
    import soxr
    if shutil.which("espeak-ng") is None:
        raise UserError("spoken clips need Debian's espeak-ng (apt-get install espeak-ng)")
    voice = VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))]
    cmd = ["espeak-ng", "-v", voice, "-s", str(int(rng.integers(120, 200))), "-p", str(int(rng.integers(25, 75))),
           "--stdout", word]
    wave, rate = sf.read(io.BytesIO(subprocess.run(cmd, capture_output=True, check=True).stdout), dtype="float32")
    return soxr.resample(wave, rate, RATE).astype(np.float32)


def tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)  # 10 ms ramps: no clicks
    return (np.sin(2 * np.pi * freq * t) * fade).astype(np.float32)


def noise(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """White (flat), pink (1/f power) or brown (1/f^2 power) noise, by shaping a white spectrum."""
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / RATE), 20.0)
    spectrum *= {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[kind]
    wave = np.fft.irfft(spectrum, n)
    return (wave / np.abs(wave).max()).astype(np.float32)


def clip(split: str, i: int) -> tuple[np.ndarray, dict]:
    """(16 kHz mono waveform, what it holds), deterministic in (split, i)."""
    rng = np.random.default_rng(_seed(split, i))
    kind = list(KINDS)[rng.choice(len(KINDS), p=list(KINDS.values()))]
    if kind == "speech":
        label = WORDS[rng.integers(len(WORDS))]
        sound = speak(label, rng)
    elif kind == "tone":
        label = list(PITCHES)[rng.integers(len(PITCHES))]
        sound = tone(rng.uniform(*PITCHES[label]), rng.uniform(0.6, 2.0))
    elif kind == "beeps":
        count = int(rng.integers(1, 6))
        label = str(count)
        freq, parts = rng.uniform(700, 1300), []
        for _ in range(count):
            parts += [tone(freq, rng.uniform(0.08, 0.15)), np.zeros(int(rng.uniform(0.15, 0.35) * RATE), np.float32)]
        sound = np.concatenate(parts)
    else:
        label = NOISES[rng.integers(len(NOISES))]
        sound = noise(label, rng.uniform(0.8, 2.0), rng)
    lead, tail = np.zeros(int(rng.uniform(0.05, 0.4) * RATE), np.float32), np.zeros(int(0.2 * RATE), np.float32)
    wave = np.concatenate([lead, sound / max(np.abs(sound).max(), 1e-6) * rng.uniform(0.2, 0.9), tail])
    wave += rng.normal(0, 10 ** (rng.uniform(-4, -2.5)), len(wave)).astype(np.float32)  # a faint noise floor
    return np.clip(wave, -1, 1).astype(np.float32), {"kind": kind, "label": label}


def questions(facts: dict) -> list[tuple[str, str]]:
    return [("What kind of sound is this?", facts["kind"]), (QUESTIONS[facts["kind"]], facts["label"])]


def write_dataset(out: str | Path = "data/audio", n_train: int = SPLITS["train"], n_test: int = SPLITS["test"]):
    """out/{train,test}/NNNNN.wav (16 kHz, 16-bit) and out/{train,test}.jsonl records {"audio": path,
    "instruction": question, "output": answer}, paths relative to `out`; out/val.jsonl is the first
    200 test questions, for the validation loss while training."""
    import soundfile as sf

    def item(out: Path, split: str, i: int) -> list[dict]:
        wave, facts = clip(split, i)
        name = f"{split}/{i:05d}.wav"
        sf.write(out / name, wave, RATE, subtype="PCM_16")
        return [{"audio": name, "instruction": q, "output": a} for q, a in questions(facts)]
    write_generated(out, {"train": n_train, "test": n_test}, item, "clips")


def write_examples(out: str | Path) -> None:
    """One test clip of each kind for the app, named after what it holds."""
    import soundfile as sf
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    for i in range(200):
        wave, facts = clip("test", i)
        if facts["kind"] in done:
            continue
        done.add(facts["kind"])
        sf.write(out / f"{facts['kind']}-{facts['label']}.wav", wave, RATE, subtype="PCM_16")
        if len(done) == len(KINDS):
            break


if __name__ == "__main__":
    from train.data import generator_cli
    generator_cli("train.audioclips", "audio", "data/audio", SPLITS, write_dataset, write_examples)
