"""Fuzzing the stage's input: ``protocol.parse_step`` and ``StageWorker.submit`` on a real ModuleRunner.

Whatever a peer sends as a ``pipe.step`` -- wrong types, missing fields, token ids out of the
vocabulary, tensors of the wrong dtype or shape, steps for sessions the stage does not know, replays of
a step already run -- must end in a clean rejection (answered to the entry node as an error for that
session, and logged), never in an exception escaping the stage or a wrong tensor reaching onnxruntime;
and the stage must still compute correct answers afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llnode.model.manifest import load_manifest
from llnode.model.runner import ModuleRunner
from llnode.net.codec import encode_tensor
from llnode.pipeline import protocol
from llnode.pipeline.protocol import ProtocolError
from llnode.pipeline.stage import StageWorker

Sent = list[tuple[str, str, dict[str, Any]]]


class Recorder:
    """The stage's ``send``: records what it would put on the wire."""

    def __init__(self) -> None:
        self.sent: Sent = []

    async def __call__(self, peer: str, msg_type: str, payload: dict[str, Any]) -> None:
        self.sent.append((peer, msg_type, payload))


@pytest.fixture(scope="module")
def middle(tiny_llama_shards: Path) -> tuple[StageWorker, Recorder, ModuleRunner]:
    """A middle stage (decoder layers only), plus an independent runner of the same range to compare."""
    manifest = load_manifest(tiny_llama_shards)
    end = manifest.num_modules - 1
    rec = Recorder()
    worker = StageWorker(
        node_id="me", epoch=3, manifest=manifest, runner=ModuleRunner(tiny_llama_shards, manifest, 1, end),
        next_node="next", send=rec,
    )  # fmt: skip
    return worker, rec, ModuleRunner(tiny_llama_shards, manifest, 1, end)


def _hidden(n: int, hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, n, hidden), dtype=np.float32)


def _valid(worker: StageWorker, session: str = "s1", n: int = 3, **over: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "session": session, "epoch": worker.epoch, "seq": 1, "entry": "entry-node", "pos0": 0,
        "ids": list(range(1, n + 1)), "reset": True,
        "hidden": encode_tensor(_hidden(n, worker.manifest.hidden_size)),
    }  # fmt: skip
    payload.update(over)
    return payload


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=80),
    st.binary(max_size=40),
)  # fmt: skip
anything = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
tensors = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "float16", "int64", "float64", "uint8", "object", "bogus"]),
        "shape": st.lists(st.integers(-2, 70), max_size=4),
        "data": st.binary(max_size=512),
    }
)
FIELDS = ["session", "epoch", "seq", "entry", "pos0", "ids", "reset", "hidden", "sampling", "generated"]


@st.composite
def step_payloads(draw: st.DrawFn) -> Any:
    """Mostly near-valid steps with one to three fields replaced, dropped or mistyped; sometimes junk."""
    if draw(st.integers(0, 9)) == 0:
        return draw(anything)
    base: dict[str, Any] = {
        "session": "fz", "epoch": 3, "seq": 1, "entry": "entry-node", "pos0": 0, "ids": [1, 2],
        "reset": True, "hidden": encode_tensor(_hidden(2, 64)),
    }  # fmt: skip
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(FIELDS))
        how = draw(st.sampled_from(["drop", "junk", "tensor", "ids", "int"]))
        if how == "drop":
            base.pop(name, None)
        elif how == "junk":
            base[name] = draw(anything)
        elif how == "tensor":
            base[name] = draw(tensors)
        elif how == "ids":
            base[name] = draw(st.lists(st.integers(-5, 1 << 20), max_size=6))
        else:
            base[name] = draw(st.integers(-3, 1 << 40))
    return base


@settings(max_examples=500, deadline=None)
@given(anything | step_payloads())
def test_parse_step_accepts_only_well_formed_steps(payload: Any) -> None:
    try:
        step = protocol.parse_step(payload, vocab_size=256)
    except ProtocolError as exc:
        assert str(exc)
        return
    # Whatever got through is exactly what a stage may rely on.
    assert isinstance(step.session, str) and 0 < len(step.session) <= protocol.MAX_SESSION_ID
    assert isinstance(step.entry, str) and step.entry
    assert all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step.epoch, step.seq, step.pos0)
    )
    assert step.ids and all(isinstance(i, int) and 0 <= i < 256 for i in step.ids)
    assert not step.reset or step.pos0 == 0
    assert 0 <= step.generated <= len(step.ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step_payloads())
def test_submit_rejects_bad_steps_with_a_reason(
    middle: tuple[StageWorker, Recorder, ModuleRunner], payload: Any
) -> None:
    worker, rec, _ = middle
    rec.sent.clear()
    asyncio.run(worker.submit(payload))
    queued = []
    while not worker._queue.empty():
        item = worker._queue.get_nowait()
        assert item is not None
        queued.append(item.step)
    if queued:
        # Accepted: then it really fits this stage (epoch, and a float32 [1, n, hidden] tensor).
        (step,) = queued
        assert not rec.sent
        assert step.epoch == worker.epoch
        assert step.hidden is not None and step.hidden.dtype == np.float32
        assert step.hidden.shape == (1, len(step.ids), worker.manifest.hidden_size)
        return
    if (
        isinstance(payload, dict)
        and isinstance(payload.get("entry"), str)
        and isinstance(payload.get("session"), str)
    ):
        # Rejected, and the entry node is told why, for that session.
        (peer, msg_type, reply) = rec.sent[-1]
        assert (peer, msg_type) == (payload["entry"], protocol.TOKEN)
        assert reply["session"] == payload["session"] and reply["error"]
    else:
        assert not rec.sent  # nobody to answer: dropped (and logged)


def test_stage_rejects_and_keeps_computing(
    middle: tuple[StageWorker, Recorder, ModuleRunner], caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong dtype/shape, wrong epoch, an unknown session, a replayed step: each rejected with a logged
    reason; a valid session interleaved with them gets exactly the hidden state a direct runner gives."""
    worker, rec, direct = middle
    hidden = worker.manifest.hidden_size
    caplog.set_level(logging.WARNING, logger="llnode.pipeline.stage")

    async def scenario() -> tuple[Sent, list[np.ndarray]]:
        rec.sent.clear()
        worker.start_worker()
        try:
            x0 = _hidden(3, hidden, seed=1)
            x1 = _hidden(1, hidden, seed=2)
            good0 = _valid(worker, "good", 3, hidden=encode_tensor(x0))
            good1 = _valid(worker, "good", 1, pos0=3, reset=False, seq=2, ids=[7], hidden=encode_tensor(x1))
            bad = [
                _valid(worker, "b-dtype", hidden=encode_tensor(x0.astype(np.float64))),
                _valid(worker, "b-shape", hidden=encode_tensor(_hidden(2, hidden))),
                _valid(worker, "b-width", hidden=encode_tensor(_hidden(3, hidden + 1))),
                _valid(worker, "b-epoch", epoch=worker.epoch + 1),
                _valid(worker, "b-nohidden", hidden=None),
                _valid(worker, "b-vocab", ids=[1, 2, worker.manifest.vocab_size]),
                # a decode step for a session this stage never saw
                _valid(worker, "b-unknown", 1, pos0=5, reset=False, ids=[3], hidden=encode_tensor(x1)),
            ]
            await worker.submit(good0)
            for b in bad:
                await worker.submit(b)
            await worker.submit(good1)
            await worker.submit(good1)  # replayed: the session is already past position 3
            for _ in range(600):
                if sum(1 for _, t, _p in rec.sent if t == protocol.STEP) >= 2 and len(rec.sent) >= 10:
                    break
                await asyncio.sleep(0.05)
            outs = [np.array(direct.step("good", x0, np.arange(3)[None, :])),
                    np.array(direct.step("good", x1, np.array([[3]])))]  # fmt: skip
            direct.free("good")
            return list(rec.sent), outs
        finally:
            await worker.close()

    sent, expected = asyncio.run(scenario())
    forwarded = [p for peer, t, p in sent if t == protocol.STEP]
    errors = {p["session"]: p["error"] for peer, t, p in sent if t == protocol.TOKEN}
    assert [p["session"] for p in forwarded] == ["good", "good"]
    for p, exp in zip(forwarded, expected, strict=True):
        from llnode.net.codec import decode_tensor

        np.testing.assert_allclose(decode_tensor(p["hidden"]), exp, rtol=1e-5, atol=1e-5)
    assert set(errors) == {
        "b-dtype", "b-shape", "b-width", "b-epoch", "b-nohidden", "b-vocab", "b-unknown", "good",
    }  # fmt: skip
    assert "float" in errors["b-dtype"] and "shape" in errors["b-shape"]
    assert "epoch" in errors["b-epoch"]
    assert "position" in errors["b-unknown"] and "position" in errors["good"]  # the replay
    logged = caplog.text
    for session in ("b-dtype", "b-epoch", "b-unknown"):
        assert session in logged or errors[session] in logged
