"""Compiled code kept between processes: JAX's persistent cache and the native kernels.

Compiling a span's programs takes seconds per shape on a small CPU, and every
worker, client and ``meshnode generate`` would pay it again at each start.
``enable_compile_cache()`` points JAX at a cache folder shared by the
machine's meshnode processes (``$JAX_COMPILATION_CACHE_DIR``, else
``<tmp>/meshnode-jax-cache-<uid>``), so only the first process compiles each
shape, and builds the native kernels (meshnode/native) if they are not built
yet. The ``meshnode`` commands that run the model call it;
``MESHNODE_COMPILE_CACHE=0`` leaves JAX's cache off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: compilations shorter than this are not worth a cache entry
MIN_CACHED_COMPILE_SECONDS = 0.1


def compile_cache_dir() -> str:
    """The shared folder of JAX's persistent compilation cache."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        Path(tempfile.gettempdir()) / f"meshnode-jax-cache-{os.getuid()}"
    )


def enable_compile_cache() -> None:
    """Use the shared compilation cache in this process, and build the native kernels."""
    import jax

    from meshnode import native

    if os.environ.get("MESHNODE_COMPILE_CACHE", "1") != "0":
        jax.config.update("jax_compilation_cache_dir", compile_cache_dir())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)
    native.load()
