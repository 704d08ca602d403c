"""A request's `model` field: the base alone, one adapter, or a weighted mix of adapters.

Resolved once, when a request is submitted, into (adapter name, weight) pairs:
    "<base id>"              the base alone                  ()
    "legal"                  one adapter                     (("legal", 1.0),)
    "legal:0.7+tone:0.3"     a weighted mix (no renormalising: y += 0.7 * LoRA_legal(x) + 0.3 * LoRA_tone(x))
Mix weights are finite numbers in [-MAX_MIX_WEIGHT, MAX_MIX_WEIGHT] (0 drops that adapter from the row).
A DoRA adapter is served alone, at weight 1 (a mix including one is refused: 400, see runtime.rescale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import AdapterNotFoundError, ConfigError, LoraplexError, UnsupportedFeatureError
from ..inject import check_name
from ..runtime import AdapterPool, Lease

Mix = tuple[tuple[str, float], ...]  # (adapter name, weight) pairs; () = the base alone
MAX_MIX_WEIGHT = 100.0  # |weight| bound in a mix: larger ones only overflow activations


def check_dora_alone(mix: Mix, dora: list[bool], spec: str) -> None:
    """Refuse a mix that includes a DoRA adapter (dora[i]: whether mix[i] is one): DoRA rescales its row's
    whole output, so it is served alone at weight 1."""
    if any(dora) and (len(mix) > 1 or mix[0][1] != 1.0):
        names = [n for (n, _), d in zip(mix, dora) if d]
        raise UnsupportedFeatureError(f"model {spec!r} mixes DoRA adapter(s) {names}: a DoRA adapter rescales the "
                                      "whole output of its row, so it is served alone (model='name', weight 1)")


def check_copies_alone(mix: Mix, copies: list[bool], spec: str) -> None:
    """Refuse a mix that includes an adapter holding modules_to_save copies (copies[i]: whether mix[i] does): a
    weighted mix of whole modules is not defined, so it is served alone."""
    if any(copies) and (len(mix) > 1 or mix[0][1] != 1.0):
        names = [n for (n, _), c in zip(mix, copies) if c]
        raise UnsupportedFeatureError(f"model {spec!r} mixes adapter(s) {names} holding modules_to_save copies: a "
                                      "weighted mix of whole modules is not defined, so serve it alone "
                                      "(model='name', weight 1)")


def lease_mix(pool: AdapterPool, mix: Mix) -> list[Lease]:
    """Leases on the current versions of `mix`'s adapters (all or none), checking that DoRA adapters and adapters
    with modules_to_save copies are served alone."""
    leases: list[Lease] = []
    try:
        for name, _ in mix:
            leases.append(pool.acquire(name))
        spec = "+".join(n for n, _ in mix)
        check_dora_alone(mix, [pool.is_dora_slot(lease.slot) for lease in leases], spec)
        check_copies_alone(mix, [pool.has_copies_slot(lease.slot) for lease in leases], spec)
    except LoraplexError:
        for lease in leases:
            lease.release()
        raise
    return leases


def parse_model(spec: str, base_ids: Sequence[str], pool: AdapterPool) -> Mix:
    """`spec` as (adapter, weight) pairs; base_ids: the names of the base alone; unknown names -> 404."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"model must be a non-empty string, got {spec!r}")
    if spec in base_ids:
        return ()
    mix = []
    for part in spec.split("+"):
        name, sep, w = part.strip(" ").partition(":")  # spaces around parts are allowed, nothing else
        name = name.strip(" ")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise ConfigError(f"bad weight {w!r} in model {spec!r}; write 'name:0.7+other:0.3'") from None
        if not (math.isfinite(weight) and abs(weight) <= MAX_MIX_WEIGHT):
            raise ConfigError(f"weight of {name!r} in model {spec!r} must be a number in "
                              f"[-{MAX_MIX_WEIGHT:g}, {MAX_MIX_WEIGHT:g}], got {w!r}")
        if name in base_ids:
            raise ConfigError(f"model {spec!r}: the base {name!r} cannot be part of a mix (its weight would "
                              "mean nothing); list adapters only")
        check_name(name)
        if name not in pool:
            raise AdapterNotFoundError(f"model {name!r} does not exist: it is neither the base "
                                       f"({base_ids[0]!r}) nor a loaded adapter")
        mix.append((name, weight))
    check_dora_alone(mix, [pool.is_dora(n) for n, _ in mix], spec)
    check_copies_alone(mix, [pool.has_copies(n) for n, _ in mix], spec)
    return tuple(mix)


def model_key(mix: Mix, base_id: str) -> str:
    """The normalised spelling of `mix` (the fairness queue's key and the metrics label)."""
    return base_id if not mix else "+".join(f"{n}:{w:g}" if w != 1.0 else n for n, w in mix)
