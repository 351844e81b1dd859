"""Where local artefacts live, and how a directory of them is published so that no reader sees it half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def vita_home() -> Path:
    """Where local artefacts (built models, logs, stack state) live: $VITA_HOME, else ~/.cache/vita."""
    return Path(os.environ.get("VITA_HOME") or Path.home() / ".cache" / "vita")


@contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False, marker: str = "config.json") -> Iterator[Path]:
    """Yields an empty staging directory next to `path`; on a clean exit it is renamed to `path`.

    A directory at `path` that holds `marker` is a finished one (another process may have published it while this
    one was writing): it is kept and the staging copy discarded, unless `overwrite`. Anything else at `path` is
    replaced. If the block raises, the staging directory is removed and `path` is left as it was. The staging
    directory sits in `path`'s parent, so the rename stays on one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        if path.joinpath(marker).is_file() and not overwrite:
            return
        if path.exists():
            shutil.rmtree(path)
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the model from other users (a pod's uid)
        try:
            staging.rename(path)
        except OSError:
            if not path.joinpath(marker).is_file():  # not a finished copy that won the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """The process's umask: Linux's /proc says it; elsewhere os.umask, which reads it only by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
