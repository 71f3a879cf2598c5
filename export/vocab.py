"""Tokenizer files -> llama.cpp vocabularies, and the check that llama.cpp then tokenizes as they do.

Two kinds, as the released checkpoints carry them:
- SentencePiece ``tokenizer.model`` (Vicuna / ConvLLaVA): llama.cpp's "llama" vocabulary, with scores,
  piece types, byte tokens and the dummy-prefix flag;
- byte-level BPE ``tokenizer.json`` (Llama-3 / LLaVA-Mini): llama.cpp's "gpt2" vocabulary with merges
  and the ``llama-bpe`` pre-tokenizer (Llama-3's split regex), special tokens as control tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..errors import CheckpointError, ExportError
from .config import read_json

# Llama-3's pre-tokenizer split pattern: the one llama.cpp implements under the name "llama-bpe".
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Strings where tokenizers disagree when a vocabulary is carried over wrongly: spaces (leading,
# double, trailing), newlines, digits, accents, CJK and emoji (byte fallback / byte-level), the
# templates' own pieces.
TOKENIZER_PROBES = ("Hello world", " leading space", "double  space", "trailing ", "\nnewline first", "0123456789",
                    "café naïve", "漢字かな", "😀", "USER:", " ASSISTANT:", "A chat between a curious user",
                    "it's 12345 o'clock!!", "tabs\tand\r\nreturns")


@dataclass
class Vocab:
    kind: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE): llama.cpp's tokenizer model
    tokens: list[bytes]
    types: list[int]  # gguf.TokenType values
    bos: int
    eos: int
    add_bos: bool
    add_eos: bool = False
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] = field(default_factory=list)  # BPE only
    unk: int | None = None
    pad: int | None = None
    eot: int | None = None  # end of turn (<|eot_id|>)
    eom: int | None = None  # end of message (<|eom_id|>)
    stop_ids: list[int] = field(default_factory=list)  # what ends generation (generation_config)
    add_space_prefix: bool = False  # SentencePiece's add_dummy_prefix
    legacy: bool = True  # HF's "legacy": a space is prefixed after special tokens too (SentencePiece)

    def runtime_entry(self) -> dict:
        """The manifest's ``tokenizer`` entry: how prompts are tokenized at run time (tokenizer.py reads it)."""
        if self.kind == "llama":  # SentencePiece
            return {"kind": "sentencepiece", "add_space_prefix": self.add_space_prefix, "space_after_special": self.legacy}
        return {"kind": "bpe", "stop_ids": self.stop_ids}

    def add_to(self, writer: gguf.GGUFWriter, pad_override: int | None = None) -> None:
        writer.add_tokenizer_model(self.kind)
        writer.add_tokenizer_pre("default" if self.kind == "llama" else "llama-bpe")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos)
        writer.add_eos_token_id(self.eos)
        for value, add in ((self.unk, writer.add_unk_token_id), (self.eot, writer.add_eot_token_id),
                           (self.eom, writer.add_eom_token_id)):
            if value is not None:
                add(value)
        pad = pad_override if pad_override is not None else self.pad
        if pad is not None:
            writer.add_pad_token_id(pad)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.kind == "llama":
            writer.add_add_space_prefix(self.add_space_prefix)


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return read_sentencepiece(folder, vocab_size)
    if (folder / "tokenizer.json").is_file():
        return read_bpe(folder, vocab_size)
    raise CheckpointError(f"{folder}: no tokenizer.model or tokenizer.json (the vocabulary is needed for the GGUF)")


def read_sentencepiece(folder: Path, vocab_size: int) -> Vocab:
    """tokenizer.model (+ tokenizer_config.json, added_tokens.json) as llama.cpp's 'llama' vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as spb

    path = folder / "tokenizer.model"
    proto = spb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from e
    if proto.trainer_spec.model_type != spb.TrainerSpec.BPE:
        raise CheckpointError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE "
                              "(Llama vocabularies are BPE)")
    # SentencePiece's piece types are numbered as gguf.TokenType: NORMAL 1, UNKNOWN 2, CONTROL 3,
    # USER_DEFINED 4, UNUSED 5, BYTE 6.
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    tok_config = _json_if(folder / "tokenizer_config.json")
    added = folder / "added_tokens.json"
    if added.is_file():
        for piece, token_id in sorted(read_json(added).items(), key=lambda kv: kv[1]):
            if token_id < len(tokens):
                continue
            if token_id != len(tokens):
                raise CheckpointError(f"{added}: token id {token_id} for {piece!r} leaves a gap after {len(tokens) - 1}")
            tokens.append(piece.encode("utf-8"))
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.USER_DEFINED))
    _pad_to(tokens, types, vocab_size, path, scores)
    spec = proto.trainer_spec
    return Vocab(
        kind="llama", tokens=tokens, types=types, scores=scores, bos=spec.bos_id, eos=spec.eos_id, unk=spec.unk_id,
        pad=spec.pad_id if spec.pad_id >= 0 else None, stop_ids=[spec.eos_id],
        add_bos=bool(tok_config.get("add_bos_token", True)), add_eos=bool(tok_config.get("add_eos_token", False)),
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        # transformers treats a missing "legacy" as True (and warns); only an explicit false changes behaviour.
        legacy=tok_config.get("legacy") is not False,
    )


def read_bpe(folder: Path, vocab_size: int) -> Vocab:
    """tokenizer.json (Llama-3 byte-level BPE) as llama.cpp's 'gpt2' vocabulary with the llama-bpe pre-tokenizer."""
    path = folder / "tokenizer.json"
    data = read_json(path)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer model {model.get('type')!r} is not BPE")
    if LLAMA3_PATTERN not in json.dumps(data.get("pre_tokenizer")).replace("\\\\", "\\"):
        raise CheckpointError(f"{path}: the pre-tokenizer is not Llama-3's; only Llama-3 BPE vocabularies "
                              "(llama.cpp's 'llama-bpe') are supported")
    tokens: list[bytes | None] = [None] * max(vocab_size, len(model["vocab"]))
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for text, token_id in model["vocab"].items():
        tokens[token_id] = text.encode("utf-8")
    for added in data.get("added_tokens", []):
        token_id = int(added["id"])
        if token_id >= len(tokens):
            raise CheckpointError(f"{path}: added token {added['content']!r} has id {token_id}, past vocab_size {vocab_size}")
        tokens[token_id] = added["content"].encode("utf-8")
        types[token_id] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows without a token: padding, as llama.cpp's converter does
            tokens[i], types[i] = f"[PAD{i}]".encode(), int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tok_config = _json_if(folder / "tokenizer_config.json")
    ids = {t.decode("utf-8", "replace"): i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.CONTROL}

    def special(name: str) -> int | None:
        value = tok_config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if value else None

    bos, eos = special("bos_token"), special("eos_token")
    if bos is None or eos is None:
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: bos_token and eos_token must name special tokens")
    post = json.dumps(data.get("post_processor") or {})
    add_bos = bool(tok_config.get("add_bos_token", tok_config.get("bos_token", "") in post))
    generation = _json_if(folder / "generation_config.json")
    stops = generation.get("eos_token_id", eos)
    stops = [int(s) for s in (stops if isinstance(stops, list) else [stops])]
    return Vocab(kind="gpt2", tokens=tokens, types=types, merges=merges, bos=bos, eos=eos, add_bos=add_bos,
                 eot=ids.get("<|eot_id|>"), eom=ids.get("<|eom_id|>"), pad=special("pad_token"),
                 stop_ids=sorted(set(stops + [eos])))


def _pad_to(tokens: list, types: list, vocab_size: int, path: Path, scores: list | None = None) -> None:
    if len(tokens) > vocab_size:
        raise CheckpointError(f"{path}: {len(tokens)} tokens but config.json vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows without a token, as llama.cpp's converter does
        tokens.append(f"[PAD{i}]".encode())
        types.append(int(gguf.TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)


def _json_if(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def reference_tokenizer(folder: Path):
    """The checkpoint's own tokenizer as a function text -> ids (no BOS, no special-token parsing)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return sp.encode
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def check_tokenizer(gguf_path: Path, checkpoint: Path) -> None:
    """llama.cpp, reading the GGUF's vocabulary, must give the checkpoint tokenizer's ids on every probe."""
    import llama_cpp

    from ..backends.llm_llamacpp import llama_log

    reference = reference_tokenizer(checkpoint)
    with llama_log(lambda line: None):  # llama.cpp's loader chatter; failures surface as exceptions
        vocab = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    for text in TOKENIZER_PROBES:
        ours = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        ref = reference(text)
        if ours != ref:
            raise ExportError(f"{gguf_path.name}: llama.cpp tokenizes {text!r} as {ours}, the checkpoint's "
                              f"tokenizer as {ref}")
