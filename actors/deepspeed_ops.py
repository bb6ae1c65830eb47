"""DeepSpeed's shared-memory communication op (CPU ranks), built once per venv and then loaded by a plain import.

DeepSpeed's CPU backend JIT-loads this op in `deepspeed.init_distributed` (`deepspeed/comm/torch.py`,
`build_shm_op`), through `torch.utils.cpp_extension.load`. Every call of that, even with the op built and up
to date, creates `<torch_extensions>/<python>_cpu/deepspeed_shm_comm/lock` and deletes it when done
(`torch/utils/file_baton.py`: an O_EXCL file that names no owner); a process killed in between leaves the file,
and every later process waits for it to disappear, forever. Here the op is built instead under an `fcntl` lock
(the kernel releases it when its holder dies, so no dead process can hold it), in a private directory, and moved
into place in one rename; once the `.so` is there every rank imports it without taking any lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

NAME = "deepspeed_shm_comm"


class OpLockTimeout(RuntimeError):
    """Another live process held the build lock of the op longer than we wait."""


def _builder():
    """DeepSpeed's ShareMemCommBuilder, or None where DeepSpeed would not load the op (not the CPU
    accelerator, or the op is incompatible here); the same test `deepspeed.comm.torch.build_shm_op` makes."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def op_dir(builder) -> Path:
    """Where this venv keeps the built op: one folder per build input (sources, flags, torch, DeepSpeed, Python),
    so an upgrade builds anew instead of loading a stale `.so`."""
    import deepspeed
    import torch

    h = hashlib.sha256(f"{sys.version}|{torch.__version__}|{deepspeed.__version__}|{builder.cxx_args()}".encode())
    for src in builder.sources():
        h.update(Path(builder.deepspeed_src_path(src)).read_bytes())
    root = Path(sys.prefix) / "share" / "raylhf"
    if not os.access(sys.prefix, os.W_OK):  # a read-only install: the user's cache
        root = Path.home() / ".cache" / "raylhf"
    return root / f"{NAME}-{h.hexdigest()[:16]}"


@contextlib.contextmanager
def build_lock(path: Path, timeout_s: float):
    """Hold the `fcntl` lock at `path` (its file records the holder's pid); OpLockTimeout after `timeout_s`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline, said = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise OpLockTimeout(
                        f"waited {timeout_s:.0f} s for {path}, held by the live process {holder} that builds "
                        f"DeepSpeed's {NAME} op; let it finish (or end it) and start again") from None
                if not said:
                    print(f"raylhf: waiting for process {holder} to finish building {NAME} ({path})",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield


def _build(builder, so: Path) -> None:
    """Build the op with DeepSpeed's own recipe in a fresh directory next to `so`, then rename it into place
    (a build cut short leaves only that directory, which the next build deletes)."""
    for old in so.parent.glob("build-*"):  # we hold the lock: whoever made these died
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=so.parent))
    saved = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp)  # torch's own lock then lives in this private directory
    try:
        builder.jit_load(verbose=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR")
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved
    os.replace(tmp / NAME / f"{NAME}.so", so)
    shutil.rmtree(tmp, ignore_errors=True)


def _import(so: Path):
    spec = importlib.util.spec_from_file_location(NAME, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_shm_comm(directory: Path | None = None, timeout_s: float = 600.0):
    """Make DeepSpeed's `build_shm_op` find the op already loaded (call before `deepspeed.init_distributed`).

    Imports `<directory>/deepspeed_shm_comm.so` (default `op_dir`), building it first if missing; only a build
    waits for another one, at most `timeout_s` (OpLockTimeout). Returns the module, or None where DeepSpeed
    does not use the op."""
    builder = _builder()
    if builder is None:
        return None
    from deepspeed.ops.op_builder.builder import OpBuilder

    if builder.name in OpBuilder._loaded_ops:
        return OpBuilder._loaded_ops[builder.name]
    directory = Path(directory) if directory is not None else op_dir(builder)
    so = directory / f"{NAME}.so"
    if not so.exists():
        with build_lock(directory / "build.lock", timeout_s):
            if not so.exists():
                _build(builder, so)
    module = OpBuilder._loaded_ops.get(builder.name) or _import(so)  # `_build` leaves its module loaded
    OpBuilder._loaded_ops[builder.name] = module
    return module


if __name__ == "__main__":  # `make install`: build it now, so no trainer ever has to
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{NAME}: built in {op_dir(_builder())}" if load_shm_comm() else f"{NAME}: not used by this accelerator")
