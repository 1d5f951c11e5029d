"""Readers for conversation data: ShareGPT, OpenAI messages, Alpaca.

Files: .jsonl, .json (a list of records), .parquet, or a local `datasets` folder (save_to_disk).
Every error names the file, the line (or record index) and the field. With `skip_invalid`, bad
records are dropped, counted and reported by reason: never dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from corral.chat.conversation import Conversation, Message

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "system": "system",
}  # fmt: skip
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
FORMATS = ("auto", "sharegpt", "openai", "alpaca")


class DataError(ValueError):
    """A record is invalid; the message starts with `file:line:` and names the field."""


@dataclass
class ReadReport:
    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first full message

    def summary(self) -> str:
        text = f"{self.path}: read {self.total} records, kept {self.kept}"
        if self.skipped:
            reasons = "; ".join(f"{n} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.items())
            text += f", skipped {sum(self.skipped.values())}: {reasons}"
        return text


BUILTIN_DIR = Path(__file__).parent / "builtin"


def resolve_data_path(path: str | Path, builtin_dir: Path = BUILTIN_DIR) -> Path:
    """`builtin:NAME` names a file shipped with Corral (`builtin_dir/NAME.jsonl`, by default a data set
    in corral/data/builtin)."""
    text = str(path)
    if text.startswith("builtin:"):
        name = text[len("builtin:") :]
        found = builtin_dir / f"{name}.jsonl"
        if not found.is_file():
            known = ", ".join(sorted(p.stem for p in builtin_dir.glob("*.jsonl")))
            raise DataError(f"{text}: nothing built in is named '{name}' (known: {known})")
        return found
    if not text:
        raise DataError("no data path given (set data.path)")
    return Path(path)


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) pairs; location is `file:line` or `file:record N`."""
    path = resolve_data_path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _iter_datasets_folder(path)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, record in enumerate(data):
            yield f"{path}:record {i}", record
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:record {i}", record
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or a datasets folder)")


def _iter_datasets_folder(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a datasets folder saved with save_to_disk ({e})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(data)})")
        data = data["train"]
    for i, record in enumerate(data):
        yield f"{path}:record {i}", record


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "openai"
        if "instruction" in record:
            return "alpaca"
    raise DataError("cannot tell the format: expected a field 'conversations' (ShareGPT), 'messages' (OpenAI) "
                    "or 'instruction' (Alpaca)")


def require_str(value: Any, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"field '{field_name}': expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"field '{field_name}': empty")
    return value


def parse_turns(items: Any, list_field: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise DataError(f"field '{list_field}': expected a non-empty list")
    messages: list[Message] = []
    for i, item in enumerate(items):
        where = f"{list_field}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"field '{where}': expected an object, got {type(item).__name__}")
        for key in (role_key, text_key):
            if key not in item:
                raise DataError(f"field '{where}.{key}': missing")
        raw_role = item[role_key]
        role = roles.get(str(raw_role).lower())
        if role is None:
            raise DataError(f"field '{where}.{role_key}': unknown role '{raw_role}' (expected one of {', '.join(roles)})")
        content = item[text_key]
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        content = require_str(content, f"{where}.{text_key}", allow_empty=(role == "system"))
        # Alternation is checked here, against the source's own field names, so errors point at the record.
        expected = _expected_role(messages)
        if role == "system" and i != 0:
            raise DataError(f"field '{where}.{role_key}': a system message is only allowed first")
        if role != "system" and role != expected:
            raise DataError(f"field '{where}.{role_key}': roles must alternate user/assistant starting with user; "
                            f"expected {expected}, got '{raw_role}'")
        messages.append(Message(role, content))  # type: ignore[arg-type]
    return messages


def _expected_role(messages: list[Message]) -> str:
    turns = [m for m in messages if m.role != "system"]
    return "user" if len(turns) % 2 == 0 else "assistant"


def parse_record(record: Any, data_format: str = "auto", need_reply: bool = True) -> Conversation:
    """One record as a Conversation. `need_reply=False` (RL prompts) also takes a conversation ending with
    a user turn, and an Alpaca record without `output`."""
    data_format = detect_format(record) if data_format == "auto" else data_format
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if data_format == "sharegpt":
        if "conversations" not in record:
            raise DataError("field 'conversations': missing")
        messages = parse_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        if isinstance(record.get("system"), str) and record["system"].strip() and messages[0].role != "system":
            messages.insert(0, Message("system", record["system"]))
    elif data_format == "openai":
        if "messages" not in record:
            raise DataError("field 'messages': missing")
        messages = parse_turns(record["messages"], "messages", "role", "content", OPENAI_ROLES)
    elif data_format == "alpaca":
        for key in ("instruction", "output") if need_reply else ("instruction",):
            if key not in record:
                raise DataError(f"field '{key}': missing")
        instruction = require_str(record["instruction"], "instruction")
        extra = record.get("input") or ""
        require_str(extra, "input", allow_empty=True)
        messages = [Message("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction)]
        if need_reply or "output" in record:
            messages.append(Message("assistant", require_str(record["output"], "output")))
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, Message("system", record["system"]))
    else:
        raise DataError(f"unknown format '{data_format}' (expected one of {', '.join(FORMATS)})")
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise DataError("no user or assistant messages")
    if turns[-1].role != "assistant" and need_reply:
        raise DataError(f"the conversation ends with a {turns[-1].role} message, not an assistant reply")
    return Conversation(messages, id=str(record.get("id", "")))


def read_conversations(
    path: str | Path, data_format: str = "auto", skip_invalid: bool = False, need_reply: bool = True
) -> tuple[list[Conversation], ReadReport]:
    report = ReadReport(str(path))
    conversations: list[Conversation] = []
    for location, record in iter_records(path):
        report.total += 1
        try:
            conv = parse_record(record, data_format, need_reply)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{location}: {e}") from None
            reason = str(e).split(":")[0] if str(e).startswith("field") else str(e)
            report.skipped[reason] += 1
            report.examples.setdefault(reason, f"{location}: {e}")
            continue
        conv.source = location
        conversations.append(conv)
        report.kept += 1
    if not conversations:
        raise DataError(f"{path}: no valid conversations" + (f" ({report.summary()})" if report.skipped else ""))
    return conversations, report
