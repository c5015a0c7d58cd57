"""The stages' thread pools: LLNODE_SPIN=run (spin while a run is in flight, sleep after) changes how
onnxruntime waits, never what it computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llnode.model import runner as runner_mod
from llnode.model.runner import ModuleRunner


def _per_session(monkeypatch: pytest.MonkeyPatch, spin: str) -> None:
    monkeypatch.setattr(runner_mod, "_pool_mode", "per-session")  # as in a daemon (disable_spinning)
    monkeypatch.setenv("LLNODE_SPIN", spin)


@pytest.mark.parametrize(("spin", "allow", "stop"), [("0", "0", ""), ("run", "1", "1")])
def test_spin_knob_sets_the_session_options(
    monkeypatch: pytest.MonkeyPatch, spin: str, allow: str, stop: str
) -> None:
    _per_session(monkeypatch, spin)
    so = runner_mod._session_options(2)
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == allow
    if stop:
        assert so.get_session_config_entry("session.force_spinning_stop") == stop
    else:  # unset: onnxruntime would raise on a missing key, the sleeping pools never set it
        with pytest.raises(Exception, match="force_spinning_stop"):
            so.get_session_config_entry("session.force_spinning_stop")


def test_spinning_pools_compute_the_same_tokens(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_shards: Path
) -> None:
    outs = {}
    for spin in ("0", "run"):
        _per_session(monkeypatch, spin)
        r = ModuleRunner(tiny_llama_shards, threads=2)
        ids = np.asarray([[5, 9, 17, 3]], np.int64)
        h = r.step("s", ids, np.arange(4, dtype=np.int64)[None])
        steps = [h]
        for pos in range(4, 12):
            tok = np.asarray([[int(np.argmax(steps[-1][0, -1])) % r.manifest.vocab_size]], np.int64)
            steps.append(r.step("s", tok, np.asarray([[pos]], np.int64)))
        outs[spin] = steps
    for a, b in zip(outs["0"], outs["run"], strict=True):
        np.testing.assert_array_equal(a, b)
