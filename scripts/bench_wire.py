#!/usr/bin/env python
"""Wire throughput and latency: meshnode TLS connection vs a plain Python ``ssl`` socket.

Sends ``--total-mib`` of tensor frames (``--frame-mib`` each) to a server in
another process, once over a meshnode ``Endpoint`` (mutual TLS 1.3, framing,
request/response) and once over a plain ``ssl`` socket pair (mutual TLS 1.3,
``sendall``/``recv_into``, no framing), then measures small-request
round-trip times over the meshnode connection (and a plain ssl ping-pong for
reference). Prints MB/s for both and their ratio; ``--json`` for a JSON line.

Loopback figures on a shared machine are noisy, so ``--rounds`` repeats the
pair (plain ssl, then meshnode, each with a fresh child process) and reports
every round and the median ratio.

    .venv/bin/python scripts/bench_wire.py [--total-mib 256] [--frame-mib 4] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from cryptography.hazmat.primitives import serialization

from meshnode.identity import Identity, PeerAddress
from meshnode.wire.limits import WireLimits
from meshnode.wire.message import Message

MIB = 1024 * 1024
ACK = b"k"


# -- servers (run in a child process) -----------------------------------------


def serve_mesh() -> None:
    from twisted.internet import reactor

    from meshnode.wire.endpoint import Endpoint

    def sink(peer, message):
        return Message("sink", {"n": int(sum(t.nbytes for t in message.tensors))})

    def ping(peer, message):
        return Message("ping", message.fields)

    endpoint = Endpoint(reactor, Identity.ephemeral(), {"sink": sink, "ping": ping})
    endpoint.listen("127.0.0.1").addCallback(lambda address: print(address, flush=True))
    reactor.run()


def _write_pem(identity: Identity, folder: Path, name: str) -> tuple[str, str]:
    key = folder / f"{name}.key"
    cert = folder / f"{name}.pem"
    key.write_bytes(
        identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(identity.certificate.public_bytes(serialization.Encoding.PEM))
    return str(cert), str(key)


def _ssl_context(server: bool, folder: Path) -> ssl.SSLContext:
    """Mutual TLS 1.3 with self-signed node certificates, each side trusting the other's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    ours, theirs = ("server", "client") if server else ("client", "server")
    context.load_cert_chain(str(folder / f"{ours}.pem"), str(folder / f"{ours}.key"))
    context.load_verify_locations(str(folder / f"{theirs}.pem"))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve_ssl(total: int, pings: int, folder: Path) -> None:
    context = _ssl_context(True, folder)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    raw, _ = listener.accept()
    with context.wrap_socket(raw, server_side=True) as conn:
        buffer = bytearray(4 * MIB)
        view = memoryview(buffer)
        received = 0
        while received < total:
            n = conn.recv_into(view, min(len(view), total - received))
            if not n:
                return
            received += n
        conn.sendall(ACK)
        for _ in range(pings):
            conn.sendall(conn.recv(64))


# -- clients -------------------------------------------------------------------


def _spawn(*args: str) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip()


def bench_ssl(total: int, frame: int, pings: int) -> dict:
    folder = Path(tempfile.mkdtemp())
    _write_pem(Identity.ephemeral(), folder, "server")
    _write_pem(Identity.ephemeral(), folder, "client")
    child, port = _spawn(
        "--serve",
        "ssl",
        "--total-bytes",
        str(total),
        "--pings",
        str(pings),
        "--folder",
        str(folder),
    )
    try:
        context = _ssl_context(False, folder)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", int(port)))) as conn:
            payload = memoryview(np.ones(frame // 4, np.float32).view(np.uint8))
            gc.collect()
            cpu = _CpuClock(child.pid)
            started = time.perf_counter()
            for _ in range(total // frame):
                conn.sendall(payload)
            assert conn.recv(1) == ACK
            elapsed = time.perf_counter() - started
            cpu_s = cpu.seconds()
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                conn.sendall(b"p" * 16)
                conn.recv(64)
                rtts.append(time.perf_counter() - t0)
            cipher = conn.cipher()
    finally:
        child.wait(timeout=30)
    return {
        "mb_s": total / elapsed / 1e6,
        "seconds": elapsed,
        **cpu_s,
        "cipher": cipher[0],
        "tls": cipher[1],
        **_percentiles(rtts),
    }


async def bench_mesh(reactor, total: int, frame: int, pings: int) -> dict:
    from twisted.internet import defer

    from meshnode.wire.endpoint import Endpoint

    child, address_text = _spawn("--serve", "mesh")
    try:
        address = PeerAddress.parse(address_text)
        endpoint = Endpoint(reactor, Identity.ephemeral(), {}, WireLimits())
        tensor = np.ones(frame // 4, np.float32)
        await endpoint.request(address, Message("ping"))  # dial + handshake outside the timing
        # The first full collection after start-up walks every imported object
        # (~100 ms here): run it now rather than inside the timed transfer.
        gc.collect()
        cpu = _CpuClock(child.pid)
        started = time.perf_counter()
        replies = await defer.gatherResults(
            [
                endpoint.request(address, Message("sink", {}, (tensor,)), timeout=120)
                for _ in range(total // frame)
            ]
        )
        elapsed = time.perf_counter() - started
        cpu_s = cpu.seconds()
        assert sum(reply.fields["n"] for reply in replies) == total
        rtts = []
        for i in range(pings):
            t0 = time.perf_counter()
            await endpoint.request(address, Message("ping", {"i": i}))
            rtts.append(time.perf_counter() - t0)
        protocol = endpoint._by_node[address.node_id]
        handle = protocol.transport.getHandle()
        stats = endpoint.stats_for(address.node_id)
        result = dict(
            mb_s=total / elapsed / 1e6,
            seconds=elapsed,
            **cpu_s,
            cipher=handle.get_cipher_name(),
            tls=handle.get_protocol_version_name(),
            frame_bytes_sent=stats.bytes_sent,
            **_percentiles(rtts),
        )
        await endpoint.close()
    finally:
        child.terminate()
        child.wait(timeout=30)
    return result


def bench_rounds(rounds: int, total: int, frame: int, pings: int) -> list[dict]:
    """``rounds`` times: plain ssl (blocking, the reactor idle), then meshnode."""
    from twisted.internet import defer, task

    results: list[dict] = []

    async def run(reactor) -> None:
        for _ in range(rounds):
            plain = bench_ssl(total, frame, pings)
            mesh = await bench_mesh(reactor, total, frame, pings)
            results.append(
                {"meshnode": mesh, "plain_ssl": plain, "ratio": mesh["mb_s"] / plain["mb_s"]}
            )

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit_:
        if exit_.code:
            raise
    return results


class _CpuClock:
    """CPU seconds spent by this process and by the server child since creation.

    On a shared machine wall-clock MB/s moves with the other load; CPU time
    per side says where the work is. The child's comes from /proc (Linux);
    elsewhere it is reported as NaN.
    """

    def __init__(self, child_pid: int) -> None:
        self._stat = Path(f"/proc/{child_pid}/stat")
        self._ours, self._theirs = time.process_time(), self._child()

    def _child(self) -> float:
        try:
            fields = self._stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def seconds(self) -> dict:
        return {
            "client_cpu_s": time.process_time() - self._ours,
            "server_cpu_s": self._child() - self._theirs,
        }


def _percentiles(rtts: list[float]) -> dict:
    if not rtts:
        return {}
    ms = np.array(rtts) * 1e3
    return {"rtt_p50_ms": float(np.percentile(ms, 50)), "rtt_p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--frame-mib", type=int, default=4)
    parser.add_argument("--pings", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=["mesh", "ssl"], help=argparse.SUPPRESS)
    parser.add_argument("--total-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "mesh":
        return serve_mesh()
    if args.serve == "ssl":
        return serve_ssl(args.total_bytes, args.pings, args.folder)
    total, frame = args.total_mib * MIB, args.frame_mib * MIB
    rounds = bench_rounds(args.rounds, total, frame, args.pings)
    report = {
        "total_mib": args.total_mib,
        "frame_mib": args.frame_mib,
        "pings": args.pings,
        "rounds": rounds,
        "median_ratio": float(np.median([r["ratio"] for r in rounds])),
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.total_mib} MiB in {args.frame_mib} MiB frames, one connection, loopback")
    for number, figures in enumerate(rounds, 1):
        print(f" round {number}: ratio meshnode / plain ssl {figures['ratio']:.2f}")
        for name in ("meshnode", "plain_ssl"):
            f = figures[name]
            print(
                f"  {name:10s} {f['mb_s']:8.1f} MB/s  cpu s client {f['client_cpu_s']:.2f}"
                f" server {f['server_cpu_s']:.2f}  rtt p50 {f['rtt_p50_ms']:.3f} ms"
                f"  p99 {f['rtt_p99_ms']:.3f} ms  ({f['tls']}, {f['cipher']})"
            )
    print(f"median ratio meshnode / plain ssl: {report['median_ratio']:.2f}")


if __name__ == "__main__":
    main()
