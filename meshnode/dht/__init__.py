"""Kademlia DHT over the TLS transport, with signed records.

- ``node``: node ids, XOR distance, contacts, ``block_key``.
- ``routing``: k-buckets and the routing table (pure).
- ``records``: signed records with sub-keys and their validation.
- ``storage``: the bounded TTL store of records held for others.
- ``messages``: encoding and parsing of the ``dht.*`` messages (``schemas/dht.cddl``).
- ``crawling``: the iterative lookup (alpha parallel requests per round).
- ``protocol``: the RPC handlers (``rpc_*``) and outgoing calls (``call_*``).
- ``network``: ``DHTNode``, the facade: bootstrap, store, get, stop.
- ``service``: ``DHTService``, a Twisted service running a DHT node from options.
"""
