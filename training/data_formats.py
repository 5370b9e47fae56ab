"""Row formats: validate raw rows into typed records, and render records into text with the loss spans marked.

    alpaca      {"instruction": str, "input": str (optional), "output": str}
    chat        {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    completion  {"prompt": str, "completion": str}
    text        {"text": str}

Validation checks every row and reports every bad one (file:line and field) in one `DataError`.
Rendering: alpaca and chat go through the tokenizer's chat template when it has one (alpaca is one user turn,
instruction + "\n\n" + input, then one assistant turn); without one, a plain Alpaca-style prompt.
Completion is prompt + completion verbatim; text is the text verbatim and carries the loss everywhere.
Every response ends with the tokenizer's EOS token, so the model learns to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorafleet.errors import DataError, LorafleetError, Problem
from lorafleet.training.data_sources import DataSourceError, Row

FORMATS = ("alpaca", "chat", "completion", "text")
ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 20
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Alpaca:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Chat:
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Text:
    text: str


Record = Alpaca | Chat | Completion | Text


@dataclass(frozen=True)
class Sample:
    location: str  # file:line of the row it came from
    record: Record


@dataclass(frozen=True)
class Rendered:
    """The text a model sees, and the [start, end) character spans that carry the loss."""

    text: str
    spans: tuple[tuple[int, int], ...]


class RenderError(ValueError):
    """A valid row that the tokenizer's chat template cannot render (e.g. roles that do not alternate)."""


def raise_for_problems(source: str, problems: list[Problem]) -> None:
    if problems:
        raise DataError(source, problems[:MAX_LISTED_PROBLEMS], total_bad=len(problems))


def parse_rows(rows: list[Row], fmt: str, source: str) -> list[Sample]:
    """Typed records for every row; a `DataError` naming each bad row (one problem per row) otherwise."""
    if fmt not in FORMATS:
        raise DataSourceError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    samples: list[Sample] = []
    problems: list[Problem] = []
    for row in rows:
        issues = [row.error] if row.error else []
        record = None if row.error else _parse(row.data, fmt, issues)
        if issues:
            problems.append(Problem(row.location, "; ".join(issues)))
        elif record is not None:
            samples.append(Sample(row.location, record))
    raise_for_problems(source, problems)
    return samples


def _parse(data: Any, fmt: str, issues: list[str]) -> Record | None:
    if not isinstance(data, dict):
        issues.append(f"expected an object with the {fmt} fields, got {_type_name(data)}")
        return None
    if fmt == "alpaca":
        instruction, extra_input = _text(data, "instruction", issues), _text(data, "input", issues, required=False)
        return Alpaca(instruction, extra_input, _text(data, "output", issues))
    if fmt == "completion":
        return Completion(_text(data, "prompt", issues), _text(data, "completion", issues))
    if fmt == "text":
        return Text(_text(data, "text", issues))
    return Chat(_messages(data, issues))


def _text(data: dict[str, Any], key: str, issues: list[str], *, required: bool = True, label: str | None = None) -> str:
    field = label or key
    value = data.get(key)
    if value is None:  # absent, JSON null, or a CSV row without that cell
        if required:
            issues.append(f"field '{field}': missing")
        return ""
    if not isinstance(value, str):
        issues.append(f"field '{field}': expected a string, got {_type_name(value)}")
        return ""
    if required and not value.strip():
        issues.append(f"field '{field}': empty")
    return value


def _messages(data: dict[str, Any], issues: list[str]) -> tuple[Message, ...]:
    value = data.get("messages")
    if isinstance(value, str):  # CSV cells (and some parquet files) hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            issues.append(f"field 'messages': not a JSON list ({exc.msg})")
            return ()
    if value is None:
        issues.append("field 'messages': missing")
        return ()
    if not isinstance(value, list) or not value:
        issues.append(f"field 'messages': expected a non-empty list, got {_type_name(value)}")
        return ()
    messages: list[Message] = []
    for index, item in enumerate(value):
        field = f"messages[{index}]"
        if not isinstance(item, dict):
            issues.append(f"field '{field}': expected an object with role and content, got {_type_name(item)}")
            continue
        role = item.get("role")
        if role not in ROLES:
            issues.append(f"field '{field}.role': expected one of {'/'.join(ROLES)}, got {role!r}")
        messages.append(Message(str(role), _text(item, "content", issues, label=f"{field}.content")))
    roles = [message.role for message in messages]
    if "assistant" not in roles:
        issues.append("field 'messages': no assistant message (the loss goes on assistant turns)")
    elif roles[0] == "assistant":
        issues.append("field 'messages[0].role': the conversation must start with a system or user message")
    return tuple(messages)


def _type_name(value: Any) -> str:
    names = {type(None): "null", dict: "object", list: "list", str: "string", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


class Renderer:
    """Renders records for one tokenizer (chat template or plain prompt; BOS where the tokenizer adds one)."""

    def __init__(self, tokenizer: Any):
        eos = tokenizer.eos_token
        if eos is None or tokenizer(eos, add_special_tokens=False)["input_ids"] != [tokenizer.eos_token_id]:
            raise LorafleetError(f"the tokenizer's EOS token {eos!r} does not tokenize to its id; cannot end responses")
        self.tokenizer = tokenizer
        self.eos = eos
        self.uses_chat_template = bool(tokenizer.chat_template)
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.bos = tokenizer.bos_token if adds_bos else ""

    def __call__(self, record: Record) -> Rendered:
        if isinstance(record, Text):
            return self._plain([(record.text + self.eos, True)])
        if isinstance(record, Completion):
            return self._plain([(record.prompt, False), (record.completion + self.eos, True)])
        if self.uses_chat_template:
            return self._templated(_as_messages(record))
        if isinstance(record, Alpaca):
            return self._plain(_alpaca_pieces(record, self.eos))
        return self._plain(_plain_chat_pieces(record, self.eos))

    def _plain(self, pieces: list[tuple[str, bool]]) -> Rendered:
        text, spans = self.bos, []
        for piece, carries_loss in pieces:
            if carries_loss:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return Rendered(text, tuple(spans))

    def _templated(self, messages: list[dict[str, str]]) -> Rendered:
        """Spans from rendering the conversation up to each assistant turn (with and without that turn)."""
        full = self._apply(messages, generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = _prefix_length(full, self._apply(messages[:index], generation_prompt=True), index)
            end = _prefix_length(full, self._apply(messages[: index + 1], generation_prompt=False), index)
            eos_at = full.rfind(self.eos, start, end)  # end the span at the turn's EOS (ChatML: <|im_end|>)
            spans.append((start, eos_at + len(self.eos) if eos_at >= 0 else end))
        last_start, last_end = spans[-1]
        if not full[last_start:last_end].endswith(self.eos):  # the template ends turns with another token
            full = full[:last_end] + self.eos + full[last_end:]
            spans[-1] = (last_start, last_end + len(self.eos))
        return Rendered(full, tuple(spans))

    def _apply(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as exc:
            raise RenderError(f"the chat template rejects this row: {exc}") from None


def _prefix_length(full: str, prefix: str, turn: int) -> int:
    if not full.startswith(prefix):
        raise RenderError(
            f"the chat template renders the conversation up to messages[{turn}] differently from the whole "
            "conversation, so the assistant turns cannot be located; use the completion format instead"
        )
    return len(prefix)


def _as_messages(record: Alpaca | Chat) -> list[dict[str, str]]:
    if isinstance(record, Chat):
        return [{"role": message.role, "content": message.content} for message in record.messages]
    user = record.instruction + ("\n\n" + record.input if record.input.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record.output}]


def _alpaca_pieces(record: Alpaca, eos: str) -> list[tuple[str, bool]]:
    if record.input.strip():
        prompt = (
            f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{record.instruction}\n\n"
            f"### Input:\n{record.input}\n\n### Response:\n"
        )
    else:
        prompt = f"{ALPACA_HEADER}\n\n### Instruction:\n{record.instruction}\n\n### Response:\n"
    return [(prompt, False), (record.output + eos, True)]


def _plain_chat_pieces(record: Chat, eos: str) -> list[tuple[str, bool]]:
    """The Alpaca layout for conversations: a system message replaces the header, each turn is a section."""
    system = [message.content for message in record.messages if message.role == "system"]
    pieces = [("\n\n".join(system) if system else ALPACA_HEADER, False)]
    for message in record.messages:
        if message.role == "user":
            pieces.append((f"\n\n### Instruction:\n{message.content}\n\n### Response:\n", False))
        elif message.role == "assistant":
            pieces.append((message.content + eos, True))
    return pieces
