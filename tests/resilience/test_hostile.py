"""Hostile input against a live worker and a live DHT node, over real TLS.

A raw TLS client with a valid certificate writes (1) random bytes, (2) frame
prefixes announcing sizes over the limits, and (3) well-framed messages whose
header fields, tensor descriptors and bodies are mutated at random. Each time
the node must answer with an error frame (or a response, when the mutation
left a valid request), close the connection, or (for bytes that are not yet
a whole frame, or frames that are not requests) wait for more: never crash,
never grow its memory without bound. Meanwhile an honest client keeps
generating through the same nodes, and its tokens equal local greedy output.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from meshnode.client.generate import GenerationOptions
from meshnode.dht import messages as dht_messages
from meshnode.identity import Identity
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.codec import encode_message
from meshnode.wire.header import KINDS, MAX_REQUEST_ID, REQUEST
from meshnode.wire.limits import MAX_HEADER_BYTES
from tests.mesh.mesh_helpers import prompts
from tests.resilience.memory_probe import MIB, rss
from tests.resilience.raw_client import exchange, frame, tls_context
from tests.resilience.resilience_helpers import make_client, reactor, start_mesh, with_timeout

EXAMPLES = 40
#: memory a warmed-up node may gain over the whole storm (allocator slack, odd cache shapes)
MAX_GROWTH = 64 * MIB
HIDDEN = 64
STORM_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=48),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def hostile_mesh(tiny_checkpoint, tmp_path_factory):
    # no background precompiling: its programs landing mid-storm would read as growth
    mesh = start_mesh(str(tiny_checkpoint), ["0:6"], tmp_path_factory.mktemp("hostile"),
                      ["--no-precompile"])
    client = None
    try:
        client = make_client(mesh, str(tiny_checkpoint), step_timeout=30.0)
        yield mesh, client, tmp_path_factory.mktemp("hostile-cert")
    finally:
        if client is not None:
            pytest_twisted.blockon(client.close())
        mesh.stop()


def base_messages(model: str) -> list[Any]:
    """Valid requests of every kind the nodes serve, to mutate."""
    hidden = np.zeros((1, 2, HIDDEN), np.float32)
    return [
        messages.build_info(),
        messages.build_open(model, BlockSpan(0, 6), 32),
        messages.build_step(b"\1" * 16, BlockSpan(0, 6), 0, hidden),
        messages.build_close(b"\2" * 16),
        dht_messages.ping(4000),
        dht_messages.find_node(None, b"\3" * 32),
        dht_messages.find_value(4000, b"\4" * 32),
    ]


def split(message: Any, request_id: int) -> tuple[dict, bytes]:
    """A message as its decoded CBOR header and raw body."""
    import cbor2

    parts = encode_message(REQUEST, request_id, message)
    return cbor2.loads(bytes(parts[1])), b"".join(bytes(p) for p in parts[2:])


@st.composite
def mutated_frames(draw: Any, model: str) -> tuple[Any, bytes]:
    """A valid request with 1-3 of its header paths replaced, deleted or added to, and its
    body kept, resized or replaced."""
    header, body = split(draw(st.sampled_from(base_messages(model))), draw(st.integers(1, 999)))
    for _ in range(draw(st.integers(1, 3))):
        header = _mutate(draw, header)
    body = draw(
        st.sampled_from([body, body[: len(body) // 2], body + b"\0" * 64, b""])
        | st.binary(max_size=512)
    )
    return header, body


def _mutate(draw: Any, value: Any) -> Any:
    """Replace ``value`` or one thing inside it (recursively) with a random CBOR value."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        action = draw(st.sampled_from(["descend", "delete", "add"]))
        copy = dict(value)
        if action == "delete":
            del copy[key]
        elif action == "add":
            copy[draw(st.text(max_size=8))] = draw(cbor_values)
        else:
            copy[key] = _mutate(draw, value[key])
        return copy
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        return value[:index] + [_mutate(draw, value[index])] + value[index + 1 :]
    return draw(cbor_values)


def expected_answer_id(header: Any) -> int | None:
    """The id a node must answer: the request's own, 0 for an unusable envelope, None for
    a well-formed response or error frame (answers to nothing we asked)."""
    if not isinstance(header, dict):
        return 0
    request_id, kind = header.get("id"), header.get("kind")
    valid_id = (
        isinstance(request_id, int)
        and not isinstance(request_id, bool)
        and 0 <= request_id <= MAX_REQUEST_ID
    )
    if not valid_id or kind not in KINDS:
        return 0
    return request_id if kind == REQUEST else None


def storm(context: Any, address: Any, model: str, stop: threading.Event) -> int:
    """Every hostile strategy against ``address``; returns how many exchanges were made."""
    count = [0]

    @STORM_SETTINGS
    @given(st.binary(min_size=1, max_size=2048))
    def random_bytes(data: bytes) -> None:
        outcome = exchange(context, address, data)
        assert all(isinstance(h, dict) and h.get("kind") == "error" for h in outcome.headers)
        count[0] += 1

    @STORM_SETTINGS
    @given(
        st.integers(MAX_HEADER_BYTES + 1, 2**32 - 1) | st.just(MAX_HEADER_BYTES + 1),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
    )
    def oversized_prefix(header_length: int, body_length: int, tail: bytes) -> None:
        data = header_length.to_bytes(4, "big") + body_length.to_bytes(4, "big") + tail
        outcome = exchange(context, address, data, quiet_after=10.0)
        assert outcome.closed
        assert [h["fields"]["code"] for h in outcome.headers] == ["frame_too_large"]
        count[0] += 1

    @STORM_SETTINGS
    @given(mutated_frames(model))
    def mutated(header_and_body: tuple[Any, bytes]) -> None:
        header, body = header_and_body
        answer_id = expected_answer_id(header)
        outcome = exchange(context, address, frame(header, body), answer_id=answer_id)
        if answer_id is not None:
            answer = outcome.answer_to(answer_id)
            assert answer is not None, f"no answer to {header!r}"
            assert answer["kind"] in ("response", "error")
        count[0] += 1

    for strategy in (random_bytes, oversized_prefix, mutated):
        if not stop.is_set():
            strategy()
    return count[0]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_storm_of_hostile_input_while_an_honest_client_is_served(hostile_mesh, tiny_local):
    """When random, oversized and mutated frames hit a worker and a DHT node, then each gets an
    error frame, a clean close or (for incomplete input) silence; both nodes stay up with
    bounded memory, the hostile sessions are freed, and an honest client generating all the
    while gets exactly local greedy tokens."""
    mesh, client, cert_folder = hostile_mesh
    worker, dht_node = mesh.workers()[-1], mesh.bootstrap
    model = client.source.fingerprint
    context = tls_context(Identity.ephemeral(), cert_folder)
    for ids in prompts(4, 128, seed=30):  # compile the worker's shapes before measuring
        await with_timeout(client.generate_ids(ids, GenerationOptions(max_new_tokens=6)))
    before = {node.name: rss(node.pid) for node in (worker, dht_node)}
    stop = threading.Event()

    def both_storms() -> int:
        try:
            return sum(storm(context, node.address, model, stop) for node in (worker, dht_node))
        finally:
            stop.set()

    storms = deferToThread(both_storms)
    honest = 0
    for ids in prompts(50, 128, seed=31):
        result = await with_timeout(client.generate_ids(ids, GenerationOptions(max_new_tokens=6)))
        local = tiny_local.generate(prompt_ids=ids, max_new_tokens=6)
        assert list(result.token_ids) == list(local.token_ids)
        honest += 1
        if stop.is_set() and honest >= 3:
            break
    exchanges = await with_timeout(storms, 600)
    assert exchanges >= 5 * EXAMPLES and honest >= 3
    for node in (worker, dht_node):
        assert node.alive(), node.log_tail()
        growth = rss(node.pid) - before[node.name]
        print(
            f"\n{node.name}: RSS {before[node.name] / MIB:.1f} -> {rss(node.pid) / MIB:.1f} MiB"
            f" over {exchanges} hostile exchanges ({honest} honest generations meanwhile)"
        )
        assert growth <= MAX_GROWTH

    for _ in range(200):  # disconnects are processed asynchronously: a bounded poll
        info = await with_timeout(client.endpoint.request(worker.address, messages.build_info()))
        if info.fields["sessions"] == 0:
            break
        await deferLater(reactor(), 0.05, lambda: None)
    else:
        raise AssertionError(f"{info.fields['sessions']} hostile sessions were not freed")
    result = await with_timeout(
        client.generate_ids(prompts(1, 128, seed=99)[0], GenerationOptions(max_new_tokens=6))
    )
    assert len(result.token_ids) == 6
