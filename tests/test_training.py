"""Adapter fine-tuning: data validation, loss going down, data parallelism equal to one process,
resume after SIGTERM, the frozen base, and a real run on the embedded model."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from core.loading import load_model
from tests.helpers import hf_llama
from train.data import collate, length_grouped_batches, load_records, tokenize_record
from train.finetune import parse_args, run

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "hf"
    hf_llama(path, num_hidden_layers=3)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A learnable toy task: repeat the word after 'say'."""
    path = tmp_path_factory.mktemp("data") / "say.jsonl"
    words = "fox dog robot moon river jazz wizard dinner".split()
    with open(path, "w") as f:
        for i in range(64):
            w = words[i % len(words)]
            f.write(json.dumps({"instruction": f"say {w}", "output": f"{w} {w} {w}"}) + "\n")
    return path


def train_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--layers", "2",
            "--prompt-len", "4", "--batch-size", "4", "--lr", "0.05", "--warmup-epochs", "0",
            "--precision", "fp32", *extra]  # fp32: the exactness checks below compare bit for bit


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,where", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "bad.jsonl:2: field 'output' is missing"),
    ('{"instruction": "a", "output": "b"}\nnot json\n', "bad.jsonl:2: invalid JSON"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": 3, "output": "b"}\n]', "bad.jsonl:3: field 'instruction'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: field 'messages' has no assistant"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "bad.jsonl:1: field 'messages[0].role'"),
    ('[{"instruction": "a", "output": "b"}', "invalid JSON"),
    ('', "no records"),
])
def test_malformed_records_are_refused_with_line_and_field(tmp_path, text, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match="accepted|invalid JSON") as e:
        load_records(str(path))
    assert where in str(e.value) and "\n" not in str(e.value)


def test_malformed_data_stops_the_cli_before_any_job_starts(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n')
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "train.finetune", *train_args(tiny_model_dir, bad, out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "bad.jsonl:2: field 'output'" in done.stderr
    assert not out.exists()


def test_tiny_random_tokenizer_masks_prompt_and_keeps_response_targets(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "float32", "cpu")
    ex = tokenize_record({"instruction": "say fox", "output": "fox fox"}, lm.tokenizer, "alpaca")
    response = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
    assert lm.tokenizer.decode(response[:-1]).strip() == "fox fox" and response[-1] == lm.tokenizer.eos_id
    assert not any(ex.loss_mask[:len(ex.tokens) - len(response)])
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "dog"}]}
    ex = tokenize_record(chat, lm.tokenizer, "chatml")
    assert lm.tokenizer.decode([t for t, m in zip(ex.tokens, ex.loss_mask) if m]) == "fox<|im_end|>dog<|im_end|>"
    inputs, targets = collate([ex, tokenize_record(chat, lm.tokenizer, "chatml", max_seq_len=5)])
    assert inputs.shape == targets.shape == (2, len(ex.tokens) - 1)
    assert (targets[1] == -100).all()  # truncated before its response: nothing to learn


def test_length_grouped_batches_cover_every_example_once_with_little_padding():
    lengths = [(i * 37) % 200 + 5 for i in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)
    assert batches == length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=0, epoch=1)


# -- training ---------------------------------------------------------------------------------------
def test_tiny_random_loss_decreases_and_only_the_adapter_changes(tmp_path, tiny_model_dir, data_file):
    lm = load_model(str(tiny_model_dir), "float32", "cpu")
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    lower_outputs = []
    lm.model.layers[0].register_forward_hook(lambda m, i, o: lower_outputs.append(o.requires_grad))
    out = tmp_path / "run"
    adapter = run(parse_args(train_args(tiny_model_dir, data_file, out, "--epochs", "6")), lm)
    curve = losses(out)
    assert len(curve) == 6 * 16
    # a random 64-wide model has near-uniform outputs that prompts move only a little; the
    # descent is still far beyond the step-to-step noise (about 0.05)
    first, last = sum(curve[:16]) / 16, sum(curve[-16:]) / 16
    assert last < first - 0.1
    adapter.detach()
    after = lm.model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert lower_outputs and not any(lower_outputs)  # the layer under the adapted two: no autograd
    saved = load_file(out / "adapter.safetensors")
    assert set(saved) == {f"layers.{i}.prompt.{n}" for i in (1, 2) for n in ("prompt", "gate")}
    assert all(saved[f"layers.{i}.prompt.gate"].abs().sum() > 0 for i in (1, 2))  # gates moved off zero
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 96


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_tiny_random_two_process_gloo_step_equals_one_process_with_doubled_batch(tmp_path, tiny_model_dir, data_file,
                                                                                 sharding):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max-steps", "3", "--seed", "3"]
    subprocess.run([sys.executable, "-m", "train.finetune",
                    *train_args(tiny_model_dir, data_file, one, *common, "--batch-size", "8")],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=120)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "train.finetune", *train_args(tiny_model_dir, data_file, two, *common, *sharding)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (two / "train.log").read_text()
    assert "2 process(es), global batch 8" in log
    if sharding:  # each rank held half of the base between uses
        held, total = re.search(r"FSDP: rank 0 holds ([\d,]+) of ([\d,]+)", log).groups()
        assert int(held.replace(",", "")) * 2 == pytest.approx(int(total.replace(",", "")), rel=0.01)
    a, b = load_file(one / "adapter.safetensors"), load_file(two / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)


def test_tiny_random_sigterm_saves_state_exits_zero_and_resume_matches_uninterrupted(tmp_path, tiny_model_dir, data_file):
    steps = ["--epochs", "20", "--save-every", "50"]  # 320 steps: seconds on the tiny model
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "train.finetune", *train_args(tiny_model_dir, data_file, whole, *steps)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([sys.executable, "-m", "train.finetune", *train_args(tiny_model_dir, data_file, cut, *steps)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (cut / "metrics.jsonl").exists() or len(losses(cut)) < 30):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    assert time.time() - sent < 5
    status = json.loads((cut / "status.json").read_text())
    assert status["state"] == "stopped" and 30 <= status["step"] < 320
    resumed = subprocess.run([sys.executable, "-m", "train.finetune", "--resume", str(cut)],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(cut) == losses(whole)  # the same curve, bit for bit
    a, b = load_file(whole / "adapter.safetensors"), load_file(cut / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_folder_without_state_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--resume", str(tmp_path)])


def test_embedded_model_short_run_improves_held_out_json_formatting(tmp_path, smollm2_bf16):
    from train.evaluate import accuracy
    from train.tasks import task_records
    held_out = task_records("json_format", "test", 16)
    before, _ = accuracy(smollm2_bf16, held_out, smollm2_bf16.chat_format)  # untuned, in its own chat format
    args = parse_args(["--data", "task:json_format", "--out", str(tmp_path / "run"), "--max-steps", "10",
                       "--batch-size", "8", "--lr", "1e-2", "--warmup-epochs", "0.01"])
    adapter = run(args, smollm2_bf16)
    try:
        after, pairs = accuracy(smollm2_bf16, held_out, "alpaca")
    finally:
        adapter.detach()
    assert after >= before + 0.5, (before, after, pairs[:3])


def test_shipped_datasets_validate_and_task_splits_are_deterministic_and_disjoint():
    from train.data import shipped_datasets
    from train.tasks import TASKS, answer_of, task_records
    assert "pirate" in shipped_datasets() and len(load_records("pirate")) >= 40
    for task in TASKS:
        train, test = task_records(task, "train"), task_records(task, "test")
        assert len(test) >= 40 and train[:5] == task_records(task, "train", 5)
        assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in test}
        assert all(answer_of(r["output"]) == r["output"] for r in test)  # the answers survive extraction
    assert load_records("task:arithmetic")[0] == task_records("arithmetic", "train")[0]


def test_tiny_random_fused_head_loss_equals_plain_cross_entropy_with_gradients():
    import torch.nn.functional as F

    from core.adapter import Adapter, AdapterConfig
    from tests.test_adapter import tiny_random_model, trained_copy
    from train.loss import CHUNK, response_loss
    model = tiny_random_model()
    adapter = trained_copy(Adapter.create(model, AdapterConfig(prompt_len=3, layers=2))).attach(model)
    g = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 100, (3, 110), generator=g)
    targets = torch.randint(0, 100, (3, 110), generator=g)
    targets[:, :20] = -100  # prompt positions; 270 targets span two chunks
    assert (targets != -100).sum() > CHUNK
    loss, count = response_loss(model, inputs, targets)
    loss.backward()
    fused = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    select = targets != -100
    plain = F.cross_entropy(model(inputs, select=select), targets[select], reduction="sum")
    plain.backward()
    assert count == 270
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-4)
    for a, b in zip(fused, (p.grad for p in adapter.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
