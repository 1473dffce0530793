"""Tokenizers: Hugging Face tokenizer.json, SentencePiece tokenizer.model, and the vocabulary
stored inside GGUF files (gpt2 byte-level BPE and llama SentencePiece kinds), behind one class."""
from __future__ import annotations

import re
from pathlib import Path

from core.errors import UserError


class Tokenizer:
    """encode(text) parses special tokens written in the text (chat formats rely on it) and adds
    BOS when the model expects one; decode(ids) drops special tokens."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_id: int | None,
                 special: dict[str, int], add_bos: bool):
        self.backend, self.kind = backend, kind  # kind: "hf" (tokenizers) or "spm"
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.special = special  # special-token text -> id
        self.special_ids = set(special.values())
        self._split = (re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")
                       if special else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size() if self.kind == "hf" else self.backend.get_piece_size()

    def token_id(self, text: str) -> int | None:
        return self.special.get(text)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        if self.kind == "hf":  # tokenizers parses added special tokens itself
            return ids + self.backend.encode(text, add_special_tokens=False).ids
        for part in (self._split.split(text) if self._split else [text]):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.backend.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.special_ids]
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.backend.decode(ids)


# -- constructors -----------------------------------------------------------------------------

def _from_hf_tokenizer(tok, bos: str | None, eos: str | None, add_bos: bool | None) -> Tokenizer:
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    if add_bos is None:  # e.g. Llama-3's post-processor prepends <|begin_of_text|> itself
        add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return Tokenizer(tok, "hf", bos_id, eos_id, special, add_bos)


def load_hf_tokenizer(path: Path, config: dict) -> Tokenizer:
    """tokenizer.json, with bos/eos/add_bos from tokenizer_config.json (`config`)."""
    from tokenizers import Tokenizer as HFTokenizer

    def content(tok):
        return tok.get("content") if isinstance(tok, dict) else tok
    return _from_hf_tokenizer(HFTokenizer.from_file(str(path)), content(config.get("bos_token")),
                              content(config.get("eos_token")), config.get("add_bos_token"))


def load_sentencepiece(path: Path | None = None, model_proto: bytes | None = None,
                       add_bos: bool = True) -> Tokenizer:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(path)) if path else spm.SentencePieceProcessor(model_proto=model_proto)
    special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    return Tokenizer(sp, "spm", bos, eos, special, add_bos)


# GGUF's tokenizer.ggml.pre names -> the pre-tokenizer split regex of that family
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(meta: dict) -> Tokenizer:
    """Build the tokenizer from GGUF `tokenizer.ggml.*` metadata (plain Python values)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not tokens:
        raise UserError("the GGUF file holds no tokenizer vocabulary (tokenizer.ggml.tokens)")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if kind == "gpt2":
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        if pre in ("smollm", "gpt2", "default"):
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                                 if pre == "smollm" else byte_level)
        elif pre in ("llama-bpe", "llama3"):
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            raise UserError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: smollm, gpt2, llama-bpe")
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types or []) if t == 3])  # 3 = control
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        return _from_hf_tokenizer(tok, tokens[bos] if bos is not None else None,
                                  tokens[eos] if eos is not None else None, add_bos)
    if kind == "llama":
        return load_sentencepiece(model_proto=_spm_proto_from_gguf(meta),
                                  add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))
    raise UserError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 (byte-level BPE), llama (SentencePiece)")


def _spm_proto_from_gguf(meta: dict) -> bytes:
    """A SentencePiece BPE ModelProto rebuilt from the GGUF vocabulary (tokens, scores, types).
    GGUF token types use SentencePiece's own numbering (1 normal .. 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    for tok, score, typ in zip(tokens, scores, types):
        proto.pieces.add(piece=tok, score=float(score), type=int(typ))
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.byte_fallback = True
    ts.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    ts.bos_id = int(meta.get("tokenizer.ggml.bos_token_id", 1))
    ts.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", 2))
    ts.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", -1))
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()
