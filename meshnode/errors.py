"""Every named exception of meshnode, and only exceptions.

Each carries a stable ``code`` string: the wire turns a ``MeshError`` raised by
a handler into an error frame ``{code, message}``, and the client turns that
frame back into ``RemoteError``. Sections are per owning package; add new
exceptions in your own section.
"""


class MeshError(Exception):
    """Base of every meshnode error; ``code`` travels in error frames."""

    code = "internal"


# --- model (meshnode/model) ---------------------------------------------------


class ModelError(MeshError):
    code = "model"


class ConfigError(ModelError):
    """A checkpoint's config is missing, unreadable or inconsistent."""

    code = "bad_config"


class UnknownArchitecture(ModelError):
    code = "unknown_architecture"


class MissingWeights(ModelError):
    """A checkpoint lacks a tensor the requested blocks need."""

    code = "missing_weights"


class ShapeMismatch(ModelError):
    code = "shape_mismatch"


class CacheOverflow(ModelError):
    """A step's positions do not fit the session's KV cache."""

    code = "cache_overflow"


class TokenizerError(ModelError):
    """A model's tokenizer or chat template is missing or cannot be built."""

    code = "bad_tokenizer"


# --- identity / TLS (meshnode/identity.py, meshnode/tls.py) ---------------------


class IdentityError(MeshError):
    code = "identity"


class PeerIdMismatch(IdentityError):
    """The peer at a pinned address presented another node id."""

    code = "peer_id_mismatch"


class BadAddress(MeshError):
    """An address string like ``host:port#<id>`` could not be parsed."""

    code = "bad_address"


# --- wire (meshnode/wire) ----------------------------------------------------


class WireError(MeshError):
    code = "wire"


class FrameTooLarge(WireError):
    code = "frame_too_large"


class MalformedFrame(WireError):
    code = "malformed_frame"


class UnknownMessageType(WireError):
    code = "unknown_message"


class BadTensor(WireError):
    """A tensor descriptor disagrees with the body or with itself."""

    code = "bad_tensor"


class UnknownDtype(BadTensor):
    code = "unknown_dtype"


class BadRequest(WireError):
    """A well-framed message whose fields are missing or of the wrong type."""

    code = "bad_request"


class RequestTimeout(WireError):
    code = "timeout"


class ConnectionClosed(WireError):
    code = "connection_closed"


class RemoteError(MeshError):
    """An error frame received from a peer."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- DHT (meshnode/dht) ------------------------------------------------------


class DHTError(MeshError):
    code = "dht"


class InvalidRecord(DHTError):
    """A record whose signature, signer, expiry or size is not acceptable."""

    code = "invalid_record"


class StorageFull(DHTError):
    """A node refuses a new sub-key: the key, or the node, holds its limit already."""

    code = "storage_full"


# --- worker / sessions (meshnode/worker) -------------------------------------


class WorkerError(MeshError):
    code = "worker"


class NoCapacity(WorkerError):
    code = "no_capacity"


class UnknownSession(WorkerError):
    code = "unknown_session"


class SpanNotServed(WorkerError):
    code = "span_not_served"


class SessionLimit(WorkerError):
    code = "session_limit"


class LengthLimit(WorkerError):
    """A session's max length over the worker's limit, or a step past the session's."""

    code = "length_limit"


class Overloaded(WorkerError):
    """A peer has too many requests waiting for this worker's compute thread."""

    code = "overloaded"


# --- client (meshnode/client) ------------------------------------------------


class ClientError(MeshError):
    code = "client"


class RouteNotFound(ClientError):
    """No set of live workers covers every block; ``missing`` lists them."""

    code = "route_not_found"

    def __init__(self, message: str, missing: tuple[int, ...] = ()):
        super().__init__(message)
        self.missing = missing
