"""Stream a completion, or chat interactively.

    python -m core.generate --model smollm2 --chat --prompt "What is the capital of France?"
    python -m core.generate --model smollm2            # interactive multi-turn chat
    torchrun --nproc_per_node 2 -m core.generate --model PATH --prompt "..."   # model-parallel
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from core.adapter import SHIPPED
from core.chat_format import FORMATS, render
from core.errors import UserError
from core.generation import Generator, model_sampling
from core.encoders import KINDS, configure_encoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m core.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, a Hub id OWNER/NAME[@REVISION], or a path: .gguf file, Hugging Face or Meta folder")
    p.add_argument("--adapter", help="adapter file (.safetensors, or an official release's .pth), or a released V2 "
                   "name (BIAS-7B, ...); with a media file and no --adapter, the shipped one for its kind")
    p.add_argument("--prompt", help="text to complete; without it, an interactive chat opens")
    for kind in KINDS:
        p.add_argument(f"--{kind}", metavar="FILE", nargs="+", help=f"ask about this {kind} file with an adapter "
                       f"trained on {kind} records (default: the shipped one); several files are mixed, see --weights")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per input file, in the order "
                   f"{', '.join('--' + k for k in KINDS)} (default: equal); kinds mix only with an encoder that "
                   "reads them all (imagebind)")
    p.add_argument("--cache", metavar="BANK", help="ImageBind-LLM's cache model: a feature bank (.npy or .safetensors, "
                   "N x encoder width) whose nearest neighbours are mixed into the input's embedding")
    p.add_argument("--cache-k", type=int, default=10, help="neighbours taken from the bank")
    p.add_argument("--cache-t", type=float, default=20.0, help="softmax temperature over their similarities")
    p.add_argument("--cache-weight", type=float, default=0.5, help="how much of the embedding the neighbours replace")
    p.add_argument("--encoder-weights", metavar="PATH", help="the adapter's encoder's checkpoint (imagebind: "
                   "imagebind_huge.pth; default: the cached copy, else the official download)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat format (implied by a "
                   "question about a media file)")
    p.add_argument("--raw", action="store_true", help="complete --prompt as it is, even about a media file")
    p.add_argument("--format", choices=FORMATS, help="prompt format (default: the adapter's training format, else the checkpoint's)")
    p.add_argument("--system", help="system prompt (default: the checkpoint's, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's own, 0.2 for the embedded "
                   "one; greedy for questions about media files, as their adapters were evaluated)")
    p.add_argument("--top-p", type=float, help="default: the model's own")
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float, help="default 1.1 (1: off; with --ngram-guard, the "
                   "repetition guard; both off for media questions)")
    p.add_argument("--ngram-guard", type=int, help="no n-gram of a reply occurs a third time (default 6; 0: off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["none", "int8", "int4"], help="weight-only quantization of the frozen base (core.quantize; default: int4 for the embedded model on CPU when no --dtype is given, else none)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"])
    p.add_argument("--compile", action="store_true", help="compile the one-token decode step (core.compiled): "
                   "about 1.7x the tokens a second at int4 on CPU after a compile of minutes, seconds once cached")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(args) -> int:
    from core import parallel
    from core.adapter import load_adapter
    from core.loading import load_model
    from core.serving import chat_setup

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; accepted here: cpu")
    if args.device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: no MPS device is available here; accepted here: cpu")
    rank = 0
    inputs = [(k, f) for k in KINDS for f in getattr(args, k) or []]
    if inputs and not args.adapter:
        args.adapter = shipped_adapter(sorted({k for k, _ in inputs}))
        print(f"note: no --adapter given: asking {args.adapter.relative_to(SHIPPED.parents[1])}, the shipped "
              f"{inputs[0][0]} adapter (made for the embedded model)", file=sys.stderr)
    if inputs and args.prompt is not None and not args.raw:
        args.chat = True  # the media adapters learned their answers as chat replies
    lm = load_model(args.model, args.dtype, args.device, args.format, quantize=args.quantize)
    if args.compile:
        from core.compiled import compile_decode
        compile_decode(lm.model)
    if args.adapter:
        adapter = load_adapter(args.adapter, lm.model)
        if not args.format:
            lm.chat_format, lm.system_prompt, _ = chat_setup(lm, adapter)
    if parallel.world_size() > 1:
        device = str(lm.model.tok_embeddings.weight.device)
        rank, _ = parallel.init_model_parallel(device)
        parallel.apply_model_parallel(lm.model)
    if (args.weights or args.cache) and not inputs:
        raise UserError(f"{'--weights' if args.weights else '--cache'} needs input files: "
                        f"{', '.join('--' + k for k in KINDS)}")
    condition_for = media_conditions(args, lm, inputs) if inputs else (lambda question: None)
    return converse(args, lm, rank, condition_for, media=bool(inputs))


def shipped_adapter(kinds: list[str]) -> Path:
    """The adapter in assets/adapters for one kind of input, as the app's tabs pick it."""
    path = SHIPPED / f"{kinds[0]}.safetensors"
    if len(kinds) > 1 or not path.is_file():
        what = " and ".join(kinds)
        raise UserError(f"no shipped adapter reads {what}; pass --adapter FILE (one trained on {what} records, "
                        f"e.g. with train.finetune --encoder imagebind); shipped: "
                        f"{', '.join('--' + p.stem for p in sorted(SHIPPED.glob('*.safetensors')) if p.stem in KINDS)}")
    return path


def media_conditions(args, lm, inputs: list[tuple[str, str]]):
    """question -> what the input files add to the adapter's prompts: encoded once for every
    question, unless the adapter's bind network reads the question too (then once per question)."""
    from core.multimodal import FeatureCache, embed_inputs, questions_for
    adapter = lm.model.adapter
    if args.encoder_weights:
        configure_encoder(adapter.cfg.encoder or "", weights=args.encoder_weights)
    weights = args.weights or ([1.0] * len(inputs) if len(inputs) > 1 else None)
    cache = FeatureCache.from_file(args.cache, k=args.cache_k, temperature=args.cache_t,
                                   weight=args.cache_weight) if args.cache else None

    @torch.no_grad()
    def condition_for(question: str) -> torch.Tensor:
        return embed_inputs(adapter, [f for _, f in inputs], [k for k, _ in inputs], weights, cache,
                            questions_for(adapter, lm.model, lm.tokenizer, [question]))
    if adapter.cfg.bind_question:
        return condition_for
    fixed = condition_for("")
    return lambda question: fixed


def converse(args, lm, rank: int, condition_for, media: bool = False) -> int:
    """`condition_for(question)`: what the input files add to the prompts for that question (None: text only)."""
    from core import parallel
    from core.multimodal import conditioned
    gen = Generator(lm.model, lm.tokenizer, lm.stop_ids)
    asked = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty", "ngram_guard")
             if getattr(args, k) is not None}
    if media:  # one-word answers about files: greedy and unguarded, as their adapters were evaluated
        asked = {"temperature": 0.0, "repetition_penalty": 1.0, "ngram_guard": 0, **asked}
    params = model_sampling(lm, **asked, max_new_tokens=args.max_new_tokens,
                            stop=args.stop + (lm.stop_texts if args.chat or args.prompt is None else []),
                            seed=args.seed if args.seed is not None else (0 if parallel.world_size() > 1 else None))
    system = args.system if args.system is not None else lm.system_prompt
    out = sys.stdout if rank == 0 else open("/dev/null", "w")

    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty; give some text")
        text = render(lm.chat_format, [{"role": "user", "content": args.prompt}], system) if args.chat else args.prompt
        with conditioned(lm.model, condition_for(args.prompt)):
            for delta in gen.stream(text, params):
                out.write(delta)
                out.flush()
        out.write("\n")
        return 0

    history: list[dict] = []
    if rank == 0:
        print(f"chat with {lm.name} ({lm.chat_format} format); empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        line = _read_line(rank)
        if not line:
            return 0
        history.append({"role": "user", "content": line})
        reply = ""
        with conditioned(lm.model, condition_for(line)):  # a question-aware bind network reads this turn's
            for delta in gen.stream(render(lm.chat_format, history, system), params):
                reply += delta
                out.write(delta)
                out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})


def _read_line(rank: int) -> str:
    """Rank 0 reads the user's line; under model parallelism every rank gets it."""
    line = ""
    if rank == 0:
        try:
            line = input("> ").strip()
        except EOFError:
            line = ""
    from core import parallel
    if parallel.world_size() > 1:
        box = [line]
        torch.distributed.broadcast_object_list(box, src=0)
        line = box[0]
    return line


if __name__ == "__main__":
    sys.exit(main())
