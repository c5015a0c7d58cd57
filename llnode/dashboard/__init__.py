"""The live dashboard every daemon serves at ``/``: peers, plan, throughput, events and a chat box.

``routes.setup_dashboard(app, node)`` mounts it (the daemon does, in ``Node.__init__``); ``view`` turns
the node's status document and gossip view into the compact document the page renders; the page itself
is plain HTML/CSS/JS in ``static/`` (no libraries, nothing fetched from the internet).
"""
