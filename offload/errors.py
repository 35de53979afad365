"""Errors a user can act on. Every message names the file, key or value and what is allowed."""


class OffloadError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ConfigError(OffloadError):
    """config.json is missing, malformed, or describes an impossible model."""


class CheckpointError(OffloadError):
    """A checkpoint directory, index, shard or tensor is missing or damaged."""


class ProfileError(OffloadError):
    """A profile file is missing, malformed, or holds a value out of range."""


class QuantError(OffloadError):
    """A quantization spec is unknown or does not fit a weight."""


class ContextError(OffloadError):
    """A prompt plus the tokens to generate does not fit the context window."""


class TokenizerError(OffloadError):
    """No usable tokenizer file, or a malformed chat."""


class CacheError(OffloadError):
    """An expert cache, host store, link or prefetch setting is out of range or inconsistent."""


class TraceError(OffloadError):
    """A routing trace file is missing, damaged or inconsistent, or a replay setting is out of range."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    return (str(err).splitlines() or [type(err).__name__])[0]


class FlagError(OffloadError):
    """A command-line flag (or the same setting given in code) is out of range."""
