"""``daskinfer run`` as a user runs it (a child process): what it prints, how it stops (Ctrl-C,
SIGTERM, also while it deploys), what it leaves behind on an external scheduler, a Redis
that is not there; and the admin subcommands ``daskinfer pipelines`` and ``daskinfer topics``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest
from cli_process import CLI, ENV, Run
from redis_server import RedisServer, free_port
from timing import scaled

import daskinfer
from daskinfer import InferenceClient, Pipeline, deploy_pipeline

# long enough for a LocalCluster of worker processes to start and stop on a machine whose cores are busy
pytestmark = pytest.mark.timeout(420)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _app(tmp_path, text: str) -> str:
    path = tmp_path / "app.yaml"
    path.write_text(text)
    return str(path)


def _redis_app(tmp_path, url: str) -> str:
    return _app(
        tmp_path,
        f"""
scheduler: null
cluster: {{n_workers: 1, threads_per_worker: 1}}
config: {{daskinfer: {{redis: {{url: "{url}"}}}}}}
models: [{{kind: onnx, name: mlp, path: bundled}}]
pipelines: [{{model: mlp, inbox: requests, connector: redis}}]
""",
    )


# -- Redis that is not there -----------------------------------------------------------------------


@pytest.mark.slow  # daskinfer run starts a LocalCluster of worker processes
def test_run_without_redis_says_so_at_once_and_hides_the_password(tmp_path):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    proc = subprocess.run(
        [*CLI, "run", _redis_app(tmp_path, url)], capture_output=True, text=True, timeout=scaled(180), env=ENV
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    port = url.rsplit(":", 1)[1].split("/")[0]
    assert f"cannot reach Redis at redis://***@127.0.0.1:{port}/0" in proc.stderr, proc.stderr[-3000:]
    assert "s3cret" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_deploy_pipeline_with_redis_unreachable_fails_at_once_naming_the_url(client, mlp_deployed):
    port = free_port()
    pipe = Pipeline(
        model=mlp_deployed,
        inbox=f"in-{uuid.uuid4().hex[:6]}",
        connector="redis",
        connector_options={"url": f"redis://:pw@127.0.0.1:{port}/0"},
    )
    with pytest.raises(daskinfer.exceptions.BrokerError) as e:
        deploy_pipeline(client, pipe, timeout=30)
    assert f"cannot reach Redis at redis://***@127.0.0.1:{port}/0" in str(e.value) and "pw" not in str(e.value)
    assert pipe.name not in daskinfer.pipelines(client)


@pytest.fixture
def hung_redis(tmp_path):
    """A real redis-server that stopped answering (SIGSTOP): connections open, no reply comes."""
    server = RedisServer(str(tmp_path), appendonly=False)
    server.start()
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield server
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


@pytest.mark.timeout(60)
def test_deploy_pipeline_with_a_hung_redis_honours_timeout(client, mlp_deployed, hung_redis):
    pipe = Pipeline(
        model=mlp_deployed,
        inbox=f"in-{uuid.uuid4().hex[:6]}",
        connector="redis",
        connector_options={"url": hung_redis.url},
    )
    with pytest.raises(daskinfer.exceptions.BrokerError) as e:
        deploy_pipeline(client, pipe, timeout=2)
    assert f"no answer from Redis at {hung_redis.url} within 2s" in str(e.value)
    assert pipe.name not in daskinfer.pipelines(client)


def _connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP connection to ``port`` on loopback."""
    import psutil  # a dependency of distributed

    return any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections("tcp"))


@pytest.mark.slow  # daskinfer run starts a LocalCluster of worker processes
def test_run_stops_on_sigterm_while_it_waits_for_redis(tmp_path, hung_redis, poll):
    run = Run(["run", _redis_app(tmp_path, hung_redis.url)])
    try:
        run.wait_for("deploying pipeline 'requests'")
        poll(lambda: _connected(run.proc.pid, hung_redis.port), what="daskinfer run waiting on the hung Redis")
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish(timeout=30) == 0, run.output()  # well before the 60 s deploy timeout
    finally:
        run.kill()
    assert "stopped" in run.stdout and "Traceback" not in run.stderr, run.stderr[-3000:]


# -- stopping, cleaning up --------------------------------------------------------------------------


def test_ctrl_c_stops_run_cleanly_without_worker_tracebacks():  # (the fast run's one LocalCluster of `daskinfer run`)
    run = Run(["run", os.path.join(ROOT, "conf", "local.yaml")])
    try:
        run.wait_for("pipeline(s) running")
        assert "dashboard: http://" in run.stdout
        os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        assert run.finish() == 0, run.output()
    finally:
        run.kill()
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr[-3000:]
    assert "stopped pipeline 'requests'" in run.stdout and "undeployed model 'mlp'" in run.stdout


def test_run_on_an_external_scheduler_undeploys_what_it_deployed(client, tmp_path):
    name = f"ext-{uuid.uuid4().hex[:6]}"
    path = _app(
        tmp_path,
        f"""
models: [{{kind: onnx, name: {name}, path: bundled}}]
pipelines: [{{model: {name}, inbox: {name}, partitions: 2}}]
""",
    )
    run = Run(["run", path, "--scheduler", client.scheduler.address])
    try:
        run.wait_for("pipeline(s) running")
        assert "dashboard: http://" in run.stdout
        assert name in daskinfer.pipelines(client) and name in daskinfer.deployed_models(client)
        with InferenceClient(client, inbox=name) as ic:
            assert ic.predict(daskinfer.testing.random_rows(3)).shape == (3, 2)
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 0, run.output()
    finally:
        run.kill()
    assert name not in daskinfer.pipelines(client)
    assert name not in daskinfer.deployed_models(client)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


# -- admin subcommands ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=scaled(120), env=ENV)


def test_pipelines_and_topics_subcommands(client, mlp_deployed):
    address = client.scheduler.address
    inbox = f"adm-{uuid.uuid4().hex[:6]}"
    handle = deploy_pipeline(client, Pipeline(model=mlp_deployed, inbox=inbox, outbox=f"{inbox}-out", partitions=2))
    try:
        listed = _cli("pipelines", "--scheduler", address)
        assert listed.returncode == 0, listed.stderr
        (line,) = [ln for ln in listed.stdout.splitlines() if ln.split()[:1] == [handle.name]]
        assert line.split()[1:4] == [inbox, "embedded", "2"], listed.stdout
        listed = _cli("topics", "--scheduler", address)
        assert listed.returncode == 0, listed.stderr
        names = {ln.split()[0]: ln.split() for ln in listed.stdout.splitlines()[1:]}
        assert names[inbox][1:3] == ["inbox", "2"] and f"{inbox}-out" in names, listed.stdout
        refused = _cli("topics", "delete", inbox, "--scheduler", address)
        assert refused.returncode == 1 and f"topic {inbox!r} is the inbox of running pipeline" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        handle.stop()
    deleted = _cli("topics", "delete", inbox, "--scheduler", address)
    assert deleted.returncode == 0 and f"deleted topic {inbox!r}" in deleted.stdout, deleted.stderr
    assert inbox not in daskinfer.topics(client)
    missing = _cli("topics", "delete", inbox, "--scheduler", address)
    assert missing.returncode == 1 and f"no topic {inbox!r}" in missing.stderr
    assert handle.name not in _cli("pipelines", "--scheduler", address).stdout


def test_admin_subcommands_without_a_scheduler_say_what_to_give():
    proc = _cli("pipelines")
    assert proc.returncode == 2 and "--scheduler" in proc.stderr and "Traceback" not in proc.stderr


# -- help ---------------------------------------------------------------------------------------------


def test_dask_infer_help_names_dask_infer():
    proc = subprocess.run(
        [sys.executable, "-m", "dask", "infer", "--help"], capture_output=True, text=True, timeout=scaled(120), env=ENV
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dask infer"), proc.stdout + proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "dask", "infer", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=scaled(120),
        env=ENV,
    )
    assert proc.stdout.startswith("usage: dask infer run"), proc.stdout + proc.stderr


def _help(capsys, *args: str) -> str:
    from daskinfer.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_says_whether_the_preload_is_needed(capsys):
    text = _help(capsys, "run")
    assert "--preload daskinfer.preload" in text and "optional" in text, text
    text = _help(capsys, "serve")
    assert "no Dask cluster" in text and "no --preload" in text, text
