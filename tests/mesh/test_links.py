"""A worker's links: round trips to its route neighbours, measured on a fake clock and
published bounded; and the batching numbers it reads from its compute."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.defer import succeed
from twisted.internet.task import Clock, deferLater

from meshnode.inference.records import MAX_BATCH_POINTS, BlockSpan, ServerInfo, WorkerState
from meshnode.worker.announce import batching_fields
from meshnode.worker.links import LinkProber, PeerRtts, neighbour_blocks

OWN = b"\1" * 32


def nid(n: int) -> bytes:
    return bytes([n]) * 32


def test_smoothed_round_trip_and_bounded_most_recent_map():
    """When round trips are observed, then each peer's is smoothed, and only the most
    recently measured peers are published, by node-id prefix."""
    clock = Clock()
    rtts = PeerRtts(clock, limit=2)
    rtts.observe(nid(2), 0.010)
    rtts.observe(nid(2), 0.030)
    assert rtts.get(nid(2)) == 0.015
    clock.advance(1)
    rtts.observe(nid(3), 0.020)
    clock.advance(1)
    rtts.observe(nid(4), 0.040)
    assert rtts.published() == ((nid(3)[:8], 0.020), (nid(4)[:8], 0.040))
    assert rtts.stalest(2, among=[nid(4), nid(5), nid(2)]) == [nid(5), nid(2)]


def test_neighbours_are_the_blocks_either_side_of_the_span():
    """When a worker serves a span, then its neighbours serve the block before and the block
    at its end, where the model has them."""
    assert neighbour_blocks(BlockSpan(10, 20), 30) == [9, 20]
    assert neighbour_blocks(BlockSpan(0, 10), 30) == [10]
    assert neighbour_blocks(BlockSpan(0, 30), 30) == []


class FakeDHT:
    def __init__(self, by_block: dict[bytes, dict[bytes, ServerInfo]]):
        self.by_block = by_block

    def get(self, key: bytes):
        found = self.by_block.get(key, {})
        return succeed({n: SimpleNamespace(value=i.to_record()) for n, i in found.items()})


class FakeEndpoint:
    """Answers ``infer.info`` after ``delays[port]`` seconds of the clock; dials count."""

    def __init__(self, clock: Clock, delays: dict[int, float]):
        self.clock = clock
        self.delays = delays
        self.identity = SimpleNamespace(node_id=OWN)
        self.connected: set[int] = set()
        self.requests: list[int] = []

    def stats_for(self, node_id: bytes):
        return object() if node_id[0] in self.connected else None

    def request(self, address, message, timeout):
        self.requests.append(address.port)
        node = address.node_id[0]
        delay = self.delays[address.port] * (1 if node in self.connected else 3)
        self.connected.add(node)
        return deferLater(self.clock, delay, lambda: None)


def info(n: int, span: BlockSpan, port: int) -> ServerInfo:
    return ServerInfo(f"127.0.0.1:{port}#{nid(n).hex()}", span, WorkerState.ONLINE, 10.0, 100,
                      "float32", "m")


def test_probe_measures_each_neighbour_without_its_handshake():
    """When the prober runs a round, then it pings every worker of the neighbouring blocks
    (not itself), twice when it had to dial (the first includes the handshake), keeps the
    second round trip, and says so once when it measured peers it did not know."""
    clock = Clock()
    keys = {b: bytes([b]) * 32 for b in range(30)}
    dht = FakeDHT({
        keys[9]: {nid(2): info(2, BlockSpan(0, 10), 4002), OWN: info(1, BlockSpan(10, 20), 4001)},
        keys[20]: {nid(3): info(3, BlockSpan(20, 30), 4003)},
    })
    endpoint = FakeEndpoint(clock, {4002: 0.004, 4003: 0.050})
    news = []
    prober = LinkProber(dht, endpoint, clock, keys.__getitem__, BlockSpan(10, 20), 30,
                        PeerRtts(clock), on_new_peers=lambda: news.append(clock.seconds()))
    done = prober.probe()
    clock.pump([0.001] * 400)
    assert done.called and len(news) == 1
    prober.probe()
    clock.pump([0.001] * 400)
    assert len(news) == 1  # the same peers again: nothing new to announce
    assert sorted(endpoint.requests) == [4002, 4002, 4002, 4003, 4003, 4003]
    assert abs(prober.rtts.get(nid(2)) - 0.004) < 0.0015
    assert abs(prober.rtts.get(nid(3)) - 0.050) < 0.0015
    assert prober.rtts.get(OWN) is None


def test_batching_fields_come_from_the_compute_when_it_has_them():
    """When the compute reports its load and batch curve, then the record fields carry them
    (a long curve thinned to the bound, its ends kept); a compute without them gives none."""
    assert batching_fields(SimpleNamespace()) == {}
    curve = [(b, 10.0 * b) for b in range(1, 33)]
    compute = SimpleNamespace(batch_load=lambda: 3, batch_throughput=lambda: curve)
    fields = batching_fields(compute)
    assert fields["batch_load"] == 3
    points = fields["batch_throughput"]
    assert len(points) == MAX_BATCH_POINTS
    assert points[0] == (1, 10.0) and points[-1] == (32, 320.0)
    ServerInfo("127.0.0.1:1#" + "ab" * 32, BlockSpan(0, 1), WorkerState.ONLINE, 10.0, 1,
               "float32", "m", **fields)
