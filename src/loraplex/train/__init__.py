"""Training: data sources, tokenization with loss masks, splitting and batching; the loop, checkpoints, DDP, FSDP."""

from .checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
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
from .distributed import DistInfo, init_distributed
from .eva import EvaConfig, get_eva_state_dict, inject_eva
from .config import TrainConfig
from .loop import Job, Trainer, adapter_params, lr_factor, row_losses, row_losses_reference
from .plot import plot_losses
from .run import TrainResult, train

__all__ = [
    "IGNORE_INDEX", "Batcher", "Example", "Examples", "Message", "Record", "RecordSet", "chatterbot_topics",
    "fortune_categories", "load_records", "split", "tokenize", "write_jsonl",
    # the loop
    "Checkpoint", "DistInfo", "EvaConfig", "get_eva_state_dict", "inject_eva", "Job", "TrainConfig", "TrainResult", "Trainer", "adapter_params", "find_checkpoint",
    "init_distributed", "load_checkpoint", "lr_factor", "plot_losses", "row_losses", "row_losses_reference",
    "save_checkpoint", "train",
]
