"""The static shapes programs are compiled for: length buckets and prefill chunks (no JAX).

A jitted program is compiled once per shape, so lengths are padded up to a few
buckets: prefill lengths to ``LENGTH_BUCKETS``, caches to multiples of
``CACHE_BUCKET``. Over a paged arena a prompt runs in chunks of at most
``CHUNK`` positions (the worker's batches, local generation), each padded to
``CHUNK_BUCKETS``; ``chunk_shape`` says what one chunk's program is.
"""

from __future__ import annotations

#: prefill lengths are padded up to the next of these (then to multiples of the last)
LENGTH_BUCKETS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: caches are allocated at a multiple of this many positions (or a smaller power of two)
CACHE_BUCKET = 256


def bucket_length(length: int, buckets: tuple[int, ...] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= length; past the last, the next multiple of the last."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    last = buckets[-1]
    return -(-length // last) * last


#: a prompt runs in chunks of at most this many positions over a paged arena
CHUNK = 256
#: chunk lengths are padded up to the next of these
CHUNK_BUCKETS = tuple(b for b in LENGTH_BUCKETS if b <= CHUNK)


def chunk_shape(start: int, length: int, table_positions: int,
                prefix_free: bool = False) -> tuple[int, int]:
    """(padded length, kv_length) of a paged chunk of ``length <= CHUNK`` positions from
    ``start`` whose page tables hold ``table_positions``: the chunk padded to a bucket,
    attention through XLA over the positions so far rounded up to a bucket. With
    ``prefix_free`` (the native kernel reads each query's causal prefix whatever kv_length
    says: ``SpanRunner.prefix_free``) kv_length is the whole table, one program a length."""
    padded = bucket_length(length, CHUNK_BUCKETS)
    if prefix_free:
        return padded, table_positions
    return padded, min(bucket_length(start + padded), table_positions)
