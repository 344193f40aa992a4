"""The checks that several entry points share, each with the message that names the argument and its value."""

from __future__ import annotations


class ArgumentError(ValueError):
    """A ValueError that also names the argument at fault (``argument``), for a caller that reports it in its
    own terms (the server names the request's field)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def integer(name: str, value, minimum: int = 1):
    """``value`` if it is an int (not a bool) >= ``minimum``; else ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def seed(name: str, value):
    """``value`` if it is None or a torch seed (an int in 0..2**64 - 1, unsigned 64-bit); else ValueError."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64):
        raise ValueError(f"{name} must be an integer in 0..2**64 - 1 or None, got {name}={value!r}")
    return value


def draft_length(value):
    """num_draft_tokens: an integer >= 1 or "auto"."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"num_draft_tokens must be an integer >= 1 or 'auto', got num_draft_tokens={value!r}")
    return value
