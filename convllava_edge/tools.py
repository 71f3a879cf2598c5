"""Tool calls for models never trained on them: llama.cpp's "generic" format, on the structured-answer path.

The tools' names, descriptions and parameter schemas go into the system prompt with a short instruction, and the
answer is constrained (structured.py) to one JSON object:
- ``auto``: ``{"tool_call": {"name": ..., "arguments": {...}}}`` (``{"tool_calls": [...]}`` when parallel calls
  are allowed) or ``{"response": "..."}``, whose text becomes the message's plain content;
- ``required``: a call only; a named function: a call of that function only;
- ``none``: no tools in the prompt and no grammar.
Each call's ``arguments`` fit that tool's parameter schema (the grammar's, the allowlist's subset). The grammar
writes compact JSON (no optional spaces), so an assistant turn that comes back as ``tool_calls`` renders to exactly
the text the model generated: the conversation's KV state is reused as for any follow-up. Tool results come back in
the user's turn, as ``{"tool_response": {"name": ..., "content": ...}}`` lines.

A model trained on a native tool format (none of today's ConvLLaVA or LLaVA-Mini checkpoints) would name it in its
manifest (a ``tool_format`` beside the template) and render calls and results in it instead; this module is the
``generic`` one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from .structured import Constraint, SchemaError, check_schema, from_schema

CHOICES = ("auto", "required", "none")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 64
INSTRUCTION = ("You can call these tools. To call one, answer with a JSON object {\"tool_call\": {\"name\": "
               "the tool's name, \"arguments\": its arguments}}{parallel}; to answer the user directly, "
               "{\"response\": your answer}.")
PARALLEL = ", or several at once as {\"tool_calls\": [...]}"


class ToolError(SchemaError):
    """A tool, a tool choice or a tool message that cannot be used; ``path`` names the field."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def to_prompt(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class Tools:
    """What a request offers: its tools, ``choice`` (auto, required, none, or a tool's name) and whether several
    calls may come at once."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def system_prompt(self, system: str) -> str:
        """``system`` with the tools and the instruction after it (only while tools are active)."""
        if not self.active:
            return system
        offered = self.tools if self.choice in CHOICES else [t for t in self.tools if t.name == self.choice]
        listed = "\n".join(json.dumps(t.to_prompt(), ensure_ascii=False, separators=(",", ":")) for t in offered)
        text = INSTRUCTION.replace("{parallel}", PARALLEL if self.parallel else "")
        return f"{system}\n\n{text}\n{listed}".lstrip()

    def constraint(self) -> Constraint | None:
        """The grammar of the answer's one JSON object (None while tools are not active)."""
        if not self.active:
            return None
        named = [t for t in self.tools if self.choice in CHOICES or t.name == self.choice]
        one_call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                               "required": ["name", "arguments"]} for t in named]}
        if len(named) == 1:
            one_call = one_call["anyOf"][0]
        calls = [{"type": "object", "properties": {"tool_call": one_call}, "required": ["tool_call"]}]
        if self.parallel and self.choice in ("auto", "required"):
            calls.append({"type": "object", "properties": {"tool_calls": {"type": "array", "items": one_call,
                                                                          "minItems": 1, "maxItems": 8}},
                          "required": ["tool_calls"]})
        branches = calls + ([{"type": "object", "properties": {"response": {"type": "string"}},
                              "required": ["response"]}] if self.choice == "auto" else [])
        made = from_schema({"anyOf": branches} if len(branches) > 1 else branches[0], "tools")
        return Constraint("tools", compact(made.grammar), made.schema)

    def read(self, text: str) -> "ToolAnswer":
        """The answer's JSON as content or calls; an answer that is not complete JSON (cut by max_tokens) is
        its text, unparsed."""
        try:
            value = json.loads(text)
        except ValueError:
            return ToolAnswer(_cut_response(text), [], complete=False)
        if "response" in value:
            return ToolAnswer(value["response"], [])
        raw = value.get("tool_calls") or [value.get("tool_call")]
        calls = [ToolCall("call_" + uuid.uuid4().hex[:24], c["name"], dumps(c["arguments"])) for c in raw if c]
        return ToolAnswer(None, calls)


@dataclass
class ToolAnswer:
    content: str | None  # a direct answer (or the cut text of an incomplete one)
    calls: list[ToolCall] = field(default_factory=list)
    complete: bool = True


RESPONSE_OPEN = '{"response":"'


def _cut_response(text: str) -> str:
    """An answer cut by max_tokens: a direct answer's text so far, out of its JSON string (its escapes read, an
    escape cut in half left out); a cut call stays the JSON text it is (no call is made of half a call)."""
    if not text.startswith(RESPONSE_OPEN):
        return text
    body = text[len(RESPONSE_OPEN):]
    for end in range(len(body), max(len(body) - 6, -1), -1):  # an escape is at most 6 characters (\uXXXX)
        try:
            return json.loads('"' + body[:end] + '"')
        except ValueError:
            continue
    return body


def dumps(value: Any) -> str:
    """JSON as the tools' grammar writes it: compact, keys in the order given."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def compact(grammar: str) -> str:
    """The grammar without the converter's optional spaces between tokens: one way to write each value."""
    lines = grammar.split("\n")
    return "\n".join('space ::= ""' if line.startswith("space ::=") else line for line in lines)


def render_calls(calls: Sequence[tuple[str, str]]) -> str:
    """(name, arguments as JSON text) calls as the model wrote them: an assistant turn sent back with
    ``tool_calls``. The arguments' text is spliced as it came (the model's own, echoed by the client), not parsed
    and written again, so that the turn renders to the tokens the KV cache holds."""
    entries = [f'{{"name":{dumps(name)},"arguments":{arguments}}}' for name, arguments in calls]
    return f'{{"tool_call":{entries[0]}}}' if len(entries) == 1 else f'{{"tool_calls":[{",".join(entries)}]}}'


def render_result(name: str, content: str) -> str:
    """A tool's result, as the user's turn carries it."""
    return dumps({"tool_response": {"name": name, "content": content}})


def parse_tools(value: Any, where: str = "tools") -> tuple[Tool, ...]:
    """OpenAI's (and Ollama's) ``tools``: [{"type": "function", "function": {"name", "description",
    "parameters"}}]; a ToolError naming the field for a tool the grammar path cannot use."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ToolError(f"{where} must be a list of tools", where)
    if len(value) > MAX_TOOLS:
        raise ToolError(f"{where}: at most {MAX_TOOLS} tools", where)
    tools, seen = [], set()
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function" or \
                not isinstance(item.get("function"), dict):
            raise ToolError(f'{at} must be {{"type": "function", "function": {{...}}}}', at)
        fn = item["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{at}.function.name must be 1-64 letters, digits, _ or -, got {name!r}"[:200],
                            f"{at}.function.name")
        if name in seen:
            raise ToolError(f"{at}.function.name: {name!r} is offered twice", f"{at}.function.name")
        seen.add(name)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{at}.function.description must be a string", f"{at}.function.description")
        parameters = fn.get("parameters")
        parameters = {"type": "object", "properties": {}} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise ToolError(f"{at}.function.parameters must be a JSON schema object", f"{at}.function.parameters")
        try:
            check_schema(parameters, f"{at}.function.parameters")
        except SchemaError as e:
            raise ToolError(str(e), f"{at}.function.parameters") from None
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


def parse_choice(value: Any, tools: Sequence[Tool], where: str = "tool_choice") -> str:
    """``none`` / ``auto`` / ``required`` or {"type": "function", "function": {"name"}}: a choice or a name."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in CHOICES:
            raise ToolError(f"{where} must be none, auto, required or a function, got {value!r}"[:200], where)
        if value != "none" and not tools:
            raise ToolError(f"{where} {value!r} needs tools", where)
        return value
    name = value.get("function", {}).get("name") if isinstance(value, dict) and \
        isinstance(value.get("function"), dict) else None
    if not isinstance(name, str):
        raise ToolError(f'{where} must be a string or {{"type": "function", "function": {{"name": ...}}}}', where)
    if name not in {t.name for t in tools}:
        raise ToolError(f"{where} names {name!r}, which is not in tools", f"{where}.function.name")
    return name
