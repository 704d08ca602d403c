"""Every reader of adapter files decodes them through `store.lora_modules`, so a bad file is refused by all of
them alike: the file check (read_adapter), loading onto a model, the multi-adapter runtime, the server's pool
and combine raise the same error type for the same defect."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import loraplex as lp
from loraplex import models, store
from loraplex.errors import AdapterFileError, ShapeMismatchError
from loraplex.runtime import MultiLoraModel
from loraplex.runtime.slots import pool_tensors
from loraplex.workflows.combine import combine

TARGETS = ["q_proj", "v_proj", "down_proj"]


def read_from_disk(af: lp.AdapterFile, tmp: Path) -> None:
    save_file({store.PREFIX + k: t.contiguous() for k, t in af.tensors.items()}, str(tmp / store.WEIGHTS_NAME))
    (tmp / store.CONFIG_NAME).write_text(json.dumps(af.raw_config))
    store.read_adapter(tmp)


def serve_pool(af: lp.AdapterFile, tmp: Path) -> None:
    base = models.tiny_llama(seed=0)
    layers = {k: (m.in_features, m.out_features) for k, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    pool_tensors(af, layers)


READERS = {
    "read_adapter": read_from_disk,
    "load_adapter": lambda af, tmp: lp.load_adapter(models.tiny_llama(seed=0), af, "x"),
    "runtime": lambda af, tmp: MultiLoraModel(models.tiny_llama(seed=0)).load("x", af),
    "server": serve_pool,
    "combine": lambda af, tmp: combine([af, af], [0.5, 0.5], "cat"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> lp.AdapterFile:
    model = models.tiny_llama(seed=0)
    lp.inject(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), "a", seed=1)
    directory = tmp_path_factory.mktemp("good")
    lp.save_adapter(model, "a", directory)
    return store.read_adapter(directory)


def defective(good: lp.AdapterFile, defect: str, module_index: int, factor: str) -> lp.AdapterFile:
    """`good` with one module's factors broken: "orphan" drops one factor, "rank" gives both rank 3 (config: 4),
    "integer" stores one factor as int32."""
    modules = sorted(store.lora_factors(good))
    module = modules[module_index % len(modules)]
    ka, kb = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    key = ka if factor == "A" else kb
    tensors = dict(good.tensors)
    if defect == "orphan":
        del tensors[key]
    elif defect == "rank":
        tensors[ka], tensors[kb] = tensors[ka][:3], tensors[kb][:, :3]
    else:
        tensors[key] = tensors[key].round().to(torch.int32)
    return dataclasses.replace(good, tensors=tensors, content_hash="")


EXPECTED = {"orphan": AdapterFileError, "rank": ShapeMismatchError, "integer": AdapterFileError}


@pytest.mark.parametrize("reader", sorted(READERS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(defect=st.sampled_from(sorted(EXPECTED)), module_index=st.integers(0, 100), factor=st.sampled_from("AB"))
def test_every_reader_refuses_a_bad_file_alike(good, tmp_path, reader, defect, module_index, factor):
    bad = defective(good, defect, module_index, factor)
    (tmp_path / "bad").mkdir(exist_ok=True)
    with pytest.raises(EXPECTED[defect]):
        READERS[reader](bad, tmp_path / "bad")


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_reads_the_good_file(good, tmp_path, reader):
    READERS[reader](good, tmp_path)
