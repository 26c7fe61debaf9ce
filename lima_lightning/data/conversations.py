"""Read conversations from LIMA-format or chat-format files, validating every row.

A bad row is a `UserError` naming `file:line`, what is wrong and what is expected, raised
before any model is loaded. Oddities a user cannot be blamed for (a LIMA conversation that
ends on a user turn) are kept and handled downstream, not fatal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lima_lightning.errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
EXPECTED_ROW = (
    'expected {"conversations": ["user", "assistant", ...]} (LIMA format) or '
    '{"messages": [{"role": "user", "content": "..."}, ...]} (chat format)'
)


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
    """Read and validate every row of a `.jsonl`, `.json` or `.parquet` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a .jsonl, .json or .parquet file in LIMA or chat format")
    rows = list(_read_rows(path))
    if not rows:
        raise UserError(f"{path}: the file has no rows; {EXPECTED_ROW}")
    return [parse_row(row, where) for where, row in rows]


def _read_rows(path: Path):
    """Yield (`file:line` or `file: row i`, row) pairs."""
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
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a JSON list of rows") from None
        except RecursionError:  # failures (#16)
            raise UserError(f"{path}: JSON nested too deeply to read; expected a JSON list of rows") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: top level is {_json_type(data)}; expected a JSON list of rows")
        for i, row in enumerate(data):
            yield f"{path}: row {i}", row
    elif suffix == ".parquet":
        with path.open("rb") as f:  # parquet starts and ends with PAR1; datasets would log its own error line first
            head = f.read(4)
            f.seek(max(0, path.stat().st_size - 4))
            if head != b"PAR1" or f.read(4) != b"PAR1":
                raise UserError(f"{path}: not a parquet file (no PAR1 header and footer); expected LIMA or chat-format rows")
        import datasets  # heavy import, only for parquet files

        try:
            table = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow and datasets raise many types for a damaged file
            reason = str(e).splitlines()[0][:160] if str(e) else ""
            raise UserError(
                f"{path}: not a readable parquet file ({type(e).__name__}: {reason}); expected LIMA or chat-format rows"
            ) from None
        for i, row in enumerate(table):
            yield f"{path}: row {i}", row
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


def parse_row(row: object, where: str) -> Conversation:
    """Turn one LIMA-format or chat-format row into a validated `Conversation`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: row is {_json_type(row)}; {EXPECTED_ROW}")
    if row.get("conversations") is not None:
        return _parse_lima(row["conversations"], where)
    if row.get("messages") is not None:
        return _parse_chat(row["messages"], where)
    raise UserError(f"{where}: row has no 'conversations' or 'messages' (keys: {sorted(row)}); {EXPECTED_ROW}")


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
    system = None
    turns: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: messages[{i}] is {message!r:.60}; expected {{'role': ..., 'content': ...}}")
        role, content = message["role"], _check_text(message["content"], where, f"messages[{i}].content")
        if role == "system" and i == 0:
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise UserError(
                f"{where}: messages[{i}] has role {role!r} where {expected!r} was expected; "
                "roles must be an optional 'system' first, then 'user' and 'assistant' alternating"
            )
        turns.append(content)
    if not turns:
        raise UserError(f"{where}: 'messages' holds only a system prompt; expected at least one 'user' turn")
    return Conversation(tuple(turns), system=system, where=where)
