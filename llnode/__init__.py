"""llnode: decentralized, distributed LLM inference across everyday devices.

Folder map (each subpackage has one job):

- ``llnode.model``     cut a model into per-layer ONNX modules, the manifest, the module runner, tokenizer
- ``llnode.net``       peer links (framing, auth), mDNS discovery, gossip membership, leader election
- ``llnode.plan``      device profiling and the module-assignment MILP
- ``llnode.pipeline``  sessions flowing through stages, sampling, KV lifetimes
- ``llnode.api``       the OpenAI-compatible HTTP API and ``/api/status``
- ``llnode.dashboard`` the live web dashboard (static assets served by the daemon)
- ``llnode.bench``     benchmarks that print figures (``llnode bench ...``)
"""

__version__ = "0.1.0"
