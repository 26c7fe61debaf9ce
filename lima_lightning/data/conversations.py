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
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); expected one JSON object per line") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a JSON list of rows") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: top level is a JSON {type(data).__name__}; expected a list of rows")
        for i, row in enumerate(data):
            yield f"{path}: row {i}", row
    elif suffix == ".parquet":
        import datasets  # heavy import, only for parquet files

        table = datasets.Dataset.from_parquet(str(path))
        for i, row in enumerate(table):
            yield f"{path}: row {i}", row
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def parse_row(row: object, where: str) -> Conversation:
    """Turn one LIMA-format or chat-format row into a validated `Conversation`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: row is a JSON {type(row).__name__}; {EXPECTED_ROW}")
    if row.get("conversations") is not None:
        return _parse_lima(row["conversations"], where)
    if row.get("messages") is not None:
        return _parse_chat(row["messages"], where)
    raise UserError(f"{where}: row has no 'conversations' or 'messages' (keys: {sorted(row)}); {EXPECTED_ROW}")


def _check_text(value: object, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} is a {type(value).__name__}; expected a non-empty string")
    if not value.strip():
        raise UserError(f"{where}: {what} is empty; expected a non-empty string")
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
