"""Honest emulation of heterogeneous devices on one machine (real CPU limits, never sleeps)."""
