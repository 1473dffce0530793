"""Serving many chats at once through the OpenAI API: our server (`app.py --api-only`, continuous
batching) and, when built (bench/build_llamacpp.sh), llama.cpp's llama-server with -np 8 on the
same GGUF, side by side in one run. 1, 4 and 8 concurrent streaming chats, each a different
200-token prompt and 128 new tokens (ignore_eos: equal work); time to first token p50/p95, tok/s
per chat and in all, and the ratios.

    .venv/bin/python bench/bench_serving.py [--dtype float32|bfloat16] [--chats 1 4 8] [--threads 2] [--compile]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SERVER = ROOT / "bench/.peers/llama.cpp/build/bin/llama-server"
WORDS = ("the lighthouse keeper watched storms roll over grey water while gulls circled the harbour and ships "
         "signalled through fog at night before dawn brought fishermen home with nets full of silver").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int, tokenizer) -> str:
    """A different prompt per chat, cut to 200 tokens of the embedded tokenizer."""
    text = f"{i}: " + " ".join(WORDS[(i * 7 + j * (1 + i % 5)) % len(WORDS)] for j in range(400))
    return tokenizer.decode(tokenizer.encode(text)[:200])


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s=900):  # a compiled step compiles first
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server ended: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    sys.exit("the server did not start")


def round_of(url: str, model: str, prompts: list[str], new_tokens: int) -> dict:
    """All prompts at once, streamed; per chat: time to first token, tok/s after it; and in all."""
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    results = [None] * len(prompts)

    def one(i):
        start = time.perf_counter()
        first = last = None
        n = 0
        stream = client.completions.create(model=model, prompt=prompts[i], max_tokens=new_tokens, temperature=0.7,
                                           seed=i, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        results[i] = (first - start, (n - 1) / max(last - first, 1e-9), n, last - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "per_chat": statistics.median(r[1] for r in results), "all": sum(r[2] for r in results) / wall,
            "chunks": sum(r[2] for r in results)}


def serve(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_ready(url, proc, log)
    return proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chats", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="our server with the compiled decode step (app.py --compile)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from core.loading import load_model, resolve_model_path
    tokenizer = load_model("smollm2", "float32", "cpu").tokenizer
    # fresh prompts for every round (llama-server reuses a slot's cached prefix): warm-up first
    prompts = [prompt(i, tokenizer) for i in range(1 + 2 * (1 + sum(args.chats)))]
    tmp = Path(tempfile.mkdtemp())
    sides = {}
    port = free_port()
    ours = serve([sys.executable, "app.py", "--api-only", "--port", str(port), "--dtype", args.dtype, "--adapters",
                  str(tmp / "adapters"), "--runs", str(tmp / "runs")] + ["--compile"] * args.compile,
                 f"http://127.0.0.1:{port}", tmp / "ours.log")
    sides[f"ours ({args.dtype}{', compiled' * args.compile})"] = (f"http://127.0.0.1:{port}", "smollm2", ours)
    if LLAMA_SERVER.is_file():
        port = free_port()
        ctx = max(args.chats) * (len(tokenizer.encode(prompts[0])) + args.new_tokens + 64)
        peer = serve([str(LLAMA_SERVER), "-m", str(resolve_model_path("smollm2")), "--port", str(port), "-np",
                      str(max(args.chats)), "-c", str(ctx), "-t", str(args.threads), "--cont-batching"],
                     f"http://127.0.0.1:{port}", tmp / "llama.log")
        sides["llama.cpp llama-server (Q4_1 GGUF)"] = (f"http://127.0.0.1:{port}", "smollm2", peer)
    else:
        print(f"(llama-server not built: bench/build_llamacpp.sh builds it into {LLAMA_SERVER.parent})")
    env_threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"{len(prompts[0].split())} words / 200 tokens per prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads (OMP_NUM_THREADS {env_threads})")
    table = {}
    try:
        for name, (url, model, _) in sides.items():
            round_of(url, model, prompts[:1], 8)  # warm
            used = 1
            for n in args.chats:
                r = round_of(url, model, prompts[used:used + n], args.new_tokens)
                used += n
                table[(name, n)] = r
                print(f"{name:40s} {n} chats: ttft p50 {r['ttft_p50']:.2f} s, p95 {r['ttft_p95']:.2f} s; "
                      f"{r['per_chat']:.1f} tok/s per chat, {r['all']:.1f} tok/s in all", flush=True)
    finally:
        for _, _, proc in sides.values():
            proc.terminate()
            proc.wait(timeout=60)
    for name in sides:
        one = table[(name, args.chats[0])]["all"]
        for n in args.chats[1:]:
            print(f"{name}: {n} chats give {table[(name, n)]['all'] / one:.2f}x one chat's tok/s in all")
    names = list(sides)
    if len(names) == 2:
        for n in args.chats:
            a, b = table[(names[0], n)], table[(names[1], n)]
            print(f"{n} chats: ours / llama.cpp = {a['all'] / b['all']:.2f}x tok/s in all, "
                  f"p95 first token {a['ttft_p95']:.2f} s vs {b['ttft_p95']:.2f} s")


if __name__ == "__main__":
    main()
