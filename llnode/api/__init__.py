"""The node's OpenAI-compatible HTTP API: routes, validation, errors, OpenAPI document, ``llnode chat``.

The daemon mounts it with ``setup_openai_routes(app, engine_provider)``; see :mod:`llnode.api.routes`.
"""

from llnode.api.auth import require_token
from llnode.api.errors import ApiError
from llnode.api.routes import EngineProvider, OpenAIRoutes, setup_openai_routes

__all__ = ["ApiError", "EngineProvider", "OpenAIRoutes", "require_token", "setup_openai_routes"]
