"""Shared helpers of the deployment checks: where things are, and the external tools.

The tools come from scripts/ci-deps.sh (.ci-venv/ venvs first, then PATH). A missing tool fails
the test with a message naming that script, unless BERTREC_SKIP_DEPLOY_TOOLS=1 turns it into a
skip (for machines that cannot install them). (A module of its own, not conftest.py: every
conftest is imported as "conftest", so `from conftest import` is ambiguous in a full run.)
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CI_VENV = Path(os.environ.get("BERTREC_CI_VENV", ROOT / ".ci-venv"))
# Hardware (cpu, gpu) x feedback store (SQLite by default, "-redis" for the shared one), and
# the shared-store CPU overlay with TLS and tokens ("-tls"), and with mutual TLS ("-mtls").
OVERLAYS = ("cpu", "gpu", "cpu-redis", "gpu-redis", "cpu-redis-tls", "cpu-redis-mtls")
REDIS_OVERLAYS = tuple(o for o in OVERLAYS if "-redis" in o)
SQLITE_OVERLAYS = tuple(o for o in OVERLAYS if o not in REDIS_OVERLAYS)
TLS_OVERLAYS = tuple(o for o in OVERLAYS if o.endswith("tls"))
JOBS = tuple(sorted((DEPLOY / "k8s" / "jobs").glob("*.yaml")))


def tool(name: str) -> str:
    """The path of an external tool; fails (or skips, see module doc) when it is missing."""
    for venv in ("tools", "checkov"):
        candidate = CI_VENV / venv / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found in {CI_VENV}/*/bin or on PATH: run scripts/ci-deps.sh"
    if os.environ.get("BERTREC_SKIP_DEPLOY_TOOLS") == "1":
        pytest.skip(message + " (skipped: BERTREC_SKIP_DEPLOY_TOOLS=1)")
    pytest.fail(message, pytrace=False)


def run_tool(name: str, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a tool from the repository root; fails the test on a non-zero exit, with its output."""
    command = [tool(name), *args]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    return result


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"].get("name"))]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_spec(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, kind, name)["spec"]["template"]["spec"]
    return spec


def server_env(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server container's env entries, in order (values and secret references)."""
    entries: list[dict[str, Any]] = pod_spec(docs, "Deployment", "bertrec")["containers"][0]["env"]
    return entries


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubelet_expand(text: str, defined: dict[str, str]) -> str:
    """What kubelet makes of a value in env, command or args: `$(NAME)` becomes the value of
    NAME when NAME is defined (earlier in env), `$$` becomes `$`, anything else stays."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return defined.get(name, match.group(0))

    return _REFERENCE.sub(replace, text)


_QUANTITY = re.compile(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
_SUFFIX = {None: Fraction(1), "m": Fraction(1, 1000), "k": Fraction(10**3), "M": Fraction(10**6),
           "G": Fraction(10**9), "T": Fraction(10**12), "Ki": Fraction(2**10),
           "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40)}  # fmt: skip


def quantity(text: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("2", "500m", "1.5", "2Gi") as an exact number."""
    match = _QUANTITY.fullmatch(str(text))
    assert match, f"not a resource quantity: {text!r}"
    return Fraction(match.group(1)) * _SUFFIX[match.group(2)]


def resource_field(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """What kubelet puts in an env variable for a Downward API `resourceFieldRef` of this
    container: the resource divided by the divisor, rounded up (0.5 CPU, divisor 1 -> "1").
    The resource must be set: without a limit kubelet would give the node's allocatable."""
    kind, _, name = ref["resource"].partition(".")
    resources = container.get("resources", {}).get(kind, {})
    assert name in resources, f"{container['name']} has no {ref['resource']} for {ref}"
    return str(math.ceil(quantity(resources[name]) / quantity(ref.get("divisor", "1"))))


def process_env(
    docs: list[dict[str, Any]], secrets: dict[tuple[str, str], str] | None = None
) -> dict[str, str]:
    """The server container's env as its process sees it: entries in order, `$(VAR)` expanded
    by kubelet's rules, Downward API resource fields resolved, Secret references from `secrets`
    ((name, key) -> value; left out when None)."""
    container = pod_spec(docs, "Deployment", "bertrec")["containers"][0]
    defined: dict[str, str] = {}
    for entry in server_env(docs):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            defined[entry["name"]] = kubelet_expand(entry["value"], defined)
        elif "resourceFieldRef" in source:
            defined[entry["name"]] = resource_field(container, source["resourceFieldRef"])
        elif secrets is not None:
            ref = source["secretKeyRef"]
            defined[entry["name"]] = secrets[(ref["name"], ref["key"])]
    return defined
