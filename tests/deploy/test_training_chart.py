"""helm/vita-training's defaults make a run that can finish: the rendered stage configs read by `vita train`'s own
loader, each stage entry with its own file and output_dir, each stage starting from the previous one's output,
retries resuming, and the export written where the engine Job and helm/vita read it. The rendered run script is
also run here, for real (torchrun, `vita train`, `vita export`), on micro stage configs."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import helm_python as helm
import pytest
import yaml

from tests.deploy import k8s
from vita.training.config import StageConfig, load_stage_config

CONFIGMAP = f"{k8s.RELEASE}-vita-training-config"
JOB = f"{k8s.RELEASE}-vita-training"
CONFIG_DIR = "/etc/vita-training"
MULTINODE = k8s.values_file(k8s.TRAINING_CHART / "examples" / "multinode.yaml")
PRODUCTION = k8s.values_file(k8s.VITA_CHART / "examples" / "production.yaml")
TRAIN_LINE = re.compile(r"^torchrun --no-python vita train (.*)$", re.M)


def _train_commands(script: str) -> list[list[str]]:
    """Each stage's `vita train` argv (after `vita`), as the shell splits it; `$resume` kept as a word."""
    return [["train", *shlex.split(m.group(1))] for m in TRAIN_LINE.finditer(script)]


def _export_command(script: str) -> list[str]:
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("vita export "))
    return shlex.split(line)[1:]


def _trainer_env(docs: list[dict]) -> dict[str, str]:
    """The trainer's environment: the indexed Job's container (node 0), or the TrainJob's trainer (whose runtime
    adds the PET_* variables)."""
    if k8s.named(docs, "TrainJob"):
        container = k8s.one(docs, "TrainJob", JOB)["spec"]["trainer"]
    else:
        container = k8s.one(docs, "Job", JOB)["spec"]["template"]["spec"]["containers"][0]
    fields = {"metadata.annotations['batch.kubernetes.io/job-completion-index']": "0"}
    return k8s.container_env(container, {}, fields)


def _stage_configs(docs: list[dict], tmp_path: Path) -> list[tuple[list[str], StageConfig]]:
    """(argv, config) per stage in run order: the ConfigMap's file each argv names, read by the project's loader
    with the trainer container's environment."""
    data = k8s.one(docs, "ConfigMap", CONFIGMAP)["data"]
    out = []
    with mock.patch.dict(os.environ, _trainer_env(docs)):
        for argv in _train_commands(data["run.sh"]):
            path = k8s.flag(argv, "--config")
            assert path.startswith(CONFIG_DIR + "/"), path
            name = path.removeprefix(CONFIG_DIR + "/")
            assert name in data, f"run.sh reads {path}, which the ConfigMap does not hold"
            (tmp_path / name).write_text(data[name])
            config = load_stage_config(tmp_path / name, [])
            assert str(config.stage) == k8s.flag(argv, "--stage")
            out.append((argv, config))
    return out


@pytest.mark.parametrize("values", [{}, MULTINODE], ids=["default", "multinode"])
def test_default_stage_configs_load_and_parse_as_vita_train_reads_them(values, tmp_path):
    """Was: every stage config `{}` (StageConfig() missing `stage`) and YAML floats such as 2e-05 read back as
    strings; now each file loads with vita.training.config and each argv parses with the `vita` CLI."""
    from vita import cli

    docs = k8s.render(k8s.TRAINING_CHART, values)
    stages = _stage_configs(docs, tmp_path)
    assert [int(k8s.flag(a, "--stage")) for a, _ in stages] == [1, 2, 2, 3]
    for argv, config in stages:
        assert config.data.manifests and (config.init.model or config.init.preset)
        assert isinstance(config.optim.lr, float) and config.optim.lr > 0
        parsed = cli.build_parser().parse_args([w for w in argv if w != "$resume"] + ["--resume"])
        assert parsed.resume and parsed.stage == config.stage


REPO_ENV = {"VITA_DATA": "/data", "VITA_TRAIN_DIR": "/output/checkpoints",
            "MIXTRAL_DIR": "/data/models/Mixtral-8x7B-v0.1", "INTERNVIT_DIR": "/data/models/InternViT-300M-448px"}


def test_the_defaults_are_the_repositorys_full_size_configs(tmp_path):
    """The chart ships training/configs/<name>.yaml; only paths differ (the claims' layout, each entry's own
    output_dir, and stage 3's speech cache, which cannot be on the read-only data claim)."""
    paths = ("output_dir", "init.model", "data.media_cache")

    def strip(config: StageConfig) -> dict:
        d = config.to_dict()
        for path in paths:
            *parents, key = path.split(".")
            node = d
            for p in parents:
                node = node[p]
            node.pop(key)
        return d

    stages = _stage_configs(k8s.render(k8s.TRAINING_CHART), tmp_path)
    with mock.patch.dict(os.environ, REPO_ENV):
        for argv, config in stages:
            name = Path(k8s.flag(argv, "--config")).stem
            repo = load_stage_config(k8s.ROOT / "training" / "configs" / f"{name}.yaml")
            assert strip(config) == strip(repo), name
            if config.stage == 1:
                assert config.init.model == repo.init.model
    assert stages[-1][1].data.media_cache.startswith("/output/")


@pytest.mark.parametrize("values", [{}, MULTINODE], ids=["default", "multinode"])
def test_each_stage_starts_from_the_previous_ones_output_and_export_reads_the_last(values, tmp_path):
    """Was: both stage-2 entries rendered to stage2.yaml (the vision config replaced by the audio one). Now each
    entry has its own config file and output_dir, and the chain stage1 -> vision -> audio -> stage 3 -> export
    holds."""
    docs = k8s.render(k8s.TRAINING_CHART, values)
    stages = _stage_configs(docs, tmp_path)
    files = [k8s.flag(a, "--config") for a, _ in stages]
    dirs = [c.output_dir for _, c in stages]
    assert len(set(files)) == len(files) and len(set(dirs)) == len(dirs)
    second = [(f, c) for f, (_, c) in zip(files, stages) if c.stage == 2]
    assert [c.trainable for _, c in second] == [["vision_connector"], ["audio_encoder", "audio_connector"]]
    data = k8s.one(docs, "ConfigMap", CONFIGMAP)["data"]
    assert len({data[Path(f).name] for f, _ in second}) == 2
    env = _trainer_env(docs)
    assert stages[0][1].init.model.startswith(env["VITA_DATA_DIR"] + "/")
    for (_, before), (_, after) in itertools.pairwise(stages):
        assert after.init.model == f"{before.output_dir}/final", (before.name, after.name)
    for d in dirs:
        assert d.startswith(env["VITA_OUTPUT_DIR"] + "/")
    export = _export_command(data["run.sh"])
    assert k8s.flag(export, "--checkpoint") == dirs[-1]


def test_the_export_is_where_the_engine_job_and_helm_vita_read_it():
    """Was: `vita export --output /output` (over the checkpoints, with triton/ instead of model_repository/) while
    the engine read /output/model and helm/vita mounts the claim's model/ and model_repository/."""
    docs = k8s.render(k8s.TRAINING_CHART)
    values = k8s.values_file(k8s.TRAINING_CHART / "values.yaml")
    script = k8s.one(docs, "ConfigMap", CONFIGMAP)["data"]["run.sh"]
    export = _export_command(script)
    from vita import cli

    parsed = cli.build_parser().parse_args(export)
    mount = values["output"]["mountPath"]
    model = f"{mount}/{PRODUCTION['model']['pvc']['subPath']}"
    repository = f"{mount}/{PRODUCTION['triton']['modelRepository']['pvc']['subPath']}"
    assert parsed.output == model and parsed.overwrite
    assert not Path(parsed.checkpoint).is_relative_to(parsed.output)
    assert not Path(parsed.output).is_relative_to(parsed.checkpoint)
    assert f"cp -R '{model}/triton/.' '{repository}'" in script
    assert values["output"]["claimName"] == PRODUCTION["model"]["pvc"]["claimName"] \
        == PRODUCTION["triton"]["modelRepository"]["pvc"]["claimName"]
    # The image's Triton templates: `vita export`'s default (next to the source tree) is not in the image.
    dockerfile = (k8s.ROOT / "Dockerfile").read_text()
    assert f"COPY model_repository {parsed.templates}" in dockerfile
    engine = k8s.one(docs, "Job", f"{k8s.RELEASE}-vita-training-engine")
    build = engine["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert re.search(rf'from_hugging_face\(\s*"{re.escape(model)}"', build)
    assert f"--output_dir '{repository}/tensorrt_llm/1'" in build


VALID = {"init": {"preset": "tiny"}, "data": {"manifests": ["${VITA_DATA_DIR}/m.jsonl"]}}


@pytest.mark.parametrize("values, error, message", [
    ({"stages": [{"name": "a", "stage": 1, "config": {}}]}, helm.HelmValuesError, "/stages/0/config"),
    ({"stages": [{"name": "a", "stage": 1, "config": {"init": {"seed": 1}, "data": {"manifests": ["m"]}}}]},
     helm.HelmValuesError, "/stages/0/config/init"),
    ({"stages": [{"name": "a", "stage": 1, "config": {"init": {"preset": "tiny"}, "data": {"manifests": []}}}]},
     helm.HelmValuesError, "/stages/0/config/data/manifests"),
    ({"stages": [{"name": "a", "stage": 1, "config": {**VALID, "max_step": 5}}]}, helm.HelmValuesError, "max_step"),
    ({"stages": [{"stage": 1, "config": VALID}]}, helm.HelmValuesError, "name"),
    ({"stages": [{"name": "a", "stage": 2, "config": {**VALID, "stage": 1}}]}, helm.HelmRenderError,
     "config.stage is 1 but the entry is stage 2"),
    ({"stages": [{"name": "a", "stage": 1, "config": VALID}, {"name": "a", "stage": 2, "config": VALID}]},
     helm.HelmRenderError, "name \"a\" is already stages[0]'s"),
    ({"stages": [{"name": "a", "stage": 1, "config": {**VALID, "output_dir": "${VITA_OUTPUT_DIR}/x"}},
                 {"name": "b", "stage": 2, "config": {**VALID, "output_dir": "/output/x/"}}]},
     helm.HelmRenderError, "/output/x is also stages[0]'s"),
    ({"stages": [{"name": "a", "stage": 1, "config": {**VALID, "output_dir": "/tmp/a"}}]}, helm.HelmRenderError,
     "is not on the output claim"),
    ({"stages": [{"name": "a", "stage": 1, "config": {**VALID, "output_dir": "${HOME}/a"}}]}, helm.HelmRenderError,
     "the only variables"),
    ({"export": {"model": "model", "modelRepository": "model/triton"}}, helm.HelmRenderError,
     "must be separate directories"),
    ({"export": {"args": ["--output", "/output"]}}, helm.HelmValuesError, "/export/args/0"),
    ({"resume": "never"}, helm.HelmValuesError, "/resume"),
])
def test_a_config_that_could_not_run_fails_the_render(values, error, message):
    with helm.Chart.load(str(k8s.TRAINING_CHART)) as chart, pytest.raises(error) as e:
        chart.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE)
    assert message in str(e.value)


# --- the rendered run script, run --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_values(tmp_path: Path, **extra) -> dict:
    """Three stages (1, then two stage-2 entries) on a micro model, one step each; the claims are directories."""
    common = {"data": {"manifests": ["${VITA_DATA_DIR}/text.jsonl"], "packing_length": 256},
              "max_steps": 1, "save_every": 1, "threads": 2, "progress": False}
    return {
        "gpusPerNode": 0,
        "data": {"claimName": "data", "mountPath": str(tmp_path / "data")},
        "output": {"claimName": "output", "mountPath": str(tmp_path / "output")},
        "stages": [
            {"name": "stage1_llm", "stage": 1, "config": {**common, "init": {"model": "${VITA_DATA_DIR}/base"}}},
            {"name": "stage2_vision", "stage": 2, "config": {
                **common, "name": "vision", "init": {"model": "${VITA_OUTPUT_DIR}/checkpoints/stage1_llm/final"}}},
            {"name": "stage2_audio", "stage": 2, "config": {
                **common, "name": "audio", "data": {**common["data"], "manifests": ["${VITA_DATA_DIR}/audio.jsonl"]},
                "init": {"model": "${VITA_OUTPUT_DIR}/checkpoints/stage2_vision/final"}}},
        ],
        "export": {"templates": str(k8s.ROOT / "model_repository")},
        **extra,
    }


def _render(values: dict, revision: int) -> list[dict]:
    """The manifests of `helm install` (revision 1) or of the upgrade to `revision`."""
    with helm.Chart.load(str(k8s.TRAINING_CHART)) as chart:
        rendered = chart.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE, revision=revision,
                                is_install=revision == 1, is_upgrade=revision > 1)
    return [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]


def _run(docs: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    """run.sh as the trainer container runs it: its environment, the ConfigMap's files, torchrun on this host."""
    data = k8s.one(docs, "ConfigMap", CONFIGMAP)["data"]
    config_dir = tmp_path / "config"
    shutil.rmtree(config_dir, ignore_errors=True)
    config_dir.mkdir()
    for name, text in data.items():
        (config_dir / name).write_text(text.replace(CONFIG_DIR + "/", f"{config_dir}/"))
    env = {**os.environ, **_trainer_env(docs), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
           "HOME": str(tmp_path / "home"), "VITA_HOME": str(tmp_path / "home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["/bin/sh", str(config_dir / "run.sh")], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_rendered_run_resumes_on_retries_starts_fresh_first_and_exports_for_helm_vita(tmp_path):
    """The run script, for real: a first try that fails in its third stage (its manifest is missing), the Job's
    retry (same revision: every started stage resumes, the finished ones train nothing), the export where
    helm/vita reads it; then a new revision refuses the old checkpoints, unless `resume: always`."""
    from tests.training_helpers import text, write_model

    data = tmp_path / "data"
    data.mkdir()
    write_model(data / "base")
    sample = {"kind": "text", "conversation": text("Hello?", "Hi there.").conversation}
    (data / "text.jsonl").write_text("".join(json.dumps(sample) + "\n" for _ in range(4)))
    docs = _render(_micro_values(tmp_path), 1)
    output = tmp_path / "output"

    first = _run(docs, tmp_path)
    assert first.returncode != 0 and "audio.jsonl" in first.stdout + first.stderr, first.stderr[-3000:]
    for name in ("stage1_llm", "stage2_vision"):
        assert (output / "checkpoints" / name / "final" / "config.json").is_file()
    assert "a retry" not in first.stdout

    (data / "audio.jsonl").write_text((data / "text.jsonl").read_text())
    retry = _run(docs, tmp_path)
    assert retry.returncode == 0, retry.stderr[-3000:]
    for name in ("stage1_llm", "stage2_vision", "stage2_audio"):
        assert f"{name}: a retry, resuming" in retry.stdout
    assert retry.stderr.count("stage already finished") == 2  # stage 1 and vision: nothing trained again
    audio = json.loads((output / "checkpoints" / "stage2_audio" / "final" / "training.json").read_text())
    assert audio["config"]["init"]["model"] == str(output / "checkpoints" / "stage2_vision" / "final")

    # What helm/vita mounts: model/ (vita serve --model) and model_repository/ (Triton's init script).
    model = output / PRODUCTION["model"]["pvc"]["subPath"]
    repository = output / PRODUCTION["triton"]["modelRepository"]["pvc"]["subPath"]
    verified = subprocess.run([str(Path(sys.executable).parent / "vita"), "export", "--verify", str(model)],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert (repository / "tensorrt_llm" / "config.pbtxt").is_file()
    assert list(output.glob(".vita-export-done-r1"))
    triton = k8s.one(k8s.render(k8s.VITA_CHART, PRODUCTION), "Deployment", f"{k8s.RELEASE}-triton")
    init = next(c for c in triton["spec"]["template"]["spec"]["initContainers"]
                if c["name"] == "prepare-model-repository")
    (repository / "tensorrt_llm" / "1").mkdir()  # the engine Job's output
    models = tmp_path / "models"
    models.mkdir()
    prepare = init["args"][0].replace("/repository", str(repository)).replace("/models", str(models))
    subprocess.run([*init["command"], prepare], check=True, capture_output=True)
    assert f'"{models}/tensorrt_llm/1"' in (models / "tensorrt_llm" / "config.pbtxt").read_text()

    # A new revision on the same claim: its first try does not take an earlier run's checkpoints for its own.
    again = _run(_render(_micro_values(tmp_path), 2), tmp_path)
    assert again.returncode == 2 and "already holds checkpoints of an earlier run" in again.stderr, again.stderr
    always = _run(_render(_micro_values(tmp_path, resume="always"), 3), tmp_path)
    assert always.returncode == 0, always.stderr[-3000:]
    assert always.stderr.count("stage already finished") == 3


def test_the_schemas_stage_config_keys_are_stage_configs_fields():
    """values.schema.json refuses a key StageConfig does not have at render time; it must know every one it has."""
    import dataclasses

    from vita.training.config import PARAMETER_GROUPS

    schema = json.loads((k8s.TRAINING_CHART / "values.schema.json").read_text())
    config = schema["properties"]["stages"]["items"]["properties"]["config"]
    assert set(config["properties"]) == {f.name for f in dataclasses.fields(StageConfig)}
    assert set(config["properties"]["trainable"]["items"]["enum"]) == set(PARAMETER_GROUPS)
