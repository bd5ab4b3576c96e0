"""A real Apache Kafka broker for tests: KRaft combined mode on free loopback ports in a temporary directory.

Its jars come from ``tests/kafka/pom.xml`` into ``.kafka/lib`` (``.ci/run`` fetches them; by
hand: ``mvn -q -f tests/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=../../.kafka/lib``);
``DASKINFER_KAFKA_LIB`` names another folder.  When Java, the jars or ``confluent-kafka`` are
missing the tests that use the broker are skipped with the reason, except where the environment
variable ``CI`` is set: there it is a failure, so that CI never passes by skipping.

``benchmarks/kafka.py`` starts its broker with :class:`KafkaBroker` too.
"""

from __future__ import annotations

import base64
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

from server_process import ServerProcess, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.environ.get("DASKINFER_KAFKA_LIB") or os.path.join(ROOT, ".kafka", "lib")
FETCH = "mvn -q -f tests/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=../../.kafka/lib"


def missing() -> str | None:
    """Why a broker cannot start here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (apt-get install openjdk-17-jre-headless) so the Kafka tests cannot run"
    if not glob.glob(os.path.join(LIB, "kafka_2.13-*.jar")):
        return f"the Kafka broker jars are not in {LIB} (fetch them with: {FETCH}) so the Kafka tests cannot run"
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "confluent-kafka is not installed (pip install daskinfer[kafka]) so the Kafka tests cannot run"
    return None


def require_kafka() -> None:
    """Skip the calling test when the broker cannot start here (fail it under ``CI``)."""
    reason = missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)


def _die_with_parent() -> None:
    """In the broker's process before exec: SIGKILL it when the test process dies (Linux), so no
    broker outlives a test run that was killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.cleaner.dedupe.buffer.size=4194304
num.network.threads=2
num.io.threads=4
background.threads=4
"""

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


class KafkaBroker(ServerProcess):
    """One Kafka broker (KRaft, broker and controller in one JVM) on ``127.0.0.1:port``, data in ``directory``.

    Parameters
    ----------
    directory : str
        Working directory: configuration, data (kept across :meth:`restart`) and ``server.log``.
    heap : str
        JVM heap (``-Xmx``); smaller ones have run out of memory at start-up.
    quick_start : bool
        Compile with the JVM's first tier only: it starts in about half the time and runs
        slower (tests: yes; benchmarks: no).
    properties : dict, optional
        More (or other) ``server.properties`` settings.
    """

    def __init__(
        self, directory: str, heap: str = "768m", quick_start: bool = True, properties: dict[str, str] | None = None
    ):
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        self.directory = directory
        self.heap = heap
        self.quick_start = quick_start
        self.port = free_port()
        self.controller_port = free_port()
        self.stop_timeout = 60.0
        self.log_path = os.path.join(directory, "server.log")
        self.config_path = os.path.join(directory, "server.properties")
        self.log4j_path = os.path.join(directory, "log4j2.properties")
        with open(self.config_path, "w") as f:
            f.write(
                SERVER_PROPERTIES.format(
                    port=self.port, controller_port=self.controller_port, data=os.path.join(directory, "data")
                )
            )
            f.writelines(f"{k}={v}\n" for k, v in (properties or {}).items())  # (the last one of a key counts)
        with open(self.log4j_path, "w") as f:
            f.write(LOG4J2.format(log=self.log_path))
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, main: str, *args: str) -> list[str]:
        jit = ["-XX:TieredStopAtLevel=1"] if self.quick_start else []
        return [
            "java",
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            *jit,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            "-cp",
            os.path.join(LIB, "*"),
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0) -> None:
        """Format the storage (first start only), start the JVM, wait until a client gets metadata."""
        if not self._formatted:
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            out = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "--config", self.config_path
                ),
                capture_output=True,
                text=True,
                timeout=120,
            )
            if out.returncode != 0:
                raise RuntimeError(f"formatting the kafka storage failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            self._formatted = True
        out_path = os.path.join(self.directory, "stdout.log")
        with open(out_path, "ab") as out:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", self.config_path),
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = ""
                for path in (self.log_path, out_path):
                    if os.path.exists(path):
                        tail += open(path, errors="replace").read()[-3000:]
                self.stop(kill=True)
                raise RuntimeError(f"kafka broker on port {self.port} did not start within {timeout:g}s:\n{tail}")
            time.sleep(0.1)

    def ready(self) -> bool:
        """True once the port answers and a client reads the cluster's metadata with this broker in it."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        from confluent_kafka.admin import AdminClient

        try:
            md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
        except Exception:
            return False
        return 1 in md.brokers


def read_topic(
    bootstrap: str, topic: str, timeout: float = 30.0, isolation_level: str = "read_committed", headers: bool = False
) -> list:
    """Every message of ``topic`` (all partitions, up to the end as it is now), read by an independent consumer.

    Returns the values, or ``(value, headers)`` pairs with ``headers``.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": isolation_level,
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        while True:
            positions = {tp.partition: tp.offset for tp in consumer.position([TopicPartition(topic, p) for p in parts])}
            if all(ends[p] == 0 or positions[p] >= ends[p] for p in parts):  # (read_committed: past aborted ones)
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r}: at {positions} of {ends} after {timeout:g}s")
            for m in consumer.consume(10_000, 0.2):
                if m.error() is None:
                    out.append((m.value(), m.headers()) if headers else m.value())
    finally:
        consumer.close()


try:
    import pytest
except ImportError:  # benchmarks/kafka.py uses KafkaBroker without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def kafka_broker(tmp_path_factory) -> Iterator[KafkaBroker]:
        """A session-wide broker (its data survives a :meth:`KafkaBroker.restart`)."""
        require_kafka()
        broker = KafkaBroker(str(tmp_path_factory.mktemp("kafka")))
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    @pytest.fixture
    def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
        """``host:port`` of the session broker (started again if a test stopped it)."""
        if not kafka_broker.running:
            kafka_broker.start()
        return kafka_broker.bootstrap
