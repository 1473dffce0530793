"""This adapter vs LoRA (peft, on transformers' LlamaForCausalLM with the same weights) vs no
tuning, at similar trainable-parameter budgets: accuracy, parameters, file size, wall time."""
import tempfile
import time
from pathlib import Path

import torch

from core.loading import load_model
from train.claims import BATCH, LR, STEPS, TASK, TEST, plot_curves, train_and_evaluate, untuned, write_table
from train.data import tokenize_records
from train.evaluate import accuracy, validation_loss
from train.peers import hf_twin, ours_from_hf, train_peft
from train.tasks import task_records

LORA_RANK = 3  # q_proj and v_proj in all 30 layers: 3 * (576 + 576 + 576 + 192) * 30 = 172,800


def lora(lm) -> dict:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(hf_twin(lm.model), LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                         target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    examples = tokenize_records(task_records(TASK, "train"), lm.tokenizer, lm.chat_format, lm.system_prompt, 512)
    started = time.time()
    trained = train_peft(model, examples, STEPS, BATCH, LR, warmup=round(0.01 * len(examples) / BATCH))
    wall = time.time() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    merged = ours_from_hf(model.merge_and_unload(), lm)
    held_out = task_records(TASK, "test", TEST)
    return {"name": f"LoRA r={LORA_RANK} (peft)", "accuracy": accuracy(merged, held_out, "alpaca")[0],
            "val_loss": validation_loss(merged, held_out, "alpaca"), "curve": trained["curve"],
            "wall_s": wall, "trainable": trainable, "file_bytes": size}


def main():
    lm = load_model("smollm2", "float32", "cpu")
    results = [train_and_evaluate(lm, "LLaMA-Adapter K=10 L=30"), lora(lm), untuned(lm)]
    write_table("vs_lora", "LLaMA-Adapter vs LoRA vs no tuning",
                ["method", "trainable params", "held-out accuracy", "val loss", "file size", "train wall time"],
                [[r["name"], f"{r['trainable']:,}", f"{r['accuracy']:.1%}", f"{r['val_loss']:.3f}",
                  f"{r['file_bytes'] / 1024:.0f} KiB" if r["file_bytes"] else "-",
                  f"{r['wall_s']:.0f} s" if r["wall_s"] else "-"] for r in results],
                note=f"LoRA trains with the same data order, optimizer, lr {LR}, schedule and clipping "
                     "(train.peers.train_peft). The untuned model is prompted in its own chat format.")
    plot_curves("vs_lora", "LLaMA-Adapter vs LoRA vs no tuning (SmolLM2-135M)", results)


if __name__ == "__main__":
    main()
