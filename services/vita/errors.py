"""Errors a caller can act on. Services map them to gRPC status codes; the CLI prints them without a traceback."""

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath


class VitaError(Exception):
    """Base class for errors whose message is meant for the person who sent the request."""


class InvalidInputError(VitaError, ValueError):
    """The request itself is wrong: undecodable media, bad sample rate, empty or oversized input."""


@contextmanager
def naming_file(source: object) -> Iterator[None]:
    """When `source` is a file path (str or Path), an InvalidInputError raised inside names it first (`PATH:
    message`), unless its message has it already: with several files given (`--wav a.wav --wav b.wav`), "audio is
    empty" alone does not say which. Other sources (bytes, arrays) pass through as they are."""
    try:
        yield
    except InvalidInputError as e:
        if isinstance(source, str | PurePath) and str(source) not in str(e):
            e.args = (f"{source}: {e}", *e.args[1:])
        raise


class ContextLengthError(InvalidInputError):
    """The prompt (after placeholder expansion) does not fit the model's context."""


class FatalError(VitaError):
    """The service cannot go on (a part it needs died): it stops and exits with status 1, so that its supervisor
    (Kubernetes, `vita up`) restarts it."""


class CheckpointError(VitaError):
    """A model directory is incomplete or inconsistent: missing/unexpected tensors, bad shapes, truncated files."""


class PortInUse(VitaError):
    """A server could not listen on its address: another process listens there (or the host is not this machine's)."""

    MARK = "the port is in use"  # in every message: what LocalStack looks for to retry on other ports

    @classmethod
    def from_bind(cls, error: OSError, action: str) -> VitaError:
        """The one-line error for an OSError from binding a socket; `action` is e.g. "listen on HOST:PORT"."""
        if error.errno == errno.EADDRINUSE:
            return cls(f"cannot {action}: {cls.MARK}")
        return VitaError(f"cannot {action}: {error.strerror or error}")


def one_line(message: object) -> str:
    """An error message as the one line a CLI or a service prints on stderr."""
    return " ".join(str(message).split()) or "(no message)"


def ffmpeg_reason(error: OSError) -> str:
    """FFmpeg's reason for a PyAV error (`av.FFmpegError`), without the errno and file name its str() adds:
    "Invalid data found when processing input", not "[Errno 1094995529] Invalid data ...: '/path'"."""
    return (error.strerror or type(error).__name__).strip().rstrip(".")
