"""meshnode: pipeline-parallel LLM inference over a TLS Kademlia mesh.

Map of the package (each module's docstring says what it owns):

- ``errors``: every named exception.
- ``identity``, ``tls``: node keys, ids, mutual TLS.
- ``wire/``: frames, CBOR headers, tensor payloads, request/response.
- ``dht/``: Kademlia over the wire, signed records.
- ``model/``: configs, Flax blocks, KV cache, weights, tokenizers, local generation.
- ``worker/``: hosts a span of blocks and serves inference sessions.
- ``client/``: route choice, sessions along a chain, recovery, generate().
- ``cli``, ``commands/``, ``tap``: the ``meshnode`` command and ``twistd meshnode``.
"""

__version__ = "0.1.0"
