"""Networking of the peer daemon: cluster key, authenticated+encrypted peer links, frame and tensor codec,
mDNS discovery, gossip membership, failure detection and leader election (see docs/daemon.md)."""
