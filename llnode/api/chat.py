"""``llnode chat --node URL``: an interactive chat in the terminal, streaming tokens as they arrive.

It talks to a node exactly as any OpenAI client would (``/v1/models``, then streamed
``/v1/chat/completions``), keeps the conversation history so that every turn sees the previous ones, and
understands two commands: ``/reset`` (forget the history) and ``/quit``; Ctrl-D also exits. Ctrl-C while
an answer streams stops that answer (the node frees its session) and returns to the prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

import aiohttp

from llnode.api.sse import sse_events

HELP = "commands: /reset forgets the conversation, /quit or Ctrl-D exits, Ctrl-C stops an answer"


class ChatError(Exception):
    """The node answered with an error (its message is shown, the REPL goes on)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", default="http://127.0.0.1:7700", help="the node's HTTP address")
    parser.add_argument("--model", default=None, help="model name (default: the first the node lists)")
    parser.add_argument("--system", default=None, help="a system prompt to start the conversation with")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length limit per turn")
    parser.add_argument(
        "--api-token", default=os.environ.get("LLNODE_API_TOKEN"), help="bearer token (env LLNODE_API_TOKEN)"
    )


async def _error_of(resp: aiohttp.ClientResponse) -> ChatError:
    text = await resp.text()
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text.strip()[:500] or resp.reason or "no details"
    return ChatError(f"HTTP {resp.status}: {message}")


class ChatClient:
    """The conversation and the HTTP calls, separate from the terminal so that tests can drive it."""

    def __init__(self, session: aiohttp.ClientSession, node: str, args: argparse.Namespace) -> None:
        self.session = session
        self.base = node.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.args = args
        self.model: str | None = args.model
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.args.system}] if self.args.system else []

    async def pick_model(self) -> str:
        if self.model is None:
            async with self.session.get(f"{self.base}/models") as resp:
                if resp.status != 200:
                    raise await _error_of(resp)
                data = (await resp.json())["data"]
            if not data:
                raise ChatError("the node serves no model yet (no active plan); try again shortly")
            self.model = str(data[0]["id"])
        return self.model

    async def ask(self, text: str) -> AsyncIterator[str]:
        """Stream the answer to ``text``; the turn is added to the history only once it completes."""
        model = await self.pick_model()
        messages = [*self.history, {"role": "user", "content": text}]
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        for key, value in (
            ("temperature", self.args.temperature),
            ("top_p", self.args.top_p),
            ("seed", self.args.seed),
            ("max_tokens", self.args.max_tokens),
        ):
            if value is not None:
                body[key] = value
        answer: list[str] = []
        async with self.session.post(f"{self.base}/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise await _error_of(resp)
            async for event in sse_events(resp.content):
                if "error" in event:
                    raise ChatError(event["error"].get("message", "generation failed"))
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        answer.append(piece)
                        yield piece
        self.history = [*messages, {"role": "assistant", "content": "".join(answer)}]


async def _read_line(prompt: str) -> str | None:
    """``input()`` off the event loop; None on end of input (Ctrl-D)."""
    try:
        return await asyncio.to_thread(input, prompt)
    except EOFError:
        return None


async def repl(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    headers = {"Authorization": f"Bearer {args.api_token}"} if args.api_token else {}
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        client = ChatClient(session, args.node, args)
        try:
            model = await client.pick_model()
        except (ChatError, aiohttp.ClientError, OSError) as exc:
            print(f"llnode chat: cannot use {args.node}: {exc}", file=sys.stderr)
            return 1
        interactive = sys.stdin.isatty()
        print(f"chatting with {model} at {args.node}. {HELP}", file=out if interactive else sys.stderr)
        while True:
            line = await _read_line("> " if interactive else "")
            if line is None or line.strip() in ("/quit", "/exit"):
                if interactive:
                    print(file=out)
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                client.reset()
                print("(conversation reset)", file=out, flush=True)
                continue
            await _answer_interruptibly(client, text, out)


async def _answer_interruptibly(client: ChatClient, text: str, out: TextIO) -> None:
    """Stream one answer; Ctrl-C cancels just this answer (closing the HTTP stream, so the node frees
    the session) instead of the whole program."""
    task = asyncio.ensure_future(_stream_answer(client, text, out))
    loop = asyncio.get_running_loop()
    interrupted: list[bool] = []

    def on_sigint() -> None:
        interrupted.append(True)
        task.cancel()

    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        installed = False
    try:
        await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
        print("\n(stopped)", file=out, flush=True)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)


async def _stream_answer(client: ChatClient, text: str, out: TextIO) -> None:
    try:
        async for piece in client.ask(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    except (TimeoutError, ChatError, aiohttp.ClientError, OSError, ValueError) as exc:
        print(f"\n[error] {exc}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(repl(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
