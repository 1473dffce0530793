"""Fine-tune a LLaMA-Adapter on instruction data; only the adapter trains.

    python -m train.finetune --model smollm2 --data pirate --out runs/pirate
    torchrun --nproc_per_node 2 -m train.finetune --model smollm2 --data task:arithmetic --out runs/a
    python -m train.finetune --resume runs/a        # continue a stopped run

Data parallel under torchrun: gloo on CPU, nccl on GPU. Every rank holds the whole (small) dataset
and the same batch plan and takes its share of each global batch; the adapter's gradients (about
a million numbers) are summed with one all-reduce per optimizer step. (DDP's wrapper would also
broadcast the whole frozen base at start and hook every micro-batch; nothing here needs that.)

The run's folder holds: config.json (the arguments), metrics.jsonl (one JSON line per step, for
other processes to follow), train.log, adapter.safetensors (and adapter-stepN.safetensors every
--save-every steps), state.pt (resumable: adapter, optimizer, step, RNG) and status.json.
SIGTERM or SIGINT: the current micro-batch finishes, the state of the last whole step is saved,
and the process exits 0; --resume then gives the losses an uninterrupted run would have.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.adapter import Adapter, AdapterConfig, base_description, load_adapter, save_adapter
from core.encoders import configure_encoder
from core.errors import UserError
from core.files import atomic_path, write_json
from core.loading import LoadedModel, cpu_has_fast_bf16, default_device, load_model
from core.parallel import apply_fsdp
from train.data import (add_questions, batch_features, collate, embed_media, length_grouped_batches, load_records, rank_share,
                        tokenize_records)
from train.loss import response_loss, summed_loss

STOP = {"requested": False}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, a Hub id OWNER/NAME[@REVISION], a .gguf file, or a HF/Meta folder")
    p.add_argument("--data", help="a .json/.jsonl file, a shipped dataset name, or task:NAME")
    p.add_argument("--val-data", help="held-out data for the validation loss (same kinds as --data)")
    p.add_argument("--out", help="the run's folder")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its saved arguments")
    a = p.add_argument_group("adapter")
    a.add_argument("--prompt-len", type=int, default=10, help="K, adaption prompts per layer")
    a.add_argument("--layers", type=int, default=30, help="L, adapted top layers (clamped)")
    a.add_argument("--bias-scale", action="store_true", help="V2: bias and scale on the linears")
    a.add_argument("--norm-tuning", action="store_true", help="V2: the adapted layers' norms train")
    a.add_argument("--encoder", help="for image/audio/points records: the encoder by name (default: "
                   "efficientnet-lite0, whisper-tiny, pointnet; pointnet-readings gives its heads' probabilities; "
                   "imagebind reads images and audio into one space; openclip:ARCH:PRETRAINED_OR_PATH)")
    a.add_argument("--prompt-bind-scales", action="store_true",
                   help="each adaption prompt scales the bind output by its own learned per-channel weights, so "
                   "questions can pick parts of the input (not in ImageBind-LLM: it adds one vector to every prompt)")
    a.add_argument("--fusion", choices=("late", "early"), default="late",
                   help="late: the media input reaches every adapted layer (the released code); early: only the "
                   "lowest --fusion-layers of them, the rest keep their prompts alone (the V2 paper)")
    a.add_argument("--fusion-layers", type=int, default=0, help="with --fusion early: how many of the lowest "
                   "adapted layers take the media input (default: half of them)")
    a.add_argument("--visual-blocks", type=int, default=0, metavar="N",
                   help="V2's visual queries in place of the bind network: K learnable queries and the encoder's "
                   "tokens through N ViT blocks, one addition per prompt (the release: 8; 0: the bind network)")
    a.add_argument("--visual-width", type=int, default=768, help="the visual blocks' width (the release: 768)")
    a.add_argument("--visual-heads", type=int, default=16, help="the visual blocks' attention heads (the release: 16)")
    a.add_argument("--bind-question", action="store_true",
                   help="the bind network reads the question too (the mean of its token embeddings), so it passes "
                   "what is asked about the input, as InstructBLIP's Q-Former (not in ImageBind-LLM)")
    a.add_argument("--encoder-weights", metavar="PATH", help="the encoder's checkpoint (imagebind: imagebind_huge.pth)")
    a.add_argument("--init", metavar="ADAPTER", help="stage two (ImageBind-LLM, V2): start from this adapter's prompts, "
                   "gates and bind network (its K, L and encoder); add --bias-scale / --norm-tuning to tune those too")
    a.add_argument("--gate-init", choices=("zero", "random"), default="zero",
                   help="zero as the paper; random (N(0,1)) only to reproduce its ablation")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=float, default=5)
    o.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    o.add_argument("--batch-size", type=int, default=4, help="examples per process per micro-batch")
    o.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--blr", type=float, default=9e-3, help="base lr; lr = blr * effective batch / 256")
    o.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    o.add_argument("--min-lr", type=float, default=0.0)
    o.add_argument("--warmup-epochs", type=float, default=2)
    o.add_argument("--weight-decay", type=float, default=0.02, help="on matrices only")
    o.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    o.add_argument("--max-seq-len", type=int, default=512)
    o.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast; auto: bf16 where the GPU or CPU computes it natively, else fp32")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the frozen base's dtype (default: bfloat16 under bf16 precision, else the device's)")
    r.add_argument("--device", help="cpu, cuda, mps (default: the best there is)")
    r.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="train over a weight-only quantized frozen base (core.quantize; gradients reach the "
                   "adapter through the dequantized products, the base never changes)")
    r.add_argument("--save-every", type=int, default=0, help="write adapter-stepN every N steps")
    r.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps")
    r.add_argument("--fsdp", action="store_true", help="shard the frozen base across processes")
    args = p.parse_args(argv)
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            p.error(f"--resume {args.resume}: no config.json there (not a run folder)")
        args = argparse.Namespace(**{**vars(args), **json.loads(saved.read_text()), "resume": args.resume})
    elif not (args.data and args.out):
        p.error("--data and --out are required (or --resume DIR)")
    return args


# -- the distributed set-up: one process unless torchrun started several --------------------------
def fusion_layers(args, n_layers: int, has_media: bool) -> int:
    """AdapterConfig.fusion_layers from --fusion / --fusion-layers (0: late fusion)."""
    if args.fusion == "late":
        if args.fusion_layers:
            raise UserError("--fusion-layers goes with --fusion early; accepted: --fusion early --fusion-layers N")
        return 0
    if not has_media:
        raise UserError("--fusion early needs image, audio or points records: text-only records have no media input")
    adapted = min(args.layers, n_layers)
    n = args.fusion_layers or max(1, adapted // 2)
    if not 1 <= n < adapted:
        raise UserError(f"--fusion-layers must be 1..{adapted - 1} (fewer than the {adapted} adapted layers), got {n}")
    return n


def setup_distributed(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif world > 1:  # CPU processes share the cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


# -- optimizer and schedule, as the paper -----------------------------------------------------------
def paper_optimizer(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95); weight decay on matrices only (not gates, biases, scales, norms)."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


# linear warmup, then half a cosine
def lr_at(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class RunLog:
    """train.log (and stdout) for people, metrics.jsonl for programs; rank 0 writes both."""

    def __init__(self, out: Path, active: bool):
        self.active = active
        if active:
            self.text = open(out / "train.log", "a", buffering=1)
            self.metrics = open(out / "metrics.jsonl", "a", buffering=1)

    def say(self, line: str):
        if self.active:
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            print(f"{stamp} {line}", file=self.text)
            print(line, flush=True)

    def step(self, record: dict, total_steps: int):
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        done = record["step"] / total_steps
        bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
        val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
        self.say(f"step {record['step']}/{total_steps} [{bar}] {100 * done:3.0f}% loss {record['loss']:.4f}{val} "
                 f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s "
                 f"eta {datetime.timedelta(seconds=round(record['eta']))}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except Exception as e:  # a crash is recorded for whoever follows the run (the app's Train tab)
        status_file = Path(args.out) / "status.json"
        if os.environ.get("RANK", "0") == "0" and status_file.parent.is_dir():
            write_json(status_file, {"state": "failed", "error": str(e).splitlines()[0] if str(e) else repr(e),
                                     "pid": os.getpid()})
        raise
    return 0


def run(args: argparse.Namespace, lm: LoadedModel | None = None) -> Adapter:
    """Train as `args` say; `lm` reuses a model already loaded in this process (its adapter is
    left attached). Returns the adapter."""
    out = Path(args.out)
    for sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a stop during loading is honoured too
        signal.signal(sig, lambda *_: STOP.update(requested=True))
    # 1. the data, validated before anything starts
    records = load_records(args.data)
    val_records = load_records(args.val_data) if args.val_data else []

    # 2. processes, model, adapter
    rank, world, device = setup_distributed(args.device or default_device())
    if args.fsdp and world == 1:
        raise UserError("--fsdp shards the base across processes: launch with torchrun --nproc_per_node N")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not args.resume:
        write_json(out / "config.json", {k: v for k, v in vars(args).items() if k != "resume"})
    log = RunLog(out, rank == 0)
    precision = args.precision
    if precision == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if device.startswith("cuda") else \
            device == "cpu" and cpu_has_fast_bf16()
        precision = "bf16" if fast_bf16 else "fp32"
    # the frozen base needs no fp32 master copy: under bf16 autocast it is stored in bf16 (half the
    # memory, no per-step casts); the adapter's own parameters stay fp32
    dtype = args.dtype or ("bfloat16" if precision == "bf16" else None)
    # with --fsdp the base is read into CPU memory, then each rank keeps 1/world of it on `device`
    if args.fsdp and args.quantize != "none":
        raise UserError("--quantize and --fsdp together are not supported; accepted: one of them")
    lm = lm or load_model(args.model, dtype, "cpu" if args.fsdp else device, quantize=args.quantize)
    model, tok = lm.model, lm.tokenizer
    base = base_description(model)  # the adapter files' record of the base, taken while it is whole
    base_numel = sum(p.numel() for p in model.parameters())
    base_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if args.fsdp:
        apply_fsdp(model, device)
        held = sum(p.to_local().numel() for p in model.parameters())
        log.say(f"FSDP: rank 0 holds {held:,} of {base_numel:,} base weights between uses")
    examples = tokenize_records(records, tok, lm.chat_format, lm.system_prompt, args.max_seq_len)
    val_examples = tokenize_records(val_records, tok, lm.chat_format, lm.system_prompt, args.max_seq_len) \
        if val_records else []
    if args.encoder and args.encoder_weights:
        configure_encoder(args.encoder, weights=args.encoder_weights)
    # checked before the encoder runs over every file
    if args.visual_blocks and (not any(e.media for e in examples) or args.bind_question or args.prompt_bind_scales):
        raise UserError("--visual-blocks needs image records and goes without --bind-question and --prompt-bind-scales "
                        "(those shape the bind network it replaces)")
    # stage two: the first stage's adapter, with any V2 parts it lacks at their identity
    stage_one = load_adapter(args.init, model, attach=False) if args.init else None
    visual_blocks = stage_one.cfg.visual_blocks if stage_one is not None else args.visual_blocks
    encoder = embed_media(examples + val_examples, args.encoder, tokens=visual_blocks > 0)
    encoder_dim = examples[0].features.shape[-1] if encoder else 0
    torch.manual_seed(args.seed)
    cfg = AdapterConfig(args.prompt_len, args.layers, args.bias_scale, args.norm_tuning, encoder, encoder_dim,
                        prompt_bind_scales=args.prompt_bind_scales, bind_question=args.bind_question,
                        fusion_layers=fusion_layers(args, lm.model.args.n_layers, bool(encoder)),
                        visual_blocks=args.visual_blocks, visual_width=args.visual_width, visual_heads=args.visual_heads)
    if args.bind_question and not encoder:
        raise UserError("--bind-question needs image, audio or points records: text-only records have no bind network")
    if stage_one is not None:
        if (stage_one.cfg.encoder or None) != (encoder or None):
            raise UserError(f"--init {args.init} reads {stage_one.cfg.encoder or 'text only'}, "
                            f"these records {encoder or 'text only'}")
        cfg = dataclasses.replace(stage_one.cfg, bias_scale=stage_one.cfg.bias_scale or args.bias_scale,
                                  norm_tuning=stage_one.cfg.norm_tuning or args.norm_tuning)
    if cfg.bind_question:
        add_questions(examples + val_examples, model, tok)
    adapter = Adapter.create(model, cfg)
    if stage_one is not None:
        missing = adapter.load_state_dict(stage_one.state_dict(), strict=False).missing_keys
        log.say(f"stage two from {args.init}: {len(missing)} new V2 tensors at identity")
    adapter.attach(model)
    adapter.meta["base"] = base
    if args.gate_init == "random":
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.prompt.gate.normal_()
    adapter.float().train()
    params = [p for p in adapter.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    # 3. optimizer and schedule
    global_batch = args.batch_size * world * args.accum
    peak_lr = args.lr if args.lr is not None else args.blr * global_batch / 256
    optimizer = paper_optimizer(params, peak_lr, args.weight_decay)
    lengths = [len(e.tokens) for e in examples]
    steps_per_epoch = len(length_grouped_batches(lengths, global_batch, args.seed, 0))
    total_steps = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = round(args.warmup_epochs * steps_per_epoch)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")

    # 4. resume: adapter, optimizer, scaler, RNG and data position (the step)
    step = 0
    if args.resume:
        state_path = out / "state.pt"
        if not state_path.is_file():
            raise UserError(f"--resume {out}: no state.pt there (the run never saved a resumable state)")
        state = torch.load(state_path, map_location=device, weights_only=True)
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        step = state["step"]
        log.say(f"resumed {out} at step {step}")
    elif world > 1:  # same seed gives the same init everywhere; make sure of it
        for p in adapter.parameters():
            dist.broadcast(p.data, 0)

    def save_state():
        if rank != 0:
            return
        with atomic_path(out / "state.pt") as tmp:
            torch.save({"step": step,  # the data position too: batch plans are fixed by (seed, epoch)
                        "adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "rng": torch.get_rng_state()}, tmp)

    def summary(loss, val_loss):
        return {"dataset": str(args.data), "records": len(examples), "steps": step, "epochs": step / steps_per_epoch,
                "final_loss": loss, "val_loss": val_loss, "prompt_format": "alpaca" if "messages" not in records[0]
                else lm.chat_format, "date": datetime.datetime.now().isoformat(timespec="seconds")}

    def status(state, **extra):
        if rank == 0:
            write_json(out / "status.json", {"state": state, "step": step, "total_steps": total_steps,
                                             "pid": os.getpid(), **extra})

    def validation_loss() -> float:
        model.eval()
        total, count = all_sum(summed_loss(model, val_examples, args.batch_size, device, rank, world), world)
        return (total / count).item()

    def stop_agreed() -> bool:
        """Every rank must stop at the same micro-batch, or the others would wait forever."""
        flag = torch.tensor([1.0 if STOP["requested"] else 0.0])
        return all_sum(flag, world).item() > 0

    # 5. the loop
    log.say(f"{lm.name}: {len(examples)} examples, {world} process(es), global batch {global_batch}, "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps, lr {peak_lr:.2e}, "
            f"adapter K={cfg.prompt_len} L={len(adapter.layers)} ({n_trainable:,} trainable), {precision}, "
            f"frozen base {args.quantize if args.quantize != 'none' else str(next(model.parameters()).dtype)[6:]} "
            f"in {base_bytes / 2**20:.0f} MB")
    status("running")
    started, window_tokens, window_start, loss_value, val_loss = time.time(), 0, time.time(), float("nan"), None
    first_step, stopped = step, False
    while step < total_steps and not stopped:
        epoch, index = divmod(step, steps_per_epoch)
        plan = length_grouped_batches(lengths, global_batch, args.seed, epoch)
        batch = [examples[i] for i in plan[index]]
        n_targets = sum(sum(e.loss_mask[1:]) for e in batch)  # all ranks know the global batch
        lr = lr_at(step, peak_lr, args.min_lr, warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for micro in range(args.accum):
            weight, part = rank_share(batch, (micro * world + rank) * args.batch_size, args.batch_size)
            inputs, targets = collate(part)
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = weight * response_loss(model, inputs, targets, batch_features(part))[0]
            scaler.scale(loss / n_targets).backward()
            loss_sum += loss.item()
            window_tokens += int(weight) * sum(len(e.tokens) for e in part)
            if stop_agreed():
                stopped = True
                break
        if stopped:  # the partial step is dropped: a resumed run redoes it from its start
            optimizer.zero_grad(set_to_none=True)
            break
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            torch.nn.utils.vector_to_parameters(flat, grads)
        for p, g in zip(params, grads):
            p.grad = g
        scaler.unscale_(optimizer)
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss_value = (all_sum(loss_sum, world) / n_targets).item()
        tokens = all_sum(torch.tensor([float(window_tokens)]), world).item()
        now = time.time()
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_value, "lr": lr,
                  "tokens_per_s": tokens / max(now - window_start, 1e-9), "elapsed": now - started,
                  "eta": (now - started) / (step - first_step) * (total_steps - step)}
        window_tokens, window_start = 0, now
        if val_examples and (step == total_steps or (args.eval_every and step % args.eval_every == 0)):
            val_loss = record["val_loss"] = validation_loss()
        log.step(record, total_steps)
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            if rank == 0:
                save_adapter(adapter, out / f"adapter-step{step}.safetensors", training=summary(loss_value, val_loss))
            save_state()

    save_state()
    if rank == 0:
        name = "adapter.safetensors" if step >= total_steps else f"adapter-step{step}.safetensors"
        save_adapter(adapter, out / name, training=summary(loss_value, val_loss))
    if stopped:
        log.say(f"stopped at step {step}/{total_steps}; resumable state saved (--resume {out})")
        status("stopped")
    else:
        log.say(f"finished: {step} steps, loss {loss_value:.4f} -> {out / 'adapter.safetensors'}")
        status("finished", final_loss=loss_value, val_loss=val_loss)
    if world > 1:
        # every rank leaves together: a rank tearing its gloo connections down while another is
        # still writing files aborted once ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return adapter


def cli(argv=None):
    try:
        sys.exit(main(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
