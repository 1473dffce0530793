"""Prompt and decode throughput of our model against transformers' LlamaForCausalLM holding the
same dequantized weights (same dtype, same thread count), in one process; prints the ratios.

    .venv/bin/python bench/bench_decode.py [--model smollm2] [--threads 2] [--new-tokens 64]

With --vs llamacpp: the embedded model at each of our precisions (fp32, bf16, int8, int4) against
llama.cpp's llama-bench on the GGUF at F32, BF16, Q8_0, Q4_0 and the shipped Q4_1 (made with
llama-quantize; bench/build_llamacpp.sh builds the peer), batch-1 decode and 128/512-token
prompts, each measurement a process of its own so that its peak RSS (GNU time's) is its own. The
whole sweep runs --rounds times (2) and each row keeps its best round: the machine drifts.
--only 'int4 compiled,Q4_0' runs just those rows (ours and the peer's names as printed).
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


PEER_BIN = Path(__file__).resolve().parent / ".peers/llama.cpp/build/bin"
# precision: (dtype, quantize, compiled decode step)
OURS = {"fp32": ("float32", "none", False), "bf16": ("bfloat16", "none", False), "int8": (None, "int8", False),
        "int4": (None, "int4", False), "fp32 compiled": ("float32", "none", True),
        "bf16 compiled": ("bfloat16", "none", True), "int8 compiled": (None, "int8", True),
        "int4 compiled": (None, "int4", True)}
PEERS = ("F32", "BF16", "Q8_0", "Q4_0", "Q4_1")


def peak_rss_mb(cmd: list[str]) -> tuple[str, float]:
    """Run `cmd` under GNU time; its stdout and peak RSS in MB."""
    import subprocess
    done = subprocess.run(["/usr/bin/time", "-f", "RSS %M", *cmd], capture_output=True, text=True, check=True)
    rss = float(done.stderr.strip().splitlines()[-1].split()[-1]) / 1024
    return done.stdout, rss


@torch.no_grad()
def one_precision(precision: str, threads: int, new_tokens: int, repeats: int):
    """Ours at one precision, batch 1: prompt tok/s at 128 and 512 tokens, decode tok/s (JSON)."""
    import json
    torch.set_num_threads(threads)
    dtype, quantize, compiled = OURS[precision]
    lm = load_model("smollm2", dtype, "cpu", quantize=quantize)
    if compiled:  # the compile happens in the untimed first generation below
        from core.compiled import compile_decode
        compile_decode(lm.model)
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in (128, 512):
        x = torch.randint(100, lm.model.args.vocab_size, (1, n), generator=g)

        def prefill():
            lm.model.setup_cache(1, n + 1)
            lm.model(x, last_only=True)
            lm.model.clear_cache()
        prefill()
        out[f"pp{n}"] = n / best_of(prefill, repeats)
    greedy = SamplingParams(max_new_tokens=new_tokens + 1)

    def decode_rate(rows: int) -> float:
        """Tokens a second over `new_tokens` steps after a 128-token prompt (timed from the first
        token on, so the prefill is not in it), `rows` sequences at once."""
        x = torch.randint(100, lm.model.args.vocab_size, (rows, 128), generator=g).tolist()
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up (and the compile, if any)
            steps = generate_tokens(lm.model, x, greedy, stop_ids=set())
            next(steps)
            t = time.perf_counter()
            for _ in steps:
                pass
            times.append(time.perf_counter() - t)
        return rows * new_tokens / min(times[1:])
    out["tg"] = decode_rate(1)
    if precision.startswith("int4"):
        out["tg8"] = decode_rate(8)
    print(json.dumps(out))


def vs_llamacpp(threads: int, new_tokens: int, repeats: int, rounds: int, only: list[str] | None = None):
    import json
    import subprocess
    from core.loading import resolve_model_path
    if not (PEER_BIN / "llama-bench").is_file():
        sys.exit("llama.cpp is not built: bench/build_llamacpp.sh builds it (about 6 minutes)")
    shipped = resolve_model_path("smollm2")
    ggufs = PEER_BIN.parent.parent.parent / "gguf"
    ggufs.mkdir(exist_ok=True)
    runs = {}  # row -> one dict per round; this shared machine drifts by up to 2x within an hour,
    # so the sweep is repeated whole and each row keeps its best round, with the spread shown
    peers = [k for k in PEERS if not only or k in only]
    ours_rows = [k for k in OURS if not only or k in only]
    for round_ in range(rounds):
        for kind in peers:
            path = shipped if kind == "Q4_1" else ggufs / f"smollm2-{kind}.gguf"
            if not path.is_file():
                subprocess.run([str(PEER_BIN / "llama-quantize"), "--allow-requantize", str(shipped), str(path), kind],
                               check=True, capture_output=True)
            stdout, rss = peak_rss_mb([str(PEER_BIN / "llama-bench"), "-m", str(path), "-t", str(threads), "-p",
                                       "128,512", "-n", str(new_tokens), "-r", str(repeats), "-o", "json"])
            found = {("tg" if r["n_prompt"] == 0 else f"pp{r['n_prompt']}"): r["avg_ts"] for r in json.loads(stdout)}
            runs.setdefault(f"llama.cpp {kind}", []).append({**found, "rss": rss})
            print(f"round {round_ + 1}, llama.cpp {kind}: {runs[f'llama.cpp {kind}'][-1]}", flush=True)
        for precision in ours_rows:
            stdout, rss = peak_rss_mb([sys.executable, __file__, "--one", precision, "--threads", str(threads),
                                       "--new-tokens", str(new_tokens), "--repeats", str(repeats)])
            runs.setdefault(f"ours {precision}", []).append({**json.loads(stdout.strip().splitlines()[-1]), "rss": rss})
            print(f"round {round_ + 1}, ours {precision}: {runs[f'ours {precision}'][-1]}", flush=True)
    rows = {name: {k: (min if k == "rss" else max)(r[k] for r in got) for k in got[0]} for name, got in runs.items()}
    print(f"\nbatch 1, {threads} threads, {new_tokens} new tokens, best of {repeats} in each of {rounds} rounds; "
          "decode's range over the rounds in brackets\n")
    print("| runtime, weights | decode tok/s | prompt tok/s (128) | prompt tok/s (512) | peak RSS |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        spread = f" ({min(x['tg'] for x in runs[name]):.0f}-{max(x['tg'] for x in runs[name]):.0f})" if rounds > 1 else ""
        print(f"| {name} | {r['tg']:.1f}{spread} | {r['pp128']:.0f} | {r['pp512']:.0f} | {r['rss']:.0f} MB |")
    print()
    for name in [n for n in ("int4", "int4 compiled") if f"ours {n}" in rows]:
        print(f"ours {name}, batch 8: decode {rows[f'ours {name}']['tg8']:.1f} tok/s in all")
    for ours, peer, what in (("int4 compiled", "Q4_0", "tg"), ("int4 compiled", "Q4_1", "tg"),
                             ("int8 compiled", "Q8_0", "tg"), ("fp32 compiled", "F32", "tg"),
                             ("bf16 compiled", "BF16", "tg"), ("int4", "Q4_0", "tg"), ("int8", "Q8_0", "tg"),
                             ("fp32", "F32", "tg"), ("bf16", "F32", "pp128"), ("bf16", "F32", "pp512")):
        if f"ours {ours}" not in rows or f"llama.cpp {peer}" not in rows:
            continue
        a, b = rows[f"ours {ours}"], rows[f"llama.cpp {peer}"]
        print(f"ours {ours} / llama.cpp {peer}: {what} {a[what] / b[what]:.2f}x, RSS {a['rss'] - b['rss']:+.0f} MB")


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="--vs: sweeps of every row, each row's best kept")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vs", choices=["llamacpp"], help="our precisions against llama.cpp's (see the module docstring)")
    p.add_argument("--only", help="--vs: these rows only, comma-separated (e.g. 'int4 compiled,Q4_0')")
    p.add_argument("--one", choices=list(OURS), help=argparse.SUPPRESS)  # one precision, in a process of its own
    args = p.parse_args()
    if args.one:
        return one_precision(args.one, args.threads, args.new_tokens, args.repeats)
    if args.vs:
        only = [r.strip() for r in args.only.split(",")] if args.only else None
        unknown = set(only or []) - set(OURS) - set(PEERS)
        if unknown:
            sys.exit(f"unknown rows {sorted(unknown)}; accepted: {', '.join([*OURS, *PEERS])}")
        return vs_llamacpp(args.threads, args.new_tokens, args.repeats, args.rounds, only)
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
