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
    """Base of the model engine's errors: raised while opening, loading or running a model."""

    code = "model"


class ConfigError(ModelError):
    """A checkpoint's config is missing, unreadable or inconsistent."""

    code = "bad_config"


class UnknownArchitecture(ModelError):
    """A checkpoint's architecture (HF ``architectures`` / GGUF ``general.architecture``) is not
    one the engine composes.
    """

    code = "unknown_architecture"


class MissingWeights(ModelError):
    """A checkpoint lacks a tensor the requested blocks need."""

    code = "missing_weights"


class ShapeMismatch(ModelError):
    """A tensor handed to a block, span or head has the wrong rank, size or dtype for the model."""

    code = "shape_mismatch"


class CacheOverflow(ModelError):
    """A step's positions do not fit the session's KV cache."""

    code = "cache_overflow"


class TokenizerError(ModelError):
    """A model's tokenizer or chat template is missing or cannot be built."""

    code = "bad_tokenizer"


# --- identity / TLS (meshnode/identity.py, meshnode/tls.py) ---------------------


class IdentityError(MeshError):
    """A key file cannot be read or written, or a peer's certificate carries no usable Ed25519 key.
    """

    code = "identity"


class PeerIdMismatch(IdentityError):
    """The peer at a pinned address presented another node id."""

    code = "peer_id_mismatch"


class BadAddress(MeshError):
    """An address string like ``host:port#<id>`` could not be parsed."""

    code = "bad_address"


# --- wire (meshnode/wire) ----------------------------------------------------


class WireError(MeshError):
    """Base of the wire's errors: raised while framing, parsing or exchanging messages with a peer.
    """

    code = "wire"


class FrameTooLarge(WireError):
    """A peer announced (in the length prefix) a header or body over the limits; it is dropped."""

    code = "frame_too_large"


class MalformedFrame(WireError):
    """A frame's header is not valid CBOR of the expected shape, or its version is not ours."""

    code = "malformed_frame"


class UnknownMessageType(WireError):
    """A request names a message type no handler is registered for."""

    code = "unknown_message"


class BadTensor(WireError):
    """A tensor descriptor disagrees with the body or with itself."""

    code = "bad_tensor"


class UnknownDtype(BadTensor):
    """A tensor descriptor names a dtype that is not on the wire's list."""

    code = "unknown_dtype"


class BadRequest(WireError):
    """A well-framed message whose fields are missing or of the wrong type."""

    code = "bad_request"


class RequestTimeout(WireError):
    """A request got no answer (or its dial did not complete) within its timeout."""

    code = "timeout"


class ConnectionClosed(WireError):
    """The connection a request was waiting on closed before its answer came, or could not be made.
    """

    code = "connection_closed"


class RemoteError(MeshError):
    """A peer answered a request with an error frame; ``code`` and ``message`` are its own.

    ``retry_after``: seconds after which the peer invites a retry, when its
    error frame said so (``no_capacity``, ``overloaded``), else ``None``.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


# --- DHT (meshnode/dht) ------------------------------------------------------


class DHTError(MeshError):
    """Base of the DHT's errors; also raised when no bootstrap peer answers."""

    code = "dht"


class InvalidRecord(DHTError):
    """A record whose signature, signer, expiry or size is not acceptable."""

    code = "invalid_record"


class StorageFull(DHTError):
    """A node refuses a new sub-key: the key, or the node, holds its limit already."""

    code = "storage_full"


# --- worker / sessions (meshnode/worker) -------------------------------------


class WorkerError(MeshError):
    """Base of the errors a worker answers a session request with."""

    code = "worker"


class NoCapacity(WorkerError):
    """A session's cache does not fit the free room of the worker's cache-token budget now."""

    code = "no_capacity"


class UnknownSession(WorkerError):
    """A step or close names a session this worker does not hold for that peer (never opened,
    closed, timed out).
    """

    code = "unknown_session"


class SpanNotServed(WorkerError):
    """A session asks for blocks outside the worker's span, or for another model."""

    code = "span_not_served"


class SessionLimit(WorkerError):
    """A peer already holds the most sessions a worker allows one peer."""

    code = "session_limit"


class LengthLimit(WorkerError):
    """A session's max length over the worker's limit, or a step past the session's."""

    code = "length_limit"


class Overloaded(WorkerError):
    """A peer has too many requests waiting for this worker's compute thread."""

    code = "overloaded"


class BadCapability(WorkerError):
    """A forwarded step (``infer.push``) carries no capability, one issued for another
    session, receiver, sender or position, or one whose signature is not the session
    owner's: it is refused and the session is left as it was."""

    code = "bad_capability"


class WaitExpired(WorkerError):
    """A client's ``infer.wait`` for a hop's output got none within the worker's bound
    (the step was never pushed, or another wait for the same position replaced it)."""

    code = "wait_expired"


class ForwardFailed(WorkerError):
    """A worker could not push its output into the next hop's session (refused, error,
    connection refused or lost, no answer in time). Raised on the client from the
    worker's report; ``node_id`` and ``address`` name the failing next hop, which is
    the one to ban and replace (not the messenger)."""

    code = "forward_failed"

    def __init__(self, message: str, node_id: bytes = b"", address: str = "",
                 cause_code: str = ""):
        super().__init__(message)
        self.node_id = node_id
        self.address = address
        self.cause_code = cause_code


class RetryLater(NoCapacity):
    """A session could not be opened now (its open waited for room that did not come);
    ``retry_after`` says in how many seconds room is expected (it travels in the error frame)."""

    code = "no_capacity"

    def __init__(self, message: str, retry_after: float):
        super().__init__(f"{message}; retry after {retry_after:.1f} s")
        self.retry_after = float(retry_after)


# --- private swarms (meshnode/swarm) -------------------------------------------


class SwarmError(MeshError):
    """A swarm key, public key, membership certificate or revocation list is missing or
    unreadable, or a swarm command was given bad arguments."""

    code = "swarm"


class NotAMember(SwarmError):
    """A peer (at connection set-up) or a DHT record's writer did not prove membership of
    our private swarm: no certificate, another swarm's, a bad signature, expired or revoked."""

    code = "not_a_member"


# --- client (meshnode/client) ------------------------------------------------


class ClientError(MeshError):
    """Base of errors the client raises itself (not a worker's fault): nothing to retry elsewhere.
    """

    code = "client"


class RouteNotFound(ClientError):
    """No set of live workers covers every block; ``missing`` lists them."""

    code = "route_not_found"

    def __init__(self, message: str, missing: tuple[int, ...] = ()):
        super().__init__(message)
        self.missing = missing


class OutputMismatch(ClientError):
    """A verified generation found a worker's span output disagreeing with another replica's;
    ``position``: the last position verified on every hop, where the generation resumes
    (on other workers, the liar banned). Raised inside the generation loop, caught by the
    verified driver (``meshnode.client.verify``)."""

    code = "output_mismatch"

    def __init__(self, message: str, position: int, liars: frozenset = frozenset()):
        super().__init__(message)
        self.position = position
        self.liars = liars


class GenerationInterrupted(ClientError):
    """A generation failed after it had produced tokens; those are kept, with the cause.

    ``token_ids`` and ``text`` are what was generated before the failure
    (``__cause__`` is the failure itself, whose message this one repeats).
    """

    def __init__(self, cause: BaseException, token_ids: tuple[int, ...] = (), text: str = ""):
        super().__init__(str(cause) or type(cause).__name__)
        self.token_ids = tuple(token_ids)
        self.text = text
        code = getattr(cause, "code", None)
        if isinstance(code, str):
            self.code = code


# --- HTTP API (meshnode/serve) -------------------------------------------------


class ApiError(MeshError):
    """Base of the errors ``meshnode serve`` answers with an OpenAI error object;
    ``status`` is the HTTP status, ``param`` the request field at fault (or None)."""

    code = "api_error"
    status = 500
    kind = "server_error"
    param: str | None = None


class InvalidParameter(ApiError):
    """A request's JSON body is malformed or one of its fields is bad; names the field."""

    code = "invalid_parameter"
    status = 400
    kind = "invalid_request_error"

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class UnknownModel(ApiError):
    """A request names a model this server does not serve."""

    code = "model_not_found"
    status = 404
    kind = "invalid_request_error"
    param = "model"


class Unauthorized(ApiError):
    """``--api-key`` is set and a request has no ``Authorization: Bearer`` key, or a wrong one."""

    code = "invalid_api_key"
    status = 401
    kind = "invalid_request_error"


class BodyTooLarge(ApiError):
    """A request's body is over ``meshnode serve``'s limit (``--max-body``); it was not read
    past the limit."""

    code = "request_too_large"
    status = 413
    kind = "invalid_request_error"


class SwarmUnavailable(ApiError):
    """The swarm cannot serve a request now (blocks not covered, no capacity); says why."""

    code = "swarm_unavailable"
    status = 503
    kind = "service_unavailable"
