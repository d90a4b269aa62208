"""The wire: frames, CBOR headers, tensors, request/response over one connection per peer.

Map of the package (see ``docs/wire.md``):

- ``limits``: ``WireLimits``, the named limits every frame is checked against.
- ``message``: ``Message``, ``PeerInfo``, ``Handler``: what handlers see.
- ``tensors``: wire dtypes, aligned receive buffers, zero-copy views and ``as_jax``.
- ``header``: the CBOR frame header and its validation.
- ``frames``: the length-prefixed frame layout and the incremental ``FrameDecoder`` (pure).
- ``codec``: ``Message`` <-> frame parts (header + tensor body).
- ``bundle``: the small frames of one reactor turn to one peer as one bundle frame, and back.
- ``protocol``: ``MeshProtocol``, one TLS connection: dispatch, request ids, flow control.
- ``endpoint``: ``Endpoint``, the facade: listen, dial, connection pool, handlers.

TLS itself is ``meshnode.tls`` (over the private ``meshnode._tls_private``), which
knows nothing of this package: ``wire`` imports ``tls``, never the reverse.
"""
