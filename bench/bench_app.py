"""What a client of the app sees: time to first token and tokens/s through Gradio's API
(gradio_client, streaming) with 1 and 4 concurrent chats, against the same engine called
in-process (no Gradio); and adapter swap latency in-process, and a one-token /chat round trip
on the same adapter against alternating adapters (each request names its own).

    .venv/bin/python bench/bench_app.py [--new-tokens 64] [--rounds 2]

Starts `app.py` as a subprocess on a free port with a temporary adapter folder holding one
K=10, L=30 adapter (the training default), the way a user runs it.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms, step by step.",
             "Describe the city of Paris to a child.", "List some tips for learning to cook."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(folder: Path):
    from core.adapter import Adapter, AdapterConfig, save_adapter
    from core.loading import load_model
    lm = load_model("smollm2", "float32", "cpu")
    adapter = Adapter.create(lm.model, AdapterConfig(prompt_len=10, layers=30))
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter, folder / "k10-l30.safetensors", lm.model)
    return lm


def in_process(lm, n_chats: int, new_tokens: int) -> list[tuple[float, float]]:
    """(ttft, tok/s) per chat through ChatEngine directly."""
    from app.studio import Studio
    studio = Studio(lm, tempfile.mkdtemp(), tempfile.mkdtemp())
    replies = [studio.start_reply([{"role": "user", "content": q}], "", new_tokens, 0.0, 1.0)[0]
               for q in QUESTIONS[:n_chats]]
    for r in replies:
        list(r)
    return [(r.first_token - r.submitted, r.tokens_per_s) for r in replies]


def through_api(url: str, tokenizer, n_chats: int, new_tokens: int) -> list[tuple[float, float]]:
    from gradio_client import Client
    client = Client(url, verbose=False)
    results = [None] * n_chats

    def one(i):
        t0 = time.perf_counter()
        first = last = None
        text = ""
        for text in client.submit(QUESTIONS[i], "", new_tokens, 0.0, 1.0, api_name="/chat"):
            now = time.perf_counter()
            if first is None and text:
                first = now
            last = now
        n = len(tokenizer.encode(text))
        results[i] = (first - t0, (n - 1) / max(last - first, 1e-9))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_chats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    lm = make_adapter(tmp / "adapters")

    print("in-process engine (no Gradio)")
    for n in (1, 4):
        rows = [r for _ in range(args.rounds) for r in in_process(lm, n, args.new_tokens)]
        print(f"  {n} chat(s): ttft {statistics.median(r[0] for r in rows):.2f} s, "
              f"{statistics.median(r[1] for r in rows):.1f} tok/s per chat")
    # swap latency in-process: cold (first load from disk, checked) and warm (already in memory);
    # each reply attaches the adapter its request names, as a reference swap
    from core.registry import AdapterRegistry
    registry = AdapterRegistry(tmp / "adapters", lm.model)
    cold = []
    for _ in range(5):
        registry._loaded.clear()
        t0 = time.perf_counter()
        registry.load("k10-l30").attach(lm.model)
        cold.append(time.perf_counter() - t0)
        lm.model.adapter.detach()
    adapter = registry.load("k10-l30")
    warm = []
    for _ in range(50):
        t0 = time.perf_counter()
        adapter.attach(lm.model)
        adapter.detach()
        warm.append((time.perf_counter() - t0) / 2)
    print(f"  adapter swap: first load from disk {1000 * statistics.median(cold):.1f} ms, "
          f"already loaded {1000 * statistics.median(warm):.3f} ms")
    tokenizer = lm.tokenizer
    del registry, adapter, lm

    port = free_port()
    log = open(tmp / "app.log", "w")
    app = subprocess.Popen([sys.executable, "app.py", "--adapters", str(tmp / "adapters"), "--runs", str(tmp / "runs"),
                            "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        print("through Gradio's API (gradio_client, streaming)")
        through_api(url, tokenizer, 1, 8)  # warm-up
        for n in (1, 4):
            rows = [r for _ in range(args.rounds) for r in through_api(url, tokenizer, n, args.new_tokens)]
            print(f"  {n} chat(s): ttft {statistics.median(r[0] for r in rows):.2f} s, "
                  f"{statistics.median(r[1] for r in rows):.1f} tok/s per chat, "
                  f"{n * statistics.median(r[1] for r in rows):.1f} tok/s in all")
        from gradio_client import Client
        client = Client(url, verbose=False)
        trips = {"same adapter": [], "alternating adapters": []}
        for kind, names in (("same adapter", ["k10-l30"] * 10), ("alternating adapters", ["k10-l30", "(none)"] * 5)):
            for name in names:
                t0 = time.perf_counter()
                client.predict("Hi.", "", 1, 0.0, 1.0, name, api_name="/chat")
                trips[kind].append(time.perf_counter() - t0)
        print("  one-token /chat round trip: " + ", ".join(f"{k} {1000 * statistics.median(v):.0f} ms"
                                                        for k, v in trips.items()))
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
