"""Verified outputs: recompute steps on a second replica, ban a worker that lies, roll back.

With ``verify_rate`` R > 0 (``MeshClient(verify_rate=R)``, ``--verify-rate R``):

- **Replicas.** Each hop of the chain gets a second replica: a route over exactly
  that hop's blocks through other workers (the one discovery path, with the
  hop's worker and every banned worker left out). It is kept in sync by
  mirroring the hop's inputs: each step's input goes to the replica at the
  same time as to the hop (queued behind the replica's previous step), off
  the critical path, and its output is compared with the hop's when both
  are in, position by position, by relative L2 error within a tolerance fit
  for the dtype (``tolerance``: 1e-3 float32, 5e-2 for 16-bit floats; honest
  float32 CPU replicas agree bit for bit, a liar's noise of its own scale
  is ~1).
- **Checks.** After each step, with probability R (every step when R >= 1,
  before the step's token is sampled), the client waits for every replica to
  catch up and judges: everything mirrored so far is then verified. Every
  generation ends with a check, so its returned tokens are verified whatever
  R is; R sets how soon a liar is caught and how fresh the stream is (tokens
  reach ``on_token`` only once verified). The replica's compute is spent on
  every step whatever R is; R only sets how often the client waits for it.
- **Mismatch.** A third replica (other workers again) recomputes the first
  disagreeing position; whoever disagrees with it is the liar. Without a third
  replica the client's record of past checks decides (the worker with more
  agreements with others is believed; on a tie both are banned). Liars are
  banned for as long as the client lives (``LifetimeBans``), and the
  generation goes back to the last position verified on every hop and goes on
  from there on a new route (``OutputMismatch`` carries that position; the
  tokens before it are kept).
- **Measured speed.** Each decode step's time on each worker is recorded
  (``TrustRecord``); route choice then uses the measured speed instead of the
  announced one (``discover_route(throughputs=...)``).

With forwarding (the default), each hop is mirrored once it has run, from
the input and output the client received for it (``meshnode.client.chain``);
speeds are then measured only by hop-by-hop steps (``forwarding=False``).
A hop with no second replica available is not verified (logged once per
span). Hooks: the ``Verifier`` is the chain's recovery object (it wraps
``SpanRecovery``); ``verified_generation`` replaces ``MeshClient._generate``'s
body when R > 0.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger

from meshnode.client.chain import LOST, HopFailure, InferenceChain, SpanSession
from meshnode.client.defaults import DEFAULT_VERIFY_RATE  # noqa: F401  (re-exported)
from meshnode.client.generate import MeshGenerationResult, StopRequest, drive, interrupted
from meshnode.client.recovery import BanList, SpanRecovery, recoverable
from meshnode.client.routing import discovery
from meshnode.client.routing.route import NodeID, Route
from meshnode.errors import ClientError, MeshError, OutputMismatch, RouteNotFound
from meshnode.inference.records import BlockSpan
from meshnode.model.decoding import Generation
from meshnode.model.sampling import Sampler

#: relative L2 error per position allowed between two replicas, by the wider dtype
TOLERANCE = {"float32": 1e-3, "float64": 1e-3, "float16": 5e-2, "bfloat16": 5e-2}
#: times one generation may go back to its last verified position
MAX_ROLLBACKS = 4
#: weight of the newest step time in the running average of a worker's speed
SPEED_SMOOTHING = 0.5

log = Logger()


def tolerance(*dtypes: str) -> float:
    """The relative error allowed when comparing outputs computed in these dtypes."""
    return max(TOLERANCE.get(str(d), 5e-2) for d in dtypes) if dtypes else TOLERANCE["float32"]


def first_mismatch(primary: np.ndarray, replica: np.ndarray, tol: float) -> int | None:
    """The first position of ``[1, T, H]`` outputs whose relative L2 error exceeds ``tol``."""
    a = np.asarray(primary, np.float32)[0]  # [T, H]
    b = np.asarray(replica, np.float32)[0]  # [T, H]
    error = np.linalg.norm(a - b, axis=-1) / (np.linalg.norm(b, axis=-1) + 1e-6)  # [T]
    bad = np.nonzero(~(error <= tol))[0]  # NaN counts as a mismatch
    return int(bad[0]) if bad.size else None


class LifetimeBans(BanList):
    """A ``BanList`` whose liars stay banned for as long as the client lives."""

    def __init__(self, clock: Any, **options: Any):
        super().__init__(clock, **options)
        self.liars: set[NodeID] = set()

    def ban_for_life(self, node_id: NodeID) -> None:
        self.liars.add(node_id)

    def is_banned(self, node_id: NodeID) -> bool:
        return node_id in self.liars or super().is_banned(node_id)

    def banned(self) -> frozenset[NodeID]:
        return super().banned() | frozenset(self.liars)


class TrustRecord:
    """What a client learned about workers: checks passed with others, measured speed. Pure."""

    def __init__(self) -> None:
        self.agreements: dict[NodeID, int] = {}
        self._block_seconds: dict[NodeID, tuple[float, int]] = {}  # per block-token, span len

    def agreed(self, node_ids: set[NodeID]) -> None:
        for node_id in node_ids:
            self.agreements[node_id] = self.agreements.get(node_id, 0) + 1

    def judge(self, primary: NodeID, replica: set[NodeID]) -> set[NodeID]:
        """Without a third replica: the side with fewer past agreements lied (both on a tie)."""
        mine = self.agreements.get(primary, 0)
        theirs = min((self.agreements.get(n, 0) for n in replica), default=0)
        if mine > theirs:
            return set(replica)
        if theirs > mine:
            return {primary}
        return {primary, *replica}

    def step_took(self, node_id: NodeID, blocks: int, tokens: int, seconds: float,
                  span_length: int) -> None:
        """One step of ``tokens`` positions over ``blocks`` blocks took ``seconds``."""
        sample = seconds / max(1, blocks * tokens)
        old = self._block_seconds.get(node_id)
        value = sample if old is None else (
            SPEED_SMOOTHING * sample + (1 - SPEED_SMOOTHING) * old[0])
        self._block_seconds[node_id] = (value, span_length)

    def throughputs(self) -> dict[NodeID, float]:
        """Measured speeds in the unit of ``ServerInfo.throughput`` (tokens/s over the span)."""
        return {n: 1.0 / max(s * length, 1e-9) for n, (s, length) in self._block_seconds.items()}


@dataclasses.dataclass
class _Replica:
    """A second replica of one hop: its sessions, its queue of mirrored steps, what it proved."""

    sessions: list[SpanSession]
    tail: Deferred
    verified: int = 0
    mismatch: tuple[int, np.ndarray, np.ndarray] | None = None  # position, primary, replica
    broken: bool = False

    @property
    def node_ids(self) -> set[NodeID]:
        return {s.hop.node_id for s in self.sessions}


class Verifier:
    """A chain's recovery object that also checks steps on second replicas (module doc)."""

    #: what replica and referee sessions are made of (tests give in-memory ones)
    session_type: Any = SpanSession

    def __init__(self, recovery: SpanRecovery, record: TrustRecord, bans: LifetimeBans,
                 rate: float, rng: random.Random, max_length: int):
        self.recovery = recovery
        self.record = record
        self.bans = bans
        self.rate = rate
        self.rng = rng
        self.max_length = max_length
        self.on_verified: Any = None
        self.verified_position = 0
        self.checks = 0
        self._replicas: dict[SpanSession, _Replica | None] = {}
        self._unverifiable: set[BlockSpan] = set()
        self._spare: list[SpanSession] = []

    async def reopen(self, chain: Any, failed: Any) -> None:
        await self.recovery.reopen(chain, failed)

    async def forward(self, chain: InferenceChain, hidden: np.ndarray) -> np.ndarray:
        """The step through the chain (forwarded worker to worker when the chain forwards,
        else hop by hop), each hop's input mirrored to its replica (a failed hop replaced as
        ``SpanRecovery`` does); then, with probability ``rate``, a check."""
        if chain.forwarding:
            hidden = await self._forwarded(chain, hidden)
        else:
            hidden = await self._hop_by_hop(chain, hidden)
        if self.rate >= 1.0 or self.rng.random() < self.rate:
            await self.check(chain)
        return hidden

    async def _hop_by_hop(self, chain: InferenceChain, hidden: np.ndarray) -> np.ndarray:
        """Each hop in order, its input mirrored to its replica at the same time; decode
        steps measure each hop's speed."""
        clock = self.recovery.clock
        index, failures = 0, 0
        while index < len(chain.sessions):
            session = chain.sessions[index]
            start, began = session.position, clock.seconds()
            replica = await self._replica_for(session)
            mirrored = self._mirror(replica, hidden) if replica is not None else None
            try:
                out = await session.step(hidden)
            except Exception as error:
                failures += 1
                if not recoverable(error) or failures > self.recovery.options.max_attempts:
                    raise
                self._drop_replica(session)
                chain.sessions[index : index + 1] = await self.recovery.replace(
                    session, error, chain.abandoned)
                continue
            if hidden.shape[1] == 1:
                self.record.step_took(session.hop.node_id, session.span.length, 1,
                                      clock.seconds() - began, session.hop.info.span.length)
            if mirrored is not None:
                mirrored.addCallback(self._compare, replica, start, out)
            hidden = out
            index += 1
        return hidden

    async def _forwarded(self, chain: InferenceChain, hidden: np.ndarray) -> np.ndarray:
        """Forwarded steps (``InferenceChain.advance``); each hop that ran has its input (its
        history) and output (the next hop's input, or the chain's output) in hand, and is
        mirrored to its replica then. Hop speeds are measured by hop-by-hop steps only."""
        index, failures = 0, 0
        while index < len(chain.sessions):
            sessions = chain.sessions[index:]
            replicas = [await self._replica_for(s) for s in sessions]
            starts = [s.position for s in sessions]
            try:
                out, ran = await chain.advance(index, hidden)
            except HopFailure as failure:
                await self._mirror_ran(sessions, replicas, starts, failure.index - index,
                                       failure.input)
                failures += 1
                error = failure.error
                if not recoverable(error) or failures > self.recovery.options.max_attempts:
                    raise error from None
                index, hidden = failure.index, failure.input
                self._drop_replica(chain.sessions[index])
                chain.sessions[index : index + 1] = await self.recovery.replace(
                    chain.sessions[index], error, chain.abandoned)
                continue
            await self._mirror_ran(sessions, replicas, starts, ran - index, out)
            index, hidden = ran, out
        return hidden

    async def _mirror_ran(self, sessions: list[SpanSession], replicas: list[_Replica | None],
                          starts: list[int], ran: int, last_out: np.ndarray) -> None:
        """Mirror the first ``ran`` of ``sessions`` (which ran this step) to their replicas,
        once the inputs the client receives for them are in."""
        for session in sessions[:ran]:
            await session.settle()
        for k in range(ran):
            replica = replicas[k]
            out = sessions[k + 1].history[-1] if k + 1 < ran else last_out
            if replica is None or out is LOST or sessions[k].history[-1] is LOST:
                continue
            mirrored = self._mirror(replica, sessions[k].history[-1])
            mirrored.addCallback(self._compare, replica, starts[k], out)

    async def check(self, chain: InferenceChain) -> int:
        """Wait for every hop's replica to catch up, then judge; the position now verified on
        every hop. Raises ``OutputMismatch`` (liars banned for life) when a hop disagrees."""
        self.checks += 1
        replicas = {s: self._replicas.get(s) for s in chain.sessions}
        await DeferredList([r.tail for r in replicas.values() if r is not None],
                           consumeErrors=True)
        verified, mismatches = [], []
        for session, replica in replicas.items():
            if replica is None or replica.broken:
                verified.append(session.position)  # unverifiable now: logged when it arose
            elif replica.mismatch is None:
                self.record.agreed({session.hop.node_id, *replica.node_ids})
                verified.append(replica.verified)
            else:
                mismatches.append((session, replica))
        if mismatches:
            liars: set[NodeID] = set()
            for session, replica in mismatches:
                at, primary_out, replica_out = replica.mismatch
                liars |= await self._decide(session, replica, at, primary_out, replica_out)
                verified.append(at)
            for liar in liars:
                self.bans.ban_for_life(liar)
            position = min(verified)
            log.warn("outputs disagree at position {p}: banned {liars} for good",
                     p=position, liars=[n.hex()[:12] for n in liars])
            raise OutputMismatch(
                f"a worker's outputs disagree with another replica's at position {position}",
                position, frozenset(liars))
        self.verified_position = min(verified, default=chain.position)
        if self.on_verified is not None:
            self.on_verified(self.verified_position)
        return self.verified_position

    async def close(self) -> None:
        """Close every replica session (best effort)."""
        replicas = [r for r in self._replicas.values() if r is not None]
        await DeferredList([r.tail for r in replicas], consumeErrors=True)
        sessions = [s for r in replicas for s in r.sessions] + self._spare
        self._replicas.clear()
        await DeferredList([Deferred.fromCoroutine(s.close()) for s in sessions],
                           consumeErrors=True)

    # -- replicas ---------------------------------------------------------------

    def _mirror(self, replica: _Replica, hidden: np.ndarray) -> Deferred:
        """Queue ``hidden`` through the replica after its previous steps; fires with its output."""
        result: Deferred = Deferred()

        def step(_: Any) -> Deferred:
            d = Deferred.fromCoroutine(_through(replica.sessions, hidden))
            d.addCallbacks(result.callback, lambda failure: self._broke(replica, failure))
            return d.addErrback(lambda _: None)

        replica.tail = replica.tail.addCallback(step)
        return result

    def _broke(self, replica: _Replica, failure: Any) -> None:
        if not replica.broken:
            replica.broken = True
            log.info("a replica failed ({e}); its hop goes unverified from here",
                     e=failure.getErrorMessage())

    def _compare(self, replica_out: np.ndarray, replica: _Replica, start: int,
                 primary_out: np.ndarray) -> None:
        if replica.mismatch is not None or replica.broken:
            return
        bad = first_mismatch(primary_out, replica_out, tolerance(str(primary_out.dtype)))
        if bad is None:
            replica.verified = start + primary_out.shape[1]
        else:
            replica.mismatch = (start + bad, primary_out[:, bad:bad + 1],
                                replica_out[:, bad:bad + 1])

    async def _replica_for(self, session: SpanSession) -> _Replica | None:
        if session in self._replicas:
            return self._replicas[session]
        self._replicas[session] = None
        route = await self._other_route(session.span, {session.hop.node_id})
        if route is None:
            if session.span not in self._unverifiable:
                self._unverifiable.add(session.span)
                log.warn("no second replica serves blocks {span}: not verified",
                         span=str(session.span))
            return None
        sessions = [self.session_type(session.endpoint, hop, session.max_length, session.timeout)
                    for hop in route.hops]
        try:
            for replica_session in sessions:
                await replica_session.open(self.recovery.model)
        except MeshError:
            self._spare += sessions
            return None
        replica = _Replica(sessions, Deferred(), verified=session.position)
        replica.tail.callback(None)
        if session.position:  # a hop that replaced a failed one: catch up on its history
            await session.settle()
            self._mirror(replica, session.inputs())
        self._replicas[session] = replica
        return replica

    def _drop_replica(self, session: SpanSession) -> None:
        replica = self._replicas.pop(session, None)
        if replica is not None:
            self._spare += replica.sessions

    async def _other_route(self, span: BlockSpan, exclude: set[NodeID]) -> Route | None:
        recovery = self.recovery
        try:
            return await discovery.discover_route(
                recovery.dht, recovery.endpoint, recovery.clock, recovery.key_for, span,
                recovery.model, self.bans.banned() | exclude, self.max_length,
                self.record.throughputs())
        except RouteNotFound:
            return None

    async def _decide(self, session: SpanSession, replica: _Replica, position: int,
                      primary_out: np.ndarray, replica_out: np.ndarray) -> set[NodeID]:
        """Who lied about ``position``: a third replica says, else the record of checks."""
        primary = session.hop.node_id
        route = await self._other_route(session.span, {primary, *replica.node_ids})
        if route is None:
            return self.record.judge(primary, replica.node_ids)
        third = [self.session_type(session.endpoint, hop, session.max_length, session.timeout)
                 for hop in route.hops]
        try:
            for third_session in third:
                await third_session.open(self.recovery.model)
            await session.settle()
            out = await _through(third, session.inputs()[:, : position + 1])
        except MeshError:
            return self.record.judge(primary, replica.node_ids)
        finally:
            self._spare += third
        referee = out[:, position : position + 1]
        tol = tolerance(str(out.dtype))
        liars = set()
        if first_mismatch(primary_out, referee, tol) is not None:
            liars.add(primary)
        if first_mismatch(replica_out, referee, tol) is not None:
            liars |= replica.node_ids
        self.record.agreed({n for n in (primary, *replica.node_ids) if n not in liars}
                           | {h.node_id for h in route.hops})
        return liars or self.record.judge(primary, replica.node_ids)


async def _through(sessions: list[SpanSession], hidden: np.ndarray) -> np.ndarray:
    for session in sessions:
        hidden = await session.step(hidden)
    return hidden


# -- the verified generation driver ------------------------------------------------


async def verified_generation(client: Any, prompt_ids: list[int], options: Any,
                              on_token: Any, route: Route | None,
                              stop: StopRequest | None = None) -> MeshGenerationResult:
    """``MeshClient._generate`` with verification: rolls back and re-routes on a mismatch."""
    honest: list[int] = []
    rng = client.verify_rng
    max_length = len(prompt_ids) + options.max_new_tokens
    stop_ids = client._stop_ids()
    for _ in range(MAX_ROLLBACKS + 1):
        ids = list(prompt_ids) + honest
        remaining = options.max_new_tokens - len(honest)
        if route is None or any(client.bans.is_banned(h.node_id) for h in route.hops):
            route = await _route(client, max_length)
        recovery = SpanRecovery(client.endpoint, client.dht, client.reactor, client._key_for,
                                client.source.fingerprint, client.bans, client.recovery_options)
        verifier = Verifier(recovery, client.trust, client.bans, client.verify_rate, rng,
                            max_length)
        chain = InferenceChain(client.endpoint, route, client.source.fingerprint, max_length,
                               client.step_timeout, verifier, client.forwarding)
        emitted: list[int] = []
        flush = _VerifiedStream(emitted, len(ids), on_token)
        verifier.on_verified = flush
        try:
            await chain.open()
            generation = Generation(ids, max_new_tokens=remaining,
                                    sampler=Sampler(options.sampling), stop_ids=stop_ids)
            loop_result = await drive(generation, client._head_compute, chain, emitted.append,
                                      stop)
            await verifier.check(chain)
        except OutputMismatch as mismatch:
            keep = min(len(emitted), max(0, mismatch.position - len(ids) + 1))
            flush(mismatch.position)
            honest += emitted[:keep]
            route = None
            if len(honest) >= options.max_new_tokens or (honest and honest[-1] in stop_ids):
                return _result(client, prompt_ids, honest, None, chain)
            continue
        except CancelledError:
            raise
        except Exception as error:
            # as an unverified generation: what was delivered so far is kept in the error
            delivered = tuple(honest + emitted[: flush.flushed])
            if not delivered:
                raise
            raise interrupted(error, delivered, client._text(delivered)) from error
        finally:
            await chain.close()
            await verifier.close()
        flush(len(ids) + len(emitted))
        return _result(client, prompt_ids, honest + list(loop_result.token_ids), loop_result,
                       chain)
    raise ClientError(f"outputs disagreed {MAX_ROLLBACKS + 1} times: giving up")


class _VerifiedStream:
    """Hands the tokens of one attempt to ``on_token`` once their position is verified."""

    def __init__(self, emitted: list[int], first_position: int, on_token: Any) -> None:
        self.emitted, self.first, self.on_token = emitted, first_position, on_token
        self.flushed = 0

    def __call__(self, verified: int) -> None:
        # token k comes from the output at position first - 1 + k
        upto = min(len(self.emitted), max(0, verified - self.first + 1))
        if self.on_token is not None:
            for token in self.emitted[self.flushed:upto]:
                self.on_token(token)
        self.flushed = max(self.flushed, upto)


async def _route(client: Any, max_length: int) -> Route:
    whole = BlockSpan(0, client.source.config.num_layers)
    route = await discovery.discover_route(
        client.dht, client.endpoint, client.reactor, client._key_for, whole,
        client.source.fingerprint, set(client.bans.banned()), max_length,
        client.trust.throughputs())
    client.last_route = route
    return route


def _result(client: Any, prompt_ids: list[int], tokens: list[int], loop_result: Any,
            chain: InferenceChain) -> MeshGenerationResult:
    text = client.tokenizer.decode(list(tokens)) if client.tokenizer else ""
    final = Route(tuple(s.hop for s in chain.sessions), 0.0)
    return MeshGenerationResult(
        token_ids=tuple(tokens),
        text=text,
        prefill_s=getattr(loop_result, "prefill_s", 0.0),
        decode_tok_s=getattr(loop_result, "decode_tok_s", 0.0),
        stop_reason=getattr(loop_result, "stop_reason", "length"),
        prompt_ids=tuple(prompt_ids),
        route=tuple(final.describe()),
    )
