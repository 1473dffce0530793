"""Our quantized modes against llama.cpp's own Q4_1 on the same tokens (issue 18, item 7).

    .venv/bin/python bench/bench_exactness.py [--new-tokens 64]

llama-server (bench/build_llamacpp.sh) runs the shipped Q4_1 GGUF and continues a few chat prompts
greedily, returning each step's top-10 log-probabilities (a plain softmax of its logits). Ours then
reads the same prompt + continuation in one forward (teacher forcing) at fp32, int8 and int4, and
at every continued position we compare: whether our top-1 is llama.cpp's token, and the largest
gap between the two log-probabilities over llama.cpp's top 10. int4 runs the file's own 4-bit
codes, so it should sit closer to llama.cpp's Q4_1 than our fp32 (the dequantized file) does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_serving import LLAMA_SERVER, free_port, serve  # noqa: E402
from core.chat_format import render  # noqa: E402
from core.loading import load_model, resolve_model_path  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue.", "List three uses of a paperclip."]


def llamacpp_greedy(url: str, ids: list[int], n: int) -> list[dict]:
    body = {"prompt": ids, "n_predict": n, "temperature": -1, "n_probs": 10, "cache_prompt": False}
    req = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["completion_probabilities"]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not LLAMA_SERVER.is_file():
        sys.exit("llama-server is not built: bench/build_llamacpp.sh builds it (about 6 minutes)")
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2", "float32", "cpu", quantize="none")
    prompts = [lm.tokenizer.encode(render(lm.chat_format, [{"role": "user", "content": q}], lm.system_prompt))
               for q in QUESTIONS]
    port, tmp = free_port(), Path(tempfile.mkdtemp())
    peer = serve([str(LLAMA_SERVER), "-m", str(resolve_model_path("smollm2")), "--port", str(port), "-c", "2048",
                  "-t", str(args.threads)], f"http://127.0.0.1:{port}", tmp / "llama.log")
    try:
        steps = [llamacpp_greedy(f"http://127.0.0.1:{port}", ids, args.new_tokens) for ids in prompts]
    finally:
        peer.terminate()
        peer.wait()
    print(f"llama.cpp Q4_1 continued {len(prompts)} chat prompts by {sum(map(len, steps))} greedy tokens; "
          f"ours reads the same tokens\n")
    print("| ours | top-1 = llama.cpp's token | largest log-prob gap over its top 10 (median / max) |")
    print("|---|---|---|")
    for mode, dtype in (("fp32", "float32"), ("int8", None), ("int4", None)):
        ours = lm if mode == "fp32" else load_model("smollm2", dtype, "cpu", quantize=mode)
        agree, gaps = 0, []
        for ids, probs in zip(prompts, steps):
            cont = [p["id"] for p in probs]
            logits = ours.model(torch.tensor([ids + cont]))[0, len(ids) - 1:len(ids) - 1 + len(cont)]
            logp = logits.float().log_softmax(-1)
            for t, p in enumerate(probs):
                agree += int(logp[t].argmax()) == p["id"]
                gaps.append(max(abs(float(logp[t, q["id"]]) - q["logprob"]) for q in p["top_logprobs"]))
        gaps_t = torch.tensor(gaps)
        print(f"| {mode} | {agree / len(gaps):.3f} | {gaps_t.median():.3f} / {gaps_t.max():.3f} |")


if __name__ == "__main__":
    main()
