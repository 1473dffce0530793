"""Tokenizers from every source, chat formats, and the streaming text decoder."""
import pytest

from core.chat_format import detect_format, render
from core.errors import UserError
from core.generation import TextStream
from core.loading import resolve_model_path
from core.tokenizer import gguf_tokenizer, load_sentencepiece
from tests.helpers import spm_tokenizer_meta, train_sentencepiece

SAMPLES = ["Hello world", "  leading spaces and  double  gaps", "numbers 1234567 and 3.14159",
           "caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \U0001F600", "<|im_start|>user\nhi<|im_end|>\n",
           "tabs\tand\nnewlines\n\n", "don't won't I'm"]


def test_embedded_gguf_tokenizer_matches_transformers_gguf_conversion():
    from transformers import AutoTokenizer
    path = resolve_model_path("smollm2")
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from core.loading import _gguf_reader
    reader = _gguf_reader(path)
    ours = gguf_tokenizer({k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")})
    for text in SAMPLES:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode("x " + text)) == ref.decode(ref.encode("x " + text), skip_special_tokens=True)


def test_sentencepiece_rebuilt_from_gguf_vocab_matches_original(tmp_path):
    import sentencepiece as spm
    model_file = train_sentencepiece(tmp_path / "spm")
    original = spm.SentencePieceProcessor(model_file=str(model_file))
    rebuilt = gguf_tokenizer(spm_tokenizer_meta(model_file))
    assert rebuilt.kind == "spm" and rebuilt.add_bos and rebuilt.bos_id == 1
    for text in SAMPLES + ["the quick brown fox", "unseen wörds with bytes \u2603"]:
        assert rebuilt.encode(text, bos=False) == original.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == original.decode(original.encode(text))
    assert rebuilt.encode("a</s>b", bos=True)[0] == 1 and 2 in rebuilt.encode("a</s>b")


def test_streaming_sentencepiece_spaces_and_multibyte_characters(tmp_path):
    tok = load_sentencepiece(train_sentencepiece(tmp_path / "spm"))
    text = "the quick fox \u2603 jumps \U0001F600 over"
    ids = tok.encode(text, bos=False)
    stream = TextStream(tok, [])
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) < len(ids)  # byte-fallback pieces were held back until complete


def test_stop_string_split_over_tokens_is_never_emitted(tmp_path):
    tok = load_sentencepiece(train_sentencepiece(tmp_path / "spm"))
    ids = tok.encode("the quick brown fox jumps over", bos=False)
    stream = TextStream(tok, ["brown fox"])
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    assert out == "the quick " and stream.stopped


def test_chat_formats_render_as_each_family_expects():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    assert render("chatml", msgs, "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert render("llama3", msgs[:1], "S") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("llama2", msgs, "S") == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]")
    alpaca = render("alpaca", msgs[:1])
    assert alpaca.startswith("Below is an instruction that describes a task.") and alpaca.endswith(
        "### Instruction:\nHi\n\n### Response:")
    with pytest.raises(UserError, match="unknown prompt format"):
        render("vicuna", msgs)


def test_format_detected_from_checkpoint_metadata():
    assert detect_format("{{ '<|im_start|>' + role }}", []) == "chatml"
    assert detect_format(None, ["<|start_header_id|>", "<|eot_id|>"]) == "llama3"
    assert detect_format("{% if ... %}[INST] {{ content }} [/INST]", ["<s>"]) == "llama2"
    assert detect_format(None, ["<s>", "</s>"]) == "alpaca"
