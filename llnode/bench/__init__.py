"""Benchmarks that print measured figures: ``llnode bench NAME [--json]`` (see ``llnode.cli.BENCHMARKS``).

Each compares contenders side by side in one run (these machines are shared and noisy, so ratios measured
together mean more than absolute times), and with ``--json`` ends with one JSON line for scripts."""
