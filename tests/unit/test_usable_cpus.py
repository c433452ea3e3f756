"""`--workers 0` (auto): the usable CPUs from the affinity mask and the cgroup CPU quota, read
from fake /proc/self files and cgroup folders (v1, v2, in and out of a cgroup namespace), and
how `bertrec serve` sizes its workers and their ONNX Runtime threads from them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from bertrec.server.cli import size_processes
from bertrec.server.config import AUTO_WORKERS, ConfigError, ServerConfig, load_config
from bertrec.server.environment import UsableCpus, cgroup_cpu_quota, usable_cpus, worker_cpus

# A cgroup v2 host (no namespace): the process sits in a pod's container cgroup.
V2_MOUNT = "35 24 0:30 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"
# Hybrid v1: the cpu controller (joined with cpuacct) and an unrelated one, then the v2 tree.
V1_MOUNTS = (
    "31 23 0:28 {root} {cpu} rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct\n"
    "32 23 0:29 / {memory} rw,relatime shared:6 - cgroup cgroup rw,memory\n"
    "33 23 0:30 / {unified} rw,relatime shared:7 - cgroup2 cgroup2 rw\n"
)


def proc_files(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo)
    (proc / "cgroup").write_text(cgroup)
    return proc


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_quota_of_the_process_cgroup_in_cpus(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup"
    pod = fs / "kubepods.slice" / "pod1"
    write(fs, cpu_max="max 100000")
    write(pod, cpu_max="max 100000")
    write(pod / "ctr", cpu_max="250000 100000")
    proc = proc_files(tmp_path, V2_MOUNT.format(mount=fs), "0::/kubepods.slice/pod1/ctr\n")
    assert cgroup_cpu_quota(proc) == 2.5


def test_a_parents_tighter_quota_limits_the_child(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup"
    pod = fs / "kubepods.slice" / "pod1"
    write(pod, cpu_max="150000 100000")  # the pod's limit
    write(pod / "ctr", cpu_max="max 100000")
    proc = proc_files(tmp_path, V2_MOUNT.format(mount=fs), "0::/kubepods.slice/pod1/ctr\n")
    assert cgroup_cpu_quota(proc) == 1.5


def test_v2_in_a_cgroup_namespace_reads_the_mount_itself(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup"
    write(fs, cpu_max="50000 100000")
    proc = proc_files(tmp_path, V2_MOUNT.format(mount=fs), "0::/\n")
    assert cgroup_cpu_quota(proc) == 0.5


def test_v2_without_a_quota_is_none(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup"
    write(fs / "user.slice", cpu_max="max 100000")
    proc = proc_files(tmp_path, V2_MOUNT.format(mount=fs), "0::/user.slice\n")
    assert cgroup_cpu_quota(proc) is None


def test_v1_cfs_quota_over_period(tmp_path: Path) -> None:
    cpu, memory, unified = (tmp_path / n for n in ("cpu,cpuacct", "memory", "unified"))
    write(cpu / "docker" / "abc", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    write(cpu / "docker", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    write(memory / "docker" / "abc", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    mounts = V1_MOUNTS.format(root="/", cpu=cpu, memory=memory, unified=unified)
    cgroup = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    # The memory controller's folder is not the cpu controller's: its files are not read.
    assert cgroup_cpu_quota(proc_files(tmp_path, mounts, cgroup)) == 3.0


def test_v1_container_sees_its_host_path_outside_the_mount_root(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: /proc/self/cgroup names the host's path, and the
    # container's own cgroup is mounted (root /docker/abc) at the mount point.
    cpu = tmp_path / "cpu"
    write(cpu, cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    mounts = V1_MOUNTS.format(root="/docker/abc", cpu=cpu, memory=tmp_path / "m", unified="/x")
    proc = proc_files(tmp_path, mounts, "4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_quota(proc) == 1.0


@pytest.mark.parametrize("cpu_max", ["garbage", "100000 0", ""])
def test_a_malformed_file_counts_as_no_quota(tmp_path: Path, cpu_max: str) -> None:
    fs = tmp_path / "cgroup"
    write(fs, cpu_max=cpu_max)
    proc = proc_files(tmp_path, V2_MOUNT.format(mount=fs), "0::/\n")
    assert cgroup_cpu_quota(proc) is None


def test_no_proc_files_is_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("affinity", "quota", "count"),
    [(8, None, 8), (8, 2.0, 2), (8, 1.5, 2), (8, 0.2, 1), (2, 6.0, 2), (0, None, 1)],
)
def test_count_is_the_affinity_capped_by_the_quota_rounded_up(
    affinity: int, quota: float | None, count: int
) -> None:
    assert UsableCpus(affinity, quota).count == count


def test_usable_cpus_reads_this_process_affinity_and_quota(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup"
    write(fs, cpu_max="100000 100000")
    proc = proc_files(tmp_path, V2_MOUNT.format(mount=fs), "0::/\n")
    cpus = usable_cpus(proc)
    assert cpus == UsableCpus(len(os.sched_getaffinity(0)), 1.0) and cpus.count == 1


# ---- the workers setting --------------------------------------------------------------------


def required(tmp_path: Path) -> dict[str, str]:
    return {"model_repo": str(tmp_path), "model": "m"}


def test_the_default_is_auto(tmp_path: Path) -> None:
    assert load_config(required(tmp_path), env={}).workers == AUTO_WORKERS == 0


@pytest.mark.parametrize("word", ["auto", "AUTO", " auto ", "0"])
def test_auto_or_0_from_flags_env_and_toml(tmp_path: Path, word: str) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text(f'workers = "{word}"\n')
    assert load_config({**required(tmp_path), "workers": word}, env={}).workers == 0
    assert load_config(required(tmp_path), env={"BERTREC_WORKERS": word}).workers == 0
    assert load_config(required(tmp_path), env={}, config_file=toml).workers == 0


def test_a_number_in_toml_and_env(tmp_path: Path) -> None:
    toml = tmp_path / "serve.toml"
    toml.write_text("workers = 3\n")
    assert load_config(required(tmp_path), env={}, config_file=toml).workers == 3
    assert load_config(required(tmp_path), env={"BERTREC_WORKERS": "4"}).workers == 4


@pytest.mark.parametrize(("value", "message"), [("-1", "must be >= 0"), ("many", "expected int")])
def test_negative_or_other_words_are_refused(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"workers.*{message}"):
        load_config({**required(tmp_path), "workers": value}, env={})
    with pytest.raises(ConfigError, match="BERTREC_WORKERS"):
        load_config(required(tmp_path), env={"BERTREC_WORKERS": value})


# ---- sizing the processes -------------------------------------------------------------------


def config(tmp_path: Path, **settings: int) -> ServerConfig:
    return ServerConfig(model_repo=tmp_path, model="m", **settings)


def test_auto_resolves_to_the_usable_cpu_count(tmp_path: Path) -> None:
    auto = config(tmp_path, workers=AUTO_WORKERS)
    assert size_processes(auto, UsableCpus(8, 3.0)).workers == 3
    assert size_processes(auto, UsableCpus(1, None)).workers == 1
    cpus = usable_cpus()
    assert size_processes(auto, cpus).workers == cpus.count >= 1


def test_one_thread_per_cpu_is_shared_among_the_workers(tmp_path: Path) -> None:
    zero = config(tmp_path, workers=AUTO_WORKERS, ranker_threads=0, intra_op_threads=0)
    sized = size_processes(zero, UsableCpus(8, None))
    assert (sized.workers, sized.ranker_threads, sized.intra_op_threads) == (8, 1, 1)
    sized = size_processes(replace(zero, workers=2), UsableCpus(8, None))
    assert (sized.workers, sized.ranker_threads, sized.intra_op_threads) == (2, 4, 4)
    sized = size_processes(replace(zero, workers=3), UsableCpus(8, None))  # 2 each, 2 idle
    assert (sized.ranker_threads, sized.intra_op_threads) == (2, 2)
    sized = size_processes(replace(zero, workers=4), UsableCpus(2, None))  # more than CPUs
    assert (sized.ranker_threads, sized.intra_op_threads) == (1, 1)


def test_set_thread_counts_and_a_single_worker_are_left_alone(tmp_path: Path) -> None:
    chosen = config(tmp_path, workers=4, ranker_threads=3, intra_op_threads=2)
    sized = size_processes(chosen, UsableCpus(8, None))
    assert (sized.workers, sized.ranker_threads, sized.intra_op_threads) == (4, 3, 2)
    alone = config(tmp_path, workers=1, ranker_threads=0, intra_op_threads=0)
    assert size_processes(alone, UsableCpus(8, None)) == alone  # ONNX Runtime's own default


def test_the_resolved_numbers_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="bertrec.server.cli")
    size_processes(config(tmp_path, workers=AUTO_WORKERS), UsableCpus(16, 2.5))
    (record,) = caplog.records
    assert record.getMessage() == (
        "workers 3 (auto); usable CPUs 3 (affinity 16, cgroup CPU quota 2.5); per worker: "
        "ranker_threads 1, intra_op_threads 1 (0: ONNX Runtime's default)"
    )


@pytest.mark.parametrize(
    ("workers", "pin", "quota", "affinity", "expected"),
    [
        (2, "auto", None, [0, 1], [{0}, {1}]),  # a machine of its own: one CPU each
        (2, "auto", 2.0, [4, 5], [{4}, {5}]),  # an exclusive cpuset with its quota (static)
        (2, "auto", 2.0, list(range(64)), None),  # a CPU limit on a shared node: never pin
        (3, "auto", None, [0, 1], None),  # more workers than CPUs: the scheduler places them
        (2, "auto", None, [0, 1, 2, 3], None),  # fewer: not measured, not pinned
        (3, "on", None, [0, 1], [{0}, {1}, {0}]),  # asked for: round robin
        (2, "on", None, [0, 1, 2, 3, 4], [{0, 1, 2}, {3, 4}]),  # a block each, none left over
        (2, "on", 2.0, list(range(64)), [set(range(32)), set(range(32, 64))]),
        (2, "off", None, [0, 1], None),
        (1, "on", None, [0, 1], None),  # one process: nothing to pin apart
    ],
)
def test_worker_cpus(
    workers: int,
    pin: str,
    quota: float | None,
    affinity: list[int],
    expected: list[set[int]] | None,
) -> None:
    cpus = UsableCpus(len(affinity), quota)
    assert worker_cpus(workers, pin, cpus, affinity) == expected


def test_pin_workers_takes_only_auto_on_off(tmp_path: Path) -> None:
    assert load_config(required(tmp_path), env={}).pin_workers == "auto"
    assert load_config({**required(tmp_path), "pin_workers": "on"}, env={}).pin_workers == "on"
    with pytest.raises(ConfigError, match="must be auto, on or off"):
        load_config(required(tmp_path), env={"BERTREC_PIN_WORKERS": "yes"})


def test_thread_scheduling_takes_only_batch_or_normal(tmp_path: Path) -> None:
    assert load_config(required(tmp_path), env={}).thread_scheduling == "batch"
    env = {"BERTREC_THREAD_SCHEDULING": "normal"}
    assert load_config(required(tmp_path), env=env).thread_scheduling == "normal"
    with pytest.raises(ConfigError, match="must be batch or normal"):
        load_config({**required(tmp_path), "thread_scheduling": "fifo"}, env={})
