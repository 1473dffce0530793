"""Prompt and decode throughput of our model against transformers' LlamaForCausalLM holding the
same dequantized weights (same dtype, same thread count), in one process; prints the ratios.

    .venv/bin/python bench/bench_decode.py [--model smollm2] [--threads 2] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.generation import SamplingParams, generate_tokens  # noqa: E402
from core.loading import load_model  # noqa: E402
from train.peers import hf_twin  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.dtype, "cpu")
    ours, hf = lm.model, hf_twin(lm.model)
    probe = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    gap = (ours(probe) - hf(probe).logits.float()).abs().max().item()
    assert gap < 1e-3, f"the transformers twin does not hold the same model (logits differ by {gap})"
    import transformers
    print(f"model {args.model} ({args.dtype}), {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"best of {args.repeats}")

    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 8):
        x = torch.randint(100, lm.model.args.vocab_size, (batch, args.prompt_tokens), generator=g)
        greedy = SamplingParams(max_new_tokens=args.new_tokens)

        def ours_prefill():
            ours.setup_cache(batch, args.prompt_tokens + 1)
            ours(x, last_only=True)
            ours.clear_cache()

        def ours_generate():
            n = sum(1 for _ in generate_tokens(ours, x.tolist(), greedy, stop_ids=set()))
            assert n == args.new_tokens

        def hf_prefill():
            hf(x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)

        def hf_generate():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            assert out.shape[1] == args.prompt_tokens + args.new_tokens

        ours_generate(), hf_generate()  # warm-up
        t = {name: best_of(fn, args.repeats) for name, fn in
             [("ours_prefill", ours_prefill), ("hf_prefill", hf_prefill),
              ("ours_gen", ours_generate), ("hf_gen", hf_generate)]}
        tokens = batch * args.prompt_tokens
        # decode time: the whole generation less its prefill
        ours_dec = batch * args.new_tokens / (t["ours_gen"] - t["ours_prefill"])
        hf_dec = batch * args.new_tokens / (t["hf_gen"] - t["hf_prefill"])
        rows.append((batch, tokens / t["ours_prefill"], tokens / t["hf_prefill"], ours_dec, hf_dec))

    print("\n| batch | prompt tok/s ours | prompt tok/s transformers | ratio | decode tok/s ours | "
          "decode tok/s transformers | ratio |")
    print("|---|---|---|---|---|---|---|")
    for b, po, ph, do, dh in rows:
        print(f"| {b} | {po:.0f} | {ph:.0f} | {po / ph:.2f}x | {do:.1f} | {dh:.1f} | {do / dh:.2f}x |")


if __name__ == "__main__":
    main()
