"""jaxgen: a JAX inference library for language models with a complete streaming chat-completion API."""
from .api import LLM, load
from .errors import InvalidRequestError, JaxgenError, ModelLoadError, NotFoundError, QueueFullError

__all__ = ["LLM", "load", "InvalidRequestError", "JaxgenError", "ModelLoadError", "NotFoundError", "QueueFullError"]
