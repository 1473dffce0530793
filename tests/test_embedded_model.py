"""The real embedded default model: answers, streaming, batching, the CLI as a subprocess."""
import subprocess
import sys
from pathlib import Path


from core.chat_format import render
from core.generation import Generator, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def chat(lm, text):
    return render(lm.chat_format, [{"role": "user", "content": text}], lm.system_prompt)


def test_embedded_default_metadata(smollm2):
    a = smollm2.model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size) == (576, 30, 9, 3, 49152)
    assert a.tie_embeddings and smollm2.chat_format == "chatml"
    assert smollm2.system_prompt.startswith("You are a helpful AI assistant named SmolLM")
    assert smollm2.stop_ids == {2}
    assert smollm2.stop_texts == []  # ChatML's <|im_end|> is a special token, caught as an id


def test_alpaca_format_stops_on_its_text_marker(smollm2):
    import dataclasses
    lm = dataclasses.replace(smollm2, chat_format="alpaca")  # the same loaded model, another format
    assert lm.stop_texts == ["### Instruction:"] and lm.stop_ids == {2}


def test_embedded_default_greedy_chat_knows_paris(smollm2):
    gen = Generator(smollm2.model, smollm2.tokenizer, smollm2.stop_ids)
    reply = gen.generate([chat(smollm2, "What is the capital of France?")], SamplingParams(max_new_tokens=24))[0]
    assert "Paris" in reply


def test_embedded_default_stream_concatenates_to_non_streamed(smollm2):
    gen = Generator(smollm2.model, smollm2.tokenizer, smollm2.stop_ids)
    prompt = chat(smollm2, "Write one sentence about caf\u00e9s in Z\u00fcrich, with an emoji.")
    params = SamplingParams(max_new_tokens=40)
    deltas = list(gen.stream(prompt, params))
    assert len(deltas) > 5 and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == gen.generate([prompt], params)[0]


def test_embedded_default_batch_of_unequal_prompts_equals_one_by_one(smollm2):
    gen = Generator(smollm2.model, smollm2.tokenizer, smollm2.stop_ids)
    prompts = [chat(smollm2, "What is 2 + 2?"), chat(smollm2, "Name three colours of the rainbow, please, in a list."),
               chat(smollm2, "Hi")]
    params = SamplingParams(max_new_tokens=16)
    assert gen.generate(prompts, params) == [gen.generate([p], params)[0] for p in prompts]


def test_embedded_default_stop_string_and_sampling_are_reproducible(smollm2):
    gen = Generator(smollm2.model, smollm2.tokenizer, smollm2.stop_ids)
    prompt = chat(smollm2, "Count from one to ten in words, separated by commas.")
    full = gen.generate([prompt], SamplingParams(max_new_tokens=40))[0]
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a piece of the real output, wherever tokens split
    cut = "".join(gen.stream(prompt, SamplingParams(max_new_tokens=40, stop=[stop])))
    assert cut == full[:full.find(stop)] and len(cut) < len(full)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7)
    assert gen.generate([prompt], sampled) == gen.generate([prompt], sampled)


def test_cli_streams_answer_and_rejects_bad_input():
    env_cmd = [sys.executable, "-m", "core.generate"]
    done = subprocess.run(env_cmd + ["--model", "smollm2", "--chat", "--prompt", "What is the capital of France?",
                                     "--max-new-tokens", "20", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    bad = subprocess.run(env_cmd + ["--model", "/no/such/model.gguf", "--prompt", "hi"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: unknown model")


def test_cli_interactive_chat_keeps_history():
    def session(lines):
        done = subprocess.run([sys.executable, "-m", "core.generate", "--max-new-tokens", "20", "--temperature", "0"],
                              input=lines,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return [r.strip() for r in done.stdout.split("> ") if r.strip()]
    two_turns = session("My name is Ada.\nWhat is my name?\n")
    fresh = session("What is my name?\n")
    assert len(two_turns) == 2 and len(fresh) == 1
    assert two_turns[1] != fresh[0]  # the second turn saw the first
