"""Read conversations from data files in LIMA, chat, Alpaca or ShareGPT format, validating every row.

One format per file, detected from its first row (a later row in another format is an error):

    {"conversations": ["user", "assistant", ...]}                                   LIMA
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}     chat
    {"instruction": "...", "input": "...", "output": "..."}                         Alpaca
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}      ShareGPT

A bad row is a `UserError` naming `file:N`, what is wrong and what is expected, raised before any model is
loaded. N is the line in a `.jsonl` file and the row's position, counted from 1, in a `.json` list or a
`.parquet` file. Oddities a user cannot be blamed for (a conversation that ends on a user turn, an Alpaca row
without `output`) are kept and handled downstream (predict answers them; fit leaves that turn out and counts it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lima_lightning.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMAT_NAMES = {"lima": "LIMA", "chat": "chat", "alpaca": "Alpaca", "sharegpt": "ShareGPT"}
EXPECTED_ROW = (
    'expected {"conversations": ["user", "assistant", ...]} (LIMA format), '
    '{"messages": [{"role": "user", "content": "..."}, ...]} (chat format), '
    '{"instruction": "...", "input": "...", "output": "..."} (Alpaca format) or '
    '{"conversations": [{"from": "human", "value": "..."}, ...]} (ShareGPT format)'
)
# ShareGPT's `from` values, and the chat roles they stand for. `user` and `assistant` are accepted too (some exports
# write them); `system` only as the first message.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Conversation:
    """Alternating turns, user first: (user, assistant, user, assistant, ...).

    The last turn may be a user turn (a prompt awaiting an answer). `where` is the
    `file:line` the row came from, for error messages.
    """

    turns: tuple[str, ...]
    system: str | None = None
    where: str = ""

    @property
    def ends_on_user(self) -> bool:
        return len(self.turns) % 2 == 1


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Read and validate every row of a `.jsonl`, `.json` or `.parquet` file; its first row decides its format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a .jsonl, .json or .parquet file in LIMA, chat, Alpaca or ShareGPT format")
    conversations = []
    file_format = first_where = None
    for where, row in _read_rows(path):
        found = row_format(row)
        if file_format is None:
            file_format, first_where = found, where
        elif found is not None and found != file_format:
            raise UserError(
                f"{where}: row is in {FORMAT_NAMES[found]} format, but the file's first row ({first_where}) is in "
                f"{FORMAT_NAMES[file_format]} format; expected one format per file"
            )
        conversations.append(parse_row(row, where))
    if not conversations:
        raise UserError(f"{path}: the file has no rows; {EXPECTED_ROW}")
    return conversations


def _read_rows(path: Path):
    """Yield (`file:N`, row) pairs: N is the line of a `.jsonl` file, the row's position from 1 otherwise."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:  # bytes, so a bad encoding is reported with its line number
            for lineno, raw in enumerate(f, start=1):
                line = _decode(raw, path, "utf-8-sig" if lineno == 1 else "utf-8", lineno)
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); expected one JSON object per line") from None
                except RecursionError:  # failures (#16): `[[[[...` a hundred thousand deep
                    raise UserError(f"{path}:{lineno}: JSON nested too deeply to read; expected one JSON object per line") from None
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            data = json.loads(_decode(raw, path, "utf-8-sig"))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected a JSON list of rows"
            ) from None
        except RecursionError:  # failures (#16)
            raise UserError(f"{path}: JSON nested too deeply to read; expected a JSON list of rows") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: top level is {_json_type(data)}; expected a JSON list of rows")
        for i, row in enumerate(data, start=1):
            yield f"{path}:{i}", row
    elif suffix == ".parquet":
        with path.open("rb") as f:  # parquet starts and ends with PAR1; datasets would log its own error line first
            head = f.read(4)
            f.seek(max(0, path.stat().st_size - 4))
            if head != b"PAR1" or f.read(4) != b"PAR1":
                raise UserError(
                    f"{path}: not a parquet file (no PAR1 header and footer); expected rows in one of the formats of docs/data.md"
                )
        import datasets  # heavy import, only for parquet files

        try:
            table = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow and datasets raise many types for a damaged file
            reason = str(e).splitlines()[0][:160] if str(e) else ""
            raise UserError(
                f"{path}: not a readable parquet file ({type(e).__name__}: {reason}); expected rows in one of the formats of docs/data.md"
            ) from None
        for i, row in enumerate(table, start=1):
            yield f"{path}:{i}", row
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _decode(raw: bytes, path: Path, encoding: str, lineno: int | None = None) -> str:
    """`raw` is one line (`lineno`) or the whole file (the line is counted); utf-8-sig accepts a leading BOM."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        lineno = lineno or raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x}); expected UTF-8 encoded JSON") from None


def _json_type(value: object) -> str:
    """What a JSON reader calls the value: `null`, `a number`, `an array`, ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


def row_format(row: object) -> str | None:
    """`lima`, `chat`, `alpaca` or `sharegpt` by the row's keys (None: none of them; `parse_row` says why).

    LIMA and ShareGPT rows share the `conversations` key: a list whose first item is an object is ShareGPT.
    """
    if not isinstance(row, dict):
        return None
    turns = row.get("conversations")
    if turns is not None:
        return "sharegpt" if isinstance(turns, list) and turns and isinstance(turns[0], dict) else "lima"
    if row.get("messages") is not None:
        return "chat"
    if "instruction" in row:
        return "alpaca"
    return None


def parse_row(row: object, where: str) -> Conversation:
    """Turn one row, in any of the four formats, into a validated `Conversation`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: row is {_json_type(row)}; {EXPECTED_ROW}")
    found = row_format(row)
    if found == "lima":
        return _parse_lima(row["conversations"], where)
    if found == "sharegpt":
        return _parse_sharegpt(row["conversations"], where)
    if found == "chat":
        return _parse_chat(row["messages"], where)
    if found == "alpaca":
        return _parse_alpaca(row, where)
    keys = sorted(map(str, row))
    raise UserError(f"{where}: row has no 'conversations', 'messages' or 'instruction' (keys: {keys}); {EXPECTED_ROW}")


def _check_text(value: object, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} is {_json_type(value)}; expected a non-empty string")
    if not value.strip():
        raise UserError(f"{where}: {what} is empty; expected a non-empty string")
    try:  # failures (#16): a JSON "\ud800" escape decodes to a lone surrogate, which tokenizers cannot take
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: {what} holds a lone surrogate ({value[e.start]!r}); expected valid Unicode text") from None
    return value


def _parse_lima(turns: object, where: str) -> Conversation:
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: 'conversations' is {turns!r:.40}; expected a non-empty list of strings (user, assistant, ...)")
    return Conversation(tuple(_check_text(t, where, f"conversations[{i}]") for i, t in enumerate(turns)), where=where)


def _parse_chat(messages: object, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' is {messages!r:.40}; expected a non-empty list of {{role, content}}")
    roles_and_texts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: messages[{i}] is {message!r:.60}; expected {{'role': ..., 'content': ...}}")
        role = message["role"]
        roles_and_texts.append((role, _check_text(message["content"], where, f"messages[{i}].content"), role))
    return _alternating(roles_and_texts, where, "messages", "role", ("system", "user", "assistant"))


def _parse_sharegpt(messages: list, where: str) -> Conversation:
    roles_and_texts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise UserError(f"{where}: conversations[{i}] is {message!r:.60}; expected {{'from': 'human' or 'gpt', 'value': ...}}")
        source = message["from"]
        if not isinstance(source, str) or source not in SHAREGPT_ROLES:
            raise UserError(
                f"{where}: conversations[{i}].from is {source!r:.40}; expected 'human' or 'gpt' (or 'user', 'assistant'), or 'system' first"
            )
        roles_and_texts.append((SHAREGPT_ROLES[source], _check_text(message["value"], where, f"conversations[{i}].value"), source))
    return _alternating(roles_and_texts, where, "conversations", "from", ("system", "human", "gpt"))


def _alternating(messages: list[tuple[object, str, object]], where: str, key: str, field: str, names: tuple[str, str, str]) -> Conversation:
    """(role, text, the role as the row spells it) triples, roles `system` (first only), `user`, `assistant`, as a
    Conversation; `names` are the format's own names for those three roles, for the error."""
    system, user, assistant = names
    spelled = dict(zip(("system", "user", "assistant"), names, strict=True))
    system_prompt = None
    turns: list[str] = []
    for i, (role, text, seen) in enumerate(messages):
        if role == "system" and i == 0:
            system_prompt = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(
                f"{where}: {key}[{i}] has {field} {seen!r:.40} where {spelled[expected]!r} was expected; "
                f"{field}s must be an optional {system!r} first, then {user!r} and {assistant!r} alternating"
            )
        turns.append(text)
    if not turns:
        raise UserError(f"{where}: {key!r} holds only a system prompt; expected at least one {user!r} turn")
    return Conversation(tuple(turns), system=system_prompt, where=where)


def _parse_alpaca(row: dict, where: str) -> Conversation:
    """The user turn is the instruction, then a blank line and the input if there is one; the output answers it.

    A row without `output` (or with `output: null`) is a prompt: predict answers it, fit leaves it out (counted).
    """
    instruction = _check_text(row["instruction"], where, "instruction").strip()
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"{where}: input is {_json_type(extra)}; expected a string (empty or left out when there is none)")
    user = f"{instruction}\n\n{extra.strip()}" if extra and extra.strip() else instruction
    if row.get("output") is None:
        return Conversation((user,), where=where)
    return Conversation((user, _check_text(row["output"], where, "output")), where=where)
