"""Request bodies of the OpenAI routes, checked field by field before anything runs.

Every check answers with an OpenAI-shaped 400 naming the offending ``param``: a wrong type, an absurd
value or a feature this server does not implement (n > 1, tools, logprobs, JSON mode...) is refused
clearly rather than silently ignored. Unknown fields are refused too, as OpenAI does, so a typo such as
``max_token`` does not quietly fall back to a default.

The checks that need the model (its name, its context length, the tokenized prompt) come after, in
:mod:`llnode.api.openai`, once the engine is known to be ready.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llnode.api.errors import bad_request

MAX_TOKENS_LIMIT = 1 << 20  # any request above this is absurd whatever the model
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 4096
MAX_PROMPT_IDS = 1 << 20
SEED_LIMIT = 1 << 63
ROLES = {"system", "developer", "user", "assistant"}


@dataclass
class SamplingFields:
    """Fields shared by both endpoints, after validation. ``None`` means "not given"."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens past end-of-text (benchmarks)


@dataclass
class ChatBody:
    fields: SamplingFields
    messages: list[dict[str, str]]


@dataclass
class CompletionBody:
    fields: SamplingFields
    prompt_text: str | None  # exactly one of prompt_text / prompt_ids is set
    prompt_ids: list[int] | None
    echo: bool


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise bad_request(
            f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}", param=name, code="invalid_value"
        )
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"'{name}' must be an integer", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise bad_request(
            f"'{name}' must be between {lo} and {hi}, got {value}", param=name, code="invalid_value"
        )
    return int(value)


def _boolean(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean", param=name, code="invalid_type")
    return value


def _unsupported(name: str, what: str) -> Exception:
    return bad_request(f"'{name}' {what} is not supported by this server", param=name, code="unsupported")


def _check_unknown(body: Mapping[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise bad_request(
                f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter"
            )


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(
            f"'stop' holds at most {MAX_STOP_STRINGS} strings", param="stop", code="invalid_value"
        )
    for s in stops:
        if not s or len(s) > MAX_STOP_LENGTH:
            raise bad_request(
                f"each stop string must be 1 to {MAX_STOP_LENGTH} characters long",
                param="stop",
                code="invalid_value",
            )
    return tuple(stops)


def _common(body: Mapping[str, Any]) -> SamplingFields:
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a 'model' parameter", param="model", code="missing_required")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' must be a non-empty string", param="model", code="invalid_type")
    n = _integer(body, "n", 1, 128)
    if n is not None and n != 1:
        raise _unsupported("n", f"= {n} (more than one choice)")
    for name in ("logit_bias",):
        if body.get(name) not in (None, {}):
            raise _unsupported(name, "")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string", param="user", code="invalid_type")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", -1, 1 << 31)
    stream = _boolean(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        # OpenAI refuses stream_options without stream; we accept and ignore them (they only shape a stream).
        if not isinstance(options, dict):
            raise bad_request(
                "'stream_options' must be an object", param="stream_options", code="invalid_type"
            )
        _check_unknown(options, {"include_usage", "continuous_usage_stats"})
        include_usage = _boolean(options, "include_usage") and stream
    return SamplingFields(
        model=model,
        max_tokens=None,  # endpoint-specific, set by the caller
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        # top_p 0 is accepted (OpenAI allows it) and means "only the most likely token".
        top_p=top_p if top_p > 0.0 else 1e-9,
        top_k=max(top_k or 0, 0),  # -1 (vLLM's "off") and 0 both disable it
        seed=_integer(body, "seed", -SEED_LIMIT, SEED_LIMIT - 1),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_boolean(body, "ignore_eos"),
    )


COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "ignore_eos",
    "stream",
    "stream_options",
    "logit_bias",
    "user",
    "logprobs",
}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "metadata",
    "store",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(
                    "content parts must be objects with a 'type'", param=param, code="invalid_type"
                )
            if part["type"] != "text":
                raise _unsupported(param, f"part type '{part['type']}' (only text)")
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs a string 'text'", param=param, code="invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(
        "message content must be a string or a list of text parts", param=param, code="invalid_type"
    )


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request(
            "you must provide a 'messages' parameter", param="messages", code="missing_required"
        )
    if not isinstance(messages, list):
        raise bad_request("'messages' must be a list", param="messages", code="invalid_type")
    if not messages:
        raise bad_request("'messages' must hold at least one message", param="messages", code="invalid_value")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(
            f"'messages' holds at most {MAX_MESSAGES} messages", param="messages", code="invalid_value"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(
                "each message needs a string 'role'", param=f"messages[{i}].role", code="invalid_type"
            )
        if role not in ROLES:
            if role in ("tool", "function"):
                raise _unsupported(f"messages[{i}].role", f"'{role}' (tool calling)")
            raise bad_request(
                f"unknown role '{role}' (expected one of {sorted(ROLES)})",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise _unsupported(f"messages[{i}].tool_calls", "(tool calling)")
        if "name" in message and not isinstance(message["name"], str):
            raise bad_request("'name' must be a string", param=f"messages[{i}].name", code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    return out


def parse_chat(body: Any) -> ChatBody:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_type")
    _check_unknown(body, CHAT_FIELDS)
    fields = _common(body)
    legacy = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    newer = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if newer is not None and legacy is not None and newer != legacy:
        raise bad_request(
            "'max_tokens' and 'max_completion_tokens' disagree; give one of them",
            param="max_tokens",
            code="invalid_value",
        )
    fields.max_tokens = newer if newer is not None else legacy
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _unsupported("logprobs", "")
    if body.get("tools") not in (None, []) or body.get("functions") not in (None, []):
        raise _unsupported("tools", "(tool calling)")
    if body.get("tool_choice") not in (None, "none", "auto") or body.get("function_call") not in (
        None,
        "none",
    ):
        raise _unsupported("tool_choice", "(tool calling)")
    if "parallel_tool_calls" in body:
        _boolean(body, "parallel_tool_calls")
    if "store" in body:
        _boolean(body, "store")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise bad_request("'metadata' must be an object", param="metadata", code="invalid_type")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise bad_request(
                "'response_format' must be an object with a 'type'",
                param="response_format",
                code="invalid_type",
            )
        if fmt["type"] != "text":
            raise _unsupported("response_format", f"type '{fmt['type']}'")
    return ChatBody(fields=fields, messages=_messages(body))


def parse_completion(body: Any) -> CompletionBody:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_type")
    _check_unknown(body, COMPLETION_FIELDS)
    fields = _common(body)
    fields.max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    if body.get("logprobs") is not None:
        raise _unsupported("logprobs", "")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix", "(insertion)")
    best_of = _integer(body, "best_of", 1, 128)
    if best_of is not None and best_of != 1:
        raise _unsupported("best_of", f"= {best_of}")
    echo = _boolean(body, "echo")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("you must provide a 'prompt' parameter", param="prompt", code="missing_required")
    # A list holding one prompt is the same as the prompt; more than one would be a batch (n prompts).
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' must not be empty", param="prompt", code="invalid_value")
        return CompletionBody(fields=fields, prompt_text=prompt, prompt_ids=None, echo=echo)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if len(prompt) > MAX_PROMPT_IDS:
            raise bad_request("'prompt' is too long", param="prompt", code="context_length_exceeded")
        return CompletionBody(fields=fields, prompt_text=None, prompt_ids=list(prompt), echo=echo)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise _unsupported("prompt", "with several prompts in one request")
    if isinstance(prompt, list) and not prompt:
        raise bad_request("'prompt' must not be empty", param="prompt", code="invalid_value")
    raise bad_request("'prompt' must be a string or a list of token ids", param="prompt", code="invalid_type")
