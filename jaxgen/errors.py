"""Errors that map one-to-one onto the API's OpenAI-style error bodies.

Every layer (sampling validation, engine, generator, HTTP shim) raises these, so the
HTTP status and `param` are decided where the fault is found, not in the shim.
"""
from __future__ import annotations


class JaxgenError(Exception):
    """Base error: carries the HTTP status, OpenAI error `type`, `param` and `code`."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict:
        """The OpenAI error body: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(JaxgenError, ValueError):
    """A client's mistake: a bad value, a missing field, a prompt that does not fit."""

    status = 400
    type = "invalid_request_error"


class NotFoundError(JaxgenError, LookupError):
    """An unknown model or adapter id."""

    status = 404
    type = "not_found_error"


class QueueFullError(JaxgenError):
    """The bounded request queue is full; the client should retry later."""

    status = 429
    type = "rate_limit_error"


class ModelLoadError(JaxgenError, OSError):
    """A checkpoint that is missing, truncated or of an unsupported kind."""

    status = 500
    type = "model_load_error"
