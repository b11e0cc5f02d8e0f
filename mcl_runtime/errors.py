"""Exceptions of the runtime. Each carries a message meant for the user."""


class MCLError(Exception):
    """Base class of the runtime's errors. ``param``: the request field at fault, when one is."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(MCLError, ValueError):
    """A model folder is missing, malformed or not supported."""


class InvalidRequestError(MCLError, ValueError):
    """A request cannot be served as given (bad parameters, prompt too long, ...)."""


class ContextLengthError(InvalidRequestError):
    """A prompt does not fit in the model's context (with room for one generated token)."""

    def __init__(self, message: str = "", param: str | None = "prompt") -> None:
        super().__init__(message, param)


class AdapterNotFoundError(InvalidRequestError):
    """A request or call names an adapter that is not loaded."""

    def __init__(self, message: str = "", param: str | None = "model") -> None:
        super().__init__(message, param)


class AdapterLoadError(MCLError, ValueError):
    """A PEFT adapter folder is missing, malformed, or does not fit the base model."""
