"""Serving many adapters on one base over HTTP (OpenAI-compatible), with continuous batching: HTTP, scheduling
and metrics. The model it runs is runtime.decoder.CompactLlama (re-exported here).

    engine.py    Engine: scheduler (continuous batching, round-robin over adapters), limits, shutdown
    sequence.py  RequestState: one request in the engine (accept a token, stop rules, finish); sample_tokens
    modelspec.py a request's `model`: the base, one adapter, or a weighted mix "a:0.7+b:0.3"
    requests.py  SamplingParams (from runtime.sampling), Result, TokenLogprob, Handle (a submitted request)
    text.py      tokenizers, chat prompts, incremental detokenizing
    adapters.py  ServedAdapters: uploads, verification, pool loading, over the folder (runtime.AdapterStore)
    metrics.py   Prometheus metrics (prometheus_client, imported when a Metrics is built)
    protocol.py  the OpenAI wire format: request bodies (pydantic) -> SamplingParams, results -> JSON
    app.py       Server + FastAPI app (create_app: the routes); errors.py maps errors to HTTP statuses (the
                 one place)
    answers.py   one completion's rows submitted and answered: a JSON body or server-sent events
    bodylimit.py a cap on request bodies before they are parsed (413)

FastAPI, uvicorn and pydantic are imported only by app.py, answers.py, protocol.py, errors.py, bodylimit.py
and the run path of `loraplex serve` (cli/serve.py).
"""

from .engine import Engine, EngineConfig
from .requests import Handle, Result, SamplingParams
from ..runtime.decoder import CompactLlama, KVCache

__all__ = ["CompactLlama", "Engine", "EngineConfig", "Handle", "KVCache", "Result", "SamplingParams"]
