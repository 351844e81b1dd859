"""Generate the Python gRPC code for protos/vita/v1 into services/vita/v1 (not committed).

Used by `make proto` and by `setup.py`, so that every wheel built from this tree ships `vita.v1`. Regenerates
only when the stamp is missing or older than a .proto file. Needs `grpcio-tools` (pinned in requirements.lock).

    python services/build_protos.py [--force]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SERVICES = Path(__file__).resolve().parent
PROTOS = SERVICES.parent / "protos"
OUT = SERVICES / "vita" / "v1"
STAMP = OUT / ".generated"
HEADER = '"""Generated from protos/vita/v1 by `make proto`; do not edit."""\n'


def sources() -> list[Path]:
    return sorted(PROTOS.glob("vita/v1/*.proto"))


def up_to_date() -> bool:
    """True when the generated code is there and newer than every .proto (or there are no .proto files here)."""
    if not sources():
        return (OUT / "__init__.py").is_file()
    return STAMP.is_file() and all(p.stat().st_mtime <= STAMP.stat().st_mtime for p in sources())


def generate(force: bool = False) -> Path:
    """Regenerate vita/v1 when stale; returns its directory. Raises RuntimeError when it cannot be made."""
    if not force and up_to_date():
        return OUT
    if not sources():
        raise RuntimeError(f"{OUT} (generated gRPC code) is missing and there are no .proto files in {PROTOS}")
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError("grpcio-tools is needed to generate vita/v1 from protos/: pip install grpcio-tools") from None
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto, as `python -m grpc_tools.protoc`
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={SERVICES}", f"--pyi_out={SERVICES}",
            f"--grpc_python_out={SERVICES}", *map(str, sources())]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS / 'vita' / 'v1'}")
    (OUT / "__init__.py").write_text(HEADER)
    STAMP.touch()
    return OUT


if __name__ == "__main__":
    try:
        print(f"generated {generate(force='--force' in sys.argv[1:])}")
    except RuntimeError as e:
        sys.exit(f"build_protos: {e}")
