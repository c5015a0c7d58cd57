"""The dashboard's HTTP side: the page and its assets, ``/api/dashboard`` and the ``/api/events`` stream.

Mounted by the daemon with ``setup_dashboard(node.app, node)``. The page and its static files are public
(they hold no data: a phone must be able to load them before it knows the token); the two data routes
go through the daemon's bearer-token middleware like every other API route. Updates are server-sent
events over a plain streaming response (the page reads it with ``fetch`` + ``ReadableStream`` so that it
can send ``Authorization``, which ``EventSource`` cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llnode.dashboard.view import SAMPLE_S, History, dashboard_doc

if TYPE_CHECKING:
    from llnode.daemon import Node

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "icon.svg": "image/svg+xml"}
PUSH_EVERY_S = 1.0
MAX_STREAMS = 32  # each open page holds one; bound them so a reload loop cannot pile up tasks


class Dashboard:
    """Samples the gossip view once a second (for the charts' history) and serves the page."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.history = History()
        self._wake = asyncio.Event()
        self.closing = asyncio.Event()
        self.streams = 0
        self._task: asyncio.Task[None] | None = None

    def _on_node_event(self, kind: str) -> None:
        if kind in ("membership", "leader"):
            self.poke()

    def poke(self) -> None:
        """Wake the sampler and every open stream now (each waits on the event current when it began)."""
        self._wake.set()
        self._wake = asyncio.Event()

    async def _sample_loop(self) -> None:
        while True:
            wake = self._wake
            try:
                self.history.observe(await self.node.status())
            except Exception:
                log.exception("dashboard sample failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), SAMPLE_S)
            await asyncio.sleep(0.05)  # let a burst of gossip settle into one sample

    async def on_startup(self, app: web.Application) -> None:
        # Subscribing here, not in __init__: the daemon mounts the dashboard before it is fully built.
        self.node.subscribe(self._on_node_event)
        self._task = asyncio.ensure_future(self._sample_loop())

    async def on_shutdown(self, app: web.Application) -> None:
        """Before the server waits for in-flight requests: end every open event stream now."""
        self.closing.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def doc(self, *, with_history: bool) -> dict[str, Any]:
        return dashboard_doc(await self.node.status(), self.history, with_history=with_history)

    # ---- handlers ---------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return _file("index.html", "text/html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no dashboard asset {name!r}")
        return _file(name, ASSETS[name])

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        with_history = request.query.get("history", "1") not in ("0", "false")
        return web.json_response(await self.doc(with_history=with_history), dumps=_dumps)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """``text/event-stream``: a ``status`` event at once (with the charts' history), then one every
        second or sooner when membership or the leader changes."""
        if self.streams >= MAX_STREAMS:
            return web.json_response(
                {"error": {"message": "too many dashboard streams open", "type": "unavailable"}}, status=503
            )
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        self.streams += 1
        first = True
        try:
            while not self.closing.is_set():
                wake = self._wake
                doc = await self.doc(with_history=first)
                first = False
                await resp.write(f"event: status\ndata: {_dumps(doc)}\n\n".encode())
                waiters = [asyncio.ensure_future(e.wait()) for e in (wake, self.closing)]
                await asyncio.wait(waiters, timeout=PUSH_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if wake.is_set() and not self.closing.is_set():
                    await asyncio.sleep(0.15)  # the sampler records the change (events) first
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self.streams -= 1
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp


def _file(name: str, content_type: str) -> web.Response:
    try:
        body = (STATIC / name).read_bytes()
    except OSError as exc:
        raise web.HTTPInternalServerError(
            text=f"dashboard asset {name} missing from the package: {exc}"
        ) from (exc)
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8" if content_type.startswith("text") else None,
        headers={"Cache-Control": "no-cache"},
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"))


# ``node.app[DASHBOARD_KEY]`` gives other parts the Dashboard (to add events, or push pages now).
DASHBOARD_KEY = web.AppKey("llnode.dashboard", Dashboard)


def setup_dashboard(app: web.Application, node: Node) -> Dashboard:
    """Add the dashboard routes to ``app``; the page and assets are exempt from the API token."""
    dash = Dashboard(node)
    app[DASHBOARD_KEY] = dash
    app.router.add_get("/", dash.index)
    app.router.add_get("/dashboard", dash.index)
    app.router.add_get("/dashboard/{name}", dash.asset)
    app.router.add_get("/api/dashboard", dash.snapshot)
    app.router.add_get("/api/events", dash.events)
    node.public_paths.update({"/", "/dashboard", *(f"/dashboard/{n}" for n in ASSETS)})
    app.on_startup.append(dash.on_startup)
    app.on_shutdown.append(dash.on_shutdown)
    return dash
