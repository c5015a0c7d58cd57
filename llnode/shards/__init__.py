"""Shard distribution between peers: the local inventory, serving chunks, and fetching missing modules.

Transport-agnostic: ``fetch.ShardTransport`` is the two calls the fetcher needs (a file's chunk index and a
byte range); ``serve.ShardServer`` answers exactly those from the local ``store.ShardStore``. The peer-link
layer (or ``http.py`` for plain HTTP) carries them. The manifest is the trust anchor: nothing a peer says
is believed until the whole file's sha256 equals the manifest's.
"""

from llnode.shards.errors import ShardError, ShardFetchError, ShardServeError
from llnode.shards.fetch import FetchProgress, ShardFetcher, ShardTransport, peers_holding
from llnode.shards.serve import ShardServer
from llnode.shards.store import ShardStore, compact_ranges, expand_ranges

__all__ = [
    "FetchProgress",
    "ShardError",
    "ShardFetchError",
    "ShardFetcher",
    "ShardServeError",
    "ShardServer",
    "ShardStore",
    "ShardTransport",
    "compact_ranges",
    "expand_ranges",
    "peers_holding",
]
