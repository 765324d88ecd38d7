"""Engines: one model serving the actor, judge and meta-judge roles (interface in `engines/base.py`).

`load_engine(config, model)` returns the engine for a checkpoint, loading it on first use and
keeping it in a process-wide cache keyed by (backend, checkpoint sha256, engine config), so the
actor, judge and meta-judge stages of an iteration share one loaded model. `release_engines()`
closes every cached engine (and frees its GPU memory); call it before training.

Backends, each imported only when first loaded (so `import metareward.engines` needs neither
torch nor vLLM): `hf` -> `metareward.engines.hf.HFEngine`, `vllm` ->
`metareward.engines.vllm.VLLMEngine`, `openai` -> `metareward.engines.openai.OpenAIEngine`; all
take `(model_dir: Path, config: EngineConfig)`, `model_dir` being the verified local checkpoint
folder from `metareward.checkpoints.materialize`.
"""

from __future__ import annotations

import gc
import importlib
import logging
import threading

import fsspec

from metareward.checkpoints import ModelRef, materialize
from metareward.engines.base import Choice, Completion, Engine, EngineConfig, Sampling

__all__ = ["Choice", "Completion", "Engine", "EngineConfig", "Sampling", "engine_is_loaded", "load_engine", "release_engines", "loaded_engines"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, tuple[str, str]] = {
    "hf": ("metareward.engines.hf", "HFEngine"),
    "vllm": ("metareward.engines.vllm", "VLLMEngine"),
    "openai": ("metareward.engines.openai", "OpenAIEngine"),
}

_engines: dict[tuple[str, str, str], Engine] = {}
_engines_lock = threading.Lock()


def _engine_key(config: EngineConfig, model: ModelRef) -> tuple[str, str, str]:
    return (config.backend, model.sha256, config.model_dump_json())


def load_engine(config: EngineConfig, model: ModelRef, fs: fsspec.AbstractFileSystem | None = None) -> Engine:
    """The engine serving checkpoint `model` with `config`, loaded once per process.

    The checkpoint is materialized (downloaded if remote, verified against its sha256) before the
    first load; `fs` is the fsspec filesystem for a remote checkpoint (default: from its URL).
    Raises `CheckpointError` for a bad checkpoint and `ImportError` naming the backend when its
    module cannot be imported.
    """
    key = _engine_key(config, model)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is not None:
            return engine
        module_name, class_name = BACKENDS[config.backend]
        try:
            engine_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"engine backend {config.backend!r} is not available: {module_name}.{class_name} could not be imported ({error})"
            ) from error
        model_dir = materialize(model, fs=fs)
        logger.info("loading %s engine for %s (sha256 %s)", config.backend, model.uri, model.sha256[:16])
        engine = engine_class(model_dir, config)
        _engines[key] = engine
        return engine


def engine_is_loaded(config: EngineConfig, model: ModelRef) -> bool:
    """Whether `load_engine(config, model)` would return an engine already loaded in this process."""
    with _engines_lock:
        return _engine_key(config, model) in _engines


def loaded_engines() -> list[Engine]:
    """The engines in the cache now (for reports and tests)."""
    with _engines_lock:
        return list(_engines.values())


def release_engines() -> None:
    """Close every cached engine and empty the cache (before training, or at the end of a run).

    Every engine is closed even when one fails; the first failure is raised afterwards.
    """
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    failure: Exception | None = None
    for engine in engines:
        try:
            engine.close()
        except Exception as error:  # close the others first, then report
            logger.error("closing %s engine failed: %s", getattr(engine, "backend", "?"), error)
            failure = failure or error
    gc.collect()
    if failure is not None:
        raise failure
