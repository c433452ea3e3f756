"""What `bertrec serve` takes from the environment it runs in, besides its settings.

- Which `BERTREC_*` variables it accepts. A misspelt setting (`BERTREC_MAX_KK=5`) used to be
  ignored without a word, so the server ran with the default; the TOML file already rejects
  unknown keys, and the environment now does the same. Some `BERTREC_*` names are not server
  settings but belong to other tools that may share the environment: they are listed here, the
  one place to add such a name.
- How many CPUs it may keep busy (`usable_cpus`), which sizes `--workers 0` (auto). A container
  sees every CPU of its node in `os.cpu_count()`, and often in its affinity mask too, while its
  cgroup CPU quota (a Kubernetes CPU limit, `docker run --cpus`) lets it use far fewer: one
  worker per node CPU would be throttled, so the quota caps the count.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PREFIX = "BERTREC_"

# Read by the test suite, CI scripts, client build scripts and docker compose, never by serve.
OTHER_TOOLS_VARIABLES = frozenset(
    {
        "BERTREC_REQUIRE_TOOLCHAINS",  # Makefile `make test`: a missing toolchain fails a test
        "BERTREC_SKIP_DEPLOY_TOOLS",  # tests/deploy: a missing deploy tool skips its test
        "BERTREC_CI_VENV",  # scripts/ci-deps.sh and tests: where the CI tools venv lives
        "BERTREC_JAVA_LIB_DIR",  # clients/java/classpath.sh
        "BERTREC_MODELS",  # deploy/compose: host folder mounted as the repository
        "BERTREC_MODEL_NAME",  # deploy/compose: becomes BERTREC_MODEL in the container
        "BERTREC_TRAIN_FEEDBACK",  # default of `bertrec train --feedback` (no password in argv)
        "BERTREC_LAYOUT_DIR",  # server/workers.py: the run's shared layout folder, per worker
    }
)

# Kubernetes "service links": each Service named bertrec or bertrec-* puts these in every pod of
# its namespace (BERTREC_SERVICE_HOST, BERTREC_SERVICE_PORT_GRPC, BERTREC_PORT_50051_TCP_ADDR,
# ...), unless the pod sets enableServiceLinks: false.
_SERVICE_LINK = re.compile(
    r"BERTREC_(?:[A-Z0-9_]+_)?"
    r"(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
# ... and `<SERVICE>_PORT=tcp://10.0.0.7:50051`, told apart from a misspelt setting by its value.
_SERVICE_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://\S+")


def unknown_variables_problem(env: Mapping[str, str], accepted: Iterable[str]) -> str | None:
    """Describe the `BERTREC_*` variables in `env` that nothing reads, or None if there are none.

    Args:
        env: the environment.
        accepted: the names `bertrec serve` reads (one per setting, and the config file's).
    Returns:
        One message naming each unknown variable and, where one is close, the name it was
        probably meant to be.
    """
    known = sorted({*accepted, *OTHER_TOOLS_VARIABLES})
    unknown = sorted(
        name
        for name, value in env.items()
        if name.startswith(PREFIX) and name not in known and not _service_link(name, value)
    )
    if not unknown:
        return None
    described = ", ".join(_with_suggestion(name, known) for name in unknown)
    return (
        f"unknown environment variable(s): {described}. A setting's variable is {PREFIX} "
        f"and its flag's name in capitals (--max-k: {PREFIX}MAX_K)"
    )


def _service_link(name: str, value: str) -> bool:
    if _SERVICE_LINK.fullmatch(name):
        return True
    return name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(value) is not None


def _with_suggestion(name: str, known: list[str]) -> str:
    # Compared without the shared prefix, which would make every pair look alike.
    suffixes = [k.removeprefix(PREFIX) for k in known]
    close = difflib.get_close_matches(name.removeprefix(PREFIX), suffixes, n=1, cutoff=0.6)
    return f"{name} (did you mean {PREFIX}{close[0]}?)" if close else name


@dataclass(frozen=True)
class UsableCpus:
    """How many CPUs this process may keep busy, and the two limits that say so.

    Attributes:
        affinity: CPUs the scheduler lets this process run on (`os.sched_getaffinity`).
        quota: the tightest cgroup CPU quota over this process's cgroup and its ancestors, in
            CPUs (`cpu.max` on cgroup v2, `cpu.cfs_quota_us / cpu.cfs_period_us` on v1);
            None where no quota is set (or no cgroup file is readable).
    """

    affinity: int
    quota: float | None

    @property
    def count(self) -> int:
        """min(affinity, quota rounded up), at least 1: a 1.5-CPU quota keeps two busy."""
        if self.quota is None:
            return max(1, self.affinity)
        return max(1, min(self.affinity, math.ceil(self.quota)))


def worker_cpus(
    workers: int, pin: str, cpus: UsableCpus, affinity: list[int]
) -> list[set[int]] | None:
    """The CPUs each of `workers` worker processes runs on, or None to let the scheduler place
    them (`pin_workers`).

    Why pin: one Python process's threads hand the GIL to each other several times per call;
    on one core a hand-off is a plain switch, across cores it is a cross-CPU wake-up and a
    wait (`bench.server`, 10k x 64: one worker on one core answered 1,917 q/s at 517 us of CPU
    per call, the same worker free on two cores 1,015 q/s at 1,143 us). "auto" pins where that
    was measured: one worker per CPU (`--workers auto`), on CPUs that are this process's own,
    with no cgroup quota below the affinity (a Kubernetes CPU limit without an exclusive cpuset
    leaves every node CPU in the affinity, shared with other pods: pinning there would pile
    every pod onto the same first cores). "on" pins anyway: with fewer workers than CPUs each
    gets its share as a block of CPUs (as its ONNX Runtime threads do, `size_processes`), with
    more, one CPU each, round robin.

    Args:
        workers: worker processes (>= 1).
        pin: "auto", "on" or "off".
        cpus: this process's usable CPUs (`usable_cpus`).
        affinity: the CPU ids this process may run on, e.g. sorted(os.sched_getaffinity(0)).
    """
    if pin == "off" or workers < 2 or not affinity:
        return None
    if pin == "auto":
        shared = cpus.quota is not None and math.ceil(cpus.quota) < len(affinity)
        if shared or workers != len(affinity):
            return None
    if workers >= len(affinity):
        return [{affinity[i % len(affinity)]} for i in range(workers)]
    share, extra = divmod(len(affinity), workers)  # the first `extra` blocks get one more
    starts = [i * share + min(i, extra) for i in range(workers + 1)]
    return [set(affinity[starts[i] : starts[i + 1]]) for i in range(workers)]


def usable_cpus(proc_self: Path = Path("/proc/self")) -> UsableCpus:
    """The CPUs this process may use: its affinity mask, capped by its cgroup CPU quota.

    Args:
        proc_self: where `mountinfo` and `cgroup` of this process are read (tests pass a folder
            of fake files; the cgroup folders named in that `mountinfo` are read as they are).
    """
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return UsableCpus(affinity or os.cpu_count() or 1, cgroup_cpu_quota(proc_self))


def cgroup_cpu_quota(proc_self: Path = Path("/proc/self")) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroups, v1 and v2; None: no quota.

    The cgroup folder is found as the kernel reports it (`/proc/self/cgroup`, relative to each
    cgroup mount's root in `/proc/self/mountinfo`), so it works inside containers with and
    without a cgroup namespace; every ancestor up to the mount is read too, because a parent's
    quota (a Kubernetes pod's) limits its children.
    """
    try:
        mounts = (proc_self / "mountinfo").read_text().splitlines()
        memberships = (proc_self / "cgroup").read_text().splitlines()
    except OSError:
        return None  # not Linux, or /proc not mounted
    quotas = [
        quota
        for line in mounts
        for folder in _cpu_cgroup_folders(line, memberships)
        if (quota := _quota(folder)) is not None
    ]
    return min(quotas, default=None)


def _cpu_cgroup_folders(mount_line: str, memberships: list[str]) -> list[Path]:
    """This process's cgroup folder and its ancestors within one mountinfo line's mount, if
    that mount is a cgroup v2 hierarchy or the v1 `cpu` controller's."""
    fields = mount_line.split()
    if "-" not in fields[6:]:
        return []
    tail = fields[fields.index("-", 6) + 1 :]
    root, mount_point = PurePosixPath(fields[3]), Path(fields[4].replace("\\040", " "))
    if tail[:1] == ["cgroup2"]:
        paths = [m.split(":", 2)[2] for m in memberships if m.startswith("0::")]
    elif tail[:1] == ["cgroup"] and len(tail) > 2 and "cpu" in tail[2].split(","):
        paths = [m.split(":", 2)[2] for m in memberships
                 if m.count(":") >= 2 and "cpu" in m.split(":", 2)[1].split(",")]  # fmt: skip
    else:
        return []
    folders = []
    for path in map(PurePosixPath, paths):
        # Outside the mount's root (a container seeing its host's path): the mount itself is
        # the container's cgroup.
        parts = path.relative_to(root).parts if path.is_relative_to(root) else ()
        folders += [mount_point.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return folders


def _quota(folder: Path) -> float | None:
    """One cgroup folder's CPU quota in CPUs (v2 `cpu.max`, else v1 CFS files); None: none."""
    try:
        if (folder / "cpu.max").is_file():
            limit, period = (folder / "cpu.max").read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():
            limit = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
            return None if int(limit) < 0 else int(limit) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None  # unreadable or malformed: no limit known from this folder
    return None
