"""The package as a user gets it: a wheel built from services/, installed into a fresh virtualenv, run outside the repo.

The wheel is built without build isolation and installed with --no-deps (no network needed); the new virtualenv
reaches the test environment's dependencies through a .pth line, which puts that site-packages on sys.path without
running its own .pth files, so the checkout's editable install of `vita` is not seen: only the wheel's copy is.
The tree is copied without its generated `vita/v1`, so the build must generate it (setup.py, build_protos.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import grimp
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Imported only inside Triton's Python backend, which provides it; and `triton` (the compiler), imported only where
# the MoE kernel runs (vita/model/fused_moe.py), with torch's CUDA build, which depends on it.
PROVIDED_AT_RUN_TIME = {"triton_python_backend_utils", "triton"}

# `vita.cli.main` on each command, in one interpreter (the console script is run on its own below).
CLI_DRIVER = """
import contextlib, io, json, sys
from vita.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results.append({"argv": argv, "rc": rc, "out": out.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(REPO / "protos", src / "protos")
    shutil.copytree(REPO / "services", src / "services", ignore=shutil.ignore_patterns(
        "__pycache__", "build", "*.egg-info", "v1"))
    dist = src / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src / "services")], check=True, capture_output=True, text=True)
    (path,) = dist.glob("vita_omni-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def run(venv: Path, *argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A command of the installed package, from `cwd` (outside the repo), with no PYTHONPATH pointing into it."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(argv, cwd=cwd, env={**environ, **env, "PATH": f"{venv / 'bin'}:{environ['PATH']}"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_ships_the_generated_protos_and_the_training_code(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("assistant", "bus", "media", "session"):
        assert {f"vita/v1/{module}_pb2.py", f"vita/v1/{module}_pb2_grpc.py"} <= names
    assert {"vita/training/duplex.py", "vita/training/speech.py", "vita/eval/cli.py", "vita/tiny.py",
            "vita/paths.py"} <= names
    console = {f"vita/realtime/console/{f}" for f in ("index.html", "console.js", "mic-worklet.js", "console.css")}
    assert console <= names  # the browser console the gateway serves (package data)
    assert not any(n.startswith(("build_protos", "setup", "tests/", "training/")) for n in names)


def test_declared_dependencies_are_the_locked_ones_and_cover_every_import(wheel: Path) -> None:
    """Every Requires-Dist of the wheel is satisfied by the locked environment (requirements.lock), and every
    package that `vita` imports (function-level imports too) comes from a declared distribution."""
    meta = zipfile.ZipFile(wheel).read("vita_omni-0.1.0.dist-info/METADATA").decode()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                    if line.startswith("Requires-Dist:")]
    runtime = [r for r in requirements if r.marker is None]
    for r in runtime:
        installed = metadata.version(r.name)
        assert r.specifier.contains(installed, prereleases=True), f"{r} but the lock has {r.name}=={installed}"

    declared = {canonicalize_name(r.name) for r in runtime}
    graph = grimp.build_graph("vita", include_external_packages=True, cache_dir=None)
    imported = {m for m in graph.modules if not m.startswith("vita") and m not in sys.stdlib_module_names}
    providers = metadata.packages_distributions()
    undeclared = {m: providers.get(m) for m in imported - PROVIDED_AT_RUN_TIME
                  if not declared & {canonicalize_name(d) for d in providers.get(m, ())}}
    assert not undeclared, f"imported by vita but not in services/pyproject.toml: {undeclared}"


def test_installed_package_runs_its_commands_and_the_demo(venv: Path, duplex_model_dir: Path,
                                                          tmp_path: Path) -> None:
    where = run(venv, "python", "-c", "import vita; print(vita.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    assert "model-info" in run(venv, "vita", "--help", cwd=tmp_path).stdout

    commands = [["model-info", "--preset", "tiny"], ["eval", "--help"], ["train", "--help"], ["export", "--help"],
                *(["serve", service, "--help"] for service in ("orchestrator", "llm", "audio-encoder",
                                                               "vision-encoder", "realtime"))]
    results = json.loads(run(venv, "python", "-c", CLI_DRIVER, json.dumps(commands), cwd=tmp_path).stdout)
    for result in results:
        assert result["rc"] in (0, None), result
    assert results[0]["out"].startswith("preset tiny:"), results[0]["out"]
    for result in results[1:]:
        assert result["out"].startswith(f"usage: vita {' '.join(result['argv'][:-1])}"), result["out"][:200]
    assert "--steps" in run(venv, "python", "-m", "vita.training.duplex", "--help", cwd=tmp_path).stdout

    # The demo's model preparation: the tiny model built from scratch, and the duplex fine-tune found where the
    # test session's VITA_HOME keeps it (duplex_model_dir built it there with the checkout's code).
    tiny = tmp_path / "home" / "models" / "tiny"
    run(venv, "vita", "init-tiny", cwd=tmp_path, VITA_HOME=str(tmp_path / "home"))
    assert (tiny / "config.json").is_file() and (tiny / "tokenizer.model").is_file()
    found = run(venv, "python", "-c", "from vita.demo import duplex_model; print(duplex_model())", cwd=tmp_path)
    assert found.stdout.strip().splitlines()[-1] == str(duplex_model_dir)

    # One request through the in-process demo (image, video and espeak-ng speech made on the spot).
    demo = run(venv, "python", "-m", "vita.demo", "--in-process", "--model", str(tiny), "--max-tokens", "2",
               cwd=tmp_path)
    assert "finish: length" in demo.stdout and "audio in 1 clip" in demo.stdout, demo.stdout
