"""Training: data sources, tokenization with loss masks, splitting and batching (the loop lives beside them)."""

from .data import IGNORE_INDEX, Batcher, Example, Examples, split, tokenize
from .sources import (
    Message,
    Record,
    RecordSet,
    chatterbot_topics,
    fortune_categories,
    load_records,
    write_jsonl,
)

__all__ = [
    "IGNORE_INDEX", "Batcher", "Example", "Examples", "Message", "Record", "RecordSet", "chatterbot_topics",
    "fortune_categories", "load_records", "split", "tokenize", "write_jsonl",
]
