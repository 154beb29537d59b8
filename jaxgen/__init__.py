"""jaxgen: a JAX inference library for language models with a complete streaming chat-completion API."""
from .errors import InvalidRequestError, JaxgenError, ModelLoadError, NotFoundError, QueueFullError

__all__ = ["LLM", "load", "InvalidRequestError", "JaxgenError", "ModelLoadError", "NotFoundError", "QueueFullError"]


def __getattr__(name: str):
    """`LLM` and `load` import the engine (JAX and every model) on first use, not with the package: the command
    line restarts itself before its real work (`cli.restart_with_huge_pages`), and importing JAX first would cost
    that start 3-4 s for nothing."""
    if name in ("LLM", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included (tab completion in notebooks)."""
    return sorted(set(globals()) | set(__all__))
