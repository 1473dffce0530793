"""The app's handlers and its job runner, without a browser: chat turns on the real embedded
model through the serving engine, adapter hot-swap and the registry, and background training
jobs as real torchrun subprocesses on a tiny random model."""
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.access import OWNER, Caller
from app.studio import NONE, Studio, message_text
from core.adapter import Adapter, AdapterConfig, save_adapter
from core.errors import UserError
from core.loading import load_model
from core.registry import AdapterRegistry, clean_name
from tests.helpers import hf_llama, persona_adapter, wait_for, write_data
from train.jobs import JobRunner


@pytest.fixture(scope="module")
def studio(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    return Studio(smollm2, root / "adapters", root / "runs")


def ask(studio, text, max_new=24, caller=OWNER, adapter=""):
    history = [{"role": "user", "content": [{"text": text, "type": "text"}]}]  # as Gradio 6 hands it over
    return studio.start_reply(history, "", max_new, 0.0, 1.0, caller=caller, adapter=adapter)


# -- chat ------------------------------------------------------------------------------------------
def test_reply_streams_on_the_embedded_model(studio):
    reply, notice = ask(studio, "What is the capital of France?")
    deltas = list(reply)
    assert notice is None and len(deltas) > 2, deltas
    assert "Paris" in "".join(deltas)
    assert reply.tokens >= len(deltas) and reply.tokens_per_s > 0


def test_empty_message_and_bad_settings_are_refused_with_a_message(studio):
    with pytest.raises(UserError, match="empty message"):
        ask(studio, "   ")
    with pytest.raises(UserError, match="top_p"):
        studio.start_reply([{"role": "user", "content": "hi"}], "", 10, 0.5, 0.0)
    with pytest.raises(UserError, match="leaves no room"):
        studio.start_reply([{"role": "user", "content": "hi"}], "", studio.lm.model.args.max_seq_len, 0.0, 1.0)


def test_too_long_history_is_trimmed_with_a_notice(studio):
    lm = studio.lm
    long_turns = [{"role": "user", "content": "tell me a story " * 40}, {"role": "assistant", "content": "ok " * 40}] * 3
    ids, notice = studio.fit_to_context(long_turns + [{"role": "user", "content": "hi"}], lm.chat_format, None,
                                        lm.model.args.max_seq_len - 200)
    assert len(ids) <= 200 and "older message" in notice
    huge = [{"role": "user", "content": "word " * 500 + "the end"}]
    ids, notice = studio.fit_to_context(huge, lm.chat_format, None, lm.model.args.max_seq_len - 100)
    assert len(ids) <= 100 and "were cut" in notice
    assert "the end" in lm.tokenizer.decode(ids)  # the end of the message is what stays


def test_interleaved_replies_on_two_adapters_equal_solo_replies(studio, tmp_path):
    """Two chats at once, one on an adapter and one on the base model: each reply is what it
    would be alone, and each runs on what its own request asked for."""
    name = studio.registry.add(persona_adapter(studio.lm, tmp_path / "odd.safetensors", seed=1), "odd")
    question = "Name three colors."
    solo_adapter = "".join(ask(studio, question, max_new=30, adapter=name)[0])
    solo_base = "".join(ask(studio, question, max_new=30, adapter=NONE)[0])
    assert solo_adapter != solo_base  # the adapter does change the reply

    first, _ = ask(studio, question, max_new=30, adapter=name)
    it = iter(first)
    head = next(it)  # the first reply is running on the adapter when the second arrives
    second, _ = ask(studio, question, max_new=30, adapter=NONE)
    results = {}
    t = threading.Thread(target=lambda: results.update(second="".join(second)))
    t.start()
    results["first"] = head + "".join(it)
    t.join()
    assert results["first"] == solo_adapter
    assert results["second"] == solo_base
    assert studio.adapter_label(first.adapter) == name and second.adapter is None
    studio.delete_adapter(name)


def test_stop_cancels_only_that_sessions_reply(studio):
    expected = "".join(ask(studio, "Name three colors.", max_new=40)[0])
    mine, _ = ask(studio, "Count from one to fifty.", max_new=200, caller=Caller("owner", "owner", "me"))
    other, _ = ask(studio, "Name three colors.", max_new=40, caller=Caller("owner", "owner", "other"))
    it = iter(mine)
    next(it)
    studio.engine.cancel("me")
    rest = list(it)
    assert mine.tokens < 200 and len(rest) < 100
    assert "".join(other) == expected and other.error is None  # the other session's reply ran to its end


def test_each_reply_attaches_its_adapter_by_reference_and_the_default_is_the_owners(studio, tmp_path):
    name = studio.registry.add(persona_adapter(studio.lm, tmp_path / "p.safetensors", seed=2), "swap-me")
    base_weights = studio.lm.model.layers[0].attention.wq.weight
    reply = ask(studio, "Hi.", max_new=2, adapter=name)[0]
    list(reply)
    assert reply.adapter is studio.registry.load(name)  # the registry's own object: attached, never copied
    assert studio.lm.model.adapter is None  # between replies the model is as it was given
    assert studio.lm.model.layers[0].attention.wq.weight is base_weights  # the base never reloads
    # "" asks for the default of new sessions, which only the owner sets
    assert "swap-me" in studio.make_default(name)
    assert ask(studio, "Hi.", max_new=2)[0].adapter is studio.registry.load(name)
    with pytest.raises(UserError, match="setting the default adapter is for the studio's owner"):
        studio.make_default(None, Caller("visitor", "v1", "s1"))
    studio.delete_adapter(name)
    assert studio.default_name is None and ask(studio, "Hi.", max_new=2)[0].adapter is None


def test_message_text_reads_gradio_parts_and_drops_the_stats_footer():
    m = {"role": "assistant", "content": [{"type": "text", "text": "Paris.\n\n<sub>3 tokens · 9.0 tok/s · adapter: x</sub>"}]}
    assert message_text(m) == "Paris."


# -- registry --------------------------------------------------------------------------------------
def test_registry_refuses_bad_files_and_sanitizes_names(smollm2, tmp_path):
    reg = AdapterRegistry(tmp_path / "reg", smollm2.model)
    good = persona_adapter(smollm2, tmp_path / "good.safetensors", seed=3)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="only .safetensors"):
        reg.add(tmp_path / "notes.txt")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(UserError, match="truncated|corrupt"):
        reg.add(corrupt)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="not an adapter"):
        reg.add(plain)
    # made for another base model: refused on upload and marked unusable if copied in by hand
    other = AdapterRegistry(tmp_path / "other", smollm2.model)
    hf_llama(tmp_path / "tiny", num_hidden_layers=2)
    tiny_lm = load_model(str(tmp_path / "tiny"), "float32", "cpu")
    foreign = tmp_path / "foreign.safetensors"
    save_adapter(Adapter.create(tiny_lm.model, AdapterConfig(prompt_len=2, layers=1)), foreign, tiny_lm.model)
    with pytest.raises(UserError, match="different base model"):
        reg.add(foreign)
    (other.folder / "foreign.safetensors").write_bytes(foreign.read_bytes())
    assert "different base model" in other.entries()[0].problem

    assert clean_name("../../etc/passwd") == "passwd"
    assert clean_name("my adapter (v2).safetensors") == "my-adapter-v2"
    with pytest.raises(UserError, match="not usable"):
        clean_name("..")
    name = reg.add(good, "../../escape")
    assert name == "escape" and (reg.folder / "escape.safetensors").is_file()
    assert not (tmp_path / "escape.safetensors").exists()
    assert reg.rename("escape", "kept") == "kept"
    with pytest.raises(UserError, match="exists already"):
        reg.add(good, "kept")
    entry = reg.entries()[0]
    assert entry.summary()["K"] == 4 and entry.summary()["dataset"] == "random" and entry.problem is None
    reg.delete("kept")
    assert reg.names() == [] and not list(reg.folder.glob(".*tmp"))


# -- training jobs ---------------------------------------------------------------------------------
def test_tiny_random_job_runs_under_torchrun_cancels_resumes_and_registers(tmp_path, tiny_dir):
    runner = JobRunner(tmp_path / "runs", model=str(tiny_dir))
    registry = AdapterRegistry(tmp_path / "adapters", load_model(str(tiny_dir), "float32", "cpu").model)
    data = write_data(tmp_path / "say.jsonl")
    opts = {"prompt_len": 4, "layers": 2, "batch_size": 4, "lr": 0.05, "epochs": 200, "precision": "fp32",
            "save_every": 25}
    job = runner.start(str(data), "say", nproc=2, options=opts)
    assert runner.jobs() == [job]
    # follow the metrics while it runs
    wait_for(lambda: len(runner.metrics(job)) >= 30)
    view = runner.view(job)
    assert view.state == "running" and view.total_steps == 1600 and view.eta is not None
    assert "step" in runner.log_tail(job)
    # cancel: a resumable state, exit 0, state "stopped"
    assert runner.cancel(job, wait=20)
    view = runner.view(job)
    assert view.state == "stopped", (view, runner.log_tail(job))
    stopped_at = view.step
    assert (runner.runs_dir / job / "state.pt").is_file()
    assert runner.register_finished(registry) == []  # nothing finished yet
    # resume, with fewer steps to go: edit the saved config as a user might not; instead let it run
    # to the end of a shorter plan by rewriting epochs
    cfg_path = runner.runs_dir / job / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["epochs"] = (stopped_at + 20) / 8  # 8 steps per epoch (64 records, 2 x 4 per step)
    cfg_path.write_text(json.dumps(cfg))
    runner.resume(job)
    wait_for(lambda: runner.view(job).state != "running", timeout=120)
    view = runner.view(job)
    assert view.state == "finished", (view, runner.log_tail(job))
    steps = [m["step"] for m in runner.metrics(job)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= stopped_at + 1  # no gap, no repeat
    # the finished adapter appears in the registry, and loads for the model
    assert runner.register_finished(registry) == [job]
    assert runner.register_finished(registry) == []  # once only
    assert runner.view(job).adapter == job
    restarted = JobRunner(tmp_path / "runs", model=str(tiny_dir))  # an app restart finds the job again
    assert restarted.jobs() == [job] and restarted.view(job).state == "finished"
    adapter = registry.load(job)
    tensors = load_file(str(registry.path(job)))
    assert adapter.meta["training"]["steps"] == steps[-1] and len(tensors) == 4


def test_jobs_refuse_bad_data_before_starting_and_report_crashes(tmp_path, tiny_dir):
    runner = JobRunner(tmp_path / "runs", model=str(tiny_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: field 'output' is missing"):
        runner.start(str(bad))
    assert runner.jobs() == [] and not list(runner.runs_dir.iterdir())
    # a job that fails at start (its model does not exist): the page learns why
    broken = JobRunner(tmp_path / "runs", model=str(tmp_path / "no-such-model"))
    job = broken.start(str(write_data(tmp_path / "ok.jsonl", 8)), options={"precision": "fp32"})
    wait_for(lambda: broken.view(job).state != "running", timeout=60)
    view = broken.view(job)
    assert view.state in ("failed", "crashed") and "no-such-model" in view.error, view
    with pytest.raises(UserError, match="not running"):
        broken.cancel(job)
    with pytest.raises(UserError, match="no job named"):
        broken.view("../etc")


def test_train_tab_refuses_bad_uploads_before_any_job(studio, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ho"}\n{"instruction": "hi", "output": 3}\n')
    with pytest.raises(UserError, match=r"mine.jsonl:2: field 'output'"):
        studio.start_job("pirate", str(bad), 10, 30, False, False, 1, 0.01, 512, 1)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(UserError, match="wrong file type; accepted: .json or .jsonl"):
        studio.start_job("pirate", str(notes), 10, 30, False, False, 1, 0.01, 512, 1)
    with pytest.raises(UserError, match="prompt len must be at least 1"):
        studio.start_job("pirate", None, 0, 30, False, False, 1, 0.01, 512, 1)
    assert studio.runner.jobs() == []


def test_app_binds_loopback_unless_told_and_reads_spaces_settings(monkeypatch, tmp_path):
    import importlib.util  # app.py, the entry script (the name `app` is the package beside it)
    spec = importlib.util.spec_from_file_location("app_main", Path(__file__).resolve().parents[1] / "app.py")
    app_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_main)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app_main.parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, "smollm2")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    assert (app_main.parse_args([]).host, app_main.parse_args([]).port) == ("0.0.0.0", 7000)
    assert not app_main.is_public(app_main.parse_args(["--host", "127.0.0.1"]))  # loopback: one user, the owner
    assert app_main.is_public(app_main.parse_args(["--host", "0.0.0.0"]))  # any other host: strangers may come
    assert app_main.is_public(app_main.parse_args(["--public", "--host", "127.0.0.1"]))
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    assert app_main.is_public(app_main.parse_args(["--host", "127.0.0.1"]))
    monkeypatch.delenv("SPACE_ID")
    # a Space's persistent storage holds adapters and runs when it exists, else the app's folder does
    monkeypatch.setattr(app_main, "PERSISTENT", tmp_path / "data")
    assert app_main.storage_root() == app_main.ROOT
    (tmp_path / "data").mkdir()
    assert app_main.parse_args([]).adapters == str(tmp_path / "data" / "adapters")
    monkeypatch.setenv("STUDIO_AUTH", "ada:s3cret:x")
    assert app_main.login() == ("ada", "s3cret:x")
    monkeypatch.setenv("STUDIO_AUTH", "nopassword")
    with pytest.raises(SystemExit, match="user:password"):
        app_main.login()


def test_points_tab_answers_about_a_cloud_through_a_bind_adapter(studio, tmp_path):
    """A (random) point-cloud adapter in the registry: listed for the Point Cloud tab, its reply
    is conditioned on the cloud asked about; bad or missing clouds get a message."""
    import numpy as np
    from safetensors.torch import save_file as save_tensors

    from core.encoders import ENCODERS
    from core.encoders.points import PointNet, PointNetEncoder
    from train.pointclouds import scene
    torch.manual_seed(0)
    weights = tmp_path / "pointnet.safetensors"
    save_tensors(PointNet(width=32).state_dict(), weights)
    ENCODERS["tiny-random-points-app"] = lambda: PointNetEncoder(weights)
    adapter = Adapter.create(studio.lm.model, AdapterConfig(prompt_len=4, layers=6, encoder="tiny-random-points-app",
                                                            encoder_dim=32))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.prompt.gate.fill_(0.8)
        adapter.bind.gate.fill_(2.0)
    save_adapter(adapter, tmp_path / "clouds.safetensors", studio.lm.model)
    name = studio.registry.add(tmp_path / "clouds.safetensors", "clouds")
    assert name in studio.media_adapters("points") and name not in studio.media_adapters("image")
    assert studio.media_adapters("image")[:2] == ["image", "image-v2"]  # the shipped one the tab starts on, first
    files = []
    for i in (0, 3):
        np.save(tmp_path / f"c{i}.npy", scene("test", i)[0])
        files.append(str(tmp_path / f"c{i}.npy"))
    history = [{"role": "user", "content": "What is this?"}]
    answers = ["".join(studio.start_reply(history, "", 12, 0.0, 1.0, adapter=name, media=("points", f))[0])
               for f in files]
    text_only = "".join(studio.start_reply(history, "", 12, 0.0, 1.0, adapter=name)[0])
    assert answers[0] != text_only  # the cloud reaches the model...
    from core.multimodal import embed_inputs
    with torch.no_grad():
        a, b = (embed_inputs(studio.registry.load(name), [f], "points") for f in files)
    assert not torch.allclose(a, b)  # ...and each cloud its own way
    with pytest.raises(UserError, match="upload a points file"):
        studio.start_reply(history, "", 12, 0.0, 1.0, adapter=name, media=("points", None))
    (tmp_path / "c.obj").write_text("v 0 0 0")
    with pytest.raises(UserError, match="unknown point-cloud format"):
        studio.start_reply(history, "", 12, 0.0, 1.0, adapter=name, media=("points", str(tmp_path / "c.obj")))
    with pytest.raises(UserError, match="no bind network"):
        studio.start_reply(history, "", 12, 0.0, 1.0, adapter=None, media=("points", files[0]))
    studio.delete_adapter(name)
