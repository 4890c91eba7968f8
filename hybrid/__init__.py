"""hybrid: a retriever and a small LLM that learn your documents, with measured factuality.

Library entry points (imported lazily so `import hybrid` stays light):

    from hybrid import Retriever, build_index, IndexConfig, Pipeline
"""

from __future__ import annotations

try:  # one version: pyproject.toml's, read from the installed package's metadata
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("hybrid")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Retriever": "retrieval.retriever",
    "Hit": "retrieval.retriever",
    "build_index": "retrieval.index",
    "IndexConfig": "retrieval.index",
    "InputError": "core.errors",
    "load_corpus": "retrieval.corpus",
    "load_qa": "core.qa",
    "tune_embedder": "retrieval.tune_embedder",
    "EmbedderTuneConfig": "retrieval.tune_embedder",
    "Pipeline": "hybrid.pipeline",
    "Answer": "hybrid.pipeline",
    "tune_generator": "tuning.tune_generator",
    "GeneratorTuneConfig": "tuning.tune_generator",
    "tune_dpo": "tuning.tune_dpo",
    "DPOTuneConfig": "tuning.tune_dpo",
    "Judge": "tuning.judge",
    "tune_judge": "tuning.tune_judge",
    "JudgeTuneConfig": "tuning.tune_judge",
    "calibrate": "hybrid.tune_calibrate",
    "CalibrateConfig": "hybrid.tune_calibrate",
    "AskConfig": "hybrid.ask",
    "PipelineSettings": "hybrid.pipeline_settings",
    "TrainSettings": "training.train_settings",
    "build_config": "hybrid.config",
    "run_eval": "hybrid.eval",
    "EvalConfig": "hybrid.eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hybrid' has no attribute {name!r}")
