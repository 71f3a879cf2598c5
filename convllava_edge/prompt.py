"""Prompt templates and the splice plan: where the image embeddings go among the prompt's tokens.

The official code (llava/conversation.py, mm_utils.py ``tokenizer_image_token``) renders the whole
conversation to text, splits it on ``<image>``, tokenizes each chunk with BOS, keeps the first BOS
and drops the others, and puts the image features where the split was. We do the same with the
GGUF's tokenizer; special tokens written in the text (``</s>`` ending an assistant turn) become
their ids, as the HF tokenizer parses them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .errors import ConfigError

IMAGE_TOKEN = "<image>"
# A chat template renders a conversation in microseconds; one still running after this long loops on
# purpose (nested loops over the sandbox's 100,000-item ranges) or by mistake.
RENDER_SECONDS = 2.0
MAX_RENDERED_CHARS = 1 << 22  # 4 Mi characters: far past any context window, short of exhausting memory
MAX_TEXT_CHARS = 1 << 20  # one question or answer: 1 Mi characters (~250k tokens, past every context)


def user_turns(turns: Sequence[tuple[str, str | None]], image: bool = True, image_turn: int = 0,
               counts: Sequence[int] | None = None) -> list[tuple[str, str | None]]:
    """Checked turns: questions stripped, each turn's images as "<image>\\n" before its text (LLaVA's convention:
    one placeholder per image, in the order given), only the last unanswered. ``counts``: the number of images
    of each turn; without it, one image in turn ``image_turn`` (the first, as LLaVA's code puts it) when
    ``image``, else none."""
    if not turns:
        raise ConfigError("a conversation needs at least one question")
    if counts is None:
        if image and not 0 <= image_turn < len(turns):
            raise ConfigError(f"the image is in turn {image_turn + 1} of a {len(turns)}-turn conversation")
        counts = [int(image and i == image_turn) for i in range(len(turns))]
    if len(counts) != len(turns) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        raise ConfigError(f"image counts {list(counts)} do not fit a {len(turns)}-turn conversation")
    out = []
    for i, ((question, answer), n) in enumerate(zip(turns, counts)):
        question = checked_text(question, "the question").strip()
        if not question:
            raise ConfigError("the question is empty")
        if answer is not None:
            checked_text(answer, "an earlier answer")
        if IMAGE_TOKEN in question:
            raise ConfigError(f"the question may not contain {IMAGE_TOKEN!r}: the image is placed by the template")
        if answer is None and i != len(turns) - 1:
            raise ConfigError("only the last turn may be unanswered")
        out.append(((IMAGE_TOKEN + "\n") * n + question, answer))
    return out


def checked_text(text: str, what: str) -> str:
    """``text`` if it is a string llama.cpp's tokenizer can take (valid UTF-8, bounded length).

    Command-line arguments that are not UTF-8 reach Python as lone surrogates ("\\udcff"), which
    cannot be encoded for the tokenizer.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"{what} is {len(text):,} characters long, more than the {MAX_TEXT_CHARS:,} allowed")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid UTF-8 (at character {e.start}: {_shown(text[e.start:e.end])})") from None
    return text


def _shown(bad: str) -> str:
    """The bytes a non-UTF-8 argument had (b'\\xff'); a lone surrogate such as JSON's "\\ud800" had none (this
    message raised UnicodeEncodeError itself before: a 500), so it is shown as its escape."""
    try:
        return repr(bad.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return bad.encode("ascii", "backslashreplace").decode("ascii")


@dataclass(frozen=True)
class Template:
    """A LLaVA conversation template in the SeparatorStyle.TWO form (vicuna_v1)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str  # after the system prompt and after each user turn
    sep2: str  # after each assistant turn
    stop: tuple[str, ...]  # text that ends an answer besides the EOS token

    def render(self, turns: Sequence[tuple[str, str | None]], image: bool = True, image_turn: int = 0,
               system: str | None = None, counts: Sequence[int] | None = None) -> str:
        """turns: (question, answer or None for the turn being asked); the image goes in the question of turn
        ``image_turn`` (the first), or ``counts[i]`` images in turn i (user_turns); ``system`` replaces the
        template's system prompt.

        ``SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:``
        """
        out = (self.system if system is None else system) + self.sep
        for question, answer in user_turns(turns, image, image_turn, counts):
            out += f"{self.roles[0]}: {question}{self.sep}"
            out += f"{self.roles[1]}:" if answer is None else f"{self.roles[1]}: {answer}{self.sep2}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Template":
        return cls(name=d["name"], system=d["system"], roles=tuple(d["roles"]), sep=d["sep"], sep2=d["sep2"],
                   stop=tuple(d.get("stop", ())))


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's own Jinja chat template (LLaVA-Mini: Llama-3.1's), rendered as the official code does.

    llavamini/conversation.py (SeparatorStyle.LLAMA_3_1): [system, user, assistant, ...] messages,
    the image as "<image>\n" before the first question, the empty assistant turn dropped, rendered with
    ``add_generation_prompt=False``: the prompt ends with the user's end-of-turn, and the model writes
    the assistant header itself (``answer_header``: shown answers leave it out).
    """

    name: str
    chat_template: str
    system: str
    bos_token: str
    answer_header: str = ""
    stop: tuple[str, ...] = ()
    kind: str = "jinja"

    def render(self, turns: Sequence[tuple[str, str | None]], image: bool = True, image_turn: int = 0,
               system: str | None = None, counts: Sequence[int] | None = None) -> str:
        messages = [{"role": "system", "content": self.system if system is None else system}]
        for question, answer in user_turns(turns, image, image_turn, counts):
            messages.append({"role": "user", "content": question})
            if answer is not None:  # the empty assistant turn is dropped, as the official code does
                messages.append({"role": "assistant", "content": answer})
        return render_bounded(_jinja(self.chat_template), messages=messages, bos_token=self.bos_token,
                              add_generation_prompt=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatTemplate":
        return cls(name=d["name"], chat_template=d["chat_template"], system=d["system"], bos_token=d["bos_token"],
                   answer_header=d.get("answer_header", ""), stop=tuple(d.get("stop", ())))


class _TemplateTimeout(Exception):
    pass


def render_bounded(template, **context) -> str:
    """``template.render(**context)``, stopped after RENDER_SECONDS with a ConfigError.

    The sandbox stops escapes, not time. ``signal.alarm`` works on the main thread only and a server
    renders in worker threads, so a trace function (per thread, installed only for the duration)
    checks the clock on every line the compiled template runs; Jinja compiles templates to Python
    code whose file name is "<template>", and only those frames are traced line by line.
    """
    from jinja2.exceptions import TemplateError

    deadline = time.monotonic() + RENDER_SECONDS

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TemplateTimeout
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        text = template.render(**context)
    except _TemplateTimeout:
        raise ConfigError(f"the chat template did not finish rendering within {RENDER_SECONDS:g} s "
                          "(a loop without end?)") from None
    except (TemplateError, ArithmeticError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            RecursionError, MemoryError) as e:
        raise ConfigError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
    finally:
        sys.settrace(previous)
    if len(text) > MAX_RENDERED_CHARS:
        raise ConfigError(f"the chat template rendered {len(text):,} characters, more than {MAX_RENDERED_CHARS:,}")
    return text


def _bounded_environment():
    """transformers' environment for chat templates (sandboxed, immutable; trim_blocks, lstrip_blocks),
    with ``*`` and ``**`` bounded: ``'x' * 10**10`` would otherwise allocate before any clock is read."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(("*", "**"))

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError(f"exponent {right} is too large for a chat template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                        raise SecurityError(f"a sequence of {len(seq) * n:,} items is too long for a chat template")
            return super().call_binop(context, operator, left, right)

    return Environment(trim_blocks=True, lstrip_blocks=True)


def _jinja(source: str):
    """Compile a chat template as transformers does (see _bounded_environment)."""
    from jinja2.exceptions import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    if not isinstance(source, str):
        raise ConfigError(f"the chat template must be text, got {type(source).__name__}")
    env = _bounded_environment()
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except (TemplateError, RecursionError, MemoryError, ValueError) as e:
        raise ConfigError(f"the chat template does not compile: {e}") from e


def template_from_dict(d: dict[str, Any]) -> "Template | ChatTemplate":
    return ChatTemplate.from_dict(d) if d.get("kind") == "jinja" else Template.from_dict(d)


# What ConvLLaVA trained with (conv_templates["vicuna_v1"]); the official CLI's default is another.
VICUNA_V1 = Template(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>", stop=("</s>",),
)


@dataclass(frozen=True)
class ImageSlot:
    """Stands for the image's embeddings in a token sequence; equal slots mean equal embeddings."""

    key: str  # content hash of the embeddings (image bytes + preprocessing + graph)
    n_tokens: int


Item = int | ImageSlot  # a token id or the image


def splice(chunks: Sequence[list[int]], slots: "ImageSlot | Sequence[ImageSlot]", bos: int) -> list[Item]:
    """tokenizer_image_token: chunks[i] are the BOS-prefixed token ids of the text between images; slot i goes
    between chunks i and i + 1 (as prepare_inputs_labels_for_multimodal puts image i's features at the i-th
    placeholder)."""
    slots = [slots] if isinstance(slots, ImageSlot) else list(slots)
    if not slots or len(chunks) != len(slots) + 1:
        raise ConfigError(f"the prompt holds {len(chunks) - 1} {IMAGE_TOKEN} for {len(slots)} image(s)")
    first = chunks[0]
    if not first or first[0] != bos:
        raise ConfigError("the first chunk must start with BOS")
    out: list[Item] = list(first)
    for slot, chunk in zip(slots, chunks[1:]):
        out += [slot, *_drop_bos(chunk, bos)]
    return out


def _drop_bos(ids: list[int], bos: int) -> list[int]:
    return ids[1:] if ids and ids[0] == bos else ids


def positions(items: Sequence[Item]) -> int:
    """How many KV-cache positions the sequence occupies."""
    return sum(i.n_tokens if isinstance(i, ImageSlot) else 1 for i in items)


def slots_of(items: Sequence[Item]) -> list[ImageSlot]:
    """The image slots of a sequence, in order."""
    return [item for item in items if isinstance(item, ImageSlot)]


def describe_positions(items: Sequence[Item]) -> str:
    """What a prompt's positions are, for errors: "3 images x 576 tokens + 41 text positions"."""
    slots = slots_of(items)
    n_text = positions(items) - sum(s.n_tokens for s in slots)
    text = f"{n_text} text position" + ("" if n_text == 1 else "s")
    if not slots:
        return text
    sizes = {s.n_tokens for s in slots}
    if len(slots) == 1:
        shown = f"1 image of {slots[0].n_tokens} tokens"
    elif len(sizes) == 1:
        shown = f"{len(slots)} images x {slots[0].n_tokens} tokens"
    else:
        shown = f"{len(slots)} images ({' + '.join(str(s.n_tokens) for s in slots)} tokens)"
    return f"{shown} + {text}"


def image_end(items: Sequence[Item]) -> int:
    """Index just past the first image slot (0 when the prompt has none): ``items[:image_end(items)]``
    is the system prompt, the text before the image, and the image."""
    return next((i + 1 for i, item in enumerate(items) if isinstance(item, ImageSlot)), 0)


def common_prefix(cached: Sequence[Item], wanted: Sequence[Item]) -> int:
    """Number of leading items two sequences share (an image slot counts as one item)."""
    n = 0
    for a, b in zip(cached, wanted):
        if a != b:
            break
        n += 1
    return n
