"""loraplex: LoRA for PyTorch models — one frozen base, many adapters.

Train adapters, keep them separate and serve many side by side, combine them with weights, and merge the
chosen one into the base for deployment. Adapter files are PEFT's format.
"""

from .version import __version__  # noqa: F401

from .config import LoraConfig  # noqa: E402
from .errors import *  # noqa: E402,F401,F403
from .layers import LoraLayer  # noqa: E402
from .functional import delta_weight, lora_linear, scaling, tolerance  # noqa: E402
from .identity import base_fingerprint, content_hash  # noqa: E402
from .inject import (  # noqa: E402
    active_adapters, configs, disable_adapters, eject, find_targets, freeze_base, inject, lora_layers, remove_adapter, route_rows,
    set_active,
)
from .merge import MergeReport, merge, merge_and_unload, merged_adapters, unmerge  # noqa: E402
from .report import ParameterReport, WeightArithmetic, parameter_report  # noqa: E402
from .store import (  # noqa: E402
    AdapterFile, adapter_state_dict, load_adapter, lora_factors, read_adapter, save_adapter, validate_adapter,
)
