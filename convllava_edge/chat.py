"""A conversation with a bundle: turns in the official multi-turn format, images with any question.

Each turn's images are placed in that turn (Model.place: LLaVA's ``<image>\\n`` per image before the turn's
text; LLaVA-Mini's video path); the KV cache keeps what a follow-up shares with the turns before it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .embedding import Embedded, ImageInput
from .errors import ConfigError
from .answers import Answer, AnswerStream, AskOptions, _drain, constrained
from .tools import ToolCall, Tools, parse_choice, parse_tools, render_result


class Chat:
    """A multi-turn conversation (``... ASSISTANT: A1</s>USER: Q2 ASSISTANT:``); images come with any question,
    each placed in the turn that brought it (Model.place). ``model``: the Model it talks to."""

    def __init__(self, model, embedded: Embedded | Sequence[Embedded], options: AskOptions):
        self.model, self.options = model, options
        # the images of the next question; those of each answered turn (as rows in hand: nothing to encode again)
        self.pending: list[Embedded] = [embedded] if isinstance(embedded, Embedded) else list(embedded)
        self.turn_images: list[list[Embedded]] = []
        self.turns: list[tuple[str, str]] = []
        self.tools: Tools | None = None  # offered from the turn that first gave them on (tools.py)

    def add_image(self, image: "ImageInput | Sequence[ImageInput]", aspect: str | None = None) -> None:
        """The image(s) for the next question, encoded now (one seen before: from the cache)."""
        self.pending += self.model.embed_all(image, aspect or self.options.aspect)

    @property
    def n_images(self) -> int:
        return sum(len(t) for t in self.turn_images) + len(self.pending)

    def ask_stream(self, question: str, options: AskOptions | None = None, *, image=None, schema=None,
                   grammar: str | None = None, tools: Sequence[dict] | Tools | None = None,
                   tool_choice=None, parallel_tool_calls: bool = True) -> AnswerStream:
        """As Model.ask_stream, for the next turn (``image``: one or several images this question brings;
        ``schema``, ``grammar``: this turn's answer). ``tools``: OpenAI's function tools (or a Tools), offered
        from this turn on; the answer is then a direct answer or calls (``.answer.tool_calls``; results go back
        with ``send_tool_results``)."""
        if tools is not None and not isinstance(tools, Tools):
            offered_tools = parse_tools(list(tools))
            tools = Tools(offered_tools, parse_choice(tool_choice, offered_tools), parallel_tool_calls)
        if tools is not None:
            self.tools = tools
        options = constrained(options or self.options, schema, grammar)
        offered = self.tools if self.tools is not None and self.tools.active else None
        system = None
        if offered is not None:
            if options.constraint is not None:
                raise ConfigError("a schema or grammar and tools both constrain the answer: give one")
            options = dataclasses.replace(options, constraint=offered.constraint())
            system = offered.system_prompt(self.model.template.system)
        if image is not None:
            self.add_image(image, options.aspect)
        placed = self.model.place([*self.turn_images, self.pending])
        items = self.model.prompt_items([*self.turns, (question, None)], [[e.slot for e in t] for t in placed],
                                        system=system)
        brought = self.pending

        def done(answer: Answer) -> None:
            self.turns.append((question, answer.text))  # as generated: the KV cache holds it so
            # Later turns reuse the embeddings in hand: no preprocessing or encoding to report.
            self.turn_images.append([e.reused() for e in brought])
            self.pending = []
            if offered is not None:
                answer.tool_answer = offered.read(answer.text)
        return self.model.answer(items, [e for t in placed for e in t], options, on_done=done)

    def ask(self, question: str, options: AskOptions | None = None, *, image=None, schema=None,
            grammar: str | None = None, tools: Sequence[dict] | Tools | None = None, tool_choice=None,
            parallel_tool_calls: bool = True) -> Answer:
        return _drain(self.ask_stream(question, options, image=image, schema=schema, grammar=grammar, tools=tools,
                                      tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls))

    def send_tool_results(self, results: Sequence[tuple[ToolCall, str]], options: AskOptions | None = None) -> Answer:
        """The results of the last answer's calls ((call, result text) pairs) as the next turn; its answer."""
        if not results:
            raise ConfigError("send_tool_results needs at least one (call, result) pair")
        return self.ask("\n".join(render_result(call.name, content) for call, content in results), options)
