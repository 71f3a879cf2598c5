"""Fuzzing validate_gguf in-process: whatever the header says, the answer is a GgufSummary or one
BundleError line naming the file, within the deadline, and an accepted file obeys the rules checked.

Three targets: byte mutations of a small valid GGUF's header (bit flips, count and length fields set
to huge values, truncation); metadata values written through gguf.GGUFWriter (ints, floats with
NaN/inf, strings, arrays) under the keys the check reads; and vocabularies with duplicates and empty
tokens, where acceptance must match llama.cpp's rule exactly.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import pytest
from gguf import GGUFValueType as V
from gguf import Keys
from hypothesis import given, settings
from hypothesis import strategies as st

from convllava_edge.errors import BundleError
from convllava_edge.gguf_check import MAX_CTX, MAX_EMBD, MAX_LAYERS, GgufSummary, validate_gguf
from unit.test_gguf_check import ggml_gguf_counts, tiny_kv, tiny_tensors, write_gguf  # tests/unit: the same GGUF builders

A = "llama"
# A micro llama (header ~1.5 KB, tensors ~50 KB) so an example costs a few milliseconds.
MICRO = dict(n_embd=32, n_layers=1, n_head=2, n_head_kv=1, n_ff=64, n_vocab=16)
MICRO_TENSORS = tiny_tensors(**MICRO)
DEADLINE_MS = 1000  # validate_gguf takes ~1 ms here; a hang or a quadratic path would not fit
# ~5-15 ms an example (GGUFWriter + validate_gguf + gguf.cpp): 16 s, 7 s and 5 s on 2 shared cores
N_BYTES, N_META, N_VOCAB = 1200, 800, 400
HUGE = [2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1]


def micro_kv(**over) -> dict:
    return tiny_kv(A, **MICRO) | over


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def micro(workdir) -> tuple[bytes, dict[str, list[int]]]:
    """The valid file's bytes and the offsets of its u32 and u64 header fields, found by GGUFReader."""
    path = write_gguf(workdir / "micro.gguf", base=micro_kv(), tensors=MICRO_TENSORS)
    assert validate_gguf(path).n_embd == MICRO["n_embd"]
    r = gguf.GGUFReader(path)
    u32s, u64s = [4], [8, 16]
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        type_at = f.offset + 8 + len(name.encode())
        u64s.append(f.offset)  # key length
        u32s.append(type_at)
        if f.types[0] == V.STRING:
            u64s.append(type_at + 4)
        elif f.types[0] == V.ARRAY:
            u32s.append(type_at + 4)
            u64s.append(type_at + 8)
            if f.types[-1] == V.STRING:
                u64s.append(type_at + 16)  # the first element's length
    for t in r.tensors:
        at = t.field.offset + 8 + len(t.name.encode())
        n_dims = len(t.shape)
        u64s += [t.field.offset] + [at + 4 + 8 * j for j in range(n_dims)] + [at + 4 + 8 * n_dims + 4]
        u32s += [at, at + 4 + 8 * n_dims]
    header_end = max(u64s) + 8
    data = path.read_bytes()
    # the file's own u64 values (offsets, dims, lengths): moved elsewhere they make plausible damage
    plausible = sorted({struct.unpack_from("<Q", data, at)[0] for at in u64s})
    return data, {"u32": sorted(set(u32s)), "u64": sorted(set(u64s)), "end": [header_end], "plausible": plausible}


def outcome(path: Path) -> GgufSummary | BundleError:
    """validate_gguf's answer; any exception other than BundleError propagates and fails the target."""
    try:
        return validate_gguf(path)
    except BundleError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(f"{path}: "), message
        return e


def assert_sane(s: GgufSummary, path: Path) -> None:
    """What an accepted file must satisfy, whatever was mutated; ggml's own parser (gguf.cpp) must
    accept its framing too."""
    assert s.architecture == A and s.tokenizer_model in ("llama", "gpt2")
    assert 1 <= s.n_layers <= MAX_LAYERS and 1 <= s.n_embd <= MAX_EMBD and 1 <= s.n_ctx_train <= MAX_CTX
    assert s.n_head >= 1 and s.n_head % s.n_head_kv == 0 and s.n_vocab >= 1
    assert s.file_size == path.stat().st_size
    counts = ggml_gguf_counts(path)
    assert counts is not None and counts[0] == s.n_tensors, counts


# -- target 1: header bytes ------------------------------------------------------------------------

def mutation(offsets: dict[str, list[int]]):
    end = offsets["end"][0]
    flip = st.tuples(st.just("flip"), st.integers(0, end - 1), st.integers(0, 7))
    u64 = st.tuples(st.just("u64"), st.sampled_from(offsets["u64"]),
                    st.one_of(st.sampled_from(HUGE), st.sampled_from(offsets["plausible"]), st.integers(0, 2**64 - 1),
                              st.integers(0, 4096)))
    u32 = st.tuples(st.just("u32"), st.sampled_from(offsets["u32"]),
                    st.one_of(st.sampled_from([0, 1, 4, 9, 12, 13, 41, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)))
    cut = st.tuples(st.just("cut"), st.integers(0, end + 64), st.just(0))
    return st.lists(st.one_of(flip, u64, u32, cut), min_size=1, max_size=4)


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=DEADLINE_MS, max_examples=N_BYTES)
@given(draw=st.data())
def test_fuzz_header_bytes(micro, workdir, draw):
    data, offsets = micro
    ops = draw.draw(mutation(offsets))
    buf = bytearray(data)
    size = len(buf)
    for op, at, value in ops:
        if op == "flip":
            buf[at] ^= 1 << value
        elif op == "u64":
            buf[at:at + 8] = struct.pack("<Q", value)
        elif op == "u32":
            buf[at:at + 4] = struct.pack("<I", value)
        else:
            size = min(size, at)
    path = workdir / "mutated.gguf"
    path.write_bytes(bytes(buf[:size]))
    result = outcome(path)
    if isinstance(result, GgufSummary):
        assert_sane(result, path)


# -- target 2: metadata values through GGUFWriter --------------------------------------------------

U32_RULES = {  # key -> the values validate_gguf may accept (type UINT32 only)
    Keys.LLM.BLOCK_COUNT.format(arch=A): lambda v: 1 <= v <= MAX_LAYERS,
    Keys.LLM.CONTEXT_LENGTH.format(arch=A): lambda v: 1 <= v <= MAX_CTX,
    Keys.LLM.EMBEDDING_LENGTH.format(arch=A): lambda v: 1 <= v <= MAX_EMBD,
    Keys.LLM.FEED_FORWARD_LENGTH.format(arch=A): lambda v: v >= 1,
    Keys.Attention.HEAD_COUNT.format(arch=A): lambda v: v >= 1,
    Keys.Attention.HEAD_COUNT_KV.format(arch=A): lambda v: v >= 1 and MICRO["n_head"] % v == 0,
    Keys.Rope.DIMENSION_COUNT.format(arch=A): lambda v: v == MICRO["n_embd"] // MICRO["n_head"],
    Keys.Tokenizer.BOS_ID: lambda v: v < MICRO["n_vocab"],
    Keys.Tokenizer.EOS_ID: lambda v: v < MICRO["n_vocab"],
    Keys.General.ALIGNMENT: lambda v: v > 0 and v & (v - 1) == 0,
}
F32_RULES = {
    Keys.Attention.LAYERNORM_RMS_EPS.format(arch=A): lambda v: 0 < v < 1,
    Keys.Rope.FREQ_BASE.format(arch=A): lambda v: math.isfinite(v) and v > 0,
}
STRING_RULES = {
    Keys.General.ARCHITECTURE: lambda v: v == A,
    Keys.Tokenizer.MODEL: lambda v: v == "llama",  # "gpt2" would need merges, which the micro file lacks
    Keys.Rope.SCALING_TYPE.format(arch=A): lambda v: v in ("none", "linear", "yarn", "longrope"),
}
KEYS = sorted(U32_RULES) + sorted(F32_RULES) + sorted(STRING_RULES) + [
    Keys.Tokenizer.LIST, Keys.Tokenizer.SCORES, Keys.Tokenizer.TOKEN_TYPE, "general.name", "x"]

INT_RANGES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-2**7, 2**7 - 1), V.UINT16: (0, 2**16 - 1),
              V.INT16: (-2**15, 2**15 - 1), V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1),
              V.UINT64: (0, 2**64 - 1), V.INT64: (-2**63, 2**63 - 1)}
ints = st.sampled_from(sorted(INT_RANGES)).flatmap(
    lambda t: st.tuples(st.one_of(st.integers(*INT_RANGES[t]), st.sampled_from([0, 1, 2, 16, 32, 512, 513])
                                  .filter(lambda v, t=t: INT_RANGES[t][0] <= v <= INT_RANGES[t][1])), st.just(t)))
floats = st.one_of(st.tuples(st.floats(width=32), st.just(V.FLOAT32)),
                   st.tuples(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-5, 1.0]),
                             st.just(V.FLOAT32)),
                   st.tuples(st.floats(), st.just(V.FLOAT64)))
texts = st.tuples(st.one_of(st.text(max_size=12), st.sampled_from(["llama", "gpt2", "yarn", "bert", ""])),
                  st.just(V.STRING))
bools = st.tuples(st.booleans(), st.just(V.BOOL))
arrays = st.one_of(
    st.tuples(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=20), st.just(V.ARRAY), st.just(V.INT32)),
    st.tuples(st.lists(st.floats(width=32), min_size=1, max_size=20), st.just(V.ARRAY), st.just(V.FLOAT32)),
    st.tuples(st.lists(st.text(max_size=4), min_size=1, max_size=20), st.just(V.ARRAY), st.just(V.STRING)))
values = st.one_of(ints, floats, texts, bools, arrays)


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=DEADLINE_MS, max_examples=N_META)
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3, unique_by=lambda kv: kv[0]))
def test_fuzz_metadata_values(workdir, changes):
    kv = dict(changes)
    arch = kv.get(Keys.General.ARCHITECTURE, (A, V.STRING))
    if arch[1] == V.STRING and arch[0] != A:
        return  # GGUFWriter(path, arch) writes general.architecture itself; another name is another file
    kv.pop(Keys.General.ARCHITECTURE, None)
    path = write_gguf(workdir / "meta.gguf", kv=kv, base=micro_kv(), tensors=MICRO_TENSORS)
    result = outcome(path)
    if isinstance(result, BundleError):
        return
    assert_sane(result, path)
    for key, (value, vtype, *_) in kv.items():  # an accepted value obeys its rule
        for rules, wanted in ((U32_RULES, V.UINT32), (F32_RULES, V.FLOAT32), (STRING_RULES, V.STRING)):
            if key in rules:
                assert vtype == wanted and rules[key](value), (key, value, vtype)


# -- target 3: vocabularies ------------------------------------------------------------------------

@st.composite
def vocabularies(draw) -> list[str]:
    """Unique tokens, then maybe one duplicate or an empty token next to its "[EMPTY_i]" twin, so both
    outcomes come up often."""
    n = MICRO["n_vocab"]
    tokens = draw(st.lists(st.text(alphabet="ab\u2581<>", max_size=4), min_size=n, max_size=n, unique=True))
    damage = draw(st.sampled_from(["none", "duplicate", "empty twin", "empty alone"]))
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
    if damage == "duplicate":
        tokens[j] = tokens[i]
    elif damage.startswith("empty"):
        tokens[i] = ""
        if damage == "empty twin":
            tokens[j] = f"[EMPTY_{i}]"
    return tokens


@pytest.mark.timeout(120)
@settings(derandomize=True, deadline=DEADLINE_MS, max_examples=N_VOCAB)
@given(tokens=vocabularies())
def test_fuzz_vocabulary_duplicates_match_llama_cpp_rule(workdir, tokens):
    path = write_gguf(workdir / "vocab.gguf", kv={Keys.Tokenizer.LIST: (tokens, V.ARRAY, V.STRING)},
                      base=micro_kv(), tensors=MICRO_TENSORS)
    renamed = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # llama-vocab.cpp's rule
    result = outcome(path)
    unique = len(set(renamed)) == len(tokens)
    assert isinstance(result, GgufSummary) == unique, (tokens, result)
    if not unique:
        assert "expected unique" in str(result)
