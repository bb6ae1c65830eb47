"""Resolve a reward (or any) function named as "package.module:function" or "path/to/file.py:function"."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable


class RewardLoadError(Exception):
    """A function name that does not resolve; the message says which part failed."""


def file_module_name(path: str | Path) -> str:
    """A stable, unique module name per absolute path, so two files named rewards.py never collide."""
    path = Path(path)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    stem = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in path.stem)
    return f"raylhf_user_{stem}_{digest}"


def _load_file_module(path: Path):
    if not path.is_file():
        raise RewardLoadError(f"file {str(path)!r} not found (relative paths are taken from the working directory)")
    name = file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardLoadError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    return module


def load_function(spec: str) -> Callable:
    """Import and return the callable named by `spec` ("module:function" or "file.py:function")."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise RewardLoadError(f"{spec!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    target, attr = spec.split(":")
    if not target or not attr:
        raise RewardLoadError(f"{spec!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target:
        module = _load_file_module(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardLoadError(f"cannot import module {target!r}: {e}") from e
        except Exception as e:
            raise RewardLoadError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardLoadError(f"module {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardLoadError(f"{spec!r} is not callable")
    return fn
