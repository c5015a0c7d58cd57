"""The OpenAPI 3.0 description of the HTTP API, served at ``/openapi.json``.

Hand-written and kept next to the validation code it describes (:mod:`llnode.api.validate`): the limits
here are the limits enforced there, so a property-based fuzzer (schemathesis) that generates requests from
this document exercises exactly the checks that matter. Only the OpenAI routes are described here; other
parts of the node may add their paths with :func:`add_paths`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from llnode import __version__
from llnode.api.validate import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT

_extra_paths: dict[str, Any] = {}


def add_paths(paths: dict[str, Any]) -> None:
    """Let another component (the daemon's ``/health``, ``/api/status``) describe its routes too."""
    _extra_paths.update(paths)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_STOP = _nullable(
    {
        "oneOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
                "maxItems": MAX_STOP_STRINGS,
            },
        ]
    }
)

_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1, "description": "a name listed by /v1/models"},
    "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_k": _nullable(
        {"type": "integer", "minimum": -1, "maximum": 2147483648, "description": "0 or -1: off"}
    ),
    "n": _nullable({"type": "integer", "minimum": 1, "maximum": 1, "description": "only 1 is supported"}),
    "seed": _nullable({"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 63) - 1}),
    "repetition_penalty": _nullable({"type": "number", "minimum": 0.01, "maximum": 10}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "stop": _STOP,
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable(
        {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean", "nullable": True}},
            "additionalProperties": False,
            "description": "only with stream: true",
        }
    ),
    "user": _nullable({"type": "string"}),
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}

_FINISH = _nullable({"type": "string", "enum": ["stop", "length"]})

def _completion(object_name: str, field: str, field_schema: dict[str, Any]) -> dict[str, Any]:
    """A (non-streamed) completion response: chat and text completions differ only in their ``object``
    name and in what a choice carries (``message`` or ``text``)."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [object_name]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", field, "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        field: field_schema,
                        "finish_reason": _FINISH,
                    },
                },
            },
            "usage": _ref("Usage"),
        },
    }


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _nullable({"type": "string"}),
                    "code": _nullable({"type": "string"}),
                },
            }
        },
    },
    "Message": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {
                                "type": {"type": "string", "enum": ["text"]},
                                "text": {"type": "string"},
                            },
                        },
                    },
                ]
            },
            "name": {"type": "string"},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": False,
        "properties": {
            **_SAMPLING,
            "messages": {"type": "array", "items": _ref("Message"), "minItems": 1},
            "max_completion_tokens": _nullable(
                {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT}
            ),
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "additionalProperties": False,
        "properties": {
            **_SAMPLING,
            "prompt": {
                "description": "a string or token ids, alone or as the single item of a list",
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                    {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                ],
            },
            "echo": _nullable({"type": "boolean"}),
        },
    },
    "Usage": _USAGE,
    "ChatCompletion": _completion(
        "chat.completion",
        "message",
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
        },
    ),
    "Completion": _completion("text_completion", "text", {"type": "string"}),
    "Model": {
        "type": "object",
        "required": ["id", "object", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _generation(request_schema: str, response_schema: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request_schema)}},
            },
            "responses": {
                "200": {
                    "description": "the completion; with stream: true a text/event-stream of chunks ending "
                    "with 'data: [DONE]'",
                    "content": {
                        "application/json": {"schema": _ref(response_schema)},
                        "text/event-stream": {
                            "schema": {
                                "type": "object",
                                "description": "one SSE event: data is a JSON chunk, or [DONE] at the end",
                                "properties": {"data": {"type": "string"}},
                            }
                        },
                    },
                },
                "400": _error("invalid request (bad field, unsupported feature, prompt too long)"),
                "401": _error("missing or wrong bearer token (non-loopback binds)"),
                "404": _error("unknown model"),
                "405": _error("wrong method"),
                "408": _error("request body not received in time"),
                "413": _error("request body too large"),
                "503": _error("the node cannot serve now (no plan yet, model not loaded); see the message"),
            },
        }
    }


def _fit_to_engine(
    schemas: dict[str, Any], model_ids: Sequence[str], max_context: int | None, vocab_size: int | None
) -> None:
    """Narrow the generic limits to the model being served. Only limits the server enforces exactly go
    here (a fuzzer checks that anything outside the schema is refused); the context budget of a whole
    chat (prompt tokens + max_tokens) cannot be expressed in a schema and is checked by the server."""
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        if model_ids:
            props["model"] = {"type": "string", "enum": list(model_ids)}
        if max_context:
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:
                    props[key]["maximum"] = max(1, max_context - 1)
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"]
    for ids in (prompt[1], prompt[3]["items"]):
        if vocab_size:
            ids["items"]["maximum"] = vocab_size - 1
        if max_context:
            ids["maxItems"] = max(1, max_context - 1)


def openapi_document(
    model_ids: Sequence[str] = (), max_context: int | None = None, vocab_size: int | None = None
) -> dict[str, Any]:
    """The document; given the served model's names and limits, the request schemas are narrowed to them."""
    schemas = copy.deepcopy(_SCHEMAS)
    _fit_to_engine(schemas, model_ids, max_context, vocab_size)
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "llnode OpenAI-compatible API",
            "version": __version__,
            "description": "Chat and text completions served by a llnode cluster. Any OpenAI client works "
            "with base_url http://<node>:7700/v1.",
        },
        "paths": {
            "/v1/chat/completions": _generation("ChatCompletionRequest", "ChatCompletion", "Chat completion"),
            "/v1/completions": _generation("CompletionRequest", "Completion", "Text completion"),
            "/v1/models": {
                "get": {
                    "summary": "Models this node serves",
                    "responses": {
                        "200": {
                            "description": "the model list (empty while no model is loaded)",
                            "content": {"application/json": {"schema": _ref("ModelList")}},
                        },
                        "401": _error("missing or wrong bearer token"),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model",
                    "parameters": [
                        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {
                            "description": "the model",
                            "content": {"application/json": {"schema": _ref("Model")}},
                        },
                        "401": _error("missing or wrong bearer token"),
                        "404": _error("unknown model"),
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    doc["paths"].update(copy.deepcopy(_extra_paths))
    return copy.deepcopy(doc)
