"""Static checks of deploy/: Dockerfiles, compose, Grafana, Prometheus rules, YAML lint.

No Docker engine or cluster is needed: these read the files, and run hadolint, checkov,
yamllint and promtool on them.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, run_tool

from bertrec.server.config import AUTO_WORKERS, load_config

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*[!e]"))  # not *.dockerignore
SERVING = ("Dockerfile.cpu", "Dockerfile.gpu")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending, start = "", 0
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form, not {args!r}"
    return value


def test_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.train"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for ins in parse_dockerfile(dockerfile):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        assert ins.keyword == "COPY", f"{dockerfile.name}:{ins.line}: use COPY, not ADD"
        for source in [w for w in words if not w.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}:{ins.line}: {source} missing"
            assert source in kept, f"{dockerfile.name}:{ins.line}: {source} is .dockerignored"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_every_package_pyproject_installs(dockerfile: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {shlex.split(i.args)[0] for i in parse_dockerfile(dockerfile) if i.keyword == "COPY"}
    assert folders <= copied, f"not copied: {sorted(folders - copied)}"
    assert {"pyproject.toml", "setup.py", "LICENSE", "README.md", "constraints.txt"} <= set(
        w for i in parse_dockerfile(dockerfile) if i.keyword == "COPY" for w in i.args.split()
    )


@pytest.mark.parametrize("name", SERVING)
def test_serving_images_run_bertrec_serve_as_non_root_with_a_grpc_healthcheck(name: str) -> None:
    instructions = parse_dockerfile(DEPLOY / "docker" / name)
    last = {i.keyword: i for i in instructions}  # the final stage's values win
    assert exec_form(last["ENTRYPOINT"].args) == ["bertrec", "serve"]
    assert exec_form(last["CMD"].args) == []
    assert last["USER"].args.split(":")[0] not in ("root", "0")
    assert "healthcheck.py" in last["HEALTHCHECK"].args
    installs = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1
    # Only the serving extra: no torch/transformers (`train`) in a serving image.
    extras = re.findall(r'"\.\[([\w,]+)\]"', installs[0])
    assert extras == [name.removeprefix("Dockerfile.")], installs[0]


def image_env(name: str) -> dict[str, str]:
    """The final stage's ENV values of a Dockerfile (KEY=VALUE pairs, no quoting used)."""
    instructions = parse_dockerfile(DEPLOY / "docker" / name)
    stage = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    pairs = [w for ins in instructions[stage:] if ins.keyword == "ENV" for w in ins.args.split()]
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.mark.parametrize("name", SERVING)
def test_serving_images_size_their_workers_from_the_containers_cpus(
    name: str, tmp_path: Path
) -> None:
    settings = {k: v for k, v in image_env(name).items() if k.startswith("BERTREC_")}
    assert settings["BERTREC_WORKERS"] == "auto"
    # Every setting the image sets is one the server accepts (the repository: a real folder).
    config = load_config(env={**settings, "BERTREC_MODEL_REPO": str(tmp_path)})
    assert config.workers == AUTO_WORKERS


def extra_requirements(extra: str) -> set[str]:
    """The distribution names `pip install ".[extra]"` brings, following `bertrec[...]`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names: set[str] = set()
    for requirement in extras[extra]:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        if name == "bertrec":
            for inner in re.findall(r"\[([\w,]+)\]", requirement)[0].split(","):
                names |= extra_requirements(inner)
        else:
            names.add(name)
    return names


@pytest.mark.parametrize("name", SERVING)
def test_serving_images_install_the_redis_client_for_the_shared_feedback_store(name: str) -> None:
    (install,) = [
        i.args for i in parse_dockerfile(DEPLOY / "docker" / name)
        if i.keyword == "RUN" and "pip install" in i.args
    ]  # fmt: skip
    (extra,) = re.findall(r'"\.\[(\w+)\]"', install)
    assert {"redis", "onnxruntime" if extra == "cpu" else "onnxruntime-gpu"} <= (
        extra_requirements(extra)
    )


def test_train_image_runs_bertrec_as_non_root() -> None:
    last = {i.keyword: i for i in parse_dockerfile(DEPLOY / "docker" / "Dockerfile.train")}
    assert exec_form(last["ENTRYPOINT"].args) == ["bertrec"]
    assert last["USER"].args.split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_to_exact_tags(dockerfile: Path) -> None:
    stages: set[str] = set()
    for ins in parse_dockerfile(dockerfile):
        if ins.keyword != "FROM":
            continue
        image, *rest = ins.args.split()
        if rest:
            stages.add(rest[-1])
        assert "$" not in image, "checkov and hadolint cannot see through ARG bases"
        assert image in stages or re.search(r":[\w.-]*\d[\w.-]*(@sha256:[0-9a-f]{64})?$", image), (
            f"{dockerfile.name}:{ins.line}: {image} is not pinned to a versioned tag"
        )
        assert not image.endswith(":latest")


def test_hadolint() -> None:
    config = str(DEPLOY / "docker" / ".hadolint.yaml")
    run_tool("hadolint", "--config", config, *map(str, DOCKERFILES))


def test_checkov_dockerfiles() -> None:
    files = [arg for p in DOCKERFILES for arg in ("-f", str(p))]
    run_tool("checkov", "--config-file", str(DEPLOY / ".checkov.yaml"), "--skip-download",
             "--quiet", "--compact", "--framework", "dockerfile", *files)  # fmt: skip


def test_yamllint() -> None:
    run_tool("yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), "deploy/")


def test_promtool_check_config_and_rules() -> None:
    run_tool("promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    run_tool(
        "promtool", "check", "rules", *map(str, (DEPLOY / "prometheus" / "rules").glob("*.yml"))
    )


def test_promtool_unit_tests_of_the_rules() -> None:
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))
    assert tests
    result = run_tool("promtool", "test", "rules", *map(str, tests))
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_a_readme_entry() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "bertrec.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "BertrecHighErrorRatio", "BertrecLatencyP99OverSLO", "BertrecNotReady",
        "BertrecNoTraffic", "BertrecModelVersionMismatch",
    }  # fmt: skip
    tested = "".join(p.read_text() for p in (DEPLOY / "prometheus" / "tests").glob("*.yml"))
    readme = (DEPLOY / "README.md").read_text()
    for alert in alerts:
        assert f"alertname: {alert}" in tested, f"{alert} has no promtool test"
        assert f"`{alert}`" in readme, f"{alert} is not explained in deploy/README.md"


def test_compose_builds_the_cpu_image_and_mounts_existing_files() -> None:
    compose_dir = DEPLOY / "compose"
    compose = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"bertrec", "prometheus", "grafana"}
    build = services["bertrec"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).resolve() == (
        DEPLOY / "docker" / "Dockerfile.cpu"
    )
    # The SQLite feedback store sits on a named volume (it outlives the read-only container),
    # mounted where the image made a folder the server's user owns (a new named volume takes
    # the folder's owner).
    store = services["bertrec"]["environment"]["BERTREC_FEEDBACK_STORE"].removeprefix("sqlite://")
    folder = str(Path(store).parent)
    mounts = dict(v.split(":")[1::-1] for v in services["bertrec"]["volumes"])
    assert mounts[folder] in compose["volumes"], f"{folder} is not on a named volume"
    assert services["bertrec"]["read_only"] is True
    user_setup = [
        i.args for i in parse_dockerfile(DEPLOY / "docker" / build["dockerfile"].split("/")[-1])
        if i.keyword == "RUN" and "useradd" in i.args
    ]  # fmt: skip
    assert re.search(rf"chown bertrec:bertrec [^&]*{folder}\b", user_setup[0]), user_setup
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose_dir / source).exists(), f"{service}: {source} missing"


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "bertrec.json").read_text())
    for panel in dashboard["panels"]:
        if panel["type"] == "row":  # a row only groups the panels below it
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "error ratio", "p50", "p99", "batch size", "queue wait",
                  "inference", "in-flight", "model version", "rejected", "dropped",
                  "queue depth", "failed batches", "auth failures"):  # fmt: skip
        assert topic in titles, f"no dashboard panel about {topic}"
