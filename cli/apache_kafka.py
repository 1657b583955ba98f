"""A real Apache Kafka broker on the local JVM, for integration tests and local runs.

One child process in KRaft mode (``process.roles=broker,controller``, a single node
that is its own controller quorum) on two free loopback ports, with its log data and
log file in a work folder. No Docker and no tarball: the jars come from Maven Central
through ``deploy/kafka/kafka-classpath.sh``, once, into a cache folder
(``~/.cache/topology-store/kafka-<version>``). The Kafka version is pinned in
``deploy/kafka/pom.xml``.

Unlike the in-memory Tansu broker of the embedded dev stack (``devstack.py``), this is
the broker that production runs: it keeps the log on disk, serves idempotent and
transactional producers, both group protocols and every admin request. It needs a
Java 17+ runtime, and Maven for the first run. Standalone on purpose: stdlib only,
nothing from the project's own packages::

    from topology_store.cli.apache_kafka import ApacheKafka, available

    if available():
        kafka = ApacheKafka().start()  # 2-4 s once the jars and the class archive are cached
        try:
            ...  # bootstrap_servers=kafka.bootstrap
        finally:
            kafka.stop()

A node of a multi-node cluster is the same class with a ``node_id``, the ``host`` it
listens on, the static controller quorum (``quorum_voters``, "1@host:port,2@...") and,
to run it on a host of its own, a ``command_prefix`` such as ``("ip", "netns", "exec",
"kafka-1")``; ``kill()`` crashes it (SIGKILL) and ``start()`` brings it back on its data
(tests/cluster/ runs three of them in network namespaces).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

__all__ = ["ApacheKafka", "ApacheKafkaError", "available", "classpath", "free_port", "java_major_version"]

#: Overrides where the classpath script is (an installed wheel has no ``deploy/`` folder).
CLASSPATH_SCRIPT_ENV = "TOPOLOGY_KAFKA_CLASSPATH_SCRIPT"
#: Set to 0 to start the JVM without the class-data-sharing archive (see ``_cds_archive``).
CDS_ENV = "TOPOLOGY_KAFKA_CDS"
#: The line the broker logs once it serves requests (``KafkaRaftServer.startup``).
STARTED_LINE = "Kafka Server started"

# Small-box JVM settings: a bounded heap, the serial collector (2 cores: no parallel GC
# threads to feed), C1 only (most of the startup is class loading and interpreted code,
# and a test broker never runs long enough to profit from C2), and no hsperfdata files.
JVM_OPTIONS = (
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

# The broker's own logging (log4j2 through SLF4J): everything to stdout, which is the log file.
LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d{ISO8601}] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
"""


class ApacheKafkaError(RuntimeError):
    pass


# Brokers this interpreter started and did not stop: ended when it exits normally, so that
# a test run that forgot one (or failed before its teardown) leaves no JVM behind.
_RUNNING: set[ApacheKafka] = set()


@atexit.register
def _stop_leftovers() -> None:
    for kafka in list(_RUNNING):
        kafka.stop(timeout_s=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def classpath_script() -> Path:
    """``$TOPOLOGY_KAFKA_CLASSPATH_SCRIPT``, else ``deploy/kafka/kafka-classpath.sh`` in the
    nearest folder above this module that has one (the checkout this module lives in)."""
    override = os.environ.get(CLASSPATH_SCRIPT_ENV)
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        script = folder / "deploy" / "kafka" / "kafka-classpath.sh"
        if script.is_file():
            return script
    return here.parent / "deploy" / "kafka" / "kafka-classpath.sh"  # named in the error


def _answer(command: list[str], timeout_s: float = 20.0) -> str | None:
    """The combined output of ``command``, or None when it is missing, fails or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


@functools.cache
def _java_version_output() -> str | None:
    return _answer(["java", "-version"])


def java_major_version() -> int | None:
    """The major version of ``java`` on PATH (8 for "1.8.0_x", 17 for "17.0.15"), or None."""
    output = _java_version_output()
    match = re.search(r'version "(\d+)(?:\.(\d+))?', output or "")
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


@functools.cache
def available() -> bool:
    """True when what ``ApacheKafka.start()`` needs answers: a Java 17+ runtime, the
    classpath script, and Maven (only until the script has cached the jars)."""
    version = java_major_version()
    if version is None or version < 17 or not classpath_script().is_file():
        return False
    return (_answer(["bash", str(classpath_script()), "--cached"]) is not None
            or _answer(["mvn", "-B", "-v"], timeout_s=60) is not None)


@functools.cache
def classpath() -> str:
    """The broker's classpath, from the script (which fetches the jars on its first run)."""
    script = classpath_script()
    if not script.is_file():
        raise ApacheKafkaError(f"no {script}: set {CLASSPATH_SCRIPT_ENV} to deploy/kafka/kafka-classpath.sh")
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ApacheKafkaError(f"{script} did not finish within {exc.timeout}s") from exc
    jars = done.stdout.strip()
    if done.returncode != 0 or not jars:
        raise ApacheKafkaError(f"{script} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return jars


def _cds_archive(jars: str, heap_mb: int) -> Path | None:
    """Where the broker's AppCDS archive (its classes, parsed and laid out once) is kept:
    beside the cached jars, named after everything it is only valid with (the JVM and its
    base archive, the classpath and each jar's size and time, compressed oops or not).
    With it the broker serves in about half the time. None when disabled or unwritable."""
    if os.environ.get(CDS_ENV, "1") == "0" or (java_major_version() or 0) < 17:
        return None
    key = hashlib.sha256()
    java = Path(os.path.realpath(shutil.which("java") or "java"))
    for item in (str(java), _java_version_output() or "", jars, str(heap_mb < 32 * 1024)):
        key.update(item.encode() + b"\0")
    for path in [java.parent.parent / "lib" / "server" / "classes.jsa", *map(Path, jars.split(os.pathsep))]:
        try:
            stat = path.stat()
        except OSError:
            continue
        key.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    folder = Path(jars.split(os.pathsep)[0]).parent
    return folder / f"broker-{key.hexdigest()[:16]}.jsa" if os.access(folder, os.W_OK) else None


def new_cluster_id() -> str:
    """A random Kafka cluster id: 16 random bytes, URL-safe base64 without padding
    (what ``kafka-storage.sh random-uuid`` prints), without starting a JVM for it."""
    # A leading "-" would read as an option to the storage tool (one id in 64 has one);
    # Kafka's own Uuid.randomUuid() draws again for the same reason.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _cds_refused(cds_log: Path) -> bool:
    """True when the JVM's class-data-sharing log says it could not map the archive."""
    try:
        text = cds_log.read_text(errors="replace")
    except OSError:
        return False
    # HotSpot logs why it gives an archive up as "UseSharedSpaces: <reason>" (a jar changed,
    # the class path or the JDK's base archive differs), or warns "Unable to use shared archive".
    return "Mapped dynamic region" not in text or any(
        sign in text for sign in ("UseSharedSpaces:", "Unable to use shared archive", "cannot be used"))


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - chars))
            return log.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"


def api_versions_ok(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """True when a Kafka broker answers an ApiVersions v0 request without an error
    on ``host:port``: it speaks the protocol, not only accepts connections."""
    # Request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id.
    client_id = b"topology-probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exactly(sock, 4)
            (size,) = struct.unpack(">i", header)
            response = _recv_exactly(sock, size)
    except OSError:
        return False
    correlation_id, error_code = struct.unpack(">ih", response[:6])
    return correlation_id == 7 and error_code == 0


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = sock.recv(missing)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


@dataclass(eq=False)
class ApacheKafka:
    """An Apache Kafka broker+controller child process on 127.0.0.1.

    ``work_dir`` holds ``server.properties``, ``data/`` and, unless ``log_path`` says
    otherwise, ``kafka.log`` (the broker's stdout and stderr, and the storage format
    run's). Without a ``work_dir`` a temporary folder is made, and removed by ``stop()``
    (not with ``stop(keep_data=True)``). A caller's ``work_dir`` and ``log_path`` are
    never removed. ``start()`` on a work folder whose data is already formatted restarts
    that broker on its data: pass the same ports then (the quorum lives at
    ``controller_port``). ``broker_config`` adds or overrides server.properties entries.
    """

    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    work_dir: Path | None = None
    log_path: Path | None = None
    heap_mb: int = 512
    broker_config: dict[str, str] = field(default_factory=dict)
    cluster_id: str = field(default_factory=new_cluster_id)
    class_data_sharing: bool = True
    #: The address both listeners bind and the broker advertises.
    host: str = "127.0.0.1"
    node_id: int = 1
    #: A static controller quorum of several nodes, "1@host:port,2@host:port,3@host:port"
    #: (every node gets the same string and the same ``cluster_id``); empty: this node alone.
    quorum_voters: str = ""
    #: Put in front of every JVM command line, e.g. ("ip", "netns", "exec", "kafka-1").
    command_prefix: tuple[str, ...] = ()
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_work_dir: bool = field(default=False, repr=False)
    _owns_log_path: bool = field(default=False, repr=False)
    _cds_dump: tuple[Path, Path] | None = field(default=None, repr=False)
    _failed: bool = field(default=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def config(self) -> dict[str, str]:
        """The server.properties that start() writes."""
        assert self.work_dir is not None
        # The 4.x dynamic quorum (KIP-853): this node alone, formatted with --standalone; or
        # the static quorum of a cluster, every voter named up front.
        quorum = ({"controller.quorum.voters": self.quorum_voters} if self.quorum_voters
                  else {"controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}"})
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.work_dir / "data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Fewer partitions for the internal topics (50 by default): a new broker's first
            # consumer group waits for 50 partition loads otherwise (measured: 1.6 s vs 0.6 s).
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
        }
        properties.update(self.broker_config)
        return properties

    def start(self, timeout_s: float = 90.0) -> ApacheKafka:
        if self._process is not None and self._process.poll() is None:
            raise ApacheKafkaError(f"already running (pid {self._process.pid})")
        jars = classpath()
        self._failed = True  # until it serves: stop() then keeps the log that the error names
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
            self._owns_work_dir = True
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = self.work_dir / "kafka.log"
            self._owns_log_path = True
        properties_path = self.work_dir / "server.properties"
        properties_path.write_text("".join(f"{key}={value}\n" for key, value in self.config().items()))
        log4j_path = self.work_dir / "log4j2.properties"
        log4j_path.write_text(LOG4J2_PROPERTIES)
        # The first broker run writes the class-data archive as it exits (some seconds more
        # for that stop()); every later JVM, the storage formatter's too, maps it.
        archive = _cds_archive(jars, self.heap_mb) if self.class_data_sharing else None
        have_archive = archive is not None and archive.is_file()
        cds_log = self.work_dir / "cds.log"
        jvm = [*self.command_prefix, "java", *([f"-XX:SharedArchiveFile={archive}"] if have_archive else []),
               f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", *JVM_OPTIONS,
               f"-Dlog4j2.configurationFile={log4j_path}", "-cp", jars]
        broker = [*jvm, "kafka.Kafka", str(properties_path)]
        after_java = len(self.command_prefix) + 1
        if have_archive:  # to tell whether the JVM could use it
            broker.insert(after_java, f'-Xlog:cds=info:file="{cds_log}"::filecount=0')
        elif archive is not None:
            partial = archive.with_name(f"{archive.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
            broker.insert(after_java, f"-XX:ArchiveClassesAtExit={partial}")
            self._cds_dump = (partial, archive)
        deadline = time.monotonic() + timeout_s
        with open(self.log_path, "ab") as log:
            if not (self.work_dir / "data" / "meta.properties").exists():
                self._format(jvm, properties_path, log, deadline)
            log_offset = log.tell()
            self._process = subprocess.Popen(
                broker,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group, as topology.devstack does: a Ctrl-C must
                # not stop the broker before the services that use it. stop() ends it.
                start_new_session=True,
            )
        _RUNNING.add(self)
        try:
            self._wait_until_serving(log_offset, deadline, timeout_s)
        except BaseException:
            self._terminate(timeout_s=10, keep_archive=False)  # a failed start's archive is a poor one
            raise
        self._failed = False
        if have_archive and archive is not None and _cds_refused(cds_log):
            archive.unlink(missing_ok=True)  # stale (e.g. the JDK's own archive changed): the next run redoes it
        return self

    def _format(self, java: list[str], properties_path: Path, log: IO[bytes], deadline: float) -> None:
        # A static quorum is formatted as it is; a lone node as a dynamic quorum of itself.
        standalone = [] if self.quorum_voters else ["--standalone"]
        command = [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}",
                   "--config", str(properties_path), *standalone, "--ignore-formatted"]
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=max(1.0, deadline - time.monotonic()), check=False)
        except subprocess.TimeoutExpired as exc:
            raise ApacheKafkaError(f"formatting the storage took over {exc.timeout:.0f}s; "
                                   f"{self.log_path} ends with:\n{_tail(self.log_path)}") from exc
        if done.returncode != 0:
            raise ApacheKafkaError(f"formatting the storage failed (exit {done.returncode}); "
                                   f"{self.log_path} ends with:\n{_tail(self.log_path)}")

    def _wait_until_serving(self, log_offset: int, deadline: float, timeout_s: float) -> None:
        assert self._process is not None and self.log_path is not None
        started = False
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ApacheKafkaError(f"the broker exited with status {self._process.returncode}; "
                                       f"{self.log_path} ends with:\n{_tail(self.log_path)}")
            if not started:
                with open(self.log_path, "rb") as log:
                    log.seek(log_offset)
                    started = STARTED_LINE.encode() in log.read()
            if started and api_versions_ok(self.port, self.host):
                return
            time.sleep(0.1)
        raise ApacheKafkaError(f"the broker did not serve on {self.bootstrap} within {timeout_s:g}s; "
                               f"{self.log_path} ends with:\n{_tail(self.log_path)}")

    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT, ...) to the broker process, if it runs."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would end it: no controlled shutdown, nothing
        flushed. Its work folder stays, so ``start()`` brings the same node back on its
        data (with the same ports)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self._terminate(timeout_s=0)  # forgets the process; a half-written class archive is dropped

    def _terminate(self, timeout_s: float, keep_archive: bool = True) -> None:
        process, self._process = self._process, None
        dump, self._cds_dump = self._cds_dump, None
        _RUNNING.discard(self)
        killed = False
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a frozen broker would not act on SIGTERM
                process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                killed = True
        if dump is not None:
            partial, archive = dump
            # The JVM writes the archive on its way out; only a whole one is kept.
            if keep_archive and not killed and process is not None and process.returncode != -signal.SIGKILL \
                    and partial.is_file():
                os.replace(partial, archive)
            else:
                partial.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 20.0, keep_data: bool = False) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after ``timeout_s``; then remove the
        temporary work folder if start() made it, unless ``keep_data`` or the last start()
        failed (its error names the log file in there)."""
        self._terminate(timeout_s)
        if self._owns_work_dir and not keep_data and not self._failed and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir, self._owns_work_dir = None, False
            if self._owns_log_path:
                self.log_path, self._owns_log_path = None, False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
