"""Models and adapters by Hub id (core/hub.py), through the real CLI: a cache in huggingface_hub's
own layout (blobs, snapshots, refs) is read with the Hub unreachable; a Hub that answers "gated" or
"not found" (a local HTTP server speaking its error headers) gets one line saying what to do."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.adapter import Adapter, AdapterConfig, load_adapter, save_adapter
from core.errors import UserError
from tests.helpers import hf_llama
from tests.test_adapter import trained_copy

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hf_home: Path, repo: str, files: dict[str, bytes]) -> Path:
    """`files` as huggingface_hub stores a download of `repo` at main: content-named blobs, a
    snapshot folder of links to them, refs/main holding the commit."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(os.path.relpath(blob, (snap / name).parent))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


def cli(*flags, env):
    return subprocess.run([sys.executable, "-m", "core.generate", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A tiny model repository and an adapter repository for it, cached; the model also as a folder."""
    from core.loading import load_model
    tmp = tmp_path_factory.mktemp("hub")
    hf_llama(tmp / "folder")
    files = {p.name: p.read_bytes() for p in (tmp / "folder").iterdir()}
    cache_repo(tmp / "hf", "tiny-org/tiny-llama", files)
    lm = load_model(str(tmp / "folder"), "float32", "cpu")
    adapter = trained_copy(Adapter.create(lm.model, AdapterConfig(prompt_len=2, layers=2)))
    save_adapter(adapter, tmp / "adapter.safetensors", lm.model)
    cache_repo(tmp / "hf", "tiny-org/tiny-adapter", {"adapter.safetensors": (tmp / "adapter.safetensors").read_bytes(),
                                                     "README.md": b"an adapter"})
    return tmp


def test_a_cached_hub_model_and_adapter_load_with_the_hub_unreachable(hub_cache, monkeypatch):
    from core.loading import resolve_model_path
    env = {"HF_HOME": str(hub_cache / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    flags = ["--prompt", "the quick brown", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32"]
    local = cli("--model", str(hub_cache / "folder"), "--adapter", str(hub_cache / "adapter.safetensors"), *flags, env=env)
    by_id = cli("--model", "tiny-org/tiny-llama", "--adapter", "tiny-org/tiny-adapter", *flags, env=env)
    assert local.returncode == 0 and by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == local.stdout and by_id.stdout.strip()
    # revisions, and a repository that is not cached, in process against the same unreachable Hub
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", env["HF_ENDPOINT"])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache / "hf" / "hub"))
    snapshot = hub_cache / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    for spec in ("tiny-org/tiny-llama@main", f"tiny-org/tiny-llama@{COMMIT}"):
        started = time.monotonic()
        assert resolve_model_path(spec) == snapshot
        assert time.monotonic() - started < 5  # a cached commit does not wait out huggingface_hub's retries (23 s)
    with pytest.raises(UserError) as missing:
        resolve_model_path("tiny-org/not-cached")
    assert str(missing.value) == (
        f"tiny-org/not-cached is not in the Hugging Face cache ({hub_cache / 'hf' / 'hub'}) and the Hub cannot be "
        "reached: connect once to download it, or give a local path")


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every API call the way the Hub does for a gated repository (meta-llama's) or a missing one."""

    def do_GET(self):
        code, error = (403, "GatedRepo") if "/meta-llama/" in self.path else (404, "RepoNotFound")
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("X-Error-Message", "Access to this repository is restricted" if code == 403 else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_gated_and_missing_repositories_get_one_line_saying_what_to_do(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    try:
        gated = cli("--model", "meta-llama/Llama-3.2-1B-Instruct", "--prompt", "hi", env=env)
        missing = cli("--model", "nobody/no-such-model", "--prompt", "hi", env=env)
    finally:
        server.shutdown()
    assert gated.returncode == 2 and missing.returncode == 2
    assert gated.stderr.strip().splitlines()[-1] == (
        "error: meta-llama/Llama-3.2-1B-Instruct is gated: accept its terms at "
        "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct while logged in, then set HF_TOKEN to a token "
        "of that account")
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: nobody/no-such-model: no such model repository on the Hub (or a private one: set HF_TOKEN); "
        "accepted: OWNER/NAME[@REVISION] or a local path")


def test_an_adapter_repository_with_several_files_names_them(tmp_path, monkeypatch):
    from core import hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cache_repo(tmp_path / "hf", "org/two", {"a.safetensors": b"{}", "b.safetensors": b"{}"})
    with pytest.raises(UserError, match=r"org/two holds 2 adapter files \(a.safetensors, b.safetensors\)"):
        hub.adapter_file("org/two")
    assert hub.is_hub_id("org/two@v1.0") and not hub.is_hub_id("smollm2") and not hub.is_hub_id(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(tmp_path / "nowhere" / "x.safetensors", None)
