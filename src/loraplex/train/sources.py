"""Training records and where they come from: JSONL files and two built-in corpora.

A record is one training example before tokenization, in one of three shapes (the JSONL line shown):

    {"text": "Any text."}                                   loss on every token
    {"prompt": "Hi?", "completion": "Hello."}               loss on the completion only
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]}   loss on the assistant turns only

Sources understood by `load_records`:

    "data/train.jsonl"          one JSON object per line; blank lines are ignored, unknown extra keys too
    "chatterbot:tech_support"   chatterbot-corpus English YAML (pip package chatterbot-corpus): a conversation
                                [a, b, c] gives the prompt/completion pairs (a, b) and (b, c)
    "fortunes:computers"        Debian `fortunes` files: quotes separated by lines holding only "%";
                                each quote is a text record

A bad record raises `DataError` naming the file, the 1-based line, what was expected and what was got; with
`skip_bad=True` it is skipped instead and counted in `RecordSet.skipped`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..errors import DataError
from ..outputs import atomic_file

ROLES = ("system", "user", "assistant")
FORTUNES_DIR = Path("/usr/share/games/fortunes")  # where Debian's `fortunes` package puts its files
_MAX_PROBLEMS = 20  # messages of skipped records kept on a RecordSet


class Message(NamedTuple):
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Record:
    """Exactly one of: `text`; `prompt` + `completion`; `messages` (with at least one assistant turn)."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Message, ...] | None = None
    origin: str = field(default="", compare=False)  # "file.jsonl:12": where it came from, for error messages

    def __post_init__(self) -> None:
        shapes = [self.text is not None, self.prompt is not None or self.completion is not None,
                  self.messages is not None]
        if sum(shapes) != 1:
            raise DataError(f"{self.origin or 'Record'}: expected exactly one of text, prompt+completion or "
                            f"messages, got {self}")
        if shapes[1] and (self.prompt is None or self.completion is None):
            raise DataError(f"{self.origin or 'Record'}: prompt and completion go together, got {self}")

    @property
    def kind(self) -> str:
        """"text", "prompt_completion" or "messages"."""
        if self.text is not None:
            return "text"
        return "messages" if self.messages is not None else "prompt_completion"

    def chat(self) -> list[dict[str, str]]:
        """The record as chat-template messages: prompt -> user turn, completion -> assistant turn."""
        if self.messages is not None:
            return [m._asdict() for m in self.messages]
        if self.prompt is None:
            raise DataError(f"{self.origin or 'Record'}: a text record has no chat form")
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]

    def to_json(self) -> dict[str, Any]:
        """The JSONL object this record reads back from (origin is not written)."""
        if self.text is not None:
            return {"text": self.text}
        if self.messages is not None:
            return {"messages": self.chat()}
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass
class RecordSet:
    """Records read from one source, plus how many bad ones were skipped (only with skip_bad=True)."""

    records: list[Record]
    source: str
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first skipped records' error messages

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]


def load_records(source: str, *, skip_bad: bool = False) -> RecordSet:
    """Read records from a `.jsonl` path, `chatterbot:TOPIC` or `fortunes:CATEGORY` (see the module doc)."""
    out = RecordSet([], source)
    if source.startswith("chatterbot:"):
        items = _chatterbot(source.partition(":")[2])
    elif source.startswith("fortunes:"):
        items = _fortunes(source.partition(":")[2])
    else:
        items = _jsonl(Path(source))
    for item in items:
        if isinstance(item, Record):
            out.records.append(item)
        elif skip_bad:  # a str: the message of a bad record
            out.skipped += 1
            if len(out.problems) < _MAX_PROBLEMS:
                out.problems.append(item)
        else:
            raise DataError(item + " (pass --skip-bad, or skip_bad=True, to skip bad records and count them)")
    return out


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str], *, overwrite: bool = False) -> int:
    """Write records as JSONL (UTF-8, one object per line) atomically (outputs.atomic_file: an existing file is
    replaced only with `overwrite`); returns how many were written."""
    n = 0
    with atomic_file(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
    return n


# ---- JSONL ---------------------------------------------------------------------------------------------

def _jsonl(path: Path) -> Iterator[Record | str]:
    """Yield a Record per non-blank line, or the error message of a bad line."""
    if path.suffix != ".jsonl":
        raise DataError(f"data source {str(path)!r}: expected a .jsonl file, 'chatterbot:TOPIC' or "
                        f"'fortunes:CATEGORY', got {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise DataError(f"data source {str(path)!r}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield f"{where}: expected UTF-8 text, got {e.reason} at byte {e.start}"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{where}: expected a JSON object, got invalid JSON ({e.msg} at column {e.colno})"
                continue
            try:
                yield _record_from_json(obj, where)
            except DataError as e:
                yield str(e)


def _record_from_json(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_describe(obj)}")
    present = [k for k in ("text", "prompt", "completion", "messages") if k in obj]
    if present == ["text"]:
        return Record(text=_string(obj, "text", where), origin=where)
    if present == ["prompt", "completion"]:
        return Record(prompt=_string(obj, "prompt", where), completion=_string(obj, "completion", where),
                      origin=where)
    if present == ["messages"]:
        return Record(messages=_messages(obj["messages"], where), origin=where)
    got = f"keys {sorted(obj)}" if obj else "an empty object"
    raise DataError(f"{where}: expected a 'text' key, or 'prompt' and 'completion', or 'messages' "
                    f"(exactly one of these forms), got {got}")


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: expected {key!r} to be a string, got {_describe(value)}")
    if not value.strip():
        raise DataError(f"{where}: expected {key!r} to be a non-empty string, got {value!r}")
    return value


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected 'messages' to be a non-empty list, got {_describe(value)}")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}: expected an object with 'role' and 'content', got {_describe(m)}")
        if m["role"] not in ROLES:
            raise DataError(f"{at}: expected role to be one of {list(ROLES)}, got {_describe(m['role'])}")
        out.append(Message(m["role"], _string(m, "content", at)))
    if not any(m.role == "assistant" for m in out):
        raise DataError(f"{where}: expected at least one assistant message (the loss is taken on those), "
                        f"got roles {[m.role for m in out]}")
    return tuple(out)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# ---- chatterbot-corpus ---------------------------------------------------------------------------------

def chatterbot_topics() -> dict[str, Path]:
    """{topic: YAML file} of the installed chatterbot-corpus English data (the package is never imported)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("chatterbot: expected the chatterbot-corpus package, got none installed; "
                        "install it with `pip install --no-deps chatterbot-corpus==1.3.3`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    return {p.stem: p for p in sorted(folder.glob("*.yml"))}


def _chatterbot(topic: str) -> Iterator[Record | str]:
    topics = chatterbot_topics()
    if topic not in topics:
        raise DataError(f"chatterbot: expected a topic among {sorted(topics)}, got {topic!r}")
    path = topics[topic]
    try:  # compose (not load) keeps line numbers and each scalar's raw text ("42", "yes" stay strings)
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: expected chatterbot YAML, got a parse error: {e}") from None
    convs = None
    if isinstance(root, yaml.MappingNode):
        convs = next((v for k, v in root.value if k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        raise DataError(f"{path}: expected a mapping with a 'conversations' list, got none")
    for conv in convs.value:
        where = f"{path}:{conv.start_mark.line + 1}"
        if not isinstance(conv, yaml.SequenceNode) or len(conv.value) < 2:
            yield f"{where}: expected a conversation list of at least 2 strings, got {_node_kind(conv)}"
            continue
        bad = [_bad_entry(node, path) for node in conv.value]
        for i in range(len(conv.value) - 1):
            a, b = conv.value[i], conv.value[i + 1]
            problem = bad[i] or bad[i + 1]
            if problem:
                yield problem
            else:
                yield Record(prompt=a.value, completion=b.value, origin=f"{path}:{a.start_mark.line + 1}")


def _bad_entry(node: yaml.Node, path: Path) -> str | None:
    where = f"{path}:{node.start_mark.line + 1}"
    if not isinstance(node, yaml.ScalarNode):
        return f"{where}: expected a string in the conversation, got {_node_kind(node)}"
    if not node.value.strip():
        return f"{where}: expected a non-empty string in the conversation, got {node.value!r}"
    return None


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return f"a list of {len(node.value)}"
    return "a mapping" if isinstance(node, yaml.MappingNode) else f"the scalar {node.value!r}"


# ---- Debian fortunes -----------------------------------------------------------------------------------

def fortune_categories() -> dict[str, Path]:
    """{category: file} of the installed Debian `fortunes` files (the .dat index files are skipped)."""
    if not FORTUNES_DIR.is_dir():
        raise DataError(f"fortunes: expected the Debian fortunes files in {FORTUNES_DIR}, got no such folder; "
                        "install them with `sudo apt-get install fortunes`")
    return {p.name: p for p in sorted(FORTUNES_DIR.iterdir())
            if p.is_file() and not p.is_symlink() and "." not in p.name}


def _fortunes(category: str) -> Iterator[Record | str]:
    categories = fortune_categories()
    if category not in categories:
        raise DataError(f"fortunes: expected a category among {sorted(categories)}, got {category!r}")
    path = categories[category]
    lines: list[str] = []
    start, problem = 1, None  # problem: why the quote being read is bad (an undecodable line), if it is
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                problem = problem or f"{path}:{lineno}: expected UTF-8 text, got {e.reason} at byte {e.start}"
                continue
            if line != "%":
                lines.append(line)
                continue
            item = problem or _quote(lines, f"{path}:{start}")
            if item:
                yield item
            lines, start, problem = [], lineno + 1, None
    item = problem or _quote(lines, f"{path}:{start}")
    if item:
        yield item


def _quote(lines: list[str], where: str) -> Record | None:
    text = "\n".join(lines).strip("\n")
    # an empty chunk ("%" twice, or a final "%") is layout, not a record
    return Record(text=text, origin=where) if text.strip() else None
