"""Native CPU kernels, built on first use and registered as XLA FFI targets.

``qmatmul.cc`` holds the block-quantized matmul and dequantize handlers (see
its header for the weight layout), ``dense.cc`` the float32 dense matmul, both
batch-invariant (a row's bits do not depend on the other rows of the call),
``attention.cc`` the attention of one new position over a KV cache (one
session's, or a paged arena's for a batch of sessions);
``parallel.h`` splits rows among threads, ``rows.h`` leaves a padded batch's zero
rows out of the matmuls. ``load()`` compiles them into one
library once per machine with the C++ compiler (``$CXX``, else ``g++``)
against the XLA FFI headers that jaxlib ships, ``-march=native`` (or
``-march=$MESHNODE_NATIVE_MARCH``, e.g. ``x86-64-v3`` for a library that runs
on any AVX2 machine; without ``-march`` if the compiler refuses it), into a
cache folder keyed by the sources, the flags, the jaxlib version, the compiler
and the CPU's model and flags (``$MESHNODE_NATIVE_CACHE``, else
``~/.cache/meshnode/native``, else a folder in the temp dir); later processes
only load the library.
Concurrent builds are safe: each writes its own file and renames it into place.

Without a compiler, on a non-CPU backend, or with ``MESHNODE_NATIVE=0``,
``load()`` returns False and says why in ``unavailable_reason()``; the model
then dequantizes weights at load time and runs them as float arrays.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

MATMUL_TARGET = "meshnode_qmatmul"
DEQUANT_TARGET = "meshnode_qdequant"
ATTENTION_TARGET = "meshnode_decode_attention"
DENSE_TARGET = "meshnode_dense_matmul"
PAGED_ATTENTION_TARGET = "meshnode_paged_attention"

_SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("qmatmul.cc", "dense.cc", "attention.cc")
)
_HEADERS = tuple(Path(__file__).with_name(name) for name in ("parallel.h", "rows.h"))
_SYMBOLS = {
    MATMUL_TARGET: "MeshnodeQMatmul",
    DEQUANT_TARGET: "MeshnodeQDequant",
    ATTENTION_TARGET: "MeshnodeDecodeAttention",
    DENSE_TARGET: "MeshnodeDenseMatmul",
    PAGED_ATTENTION_TARGET: "MeshnodePagedAttention",
}
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}


def load() -> bool:
    """Build (once) and register the kernels; True when they can be used here."""
    with _lock:
        if "ok" not in _state:
            try:
                _register(_build())
                _state["ok"], _state["reason"] = True, ""
            except _Unavailable as exc:
                _state["ok"], _state["reason"] = False, str(exc)
                _log.info("native kernels unavailable: %s", exc)
        return bool(_state["ok"])


def unavailable_reason() -> str:
    """Why load() returned False ('' when it did not, or was not called)."""
    return str(_state.get("reason", ""))


class _Unavailable(Exception):
    pass


def cache_dir() -> Path:
    configured = os.environ.get("MESHNODE_NATIVE_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshnode" / "native"


def _cpu_signature() -> bytes:
    """What -march=native depends on: the CPU's model and flags (a shared home folder
    may serve machines with other CPUs)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines))).encode()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def _writable_cache() -> Path:
    try:  # Path.home() raises RuntimeError when there is no home to find
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, RuntimeError):
        pass
    folder = Path(tempfile.gettempdir()) / f"meshnode-native-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build() -> Path:
    if os.environ.get("MESHNODE_NATIVE", "1") == "0":
        raise _Unavailable("MESHNODE_NATIVE=0")
    if jax.default_backend() != "cpu":
        raise _Unavailable(f"the JAX backend is {jax.default_backend()}, not cpu")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise _Unavailable(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    source = b"\0".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    include = jax.ffi.include_dir()
    try:
        folder = _writable_cache()
    except OSError as exc:
        raise _Unavailable(f"no writable cache folder: {exc}") from exc
    last_error = ""
    march = os.environ.get("MESHNODE_NATIVE_MARCH", "native")
    for arch in ((f"-march={march}",), ()):
        flags = (*_FLAGS, *arch)
        parts = [source, " ".join(flags).encode(), jaxlib.__version__.encode(), compiler.encode()]
        key = hashlib.sha256(b"\0".join([*parts, _cpu_signature()])).hexdigest()[:24]
        library = folder / f"meshnode_kernels-{key}.so"
        if library.exists():
            return library
        fd, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        command = [compiler, *flags, f"-I{include}", *map(str, _SOURCES), "-o", scratch]
        try:
            result = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            os.unlink(scratch)
            raise _Unavailable(f"running {compiler}: {exc}") from exc
        if result.returncode == 0:
            os.replace(scratch, library)  # atomic: concurrent builds each rename a whole file
            _log.info("built native kernels: %s", library)
            return library
        os.unlink(scratch)
        last_error = (result.stderr or result.stdout).strip()[-400:]
    raise _Unavailable(f"compiling the native kernels failed: {last_error}")


def _register(library: Path) -> None:
    try:
        handle = ctypes.cdll.LoadLibrary(str(library))
        for target, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu"
            )
    except (OSError, AttributeError) as exc:
        raise _Unavailable(f"loading {library}: {exc}") from exc
