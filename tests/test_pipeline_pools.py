"""The stages' thread pools: LLNODE_SPIN=run (spin while a run is in flight, sleep after) changes how
onnxruntime waits, never what it computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llnode.model import runner as runner_mod


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


# Once a process has onnxruntime's global pool, it cannot make per-session pools: each run is its own process.
_RUN = """
import sys
import numpy as np
from llnode.model.runner import ModuleRunner, disable_spinning
disable_spinning()  # as the daemon does
r = ModuleRunner(sys.argv[1], threads=2)
steps = [r.step("s", np.asarray([[5, 9, 17, 3]], np.int64), np.arange(4, dtype=np.int64)[None])]
for pos in range(4, 12):
    tok = np.asarray([[int(np.argmax(steps[-1][0, -1])) % r.manifest.vocab_size]], np.int64)
    steps.append(r.step("s", tok, np.asarray([[pos]], np.int64)))
np.save(sys.argv[2], np.concatenate([s.reshape(-1) for s in steps]))
"""


def test_spinning_pools_compute_the_same_tokens(tiny_llama_shards: Path, tmp_path: Path) -> None:
    outs = {}
    for spin in ("0", "run"):
        out = tmp_path / f"{spin}.npy"
        env = {**os.environ, "LLNODE_SPIN": spin}
        subprocess.run([sys.executable, "-c", _RUN, str(tiny_llama_shards), str(out)], env=env, check=True)
        outs[spin] = np.load(out)
    assert outs["0"].size > 0
    np.testing.assert_array_equal(outs["0"], outs["run"])
