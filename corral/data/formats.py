"""Readers for conversation data: ShareGPT, OpenAI messages, Alpaca, self-instruct seed tasks.

Files: .jsonl, .json (a list of records), .parquet, a local `datasets` folder (save_to_disk), or a data set
on the Hugging Face Hub, `org/name` (datasets.load_dataset and its cache; subset, split and revision as
`org/name?subset=..&split=..&revision=..`, which the data config's keys fill in). A .jsonl
or .json file may be compressed (.gz, .bz2, .xz, .zst: read transparently) and may start with a UTF-8
byte-order mark. Every error names the file, the line (or record index) and the field; a byte that is
not UTF-8 also gets its byte offset, a duplicate JSON key its name. With `skip_invalid`, bad records are
dropped, counted and reported by reason: never dropped silently. Fields a reader does not use are
reported once per file, with a count, so a misspelt field does not vanish unnoticed.

Tool use: OpenAI messages with a record's `tools`, assistant `tool_calls` and `tool` results; ShareGPT in
LLaMA-Factory's (glaive's) variant, with `function_call` and `observation` turns and `tools`. Either becomes
messages with ToolCalls and `tool` messages, checked by chat/tools.check_tools.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from corral.chat.conversation import Conversation, Message, ToolCall, next_roles

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "system": "system",
}  # fmt: skip
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
OPENAI_TOOL_ROLES = {**OPENAI_ROLES, "tool": "tool"}
SHAREGPT_TOOL_ROLES = {**SHAREGPT_ROLES, "function_call": "assistant", "observation": "tool", "tool": "tool"}
FORMATS = ("auto", "sharegpt", "openai", "alpaca", "self_instruct")
# The fields each format reads (top level, then inside each turn or instance); any other is reported as unused.
USED_FIELDS = {
    "sharegpt": ({"id", "conversations", "system", "tools"}, "conversations", {"from", "value", "tool_call_id"}),
    "openai": ({"id", "messages", "tools"}, "messages", {"role", "content", "tool_calls", "tool_call_id", "name"}),
    "alpaca": ({"id", "instruction", "input", "output", "system"}, None, set()),
    "self_instruct": ({"id", "instruction", "instances"}, "instances", {"input", "output"}),
}
BOM = b"\xef\xbb\xbf"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """A record is invalid; the message starts with `file:line:` and names the field."""


@dataclass
class ReadReport:
    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first full message
    unused: Counter = field(default_factory=Counter)  # field a reader ignored -> records (or turns) that had it

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, message)

    def summary(self) -> str:
        text = f"{self.path}: read {self.total} records, kept {self.kept}"
        if self.skipped:
            reasons = "; ".join(f"{n} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.items())
            text += f", skipped {sum(self.skipped.values())}: {reasons}"
        if self.unused:
            text += "; fields not used: " + ", ".join(f"'{name}' ({n}x)" for name, n in sorted(self.unused.items()))
        return text


def error_reason(error: DataError) -> str:
    """What a skip is counted under: the field (`field 'conversations[1].value'`), or the whole message."""
    text = str(error)
    return text.split(":")[0] if text.startswith("field") else text


def line_error_reason(location: str, error: DataError) -> str:
    """What an unreadable line is counted under: `invalid JSON`, `not UTF-8`, `duplicate key 'id' ...`."""
    return str(error)[len(location) + 2 :].split(":")[0]


BUILTIN_DIR = Path(__file__).parent / "builtin"


HUB_ID = re.compile(r"(?:hf://datasets/)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:\?(.*))?", re.DOTALL)
HUB_OPTIONS = ("subset", "split", "revision")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".bz2", ".xz", ".zst", ".csv", ".txt", ".arrow")


@dataclass(frozen=True)
class HubDataset:
    """A data set on the Hugging Face Hub, `org/name`, read with datasets.load_dataset (and its cache: with
    HF_HUB_OFFLINE=1 the cached copy). `subset` is load_dataset's configuration name, `split` its split
    ("train" when the data set has one and none is given), `revision` a branch, tag or commit."""

    repo: str
    subset: str = ""
    split: str = ""
    revision: str = ""

    def __str__(self) -> str:
        query = "&".join(f"{key}={getattr(self, key)}" for key in HUB_OPTIONS if getattr(self, key))
        return self.repo + (f"?{query}" if query else "")

    def exists(self) -> bool:
        """True: whether the Hub (or the cache) has it is known only when it is loaded."""
        return True

    def is_dir(self) -> bool:
        return False


def parse_hub_id(text: str) -> HubDataset | None:
    """`org/name` or `hf://datasets/org/name`, with options as a query (`org/name?subset=en&split=test&revision=v1`),
    as a HubDataset; None when `text` does not look like one (a file name, a path of more parts). An unknown or
    repeated option is a DataError."""
    match = HUB_ID.fullmatch(text)
    if match is None or (not text.startswith("hf://") and match.group(1).lower().endswith(DATA_SUFFIXES)):
        return None
    options: dict[str, str] = {}
    for part in (match.group(2) or "").split("&") if match.group(2) else []:
        key, _, value = part.partition("=")
        if key not in HUB_OPTIONS or key in options or not value:
            raise DataError(f"{text}: '{part}': a Hub data set takes {', '.join(f'{k}=VALUE' for k in HUB_OPTIONS)}, "
                            "each once")  # fmt: skip
        options[key] = value
    return HubDataset(match.group(1), **options)


def resolve_data_path(path: str | Path, builtin_dir: Path = BUILTIN_DIR) -> Path | HubDataset:
    """`builtin:NAME` names a file shipped with Corral (`builtin_dir/NAME.jsonl`, by default a data set
    in corral/data/builtin); `org/name` (when no such file or folder exists here) or `hf://datasets/org/name`
    a data set on the Hub (HubDataset)."""
    if isinstance(path, HubDataset):
        return path
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
    if text.startswith("hf://") or not Path(text).exists():
        hub = parse_hub_id(text)
        if hub is not None:
            return hub
    return Path(path)


def _iter_hub_dataset(hub: HubDataset) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_dataset

    try:
        data = load_dataset(hub.repo, hub.subset or None, split=hub.split or None, revision=hub.revision or None)
    except Exception as e:  # not on the Hub, not cached offline, no such subset, split or revision: say which
        detail = " ".join(str(e).split())
        raise DataError(f"{hub}: no such file or folder here, and it could not be loaded as a data set on the Hub "
                        f"({type(e).__name__}: {detail})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"{hub}: no 'train' split (it has {', '.join(data)}): choose one with data.hub_split "
                            "(or ?split= in the path)")  # fmt: skip
        data = data["train"]
    for i, record in enumerate(data):
        yield f"{hub}:record {i}", record


# ---------------------------------------------------------------------------------------------------------
# Bytes -> JSON records


def _open_zstd(path: Path):
    try:
        import zstandard
    except ImportError:
        raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
    # A buffered reader over the stream: zstandard.open's reader cannot iterate lines.
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))


COMPRESSIONS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _open_zstd}


def file_kind(path: Path) -> tuple[str, str]:
    """(kind, compression): `chats.jsonl.gz` -> (".jsonl", ".gz"); `chats.json` -> (".json", "")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""


def open_binary(path: Path):
    """The file's bytes, decompressed when its name ends with .gz, .bz2, .xz or .zst."""
    _, compression = file_kind(path)
    return COMPRESSIONS[compression](path) if compression else open(path, "rb")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DataError(f"duplicate key '{key}' in one JSON object (only one value could be kept)")
    return record


def _nesting_path(text: str, depth: int = 64) -> str:
    """Where a JSON text first nests `depth` levels deep, as a field path (`conversations[0].value[0][0]...`).

    Used only after json raised RecursionError, so the error can name the field instead of a line alone."""
    stack: list[list] = []  # [kind, current key or index]
    last_string, i, n = "", 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            last_string, i = text[i + 1 : j], j + 1
            continue
        if c in "[{":
            if len(stack) >= depth:
                break
            stack.append([c, 0 if c == "[" else None])
        elif c in "]}" and stack:
            stack.pop()
        elif c == "," and stack and stack[-1][0] == "[":
            stack[-1][1] += 1
        elif c == ":" and stack:
            stack[-1][1] = last_string
        i += 1
    # The field is the path down to the last key before the nesting runs away (`conversations[0].value`).
    last_key = max((i for i, (kind, _) in enumerate(stack) if kind == "{"), default=-1)
    shown = stack[: min(max(last_key + 1, 3), 8)]
    path = "".join(f"[{key}]" if kind == "[" else f".{key}" for kind, key in shown).lstrip(".")
    return path + ("..." if len(shown) < len(stack) and last_key + 1 > len(shown) else "")


def _failing_element(text: str) -> int | None:
    """The index of the first element of a top-level JSON list that fails to parse on its own, or None.
    Only called after a whole-file parse failed, so its error can name the record."""
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
    space = re.compile(r"[ \t\n\r]*")
    i = space.match(text, 0).end()
    if text[i : i + 1] != "[":
        return None
    i, k = i + 1, 0
    while True:
        try:
            _, i = decoder.raw_decode(text, space.match(text, i).end())
        except (DataError, ValueError, RecursionError):
            return k
        i, k = space.match(text, i).end(), k + 1
        if text[i : i + 1] != ",":
            return None
        i += 1


def parse_json(text: str) -> Any:
    """json.loads that refuses duplicate keys and turns too-deep nesting into a DataError naming the field."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        where = _nesting_path(text)
        raise DataError(f"field '{where}': nested too deeply (lists or objects inside each other beyond Python's "
                        "recursion limit)") from None


def _utf8_error(path: Path, line: int, offset: int, byte: int, compressed: bool) -> DataError:
    of = " of the decompressed data" if compressed else ""
    return DataError(f"{path}:{line}: not UTF-8: byte 0x{byte:02x} at byte offset {offset}{of} "
                     "(re-encode the file as UTF-8)")


def _iter_jsonl(path: Path, compressed: bool) -> Iterator[tuple[str, str | None, DataError | None]]:
    offset = 0
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM) :], start + len(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", None, _utf8_error(path, lineno, start + e.start, raw[e.start], compressed)
                continue
            if line.strip():
                yield f"{path}:{lineno}", line, None


def parse_line(location: str, line: str) -> tuple[Any, DataError | None]:
    """One JSONL line's record, or (None, the error naming the line)."""
    try:
        return parse_json(line), None
    except json.JSONDecodeError as e:
        return None, DataError(f"{location}: invalid JSON: {e.msg} (column {e.colno})")
    except DataError as e:
        return None, DataError(f"{location}: {e}")


class _Unparsed:
    """iter_raw_records(parse=False)'s record for a JSONL line left to the caller's parse_line."""

    def __reduce__(self):
        return "UNPARSED"  # pickled as a reference: the same object in a worker process


UNPARSED = _Unparsed()


def iter_raw_records(path: str | Path, parse: bool = True) -> Iterator[tuple[str, Any, DataError | None, str]]:
    """Yield (location, record, error, raw text): `error` is set (and `record` None) for a line that is not
    valid UTF-8 or JSON, so a caller may skip it and carry on. Location is `file:line` or `file:record N`;
    `raw` is the line's text (.jsonl) or "" (whole-file formats). With `parse=False` a JSONL line's record
    is UNPARSED, left for `parse_line` (in another process, say)."""
    path = resolve_data_path(path)
    if isinstance(path, HubDataset):
        for location, record in _iter_hub_dataset(path):
            yield location, record, None, ""
        return
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        for location, record in _iter_datasets_folder(path):
            yield location, record, None, ""
        return
    kind, compression = file_kind(path)
    if kind == ".jsonl":
        for location, line, error in _iter_jsonl(path, bool(compression)):
            if error is not None:
                yield location, None, error, ""
            elif not parse:
                yield location, UNPARSED, None, line
            else:
                yield location, *parse_line(location, line), line
    elif kind == ".json":
        for location, record in _iter_json_list(path, bool(compression)):
            yield location, record, None, ""
    elif kind == ".parquet" and not compression:
        import pyarrow.parquet as pq

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:record {i}", record, None, ""
    else:
        raise DataError(f"{path}: unsupported file type '{''.join(path.suffixes) or path.name}' (use .jsonl, .json, "
                        ".parquet or a datasets folder; .jsonl and .json may be compressed: .gz, .bz2, .xz, .zst)")


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) pairs; location is `file:line` or `file:record N`. Raises DataError at the
    first line that cannot be read."""
    for location, record, error, _ in iter_raw_records(path):
        if error is not None:
            raise error
        yield location, record


def _iter_json_list(path: Path, compressed: bool) -> Iterator[tuple[str, Any]]:
    with open_binary(path) as f:
        data = f.read()
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        raise _utf8_error(path, data.count(b"\n", 0, at) + 1, at, data[at], compressed) from None
    try:
        records = parse_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except DataError as e:
        match = re.match(r"field '\[(\d+)\]\.?([^']*)'", str(e))
        if match:  # too deep: the path names the record as well as the field
            raise DataError(f"{path}:record {match.group(1)}: field '{match.group(2)}'{str(e)[match.end():]}") from None
        at = _failing_element(text)
        raise DataError(f"{path}:{'' if at is None else f'record {at}: '}{e}") from None
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for i, record in enumerate(records):
        yield f"{path}:record {i}", record


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


# ---------------------------------------------------------------------------------------------------------
# JSON records -> Conversations


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "openai"
        if "instruction" in record:
            return "self_instruct" if "instances" in record else "alpaca"
    raise DataError("cannot tell the format: expected a field 'conversations' (ShareGPT), 'messages' (OpenAI), "
                    "'instruction' (Alpaca) or 'instruction' + 'instances' (self-instruct seed tasks)")


def require_str(value: Any, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"field '{field_name}': expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"field '{field_name}': empty")
    bad = LONE_SURROGATE.search(value)
    if bad:
        raise DataError(f"field '{field_name}': lone surrogate U+{ord(bad.group()):04X} at character {bad.start()} "
                        "(a JSON \\u escape without its other half: not valid Unicode)")
    return value


def read_turn(item: Any, where: str, role_key: str, text_key: str, roles: dict[str, str],
              allow_empty: bool = False) -> tuple[str, str, str]:
    """One turn's (role, raw role name, text), checked field by field; `roles` maps names to roles."""
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
    content = require_str(content, f"{where}.{text_key}", allow_empty=allow_empty or role == "system")
    return role, str(raw_role), content


def parse_turns(items: Any, list_field: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise DataError(f"field '{list_field}': expected a non-empty list")
    messages: list[Message] = []
    for i, item in enumerate(items):
        where = f"{list_field}[{i}]"
        role, raw_role, content = read_turn(item, where, role_key, text_key, roles)
        _check_order(messages, role, raw_role, f"{where}.{role_key}", i)
        messages.append(Message(role, content))  # type: ignore[arg-type]
    return messages


def _check_order(messages: list[Message], role: str, raw_role: str, where: str, i: int) -> None:
    """Alternation is checked while reading, against the source's own field names, so errors point at the record."""
    if role == "system" and i != 0:
        raise DataError(f"field '{where}': a system message is only allowed first")
    turns = [m for m in messages if m.role != "system"]
    expected = next_roles(turns[-1] if turns else None)
    if role != "system" and role not in expected:
        raise DataError(f"field '{where}': roles must alternate user/assistant starting with user"
                        + (", a tool call's results right after it" if role == "tool" or "tool" in expected else "")
                        + f"; expected {' or '.join(expected)}, got '{raw_role}'")


# ---------------------------------------------------------------------------------------------- tool use
def uses_tools(record: dict, data_format: str) -> bool:
    """Whether a ShareGPT or OpenAI record has tool definitions, calls or results (then the tool readers
    read it; a plain record reads exactly as before)."""
    if "tools" in record:
        return True
    if data_format == "openai":
        items = record.get("messages")
        return isinstance(items, list) and any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in items)  # fmt: skip
    items = record.get("conversations")
    return isinstance(items, list) and any(
        isinstance(t, dict) and str(t.get("from")).lower() in ("function_call", "observation", "tool") for t in items)


def read_tools(value: Any, where: str = "tools") -> list[dict]:
    """A record's tool definitions (a list, or a JSON string of one, as LLaMA-Factory writes them), each
    OpenAI-shaped `{"type": "function", "function": {...}}` or the bare function: returned OpenAI-shaped."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = parse_json(value)
        except json.JSONDecodeError as e:
            raise DataError(f"field '{where}': not JSON ({e.msg}, column {e.colno})") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"field '{where}': expected a list of tool definitions, got {type(value).__name__}")
    tools = []
    for k, tool in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(tool, dict):
            raise DataError(f"field '{at}': expected an object, got {type(tool).__name__}")
        if "function" in tool:
            if not isinstance(tool["function"], dict):
                raise DataError(f"field '{at}.function': expected an object, got {type(tool['function']).__name__}")
            if tool.get("type", "function") != "function":
                raise DataError(f"field '{at}.type': '{tool.get('type')}' (only \"function\" tools are supported)")
            function, at = tool["function"], f"{at}.function"
        else:
            function = tool
        require_str(function.get("name"), f"{at}.name")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise DataError(f"field '{at}.parameters': expected a JSON schema object, "
                            f"got {type(function['parameters']).__name__}")
        tools.append({"type": "function", "function": function})
    return tools


def _arguments(value: Any, where: str) -> dict:
    """A call's arguments: a JSON object, or a string holding one (OpenAI sends them as a string)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except json.JSONDecodeError as e:
            raise DataError(f"field '{where}': not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"field '{where}': expected a JSON object, got {type(value).__name__}")
    return value


def _call(name: Any, arguments: Any, call_id: Any, where: str, names: set[str], id_where: str) -> ToolCall:
    """One ToolCall (`where` the field of its name and arguments), its name checked against the record's tools
    when it has any; a call without an id gets a new one."""
    from corral.chat.tools import new_call_id

    name = require_str(name, f"{where}.name")
    if names and name not in names:
        raise DataError(f"field '{where}.name': '{name}' is not one of the tools ({', '.join(sorted(names))})")
    call_id = require_str(call_id, id_where) if call_id not in (None, "") else new_call_id()
    return ToolCall(call_id, name, _arguments(arguments, f"{where}.arguments"))


def _check_tools(messages: list[Message], tools: list[dict], list_field: str, shift: int = 0) -> None:
    from corral.chat.tools import ToolError, check_tools

    try:
        check_tools(Conversation(messages, tools=tools), list_field=list_field, shift=shift)
    except ToolError as e:
        raise DataError(str(e)) from None


def parse_openai_tool_messages(items: Any, tools: list[dict]) -> list[Message]:
    """OpenAI messages with tool use: assistant `tool_calls` (`[{"id", "type": "function", "function": {"name",
    "arguments"}}]`, arguments a JSON string or an object; content may be null) and `tool` results
    (`tool_call_id`, `content`)."""
    if not isinstance(items, list) or not items:
        raise DataError("field 'messages': expected a non-empty list")
    names = {tool["function"]["name"] for tool in tools}
    messages: list[Message] = []
    for i, item in enumerate(items):
        where = f"messages[{i}]"
        calls_value = item.get("tool_calls") if isinstance(item, dict) else None
        if calls_value and item.get("content") is None:
            item = {**item, "content": ""}
        role, raw_role, content = read_turn(item, where, "role", "content", OPENAI_TOOL_ROLES,
                                            allow_empty=bool(calls_value) or item.get("role") == "tool")
        calls = []
        if calls_value:
            if role != "assistant":
                raise DataError(f"field '{where}.tool_calls': only an assistant message makes calls")
            if not isinstance(calls_value, list):
                raise DataError(f"field '{where}.tool_calls': expected a list, got {type(calls_value).__name__}")
            for j, call in enumerate(calls_value):
                at = f"{where}.tool_calls[{j}]"
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                    raise DataError(f"field '{at}.function': expected an object with 'name' and 'arguments'")
                function = call["function"]
                calls.append(_call(function.get("name"), function.get("arguments"), call.get("id"), f"{at}.function",
                                   names, f"{at}.id"))  # fmt: skip
        call_id = require_str(item.get("tool_call_id") or "", f"{where}.tool_call_id", allow_empty=True)
        name = require_str(item.get("name") or "", f"{where}.name", allow_empty=True) if role == "tool" else ""
        _check_order(messages, role, raw_role, f"{where}.role", i)
        call_id = call_id if role == "tool" else ""
        messages.append(Message(role, content, calls, call_id, name))  # type: ignore[arg-type]
    _check_tools(messages, tools, "messages")
    return messages


def parse_sharegpt_tool_turns(items: Any, tools: list[dict], roles: dict[str, str] = SHAREGPT_TOOL_ROLES
                              ) -> list[Message]:  # fmt: skip
    """ShareGPT turns in LLaMA-Factory's variant: a `function_call` turn's value is a JSON object `{"name",
    "arguments"}` (or a list of them: parallel calls), an `observation` turn is a call's result; a `gpt` turn
    right before a `function_call` is the text the calls come with. Results answer the open calls in order
    (or the call a turn's `tool_call_id` names), and get that call's id."""
    if not isinstance(items, list) or not items:
        raise DataError("field 'conversations': expected a non-empty list")
    names = {tool["function"]["name"] for tool in tools}
    messages: list[Message] = []
    open_calls: list[str] = []
    made: set[str] = set()
    for i, item in enumerate(items):
        where = f"conversations[{i}]"
        raw = str(item.get("from")).lower() if isinstance(item, dict) else ""
        if raw == "function_call" and isinstance(item.get("value"), (dict, list)):  # the object itself, not its text
            item = {**item, "value": json.dumps(item["value"], ensure_ascii=False)}
        role, raw_role, content = read_turn(item, where, "from", "value", roles,
                                            allow_empty=raw in ("observation", "tool"))  # fmt: skip
        if raw == "function_call":
            calls = _sharegpt_calls(item["value"], f"{where}.value", names)
            for k, call in enumerate(calls):
                if call.id in made:
                    raise DataError(f"field '{where}.value{f'[{k}]' if len(calls) > 1 else ''}.id': call id "
                                    f"'{call.id}' is used twice")
                made.add(call.id)
            previous = messages[-1] if messages else None
            if previous is not None and previous.role == "assistant" and not previous.tool_calls and open_calls == []:
                messages[-1] = Message("assistant", previous.content, calls)  # the text the calls come with
            else:
                _check_order(messages, "assistant", raw_role, f"{where}.from", i)
                messages.append(Message("assistant", "", calls))
            open_calls = [call.id for call in calls]
            continue
        _check_order(messages, role, raw_role, f"{where}.from", i)
        if role == "tool":
            call_id = require_str(item.get("tool_call_id") or "", f"{where}.tool_call_id", allow_empty=True)
            if not open_calls:
                raise DataError(f"field '{where}': an observation with no unanswered function_call before it")
            if call_id and call_id not in open_calls:
                raise DataError(f"field '{where}.tool_call_id': no open call '{call_id}' before this observation")
            call_id = call_id or open_calls[0]
            open_calls.remove(call_id)
            messages.append(Message("tool", content, tool_call_id=call_id))
        else:
            if open_calls:
                raise DataError(f"field '{where}': the function_call before it has {len(open_calls)} call(s) "
                                "with no observation")
            messages.append(Message(role, content))  # type: ignore[arg-type]
    return messages


def _sharegpt_calls(value: str, where: str, names: set[str]) -> list[ToolCall]:
    try:
        found = parse_json(value)
    except json.JSONDecodeError as e:
        raise DataError(f"field '{where}': not JSON ({e.msg}, column {e.colno})") from None
    items = found if isinstance(found, list) else [found]
    if not items:
        raise DataError(f"field '{where}': an empty list of calls")
    calls = []
    for k, body in enumerate(items):
        at = f"{where}[{k}]" if isinstance(found, list) else where
        if not isinstance(body, dict):
            raise DataError(f"field '{at}': expected an object {{\"name\", \"arguments\"}}, got {type(body).__name__}")
        calls.append(_call(body.get("name"), body.get("arguments", body.get("parameters")), body.get("id"), at, names,
                           f"{at}.id"))  # fmt: skip
    return calls


def _instruction_prompt(instruction: str, extra: str) -> str:
    """Alpaca's user turn: the instruction, then the input after a blank line when there is one. Prompts (RL)
    and SFT records are built by this one function, so both see the same text."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _parse_alpaca(record: dict, need_reply: bool) -> list[Message]:
    for key in ("instruction", "output") if need_reply else ("instruction",):
        if key not in record:
            raise DataError(f"field '{key}': missing")
    instruction = require_str(record["instruction"], "instruction")
    extra = require_str(record.get("input") or "", "input", allow_empty=True)
    messages = [Message("user", _instruction_prompt(instruction, extra))]
    if need_reply or "output" in record:
        messages.append(Message("assistant", require_str(record["output"], "output")))
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.insert(0, Message("system", record["system"]))
    return messages


def _parse_self_instruct(record: dict, need_reply: bool) -> list[list[Message]]:
    """A self-instruct seed task: one conversation per instance, its input after the instruction."""
    instruction = require_str(record.get("instruction"), "instruction")
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        raise DataError("field 'instances': expected a non-empty list of {'input', 'output'} objects")
    conversations = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise DataError(f"field 'instances[{i}]': expected an object, got {type(instance).__name__}")
        extra = require_str(instance.get("input") or "", f"instances[{i}].input", allow_empty=True)
        messages = [Message("user", _instruction_prompt(instruction, extra))]
        if need_reply or instance.get("output"):
            if "output" not in instance:
                raise DataError(f"field 'instances[{i}].output': missing")
            messages.append(Message("assistant", require_str(instance["output"], f"instances[{i}].output")))
        conversations.append(messages)
    return conversations


def parse_record(record: Any, data_format: str = "auto", need_reply: bool = True) -> list[Conversation]:
    """One record's conversations: one, except for a self-instruct seed task (one per instance).
    `need_reply=False` (RL prompts) also takes a conversation ending with a user turn, and an Alpaca record
    or a seed-task instance without `output`."""
    data_format = detect_format(record) if data_format == "auto" else data_format
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    tools: list[dict] = []
    if data_format == "sharegpt":
        if "conversations" not in record:
            raise DataError("field 'conversations': missing")
        if uses_tools(record, "sharegpt"):
            tools = read_tools(record.get("tools"))
            messages = parse_sharegpt_tool_turns(record["conversations"], tools)
        else:
            messages = parse_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        if isinstance(record.get("system"), str) and record["system"].strip() and messages[0].role != "system":
            messages.insert(0, Message("system", record["system"]))
        found = [messages]
    elif data_format == "openai":
        if "messages" not in record:
            raise DataError("field 'messages': missing")
        if uses_tools(record, "openai"):
            tools = read_tools(record.get("tools"))
            found = [parse_openai_tool_messages(record["messages"], tools)]
        else:
            found = [parse_turns(record["messages"], "messages", "role", "content", OPENAI_ROLES)]
    elif data_format == "alpaca":
        found = [_parse_alpaca(record, need_reply)]
    elif data_format == "self_instruct":
        found = _parse_self_instruct(record, need_reply)
    else:
        raise DataError(f"unknown format '{data_format}' (expected one of {', '.join(FORMATS)})")
    conversations = []
    for messages in found:
        turns = [m for m in messages if m.role != "system"]
        if not turns:
            raise DataError("no user or assistant messages")
        if turns[-1].role != "assistant" and need_reply:
            raise DataError(f"the conversation ends with a {turns[-1].role} message, not an assistant reply")
        conversations.append(Conversation(messages, id=str(record.get("id", "")), tools=tools))
    return conversations


def count_unused_fields(record: Any, data_format: str, unused: Counter) -> None:
    """Add the fields of `record` that its format's reader ignores to `unused` (`model`, `conversations[].markdown`)."""
    if not isinstance(record, dict) or data_format not in USED_FIELDS:
        return
    top, list_field, inner = USED_FIELDS[data_format]
    for key in record.keys() - top:
        unused[key] += 1
    items = record.get(list_field) if list_field else None
    if isinstance(items, list):
        names = set()
        for item in items:
            if isinstance(item, dict):
                names |= item.keys() - inner
        for key in names:
            unused[f"{list_field}[].{key}"] += 1


def iter_counted(path: str | Path, report: ReadReport, skip_invalid: bool) -> Iterator[tuple[str, Any]]:
    """(location, record) of each record, counted in `report.total`. A line that cannot be read at all (not
    UTF-8, not JSON) raises, or with `skip_invalid` is counted as skipped, like an invalid record."""
    for location, record, error, _ in iter_raw_records(path):
        report.total += 1
        if error is None:
            yield location, record
        elif skip_invalid:
            report.skip(line_error_reason(location, error), str(error))
        else:
            raise error


def read_conversations(
    path: str | Path, data_format: str = "auto", skip_invalid: bool = False, need_reply: bool = True
) -> tuple[list[Conversation], ReadReport]:
    report = ReadReport(str(path))
    conversations: list[Conversation] = []
    for location, record in iter_counted(path, report, skip_invalid):
        try:
            record_format = detect_format(record) if data_format == "auto" else data_format
            found = parse_record(record, record_format, need_reply)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{location}: {e}") from None
            report.skip(error_reason(e), f"{location}: {e}")
            continue
        count_unused_fields(record, record_format, report.unused)
        for k, conv in enumerate(found):
            conv.source = location if len(found) == 1 else f"{location} (instance {k})"
            conversations.append(conv)
        report.kept += 1
    if not conversations:
        raise DataError(f"{path}: no valid conversations" + (f" ({report.summary()})" if report.skipped else ""))
    return conversations, report
