"""Training throughput and peak memory: our adapter against peft's AdaptionPrompt on transformers'
LlamaForCausalLM holding the same weights, same batch, sequence length, K and L; prints ratios.

    .venv/bin/python bench/bench_train.py [--layers 30 10] [--batch 8] [--seq-len 128] [--steps 6] [--compile]
                                          [--device cpu|cuda] [--data SOURCE]

By default each batch is random tokens with every position a target. --data (a file, a shipped
dataset or task:NAME, as train.finetune takes) trains on instruction records instead, batched as
train.finetune batches them: grouped by length, right-padded, loss on the response tokens only;
peft's side gets the same tensors and computes its loss as transformers does with -100 labels.

Each side runs in a subprocess of its own, so its peak memory is its own. On the CPU that is the
resident memory, sampled every 2 ms during the training steps (after both sides hold one copy of
the weights); on CUDA it is torch's peak of allocated GPU memory over the timed steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakRSS:
    """Highest resident set size seen while the `with` block runs."""

    def __enter__(self):
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def instruction_batches(lm, source: str, batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The first n batches of train.finetune's first epoch (seed 0) over `source`: (inputs,
    targets, real tokens)."""
    from train.data import collate, length_grouped_batches, load_records, tokenize_records
    examples = tokenize_records(load_records(source), lm.tokenizer, lm.chat_format)
    order = length_grouped_batches([len(e.tokens) for e in examples], batch, seed=0, epoch=0)
    if len(order) < n:
        sys.exit(f"--data {source}: {len(order)} batches of {batch}, the benchmark needs {n}")
    return [(*collate([examples[i] for i in b]), sum(len(examples[i].tokens) - 1 for i in b)) for b in order[:n]]


def one_side(side: str, precision: str, layers: int, prompt_len: int, batch: int, seq_len: int, steps: int,
             threads: int, compile_blocks: bool = False, device: str = "cpu", data: str | None = None) -> dict:
    """bf16: the frozen base stored in bf16, trainable parameters in fp32, bf16 autocast, on both
    sides (what train.finetune does by default on CPUs with native bf16, and on GPUs)."""
    torch.set_num_threads(threads)
    from core.loading import load_model
    lm = load_model("smollm2", "bfloat16" if precision == "bf16" else "float32", device)
    torch.manual_seed(0)
    if data:
        batches = instruction_batches(lm, data, batch, steps + 3)
    else:  # random tokens, every position a target
        g = torch.Generator().manual_seed(1)
        batches = [(x[:, :-1], x[:, 1:], x[:, 1:].numel()) for x in
                   (torch.randint(100, 40000, (batch, seq_len + 1), generator=g) for _ in range(steps + 3))]
    if side == "ours":
        from core.adapter import Adapter, AdapterConfig
        from train.loss import response_loss
        model = lm.model
        Adapter.create(model, AdapterConfig(prompt_len, layers)).attach(model)
        if compile_blocks:  # torch.compile (inductor) on each block; compiled during the warm-up steps
            for block in model.layers:
                block.compile()

        def loss_of(inputs, targets):  # what train.finetune computes
            loss, count = response_loss(model, inputs, targets)
            return loss / count
    else:
        from peft import AdaptionPromptConfig, get_peft_model

        from train.peers import hf_twin
        model = get_peft_model(hf_twin(lm.model), AdaptionPromptConfig(adapter_len=prompt_len, adapter_layers=layers,
                                                                       task_type="CAUSAL_LM"))
        del lm  # one copy of the weights, as on our side

        def loss_of(inputs, targets):  # transformers' loss with labels: -100 ignored
            logits = model(input_ids=inputs).logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)
    cuda = device.startswith("cuda")

    def step(inputs, targets, _tokens):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(inputs.to(device), targets.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for b in batches[:3 if compile_blocks else 1]:  # warm-up (compiling takes more than one step)
        step(*b)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
    with PeakRSS() as peak:
        started = time.perf_counter()
        for b in batches[-steps:]:
            step(*b)  # loss.item() waits for the GPU each step
        elapsed = time.perf_counter() - started
    return {"tokens_per_s": sum(b[2] for b in batches[-steps:]) / elapsed, "memory_before": before,
            "peak_memory": torch.cuda.max_memory_allocated() if cuda else peak.peak,
            "trainable": sum(p.numel() for p in params)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[30, 10])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile our side's blocks (peft's stays eager)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to measure on a GPU")
    p.add_argument("--data", help="instruction records (file, shipped dataset or task:NAME) instead of random tokens")
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:  # a child: one side, one configuration
        print(json.dumps(one_side(args.side, args.precision[0], args.layers[0], args.prompt_len, args.batch,
                                  args.seq_len, args.steps, args.threads, args.compile, args.device, args.data)))
        return
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; use --device cpu")
    memory = "peak GPU memory" if cuda else "peak RSS"
    import peft
    import transformers
    where = torch.cuda.get_device_name(args.device) if cuda else f"{args.threads} threads"
    shape = f"{args.data}, batches of {args.batch} (tok/s: real tokens)" if args.data else \
        f"random tokens, batch {args.batch} x {args.seq_len}"
    print(f"SmolLM2-135M, {where}, {shape}, K={args.prompt_len}, "
          f"{args.steps} timed steps (forward, backward, AdamW); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}\n")
    print(f"| precision | K | L | trainable (ours / peft) | tok/s ours | tok/s peft | speed ratio | {memory} ours | "
          f"{memory} peft | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision, layers in [(p, n) for p in args.precision for n in args.layers]:
        res = {}
        for side in ("ours", "peft"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--precision", precision,
                                  "--layers", str(layers),
                                  "--prompt-len", str(args.prompt_len), "--batch", str(args.batch),
                                  "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--device", args.device] + ["--compile"] * args.compile
                                 + ["--data", args.data] * bool(args.data),
                                 capture_output=True, text=True, check=True)
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        o, q = res["ours"], res["peft"]
        gib = 1024 ** 3
        print(f"| {precision} | {args.prompt_len} | {layers} | {o['trainable']:,} / {q['trainable']:,} | {o['tokens_per_s']:.0f} | "
              f"{q['tokens_per_s']:.0f} | {o['tokens_per_s'] / q['tokens_per_s']:.2f}x | {o['peak_memory'] / gib:.2f} GiB | "
              f"{q['peak_memory'] / gib:.2f} GiB | {o['peak_memory'] / q['peak_memory']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
