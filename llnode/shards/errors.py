"""Errors of shard distribution, with a short machine-readable ``code`` a transport can put on the wire."""

from __future__ import annotations


class ShardError(Exception):
    """Base class: something about a shard set is wrong or unavailable."""

    code = "shard_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ShardServeError(ShardError):
    """A chunk or index request that this node cannot answer (unknown model/file, bad range...).

    Codes: ``unknown_model``, ``unknown_file``, ``not_verified``, ``out_of_range``, ``bad_request``.
    """

    code = "bad_request"


class ShardFetchError(ShardError):
    """Files could not be obtained from any peer; ``missing`` names them (``model/file``)."""

    code = "fetch_failed"

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
