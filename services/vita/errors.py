"""Errors a caller can act on. Services map them to gRPC status codes; the CLI prints them without a traceback."""


class VitaError(Exception):
    """Base class for errors whose message is meant for the person who sent the request."""


class InvalidInputError(VitaError, ValueError):
    """The request itself is wrong: undecodable media, bad sample rate, empty or oversized input."""


class ContextLengthError(InvalidInputError):
    """The prompt (after placeholder expansion) does not fit the model's context."""


class CheckpointError(VitaError):
    """A model directory is incomplete or inconsistent: missing/unexpected tensors, bad shapes, truncated files."""


class PortInUse(VitaError):
    """A server could not listen on its address: another process listens there (or the host is not this machine's)."""

    MARK = "the port is in use"  # in every message: what LocalStack looks for to retry on other ports
