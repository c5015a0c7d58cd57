"""``llnode bench links`` runs end to end and reports its figures (values are printed, not asserted on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_links_reports_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llnode", "bench", "links", "--json", "--frames", "300", "--round-trips", "50",
         "--large", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    )  # fmt: skip
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("encrypted", "plain"):
        assert doc[mode]["frames_per_s"] > 0 and doc[mode]["rtt_ms_p50"] > 0
        assert 2300 < doc[mode]["frame_bytes"] < 2500  # one [1,1,576] f32 hidden state + framing
    assert abs(doc["encrypted"]["frame_bytes"] - doc["plain"]["frame_bytes"] - 16) < 1  # the Poly1305 tag
    assert set(doc["encryption_cost"]) == {"frames_per_s_ratio", "large_mb_per_s_ratio", "rtt_extra_ms"}
