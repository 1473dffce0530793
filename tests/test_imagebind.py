"""ImageBind, OpenCLIP and mixing kinds of input: our ImageBind's layout against the released
checkpoint's manifest; small random configurations against the reference implementation
(peachdb-imagebind, the released model code, a test-only dependency) for every modality; the
official preprocessing against the reference's own functions; clear errors for missing, corrupt
and mismatched checkpoints; an OpenCLIP tower from a local checkpoint; an image and a clip mixed
into one bind network. The real weights (4.5 GB) cannot be had here: the manifest stands in."""
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from core.encoders import ENCODERS, encoder_kinds, get_encoder
from core.encoders import imagebind as ib
from core.encoders.imagebind_model import MODALITIES, ImageBindArgs, build
from core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT.parent / "shared" / "data" / "imagebind_huge_manifest.tsv"
SMALL = dict(width=32, n_blocks=2, n_heads=4, out_dim=24)
IMAGE = ROOT / "assets" / "examples" / "image" / "red-triangle.png"
CLIP = ROOT / "assets" / "examples" / "audio" / "speech-five.wav"


def manifest() -> dict[str, tuple]:
    rows = [line.rstrip("\n").split("\t") for line in MANIFEST.read_text().splitlines()[1:]]
    return {k: (tuple(int(n) for n in shape.split("x")) if shape != "scalar" else (), kind)
            for k, shape, _dtype, _numel, kind in rows}


def reference():
    """The released model code. Its data module imports pytorchvideo for video decoding, which
    does not import beside torchvision 0.29; the functions used here do not touch it."""
    for name in ("pytorchvideo", "pytorchvideo.transforms", "pytorchvideo.data", "pytorchvideo.data.clip_sampling",
                 "pytorchvideo.data.encoded_video"):
        module = sys.modules.setdefault(name, types.ModuleType(name))
        module.ConstantClipsPerVideoSampler = module.EncodedVideo = None
    import imagebind.data
    from imagebind.models.imagebind_model import ImageBindModel
    return ImageBindModel, imagebind.data


@pytest.fixture(scope="module")
def small_pair():
    """The same small random weights in the reference model and in ours."""
    ImageBindModel, _ = reference()
    torch.manual_seed(0)
    kw = {f"{m}_{part}": SMALL[key] for m in MODALITIES
          for part, key in (("embed_dim", "width"), ("num_blocks", "n_blocks"), ("num_heads", "n_heads"))}
    theirs = ImageBindModel(out_embed_dim=SMALL["out_dim"], **kw).eval()
    ours = build(ImageBindArgs.small(**SMALL), state_dict=theirs.state_dict())
    return theirs, ours


def test_imagebind_huge_has_exactly_the_released_keys_shapes_and_buffers():
    with torch.device("meta"):
        model = ib_huge()
    released = manifest()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(released) == len(ours) == 1311
    assert ours == {k: shape for k, (shape, _) in released.items()}
    params = dict(model.named_parameters())
    assert {k for k, (_, kind) in released.items() if kind == "param"} == set(params)


def ib_huge():
    from core.encoders.imagebind_model import ImageBind
    return ImageBind(ImageBindArgs())


def test_imagebind_huge_builds_from_a_checkpoint_in_seconds_without_a_random_init(tmp_path):
    """A full-size state dict (uninitialized tensors of the manifest's shapes) loads strictly into
    a model built on the meta device: no init, no copy. In a fresh process, so its memory is its own."""
    script = """
import resource, time, torch
from tests.test_imagebind import manifest
from core.encoders.imagebind_model import build
state = {k: torch.empty(shape) for k, (shape, _) in manifest().items()}
start = time.perf_counter()
model = build(state_dict=state)
took = time.perf_counter() - start
assert model.modality_trunks["vision"].blocks[31].mlp.fc1.weight.data_ptr() == state[
    "modality_trunks.vision.blocks.31.mlp.fc1.weight"].data_ptr()  # the checkpoint's own tensors
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seconds, peak_gib = map(float, out.stdout.split())
    assert seconds < 5 and peak_gib < 5, (seconds, peak_gib)


def test_small_random_imagebind_equals_the_reference_for_every_modality(small_pair):
    theirs, ours = small_pair
    g = torch.Generator().manual_seed(1)
    inputs = {
        "vision": torch.randn(2, 3, 224, 224, generator=g),
        "text": ib.text_ids(["a dog barking", "rain on a tin roof"]),
        "audio": torch.randn(2, 3, 1, 128, 204, generator=g),       # 3 clips per item, averaged
        "depth": torch.randn(2, 1, 224, 224, generator=g),
        "thermal": torch.randn(2, 1, 224, 224, generator=g),
        "imu": torch.randn(2, 6, 2000, generator=g),
    }
    video = {"vision": torch.randn(1, 6, 3, 2, 224, 224, generator=g)}  # 6 clips of 2 frames
    with torch.no_grad():
        want, got = theirs(inputs), ours(inputs)
        want_video, got_video = theirs(video)["vision"], ours(video)["vision"]
    for m in MODALITIES:
        assert got[m].shape == (2, SMALL["out_dim"])
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=1e-5, msg=m)
    torch.testing.assert_close(got_video, want_video, rtol=0, atol=1e-5)
    # the postprocessors' scales: unit vision, audio x20, depth x5, thermal x10, IMU x5, text x 1/0.07
    norms = {m: got[m].norm(dim=-1).mean().item() for m in MODALITIES}
    with torch.no_grad():  # one clip, not the average of three
        norms["audio"] = ours.embed("audio", inputs["audio"][:, 0]).norm(dim=-1).mean().item()
    assert norms == pytest.approx({"vision": 1, "audio": 20, "depth": 5, "thermal": 10, "imu": 5, "text": 1 / 0.07},
                                  rel=1e-4)


def test_small_imagebind_loads_in_bfloat16_on_request(small_pair):
    theirs, _ = small_pair
    half = build(ImageBindArgs.small(**SMALL), state_dict=theirs.state_dict(), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(half.embed("vision", x.bfloat16()).float(), theirs({"vision": x})["vision"],
                                   rtol=0, atol=0.05)


def test_preprocessing_of_a_known_image_tone_and_text_equals_the_reference():
    _, data = reference()
    torch.testing.assert_close(ib.image_tensor(__import__("PIL.Image").Image.open(IMAGE)),
                               data.load_and_transform_vision_data([str(IMAGE)], "cpu")[0], rtol=0, atol=1e-6)
    rate = 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(5.5 * rate)) / rate)).astype(np.float32)
    ours = ib.audio_tensor(tone, rate)
    assert ib.clip_starts(5.5, 2.0, 3) == [0.0, 1.75, 3.5]  # evenly spaced, the last ending at the end
    want = []
    for start in (0.0, 1.75, 3.5):
        clip = torch.from_numpy(tone[int(start * rate):int((start + 2) * rate)])[None].clone()
        want.append((data.waveform2melspec(clip, rate, 128, 204) - ib.AUDIO_MEAN) / ib.AUDIO_STD)
    assert ours.shape == (3, 1, 128, 204)
    torch.testing.assert_close(ours, torch.stack(want), rtol=0, atol=1e-5)
    texts = ["A dog.", "a photo of a CAT!! ünïcödé &amp; html", ""]
    torch.testing.assert_close(ib.text_ids(texts), data.load_and_transform_text(texts, "cpu"), rtol=0, atol=0)


def test_video_clips_are_cropped_like_the_reference():
    _, data = reference()
    frames = np.random.default_rng(0).integers(0, 256, (150, 240, 320, 3), dtype=np.uint8)  # 5 s at 30 fps
    clips = ib.video_tensor(frames, 30.0)
    assert clips.shape == (15, 3, 2, 224, 224)
    scaled = torch.nn.functional.interpolate(torch.from_numpy(frames[[0, 59]]).permute(3, 0, 1, 2).float() / 255,
                                             size=(224, 298), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(ib.CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(ib.CLIP_STD).view(3, 1, 1, 1)
    crops = data.SpatialCrop(224, num_crops=3)([(scaled - mean) / std])  # left, centre, right
    torch.testing.assert_close(clips[:3], torch.stack(crops), rtol=0, atol=1e-5)


def test_missing_corrupt_and_mismatched_checkpoints_get_one_line_errors(tmp_path, monkeypatch, small_pair):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"imagebind_huge.pth.*none were found.*--encoder-weights PATH"):
        ib.find_weights(download=False)
    with pytest.raises(UserError, match=r"nowhere.pth is not a file.*dl.fbaipublicfiles.com"):
        ib.find_weights(tmp_path / "nowhere.pth")
    with pytest.raises(UserError, match="the download failed"):  # no server there: the network refuses
        ib.find_weights(url="http://127.0.0.1:9/imagebind_huge.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(UserError, match="corrupt.pth: not a readable PyTorch checkpoint"):
        ib.load_checkpoint(corrupt)
    small = tmp_path / "small.pth"
    torch.save(small_pair[0].state_dict(), small)
    with pytest.raises(UserError, match="not an ImageBind checkpoint of this size|does not fit"):
        ib.load_checkpoint(small)  # the huge layout expected; a small file has other shapes
    code = tmp_path / "code.pth"
    torch.save({"model": types.SimpleNamespace(a=1)}, code)  # a pickle of an arbitrary object: never unpickled
    with pytest.raises(UserError, match="code.pth: not a readable PyTorch checkpoint"):
        ib.load_checkpoint(code)


def test_download_goes_to_the_cache_whole_and_is_checked_on_later_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "served.pth"
    source.write_bytes(b"stand-in bytes" * 1000)
    got = ib.find_weights(url=source.as_uri())  # urllib reads file:// as it reads https://
    assert got == tmp_path / "cache" / ib.FILE and got.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in got.parent.iterdir()) == [ib.FILE, "imagebind_huge.sha256"]  # no partial file
    assert ib.find_weights(download=False) == got
    got.write_bytes(b"changed")
    with pytest.raises(UserError, match="SHA-256 differs"):
        ib.find_weights(download=False)


@pytest.fixture
def tiny_imagebind(small_pair):
    """A small random ImageBind behind the encoder interface, registered under a test name."""
    encoder = ib.ImageBindEncoder(model=small_pair[1])
    ENCODERS["tiny-random-imagebind"] = lambda: encoder
    yield encoder
    del ENCODERS["tiny-random-imagebind"]


def test_tiny_random_imagebind_encoder_reads_every_kind_into_one_space(tiny_imagebind):
    rng = np.random.default_rng(0)
    items = [tiny_imagebind.load(IMAGE, "image"), tiny_imagebind.load(CLIP, "audio"),
             tiny_imagebind.load("a spoken number", "text"),
             tiny_imagebind.load((rng.integers(0, 256, (40, 120, 160, 3), dtype=np.uint8), 20.0), "video"),
             tiny_imagebind.load(rng.random((200, 300)).astype(np.float32), "depth"),
             tiny_imagebind.load(IMAGE, "thermal"), tiny_imagebind.load(rng.standard_normal((1500, 6)), "imu"),
             tiny_imagebind.load(IMAGE, "image")]
    rows = tiny_imagebind.embed(items)
    assert rows.shape == (8, SMALL["out_dim"])
    torch.testing.assert_close(rows[0], rows[7])  # the same image alone in its batch or not
    with torch.no_grad():
        alone = tiny_imagebind.embed([items[1]])
    torch.testing.assert_close(rows[1], alone[0], rtol=0, atol=1e-5)
    assert encoder_kinds("imagebind") == ("image", "video", "audio", "text", "depth", "thermal", "imu")
    with pytest.raises(UserError, match="IMU data must be 6 finite channels"):
        tiny_imagebind.load(np.zeros((5, 100)), "imu")
    with pytest.raises(UserError, match="ImageBind reads no 'points'"):
        tiny_imagebind.load("x.npy", "points")


def test_tiny_random_adapter_mixes_an_image_and_a_clip_through_one_bind_network(tiny_imagebind):
    from core.adapter import Adapter, AdapterConfig
    from core.multimodal import combine, embed_inputs
    from tests.test_adapter import tiny_random_model
    model = tiny_random_model()
    adapter = Adapter.create(model, AdapterConfig(prompt_len=2, layers=2, encoder="tiny-random-imagebind",
                                                  encoder_dim=SMALL["out_dim"]))
    with torch.no_grad():
        adapter.bind.gate.fill_(0.5)
        mixed = embed_inputs(adapter, [IMAGE, CLIP], ["image", "audio"], [0.7, 0.3])
        image, clip = tiny_imagebind.embed([tiny_imagebind.load(IMAGE, "image"), tiny_imagebind.load(CLIP, "audio")])
        torch.testing.assert_close(mixed, adapter.bind(combine([image[None], clip[None]], [0.7, 0.3])))
        only_image = embed_inputs(adapter, [IMAGE, CLIP], ["image", "audio"], [1.0, 0.0])
        torch.testing.assert_close(only_image, embed_inputs(adapter, [IMAGE], "image"))
    plain = Adapter.create(model, AdapterConfig(prompt_len=2, layers=2, encoder="efficientnet-lite0", encoder_dim=1280))
    with pytest.raises(UserError, match="encoder efficientnet-lite0 reads image, not audio"):
        embed_inputs(plain, [IMAGE, CLIP], ["image", "audio"], [0.5, 0.5])


def test_imagebind_without_weights_says_what_is_missing_from_the_cli(tmp_path):
    """An adapter trained with --encoder imagebind, asked about an image where no weights exist."""
    from core.adapter import Adapter, AdapterConfig, save_adapter
    from core.loading import load_model
    lm = load_model("smollm2")
    adapter = Adapter.create(lm.model, AdapterConfig(prompt_len=2, layers=2, encoder="imagebind", encoder_dim=1024))
    path = tmp_path / "ib.safetensors"
    save_adapter(adapter, path)
    env = {"STUDIO_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "core.generate", "--adapter", str(path), "--image", str(IMAGE),
                          "--encoder-weights", str(tmp_path / "imagebind_huge.pth"), "--prompt", "What is it?"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ImageBind needs its released weights")
    assert "--encoder-weights PATH" in out.stderr and "dl.fbaipublicfiles.com" in out.stderr


def tiny_openclip(tmp_path, arch: str, vision_cfg: dict):
    """A small OpenCLIP architecture of our own, registered with open_clip and saved with random
    weights; returns (model, preprocess, the encoder loaded as openclip:ARCH:PATH)."""
    import open_clip
    config = {"embed_dim": 16, "vision_cfg": vision_cfg,
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (tmp_path / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / f"{arch}.json"))
    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    torch.save(model.state_dict(), tmp_path / f"{arch}.pt")
    return model, preprocess, get_encoder(f"openclip:{arch}:{tmp_path / f'{arch}.pt'}", "image")


def test_openclip_tower_from_a_local_checkpoint(tmp_path):
    """A small OpenCLIP architecture (a config of our own, registered with open_clip) saved with
    random weights, then loaded by name and path: openclip:ARCH:PATH, offline."""
    model, preprocess, encoder = tiny_openclip(tmp_path, "tiny-random-clip", {"image_size": 32, "layers": 1, "width": 32,
                                                                             "head_width": 8, "patch_size": 8})
    assert encoder.dim == 16 and encoder.kinds == ("image", "text")
    rows = encoder.embed([encoder.load(IMAGE), encoder.load("a red triangle", "text")])
    with torch.no_grad():
        want = model.eval().encode_image(preprocess(__import__("PIL.Image").Image.open(IMAGE).convert("RGB"))[None],
                                         normalize=True)
    torch.testing.assert_close(rows[0], want[0], rtol=0, atol=1e-5)
    assert rows.norm(dim=-1).tolist() == pytest.approx([1, 1])
    # V2's visual queries read every token as V2 reads CLIP's: the last block's output through
    # ln_post and the projection, the class token first (so token 0, unit length, is the embedding)
    tokens = encoder.tokens([encoder.load(IMAGE)])
    assert tokens.shape == (1, 1 + (32 // 8) ** 2, 16)
    torch.testing.assert_close(torch.nn.functional.normalize(tokens[:, 0], dim=-1), rows[:1], rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="the visual queries read images only"):
        encoder.tokens([encoder.load("a red triangle", "text")])
    with pytest.raises(UserError, match="unknown OpenCLIP architecture 'no-such-arch'"):
        get_encoder("openclip:no-such-arch:x.pt")
    with pytest.raises(UserError, match="openclip:tiny-random-clip needs weights"):
        get_encoder("openclip:tiny-random-clip")
    with pytest.raises(UserError, match="neither a pretrained tag of tiny-random-clip nor a checkpoint file"):
        get_encoder("openclip:tiny-random-clip:missing.pt")


def test_openclip_resnet_tower_gives_its_last_grid_as_tokens(tmp_path):
    """Any open_clip tower gives tokens for V2's visual queries: a small random ModifiedResNet
    (CLIP's RN50 family) its last stage's 2 x 2 grid in the trunk's width, row by row."""
    model, _, encoder = tiny_openclip(tmp_path, "tiny-random-rn", {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16,
                                                                    "head_width": 8})
    image = encoder.load(IMAGE)
    tokens = encoder.tokens([image, image])
    with torch.no_grad():
        grid = model.eval().visual.forward_intermediates(image[1][None], indices=1, intermediates_only=True)
    assert tokens.shape == (2, 4, 16 * 32)
    torch.testing.assert_close(tokens[1], grid["image_intermediates"][-1][0].flatten(1).T, rtol=0, atol=1e-5)


def test_tiny_random_imagebind_embeds_a_file_of_image_and_audio_records_once_each(tiny_imagebind, tmp_path):
    from train.data import embed_media, load_records
    data = tmp_path / "mixed.jsonl"
    records = [{"image": str(IMAGE), "instruction": "What shape?", "output": "triangle"},
               {"audio": str(CLIP), "instruction": "What word?", "output": "five"},
               {"image": str(IMAGE), "instruction": "What colour?", "output": "red"}]
    data.write_text("\n".join(json.dumps(r) for r in records))
    assert len(load_records(str(data))) == 3  # kinds of media may share a file
    examples = [types.SimpleNamespace(media=(k, r[k]), features=None) for r in records for k in ("image", "audio") if k in r]
    with pytest.raises(UserError, match="these records mix audio and image: name one --encoder"):
        embed_media(examples)
    with pytest.raises(UserError, match="encoder efficientnet-lite0 reads image, not audio"):
        embed_media(examples, "efficientnet-lite0")
    assert embed_media(examples, "tiny-random-imagebind") == "tiny-random-imagebind"
    torch.testing.assert_close(examples[0].features, examples[2].features)
    assert examples[1].features.shape == (SMALL["out_dim"],)
    assert not torch.allclose(examples[0].features, examples[1].features)
    text_and_image = tmp_path / "text-and-image.jsonl"
    text_and_image.write_text(json.dumps(records[0]) + "\n" + json.dumps({"instruction": "Hi", "output": "Hello"}))
    with pytest.raises(UserError, match="records mix text-only and image records"):
        load_records(str(text_and_image))


def official_imagebind_llm_state(model, top: int, rank: int, legacy: bool, feature_dim: int = 24, seed: int = 0) -> dict:
    """A random state dict with the released ImageBind-LLM adapter's layout, at a tiny model's size."""
    a = model.args
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    hd, hidden, dim = a.head_dim, a.hidden_dim, a.dim
    outs = {"attention.wq": (a.n_heads * hd, dim), "attention.wk": (a.n_kv_heads * hd, dim),
            "attention.wv": (a.n_kv_heads * hd, dim), "attention.wo": (dim, a.n_heads * hd),
            "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}
    sd = {"prefix_query.weight": rand(top, dim), "image_bind_proj.weight": rand(dim, feature_dim),
          "image_bind_proj.bias": rand(dim), "llama.norm.weight": 1 + rand(dim)}
    for b in (1, 2, 3):
        sd[f"image_bind_norm_{b}.weight"] = 1 + rand(dim)
        for f, shape in (("f1", (4 * dim, dim)), ("f2", (dim, 4 * dim)), ("f3", (4 * dim, dim))):
            sd[f"image_bind_{f}_{b}.weight"] = rand(*shape)
            if legacy:
                sd[f"image_bind_{f}_{b}.bias"] = rand(shape[0])
        if legacy:
            sd[f"image_bind_norm_{b}.bias"] = rand(dim)
    for i in range(a.n_layers - top, a.n_layers):
        sd[f"llama.layers.{i}.attention.gate"] = rand(1, a.n_heads, 1, 1) * 10
        sd[f"llama.layers.{i}.attention_norm.weight"] = 1 + rand(dim)
        sd[f"llama.layers.{i}.ffn_norm.weight"] = 1 + rand(dim)
        for lin, (out, inp) in outs.items():
            module, short = lin.split(".")
            if short not in ("wk", "wv"):  # the release's V2 biases: wq, wo, w1, w2, w3
                sd[f"llama.layers.{i}.{lin}.bias"] = rand(out)
            sd[f"llama.layers.{i}.{module}.lora_{short}_l1.weight"] = rand(rank, inp)
            sd[f"llama.layers.{i}.{module}.lora_{short}_l2.weight"] = rand(out, rank)
    return sd


@pytest.mark.parametrize("legacy", [False, True], ids=["rmsnorm-bridge", "legacy-layernorm-bridge"])
def test_tiny_random_official_imagebind_llm_file_loads_into_our_adapter(tmp_path, legacy):
    from core.adapter import load_adapter
    from tests.test_adapter import tiny_random_model, x_tokens
    model = tiny_random_model()
    sd = official_imagebind_llm_state(model, top=model.args.n_layers, rank=4, legacy=legacy)
    path = tmp_path / "imagebind-llm.pth"
    torch.save({"model": sd, "config": {}}, path)  # the release: a torch pickle whose "model" is the state dict
    with torch.no_grad():
        base = model(x_tokens())
        adapter = load_adapter(path, model)
    cfg = adapter.cfg
    assert (cfg.prompt_len, cfg.layers, cfg.lora_rank, cfg.encoder, cfg.encoder_dim, cfg.bind_blocks) == (1, 4, 4, "imagebind", 24, 3)
    assert cfg.bias_scale and cfg.norm_tuning and cfg.final_norm
    assert cfg.bind_style == ("imagebind-llm-legacy" if legacy else "imagebind-llm")
    block, layer = model.layers[2], adapter.layers["2"]
    torch.testing.assert_close(layer.prompt.prompt[0], sd["prefix_query.weight"][2])
    torch.testing.assert_close(layer.prompt.gate, sd["llama.layers.2.attention.gate"].flatten())
    torch.testing.assert_close(block.attention_norm.weight, sd["llama.layers.2.attention_norm.weight"])
    torch.testing.assert_close(model.norm.weight, sd["llama.norm.weight"])
    x = torch.randn(3, model.args.dim)
    with torch.no_grad():
        # a linear with the release's bias and LoRA: W x + b + l2(l1(x))
        wq = block.attention.wq.base.weight
        want = x @ wq.T + sd["llama.layers.2.attention.wq.bias"] + \
            (x @ sd["llama.layers.2.attention.lora_wq_l1.weight"].T) @ sd["llama.layers.2.attention.lora_wq_l2.weight"].T
        torch.testing.assert_close(block.attention.wq(x), want)
        # its prompts' values go through wv without LoRA (wv has no bias in the release)
        _, v = layer.prompt._project(block.attention, layer.prompt.prompt[None])
        torch.testing.assert_close(v.transpose(1, 2).flatten(2)[0], layer.prompt.prompt @ block.attention.wv.base.weight.T)
        # the bind network: proj, then x + f2(silu(f1(n(x))) * f3(n(x))) three times, no gate
        feats = torch.randn(2, 24) * 20  # ImageBind audio comes x20: taken as it is
        h = feats @ sd["image_bind_proj.weight"].T + sd["image_bind_proj.bias"]
        for b in (1, 2, 3):
            if legacy:
                n = torch.nn.functional.layer_norm(h, (h.shape[-1],), sd[f"image_bind_norm_{b}.weight"],
                                                   sd[f"image_bind_norm_{b}.bias"])
            else:
                n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"image_bind_norm_{b}.weight"]
            f = {k: (lambda t, k=k: t @ sd[f"image_bind_{k}_{b}.weight"].T +
                     (sd[f"image_bind_{k}_{b}.bias"] if legacy else 0)) for k in ("f1", "f2", "f3")}
            h = h + f["f2"](torch.nn.functional.silu(f["f1"](n)) * f["f3"](n))
        torch.testing.assert_close(adapter.bind(feats), h, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(x_tokens()), base, atol=1e-3)  # the LM is now the tuned one
        adapter.detach()
        torch.testing.assert_close(model(x_tokens()), base)  # and detaching gives the base back exactly


def test_official_imagebind_llm_files_of_another_layout_are_refused(tmp_path):
    from core.adapter import load_adapter
    from tests.test_adapter import tiny_random_model
    model = tiny_random_model()
    sd = official_imagebind_llm_state(model, top=2, rank=4, legacy=False)
    extra = dict(sd, **{"llama.layers.3.attention.new_gate": torch.ones(1, 1, 1, 1)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"extra.pth: 1 tensors this loader does not place .*new_gate"):
        load_adapter(tmp_path / "extra.pth", model)
    wide = dict(sd, **{"prefix_query.weight": torch.zeros(2, 128)})
    torch.save({"model": wide}, tmp_path / "wide.pth")
    with pytest.raises(UserError, match=r"wide.pth: prefix_query.weight has shape \(2, 128\), expected"):
        load_adapter(tmp_path / "wide.pth", model)
    top2 = load_adapter(_saved(tmp_path / "top2.pth", sd), model, attach=False)  # the top 2 of 4 layers only
    assert sorted(top2.layers) == ["2", "3"]


def _saved(path, sd):
    torch.save({"model": sd}, path)
    return path


def test_point_bind_sampling_and_grouping_equal_brute_force():
    from core.encoders.pointbind import farthest_points, group
    xyz = torch.rand(2, 300, 3, generator=torch.Generator().manual_seed(0))
    got = farthest_points(xyz, 20)
    for b in range(2):  # the textbook loop, in numpy
        pts = xyz[b].numpy()
        chosen, nearest = [0], np.full(300, np.inf)
        for _ in range(19):
            nearest = np.minimum(nearest, ((pts - pts[chosen[-1]]) ** 2).sum(1))
            chosen.append(int(nearest.argmax()))
        assert got[b].tolist() == chosen
    groups, centres = group(xyz, 20, 8)
    assert groups.shape == (2, 20, 8, 3) and torch.equal(centres[0], xyz[0, got[0]])
    order = np.argsort(((xyz[0].numpy()[None] - centres[0].numpy()[:, None]) ** 2).sum(-1), axis=1)[:, :8]
    torch.testing.assert_close(groups[0] + centres[0][:, None], xyz[0][torch.from_numpy(order)])


def test_point_bind_branch_has_the_released_layout():
    """The published PointBERT configuration (384 wide, 12 blocks, 6 heads, 512 groups of 32 of
    8192 points, 256-d group features) and Point-Bind's projection and head."""
    from core.encoders.pointbind import PointBind, PointBindArgs
    state = PointBind(PointBindArgs()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len(shapes) == 164 and sum(v.numel() for v in state.values()) == 22_778_626
    assert shapes["pc_projection"] == (768, 512)
    assert shapes["modality_head_point.0.weight"] == (512,) and shapes["modality_head_point.2.weight"] == (1024, 512)
    assert shapes["point_encoder.encoder.first_conv.3.weight"] == (256, 128, 1)
    assert shapes["point_encoder.encoder.second_conv.3.weight"] == (256, 512, 1)
    assert shapes["point_encoder.reduce_dim.weight"] == (384, 256)
    assert shapes["point_encoder.pos_embed.2.weight"] == (384, 128)
    assert shapes["point_encoder.blocks.blocks.11.attn.qkv.weight"] == (1152, 384)
    assert "point_encoder.blocks.blocks.11.attn.qkv.bias" not in shapes and "point_encoder.blocks.blocks.12.norm1.weight" not in shapes


def test_tiny_random_point_bind_file_gives_imagebind_and_points_in_one_space(tmp_path, small_pair):
    from core.adapter import Adapter, AdapterConfig
    from core.encoders.pointbind import PointBind, PointBindArgs, PointBindEncoder, build_point_branch, split_checkpoint
    from core.multimodal import embed_inputs
    from tests.test_adapter import tiny_random_model
    torch.manual_seed(0)
    branch = PointBind(PointBindArgs.small(out_dim=SMALL["out_dim"]))
    torch.nn.init.normal_(branch.pc_projection, std=0.2)
    state = {**{f"bind.{k}": v for k, v in small_pair[0].state_dict().items()},
             **{("bind." + k if k.startswith("modality_head_point") else k): v for k, v in branch.state_dict().items()},
             "logit_scale": torch.tensor(2.6), "bind.modality_postprocessor_point.1.log_logit_scale": torch.tensor(0.0)}
    torch.save(state, tmp_path / "pointbind.pt")
    image_bind, points = split_checkpoint(ib.read_state_dict(tmp_path / "pointbind.pt"))
    encoder = PointBindEncoder(model=build(ImageBindArgs.small(**SMALL), state_dict=image_bind),
                               points=build_point_branch(points, PointBindArgs.small(out_dim=SMALL["out_dim"])))
    cloud = ROOT / "assets" / "examples" / "points" / sorted(p.name for p in (ROOT / "assets" / "examples" / "points").iterdir())[0]
    rows = encoder.embed([encoder.load(IMAGE, "image"), encoder.load(cloud, "points"), encoder.load(cloud, "points")])
    assert rows.shape == (3, SMALL["out_dim"]) and rows.norm(dim=-1).tolist() == pytest.approx([1, 1, 1])
    torch.testing.assert_close(rows[1], rows[2])  # the same cloud, the same sample of it
    with torch.no_grad():
        torch.testing.assert_close(rows[0], small_pair[0]({"vision": ib.image_tensor(
            __import__("PIL.Image").Image.open(IMAGE))[None]})["vision"][0], rtol=0, atol=1e-5)
    ENCODERS["tiny-random-pointbind"] = lambda: encoder
    try:
        model = tiny_random_model()
        adapter = Adapter.create(model, AdapterConfig(prompt_len=2, layers=2, encoder="tiny-random-pointbind",
                                                      encoder_dim=SMALL["out_dim"]))
        with torch.no_grad():
            assert embed_inputs(adapter, [IMAGE, cloud], ["image", "points"], [0.5, 0.5]).shape == (1, model.args.dim)
    finally:
        del ENCODERS["tiny-random-pointbind"]
    assert encoder_kinds("pointbind")[-1] == "points"
    with pytest.raises(UserError, match="unexpected tensor surprise"):
        split_checkpoint({**state, "surprise": torch.zeros(1)})
    with pytest.raises(UserError, match="not a Point-Bind \\(PointBERT\\) checkpoint of this size"):
        build_point_branch(points)  # the full-size layout expected


def test_point_bind_without_weights_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"Point-Bind needs its released weights \(pointbind_pointbert.pt\) and none "
                                        r"were found: pass --encoder-weights PATH"):
        get_encoder("pointbind", "points")


def test_studio_mixes_an_image_and_a_clip_for_an_imagebind_adapter(smollm2, tiny_imagebind, tmp_path):
    """The Mix tab's path on the real embedded model: an adapter whose (tiny random) ImageBind
    reads images and audio is listed for mixing, and its reply depends on the weights."""
    from app.studio import Studio
    from core.adapter import Adapter, AdapterConfig, save_adapter
    studio = Studio(smollm2, tmp_path / "adapters", tmp_path / "runs")
    adapter = Adapter.create(smollm2.model, AdapterConfig(prompt_len=4, layers=6, encoder="tiny-random-imagebind",
                                                          encoder_dim=SMALL["out_dim"]))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.prompt.gate.fill_(0.8)
        adapter.bind.gate.fill_(2.0)
    save_adapter(adapter, tmp_path / "mix.safetensors", smollm2.model)
    name = studio.registry.add(tmp_path / "mix.safetensors", "mix")
    assert name in studio.media_adapters("mix") and name in studio.media_adapters("audio")
    assert name not in studio.media_adapters("points")
    history = [{"role": "user", "content": "What is this?"}]

    def reply(weights):
        stream, _ = studio.start_reply(history, "", 12, 0.0, 1.0, adapter=name,
                                       media=(["image", "audio"], [str(IMAGE), str(CLIP)], weights))
        return "".join(stream)
    image_only, audio_only = reply([1.0, 0.0]), reply([0.0, 1.0])
    assert image_only == "".join(studio.start_reply(history, "", 12, 0.0, 1.0, adapter=name, media=("image", str(IMAGE)))[0])
    assert image_only != audio_only
    with pytest.raises(UserError, match="positive sum"):
        reply([0.0, 0.0])


def test_cache_model_pulls_an_embedding_toward_its_nearest_bank_features(tmp_path, monkeypatch):
    from core.multimodal import FeatureCache
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=g)
    query = torch.randn(3, 8, generator=g)
    cache = FeatureCache(bank, k=4, temperature=20.0, weight=0.5)
    assert cache.index is not None  # faiss, from the test requirements
    unit_bank, unit_q = torch.nn.functional.normalize(bank, dim=-1), torch.nn.functional.normalize(query, dim=-1)
    sims = unit_q @ unit_bank.T
    want = []
    for row in range(3):  # spelled out: the 4 most similar, softmax(20 x sim)-weighted, mixed in at 0.5
        top = sims[row].argsort(descending=True)[:4]
        w = (20 * sims[row, top]).softmax(0)
        near = torch.nn.functional.normalize((w[:, None] * unit_bank[top]).sum(0), dim=0)
        want.append(torch.nn.functional.normalize(0.5 * query[row] + 0.5 * near, dim=0))
    torch.testing.assert_close(cache(query), torch.stack(want), rtol=0, atol=1e-5)
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "faiss" else real_import(name, *a, **k))
    plain = FeatureCache(bank, k=4)  # faiss missing: torch's topk
    assert plain.index is None
    torch.testing.assert_close(plain(query), torch.stack(want), rtol=0, atol=1e-5)
    monkeypatch.undo()
    np.save(tmp_path / "bank.npy", bank.numpy())
    torch.testing.assert_close(FeatureCache.from_file(tmp_path / "bank.npy", k=4)(query), torch.stack(want), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="the feature bank is 8-d, the encoder's embeddings 5-d"):
        cache(torch.randn(1, 5))
    with pytest.raises(UserError, match="bank.txt: unknown feature-bank format"):
        FeatureCache.from_file(tmp_path / "bank.txt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"x\": ")  # a damaged file
    with pytest.raises(UserError, match="cut.safetensors: unreadable feature bank"):
        FeatureCache.from_file(tmp_path / "cut.safetensors")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="objects.npy: unreadable feature bank"):
        FeatureCache.from_file(tmp_path / "objects.npy")  # never unpickled


def write_video(path, n_frames=75, fps=15, size=(120, 160)):
    """An MPEG-4 clip whose frames differ (a bar moving right), written with PyAV."""
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width, stream.pix_fmt = *size, "yuv420p"
        for i in range(n_frames):
            frame = np.full((*size, 3), 40, np.uint8)
            frame[:, 2 * i % size[1]:2 * i % size[1] + 10] = (250, 120, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_file_is_decoded_only_where_its_clips_need_frames(tmp_path, tiny_imagebind):
    import av
    write_video(tmp_path / "bar.mp4")
    frames, fps = ib.read_video(tmp_path / "bar.mp4")
    assert fps == 15 and len(frames) == 75
    needed = {i for picks in ib.video_frame_indices(75, 15) for i in picks}
    assert set(frames.frames) == needed and len(needed) == 10  # 5 clips x 2 frames, nothing else kept
    with av.open(str(tmp_path / "bar.mp4")) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    torch.testing.assert_close(ib.video_tensor(frames, fps), ib.video_tensor(every, 15.0))
    kind, clips = tiny_imagebind.load(tmp_path / "bar.mp4", "video")
    assert kind == "vision" and clips.shape == (15, 3, 2, 224, 224)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    with pytest.raises(UserError, match="broken.mp4: unreadable video"):
        ib.read_video(tmp_path / "broken.mp4")
    with pytest.raises(UserError, match="unknown video format .gifv"):
        ib.read_video(tmp_path / "x.gifv")
