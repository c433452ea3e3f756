"""`bertrec serve --workers 2`: two processes on one port, one metrics endpoint, restarts, drain.

so_reuseport spreads connections, not calls: each test channel gets its own connection (a local
subchannel pool), and 32 of them leave both workers idle with probability 2 * 2**-32.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import MODEL, ServerProcess, handled_ok, metric_value, serving, start_server

from bertrec.bench.versions import publish_variant
from bertrec.server.environment import usable_cpus, worker_cpus
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

WORKER = re.compile(r"worker (\d+) pid (\d+) serving, its own metrics on (\S+):(\d+)")
USERS = [f"u{i:04d}" for i in range(8)]


def recommend_ok(url: str) -> float:
    return handled_ok(url, "Recommend")


def workers_announced(server: ServerProcess, count: int) -> dict[int, tuple[int, str]]:
    """slot -> (pid, its own metrics URL), from the next `count` worker lines."""
    found = {}
    for _ in range(count):
        m = server.wait_for_line(WORKER, 60)
        found[int(m.group(1))] = (int(m.group(2)), f"http://{m.group(3)}:{m.group(4)}/metrics")
    return found


def call_on_fresh_connections(target: str, ref, channels: int, per_channel: int) -> None:
    """Recommend over `channels` separate TCP connections; every answer checked against numpy."""
    for c in range(channels):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            for n in range(per_channel):
                user = USERS[(c + n) % len(USERS)]
                reply = stub.Recommend(
                    pb.RecommendRequest(user_id=user, k=3), timeout=30, wait_for_ready=True
                )
                assert [i.item_id for i in reply.items] == [i for i, _ in ref.recommend(user, 3)]


def on_fresh_connections_until_announced(
    server: ServerProcess, count: int, call: Callable[[grpc.Channel], None]
) -> dict[int, tuple[int, str]]:
    """Run `call` on a new TCP connection, again and again, until the next `count` workers
    announce that they serve (or 120 s pass); returns their announcements (`workers_announced`)."""
    announced: dict[int, tuple[int, str]] = {}
    watcher = threading.Thread(target=lambda: announced.update(workers_announced(server, count)))
    watcher.start()
    deadline = time.monotonic() + 120
    while watcher.is_alive() and time.monotonic() < deadline:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.target, options=options) as channel:
            call(channel)
    watcher.join(5)
    return announced


@pytest.fixture(scope="module")
def two_workers(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with serving(model_repo, tmp_path_factory.mktemp("workers"), "--workers", "2") as server:
        yield server, workers_announced(server, 2)


def test_two_workers_share_the_port_and_the_parent_sums_their_metrics(two_workers, ref) -> None:
    server, workers = two_workers
    assert sorted(workers) == [0, 1] and server.proc.pid not in {p for p, _ in workers.values()}
    before = {slot: recommend_ok(url) for slot, (_, url) in workers.items()}

    call_on_fresh_connections(server.target, ref, channels=32, per_channel=3)

    served = {slot: recommend_ok(url) - before[slot] for slot, (_, url) in workers.items()}
    assert all(n > 0 for n in served.values()), served  # both processes took calls
    assert sum(served.values()) == 96
    assert recommend_ok(server.metrics_url) == sum(before.values()) + 96
    assert metric_value(server.metrics_url, "bertrec_workers_ready") == 2
    readyz = server.metrics_url.replace("/metrics", "/readyz")
    with urllib.request.urlopen(readyz, timeout=5) as response:
        assert response.status == 200


def mapped_layout_files(pid: int) -> set[Path]:
    """Files of the run's shared layout directory that process `pid` maps."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {Path(line.split(maxsplit=5)[5]) for line in lines
            if line.count(" ") >= 5 and "/layouts/" in line}  # fmt: skip


def test_two_workers_map_one_shared_layout_file_per_derived_array(two_workers) -> None:
    """The Ranker's layout and the id indexes are built once per run and mapped by both."""
    _, workers = two_workers
    first, second = (mapped_layout_files(pid) for pid, _ in workers.values())
    assert first == second
    kinds = sorted(path.name.split("-")[0] for path in first)
    assert kinds == ["item", "ranker", "user"], first
    (folder,) = {path.parent for path in first}
    assert folder.stat().st_mode & 0o777 == 0o700
    assert folder.parent.name.startswith("bertrec-workers-")


def test_a_new_version_is_shared_by_the_workers_too(model_repo: Path, tmp_path: Path) -> None:
    """A version swap builds the new version's layout once; both workers map it (the old
    version's file stays until the run ends)."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / MODEL / "1", repo / MODEL / "1")
    with serving(repo, tmp_path / "logs", "--workers", "2", "--poll-interval-s", "0.2") as server:
        pids = [pid for pid, _ in workers_announced(server, 2).values()]
        (first,) = {p for p in mapped_layout_files(pids[0]) if p.name.startswith("ranker-")}
        publish_variant(repo, MODEL, 1, seed=2, version=2)
        deadline = time.monotonic() + 60
        while True:
            rankers = [{p for p in mapped_layout_files(pid) if p.name.startswith("ranker-")}
                       for pid in pids]  # fmt: skip
            if all(r and first not in r for r in rankers):
                break
            assert time.monotonic() < deadline, f"workers still map the old layout: {rankers}"
            time.sleep(0.2)
        assert rankers[0] == rankers[1] and len(rankers[0]) == 1
        assert len(list(first.parent.glob("ranker-*.npy"))) == 2
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            assert info.model.version == 2


def test_a_killed_worker_is_restarted_and_counted_and_calls_keep_succeeding(
    two_workers, ref
) -> None:
    server, workers = two_workers
    total = recommend_ok(server.metrics_url)
    assert metric_value(server.metrics_url, "bertrec_worker_restarts_total") == 0
    victim, _ = workers[1]
    os.kill(victim, signal.SIGKILL)

    call_on_fresh_connections(server.target, ref, channels=8, per_channel=2)  # one worker left
    slot, (pid, url) = next(iter(workers_announced(server, 1).items()))
    assert slot == 1 and pid != victim
    workers[1] = (pid, url)

    assert metric_value(server.metrics_url, "bertrec_worker_restarts_total") == 1
    call_on_fresh_connections(server.target, ref, channels=16, per_channel=2)
    assert recommend_ok(url) > 0  # the new worker serves
    # The dead worker's counts stay in the sum: counters never go back.
    assert recommend_ok(server.metrics_url) == total + 16 + 32


def test_a_restarted_worker_takes_no_connection_before_it_serves(
    model_repo: Path, tmp_path: Path, ref
) -> None:
    """While a replacement loads (a long warm-up here), calls on new connections all succeed:
    it listens only once it serves, so the kernel hands its connections to the live sibling.
    Listening first (as a first worker does), about half of them got FAILED_PRECONDITION. The
    pod stays ready meanwhile (`/readyz` 200: it answers every call, on one worker)."""
    flags = ("--workers", "2", "--warmup-iterations", "400")
    with serving(model_repo, tmp_path, *flags) as server:
        workers = workers_announced(server, 2)
        os.kill(workers[1][0], signal.SIGKILL)
        while _running(workers[1][0]):
            time.sleep(0.01)
        codes: list[grpc.StatusCode] = []
        readyz: list[int] = []
        expected = [i for i, _ in ref.recommend(USERS[0], 3)]

        def recommend(channel: grpc.Channel) -> None:
            stub = pb_grpc.RecommenderServiceStub(channel)
            try:
                reply = stub.Recommend(pb.RecommendRequest(user_id=USERS[0], k=3), timeout=30)
                assert [i.item_id for i in reply.items] == expected
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
            readyz.append(http_status(server.metrics_url.replace("/metrics", "/readyz")))

        replaced = on_fresh_connections_until_announced(server, 1, recommend)
        assert replaced and next(iter(replaced)) == 1, "the worker was never replaced"
        assert len(codes) >= 20, f"too few calls while the replacement loaded: {len(codes)}"
        # The first connections may still meet the dead worker's closing socket (reset, and
        # retried by clients); after that every call is answered, none refused.
        failed = [(n, c) for n, c in enumerate(codes) if c != grpc.StatusCode.OK]
        assert all(n < 3 and c == grpc.StatusCode.UNAVAILABLE for n, c in failed), failed[:5]
        assert set(readyz) == {200}, readyz
        call_on_fresh_connections(server.target, ref, channels=16, per_channel=1)
        assert recommend_ok(replaced[1][1]) > 0  # and then it serves


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (whose sockets are closed already)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_sigterm_to_the_parent_drains_every_worker(model_repo: Path, tmp_path: Path) -> None:
    flags = ("--workers", "2", "--ranker-max-queue-delay-us", "2000000", "--grace-period-s", "20")
    with serving(model_repo, tmp_path, *flags) as server:
        pids = [pid for pid, _ in workers_announced(server, 2).values()]
        (layouts,) = {path.parent for path in mapped_layout_files(pids[0])}
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(server.target, options=options) for _ in range(8)]
        try:
            calls = [
                pb_grpc.RecommenderServiceStub(ch).Recommend.future(
                    pb.RecommendRequest(user_id=USERS[n % 8], k=3), timeout=60
                )
                for n, ch in enumerate(channels * 2)
            ]
            # The parent sums the workers' in-flight gauges (livesum): all 16 calls are inside.
            deadline = time.monotonic() + 30
            while metric_value(server.metrics_url, "bertrec_in_flight_requests") < 16:
                assert time.monotonic() < deadline, "calls never reached the workers"
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            assert [len(c.result().items) for c in calls] == [3] * 16
        finally:
            for ch in channels:
                ch.close()
        assert server.proc.wait(60) == 0
    assert not layouts.exists()  # the parent removes the run's shared files when it exits
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.metrics_url, timeout=2)


def test_a_worker_that_cannot_serve_fails_the_start_with_its_error(
    model_repo: Path, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
               "--model", "absent", "--host", "127.0.0.1", "--grpc-port", "0",
               "--metrics-port", "0", "--workers", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTREC_")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "grpc" not in done.stdout  # no port announced
    assert "absent" in done.stderr and "exited with 2 before serving" in done.stderr


def gone(pid: int) -> bool:
    """Exited (a zombie left to an init that does not reap counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def test_workers_drain_and_exit_when_the_parent_is_killed(model_repo: Path, tmp_path: Path) -> None:
    with serving(model_repo, tmp_path, "--workers", "2") as server:
        pids = [pid for pid, _ in workers_announced(server, 2).values()]
        (layouts,) = {path.parent for path in mapped_layout_files(pids[0])}
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 60
        while not all(gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "orphaned workers kept running"
            time.sleep(0.2)
        assert not layouts.parent.exists()  # the orphans removed the run folder


def test_no_worker_takes_a_connection_before_it_serves_on_first_start(
    model_repo: Path, tmp_path: Path, ref
) -> None:
    """From the moment the port is announced until both workers serve, a call or a probe on a
    new connection is refused (UNAVAILABLE, which clients retry) or answered, never refused by
    a worker still loading (FAILED_PRECONDITION, NOT_SERVING), which the kernel would otherwise
    hand about one in two connections: a probe could mark the pod ready on one loaded worker."""
    flags = ("--workers", "2", "--warmup-iterations", "400")
    server = start_server(model_repo, tmp_path, *flags)
    try:
        seen: list[str] = []
        expected = [i for i, _ in ref.recommend(USERS[0], 3)]

        def probe_then_recommend(channel: grpc.Channel) -> None:
            try:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
                reply = pb_grpc.RecommenderServiceStub(channel).Recommend(
                    pb.RecommendRequest(user_id=USERS[0], k=3), timeout=30
                )
                assert [i.item_id for i in reply.items] == expected
                seen.append("OK")
            except grpc.RpcError as err:
                seen.append(err.code().name)

        announced = on_fresh_connections_until_announced(server, 2, probe_then_recommend)
        assert sorted(announced) == [0, 1], "the workers never both served"
        assert "UNAVAILABLE" in seen, seen[:10]  # the loads were slow enough to be watched
        assert set(seen) <= {"UNAVAILABLE", "SERVING", "OK"}, sorted(set(seen))
    finally:
        assert server.terminate() == 0


def test_a_second_supervisor_cannot_join_the_port(
    two_workers, model_repo: Path, tmp_path: Path
) -> None:
    """Another `--workers N` server on a port in use fails at once (exit 2, one line) and
    leaves no run folder: SO_REUSEPORT alone would let it take half the connections."""
    server, _ = two_workers
    done = subprocess.run(
        [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
         "--model", MODEL, "--workers", "2", "--host", "127.0.0.1",
         "--grpc-port", str(server.port), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bertrec serve: error: cannot bind gRPC") and "in use" in last, last
    assert not list(tmp_path.glob("bertrec-workers-*"))


def test_a_worker_orphaned_while_starting_serves_nobody(tmp_path: Path) -> None:
    """A worker whose supervisor died before it started (it is not the parent named on its
    command line) exits at once and removes the run folder instead of serving on its own."""
    run_dir = tmp_path / "bertrec-workers-x"
    (run_dir / "layouts").mkdir(parents=True)
    not_my_parent = os.getpid() + 1_000_000
    done = subprocess.run(
        [sys.executable, "-m", "bertrec.server.workers", str(run_dir), "0", str(not_my_parent)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert not run_dir.exists()


def test_ctrl_c_while_the_workers_load_exits_0(model_repo: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C) while the workers still load:
    the parent drains what started and exits 0, no worker dies of the signal."""
    command = [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
        "--model", MODEL, "--workers", "2", "--warmup-iterations", "400",
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
    ]  # fmt: skip
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("bertrec serve: grpc "), line
        time.sleep(0.5)  # the workers are importing or loading
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, stderr_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = stderr_path.read_text()
    assert "Traceback" not in log and "before serving" not in log, log[-3000:]
    assert "ready on port" not in (proc.stdout.read() if proc.stdout else "")
    assert not list(tmp_path.glob("bertrec-workers-*"))


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of every thread of `pid`."""
    return {frozenset(os.sched_getaffinity(int(task.name)))
            for task in Path(f"/proc/{pid}/task").iterdir()}  # fmt: skip


def test_each_worker_runs_on_a_cpu_of_its_own_where_the_cpus_are_ours(two_workers) -> None:
    """`pin_workers` auto: on a machine (or exclusive cpuset) of its own each worker and all
    its threads run on one CPU, a different one each; under a CPU quota on shared CPUs none is
    pinned. The test computes which applies here the way the server does."""
    _, workers = two_workers
    affinity = sorted(os.sched_getaffinity(0))
    plan = worker_cpus(2, "auto", usable_cpus(), affinity)
    found = {slot: thread_cpus(pid) for slot, (pid, _) in workers.items()}
    if plan is None:
        assert all(sets == {frozenset(affinity)} for sets in found.values()), found
    else:
        assert found == {slot: {frozenset(plan[slot])} for slot in range(2)}, found


def thread_policies(pid: int) -> set[int]:
    """The distinct scheduling policies of every thread of `pid`."""
    return {os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()}


def test_every_thread_of_the_supervisor_and_the_workers_runs_under_sched_batch(
    two_workers,
) -> None:
    """`thread_scheduling` batch (the default) reaches every thread of every process: those
    started before it was set (numpy's, grpc's) and those started after (inherited)."""
    server, workers = two_workers
    for pid in (server.proc.pid, *(pid for pid, _ in workers.values())):
        assert thread_policies(pid) == {os.SCHED_BATCH}, pid


def test_thread_scheduling_normal_leaves_every_thread_under_sched_other(
    model_repo: Path, tmp_path: Path
) -> None:
    """Started under SCHED_BATCH (inherited from this thread while it starts the server), so
    only the setting can bring every thread back to SCHED_OTHER."""
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        server = start_server(model_repo, tmp_path, "--workers", "1", "--thread-scheduling",
                              "normal")  # fmt: skip
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        server.wait_serving()
        assert thread_policies(server.proc.pid) == {os.SCHED_OTHER}
    finally:
        server.terminate()


def test_pin_workers_off_leaves_the_workers_to_the_scheduler(
    model_repo: Path, tmp_path: Path
) -> None:
    with serving(model_repo, tmp_path, "--workers", "2", "--pin-workers", "off") as server:
        workers = workers_announced(server, 2)
        everywhere = {frozenset(os.sched_getaffinity(0))}
        assert all(thread_cpus(pid) == everywhere for pid, _ in workers.values())


def test_a_health_port_in_use_is_refused_before_any_worker_starts(
    model_repo: Path, tmp_path: Path
) -> None:
    """Every worker joins the health-only port with SO_REUSEPORT, so the supervisor reserves
    it first: a port another server holds would otherwise answer half the probes for it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        done = subprocess.run(
            [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
             "--model", MODEL, "--workers", "2", "--host", "127.0.0.1", "--grpc-port", "0",
             "--metrics-port", "0", "--health-port", port],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bertrec serve: error: cannot bind the health port") and port in last


def test_workers_told_to_stop_while_loading_never_bind_the_port(
    model_repo: Path, tmp_path: Path
) -> None:
    """The supervisor killed -9 while its workers load: they notice, finish loading, and exit
    without ever listening (a new server on the port would otherwise find them in its
    SO_REUSEPORT group), and the run folder goes."""
    from tls_material import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(model_repo),
        "--model", MODEL, "--workers", "2", "--warmup-iterations", "400",
        "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("bertrec serve: grpc ")
    workers = [
        int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    listened = []
    deadline = time.monotonic() + 120
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                listened.append(time.monotonic())
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers), "the orphaned workers did not exit"
    assert listened == [], "an orphaned worker bound the port"
    assert not list(tmp_path.glob("bertrec-workers-*"))
