"""The topics a config needs, and ``processor topics create|check``: provision and verify them with
confluent-kafka's AdminClient.

The relay reads its input topics (producers own them: checked, never created), writes dead letters to
``deadletter.topic`` and parks on one retry topic per vendor with ``on_outage: park``. A retry topic must
keep a parked record until the relay redrives or expires it: its ``retention.ms`` at least the vendor's
``retry.max_elapsed_s`` plus ``RETRY_RETENTION_MARGIN_MS`` (a day: room for a relay that is down, or a
redrive that is behind, when a record's budget runs out, so it is dead-lettered as exhausted rather than
deleted unseen) and no ``retention.bytes`` limit, or parked events are deleted before they are redriven.
The dead-letter and retry topics must delete by time only: ``cleanup.policy`` ``delete``, never
``compact`` (compaction keeps one record per key, and a parked or dead-lettered record shares its key
with the other events of that key; Kafka refuses keyless records on a compacted topic outright). They
must take every record the relay's producer may write (``max.message.bytes`` at least the producer's
``message.max.bytes``). Every partition needs a leader and the relay's principal needs WRITE, or the
relay cannot settle what it writes there. deploy/RUNBOOK.md states the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient, ConfigResource, NewTopic, ResourceType

from processor.config import Config
from processor.kafka_access import AccessWatch, reach

logger = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
PRODUCER_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
# what a record may grow by on its way to a dead-letter or retry topic: the relay.* headers (a reason is at
# most 240 characters; about fifteen short names and numbers besides), with room to spare
HEADROOM_BYTES = 4096
# a retry topic keeps a parked record this long past its vendor's retry.max_elapsed_s: what `check` requires
# and what `create` gives (deploy/RUNBOOK.md, RelayParkedBacklogOld, says the same)
RETRY_RETENTION_MARGIN_MS = DAY_MS
DEFAULT_RETRY_MARGIN_MS = RETRY_RETENTION_MARGIN_MS
DEFAULT_DEADLETTER_RETENTION_MS = 14 * DAY_MS  # time to inspect and replay dead letters


@dataclass(frozen=True)
class TopicNeed:
    """A topic the config needs and what it must hold: ``retry_budget_ms`` (a retry topic: its vendor's
    ``retry.max_elapsed_s``; None: no retention floor) and ``min_message_bytes`` (None: the relay does not
    write it)."""

    name: str
    role: str  # input, dead-letter, retry:<vendor>
    retry_budget_ms: int | None = None
    min_message_bytes: int | None = None

    @property
    def written(self) -> bool:
        return self.min_message_bytes is not None

    @property
    def min_retention_ms(self) -> int | None:
        """The shortest ``retention.ms`` that keeps a parked record past its budget: the budget plus the
        margin."""
        return None if self.retry_budget_ms is None else self.retry_budget_ms + RETRY_RETENTION_MARGIN_MS


def producer_message_max_bytes(config: Config) -> int:
    """The largest record the relay's dead-letter and parking producer sends."""
    return int(config.producer_settings().get("message.max.bytes", PRODUCER_MESSAGE_MAX_BYTES))


def needed_topics(config: Config) -> list[TopicNeed]:
    """Input topics, the dead-letter topic, and each parking vendor's retry topic, in that order."""
    biggest = producer_message_max_bytes(config)
    needs = [TopicNeed(t, "input") for t in config.kafka.topics]
    needs.append(TopicNeed(config.deadletter.topic, "dead-letter", None, biggest))
    for vendor, topic in config.retry_topics().items():
        budget_ms = int(config.vendors[vendor].retry.max_elapsed_s * 1000)
        needs.append(TopicNeed(topic, f"retry:{vendor}", budget_ms, biggest))
    return needs


@dataclass(frozen=True)
class CreateOptions:
    partitions: int | None = None  # None: as many as the first input topic has
    replication_factor: int = -1  # -1: the broker's default.replication.factor
    retry_margin_ms: int = RETRY_RETENTION_MARGIN_MS  # at least that: `check` requires it
    deadletter_retention_ms: int = DEFAULT_DEADLETTER_RETENTION_MS

    def __post_init__(self) -> None:
        if self.retry_margin_ms < RETRY_RETENTION_MARGIN_MS:
            raise ValueError(f"the retry topics' retention margin must be at least "
                             f"{RETRY_RETENTION_MARGIN_MS // HOUR_MS} h (what `topics check` requires)")


def topic_settings(need: TopicNeed, options: CreateOptions) -> dict[str, str]:
    """The topic configs ``create`` sets on a dead-letter or retry topic."""
    if need.retry_budget_ms is not None:
        retention = need.retry_budget_ms + options.retry_margin_ms
    else:
        retention = options.deadletter_retention_ms
    return {"retention.ms": str(retention), "retention.bytes": "-1", "cleanup.policy": "delete",
            "max.message.bytes": str(need.min_message_bytes)}


def admin_client(config: Config, access: AccessWatch | None = None) -> AdminClient:
    conf: dict[str, Any] = {**config.client_settings(), "log_level": 3}
    if access is not None:
        conf["error_cb"] = access
    return AdminClient(conf, logger=logging.getLogger("librdkafka"))


def _list_topics(config: Config, admin: AdminClient | None, timeout_s: float) -> tuple[AdminClient, Any]:
    """An admin client (``admin`` or one of the config's) and the cluster's topics; a KafkaException naming the
    cause as soon as the cluster refuses the client (login, TLS, permission), or when it does not answer."""
    access = AccessWatch("topics")
    admin = admin or admin_client(config, access)
    try:
        return admin, reach(admin, access, timeout_s).topics
    except KafkaException as exc:
        raise _kafka_error(exc, f"cannot reach {config.kafka.bootstrap_servers}") from exc


def _kafka_error(exc: KafkaException, doing: str) -> KafkaException:
    """A KafkaException saying what was being done and librdkafka's reason (for the CLI to print)."""
    err = exc.args[0] if exc.args else None
    return KafkaException(f"{doing}: {err.str() if isinstance(err, KafkaError) else exc}")


def create(config: Config, options: CreateOptions, admin: AdminClient | None = None,
           timeout_s: float = 30.0) -> dict[str, str]:
    """Create the dead-letter and retry topics that do not exist (idempotent: existing topics are left as
    they are; ``check`` says whether they fit). Returns topic -> 'created' or 'exists'. Input topics are the
    producers' and never created. Raises KafkaException naming the topic when the broker refuses."""
    admin, existing = _list_topics(config, admin, timeout_s)
    partitions = options.partitions
    if partitions is None:
        first = config.kafka.topics[0]
        if first not in existing or existing[first].error is not None:
            raise KafkaException(f"input topic {first} does not exist to take the partition count from; "
                                 "pass --partitions")
        partitions = len(existing[first].partitions)
    result: dict[str, str] = {}
    new = []
    for need in needed_topics(config):
        if not need.written:
            continue
        if need.name in existing and existing[need.name].error is None:
            result[need.name] = "exists"
            continue
        new.append(NewTopic(need.name, partitions, options.replication_factor,
                            config=topic_settings(need, options)))
    if not new:
        return result
    for topic, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args and isinstance(exc.args[0], KafkaError) and \
                    exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                result[topic] = "exists"  # created meanwhile (another run)
                continue
            raise _kafka_error(exc, f"cannot create {topic}") from exc
        logger.info("created topic %s (%d partitions)", topic, partitions)
        result[topic] = "created"
    return result


def _number(configs: dict[str, Any], key: str) -> int | None:
    entry = configs.get(key)
    if entry is None or entry.value is None:
        return None
    return int(entry.value)


def _compaction_problem(need: TopicNeed, configs: dict[str, Any]) -> str | None:
    """A dead-letter or retry topic whose ``cleanup.policy`` compacts (not reported: Kafka's default,
    ``delete``)."""
    entry = configs.get("cleanup.policy")
    policy = entry.value if entry is not None and entry.value is not None else "delete"
    if not need.written or {p.strip() for p in policy.split(",")} == {"delete"}:
        return None
    return (f"{need.name}: cleanup.policy {policy} compacts ({need.role} topic): it keeps one record per key "
            "and loses the rest (a broker refuses keyless records outright); set it to delete")


def _margin(need: TopicNeed) -> str:
    return (f"({need.role}: retry.max_elapsed_s {need.retry_budget_ms} ms plus the "
            f"{RETRY_RETENTION_MARGIN_MS // HOUR_MS} h margin)")


def _retention_problem(need: TopicNeed, retention: int) -> str | None:
    if need.min_retention_ms is None or not 0 <= retention < need.min_retention_ms:
        return None
    return (f"{need.name}: retention.ms {retention} is shorter than {need.min_retention_ms} {_margin(need)}; "
            "parked events could be deleted before they are redriven or dead-lettered as exhausted")


def _config_problems(need: TopicNeed, configs: dict[str, Any]) -> list[str]:
    problems = []
    compaction = _compaction_problem(need, configs)
    if compaction:
        problems.append(compaction)
    if need.min_retention_ms is not None:
        retention = _number(configs, "retention.ms")
        if retention is None:
            problems.append(f"{need.name}: the broker does not report retention.ms; it must be at least "
                            f"{need.min_retention_ms} ms {_margin(need)} or -1")
        else:
            short = _retention_problem(need, retention)
            if short:
                problems.append(short)
        size_cap = _number(configs, "retention.bytes")
        if size_cap is not None and size_cap >= 0:
            problems.append(f"{need.name}: retention.bytes {size_cap} deletes parked events by size; set it to -1")
    if need.min_message_bytes is not None:
        biggest = _number(configs, "max.message.bytes")
        if biggest is None:
            problems.append(f"{need.name}: the broker does not report max.message.bytes; it must be at least "
                            f"{need.min_message_bytes} (the producer's message.max.bytes)")
        elif biggest < need.min_message_bytes:
            problems.append(f"{need.name}: max.message.bytes {biggest} is smaller than {need.min_message_bytes} "
                            "(the producer's message.max.bytes): larger dead letters or parked records would "
                            "be refused")
    return problems


def check(config: Config, admin: AdminClient | None = None, timeout_s: float = 30.0) -> list[str]:
    """What does not fit, one line per problem naming the topic (empty: every topic fits): a topic
    missing, a partition without a leader, no WRITE for the relay on a topic it writes, a dead-letter or
    retry topic that compacts, a retention or ``max.message.bytes`` short of the config."""
    needs = needed_topics(config)
    admin, existing = _list_topics(config, admin, timeout_s)
    problems: list[str] = []
    present = []
    for need in needs:
        md = existing.get(need.name)
        if md is None or md.error is not None:
            problems.append(f"{need.name}: missing ({need.role} topic)")
            continue
        leaderless = sorted(p for p, part in md.partitions.items() if part.leader < 0)
        if leaderless:
            problems.append(f"{need.name}: partitions {leaderless} have no leader (not writable)")
        if need.written:
            present.append(need)
    if not present:
        return problems
    resources = [ConfigResource(ResourceType.TOPIC, n.name) for n in present]
    described = admin.describe_configs(resources, request_timeout=timeout_s)
    by_name = {r.name: f for r, f in described.items()}
    for need in present:
        try:
            configs = by_name[need.name].result()
        except KafkaException as exc:
            problems.append(f"{need.name}: cannot describe its configs ({_kafka_error(exc, 'describe')})")
            continue
        problems.extend(_config_problems(need, configs))
    problems.extend(_write_problems(admin, present, timeout_s))
    return problems


def _write_problems(admin: AdminClient, needs: list[TopicNeed], timeout_s: float) -> list[str]:
    """Topics the broker says the relay's principal may not write (brokers without an authorizer, or that
    do not report operations, allow everything: nothing to say)."""
    futures = admin.describe_topics(TopicCollection([n.name for n in needs]), request_timeout=timeout_s,
                                    include_authorized_operations=True)
    problems = []
    for name, future in futures.items():
        try:
            ops = future.result().authorized_operations
        except KafkaException as exc:
            problems.append(f"{name}: cannot describe it ({_kafka_error(exc, 'describe')})")
            continue
        if ops and AclOperation.WRITE not in ops and AclOperation.ALL not in ops:
            problems.append(f"{name}: the relay's principal may not WRITE to it")
    return problems


def start_problems(config: Config, admin: AdminClient | None = None,
                   timeout_s: float = 10.0) -> tuple[list[str], list[str]]:
    """What the relay checks before it consumes (``Relay.run``), as far as the broker reports it: problems
    (it refuses to start) and warnings (logged as errors). Unlike ``check``, what the broker does not report
    is not judged: a broker without an authorizer or topic configs (the test broker) passes.

    Problems: a dead-letter or retry topic the relay may not WRITE to, that compacts, or whose
    ``max.message.bytes`` is below the producer's ``message.max.bytes`` (the same rules as ``check``).
    Warnings: a retry topic whose retention is short of ``retry.max_elapsed_s`` plus the margin (what
    ``check`` names; a warning, since only an outage that long loses anything, and the topic can be altered
    while the relay runs); an input topic that takes records larger than the producer's
    ``message.max.bytes`` less ``HEADROOM_BYTES`` for the relay's headers: such a record could not be
    dead-lettered or parked (its offset would be held, loudly, until the setting is raised). A warning, not a
    refusal: with the defaults (an input topic at the broker's 1,048,588, the producer at 1,000,000) every
    relay would be refused."""
    admin = admin or admin_client(config)
    needs = needed_topics(config)
    written = [n for n in needs if n.written]
    described = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n.name) for n in needs],
                                       request_timeout=timeout_s)
    by_name = {n.name: n for n in needs}
    sizes: dict[str, int] = {}
    problems: list[str] = []
    warnings: list[str] = []
    for resource, future in described.items():
        try:
            configs = future.result()
        except KafkaException:
            continue
        need = by_name[resource.name]
        compaction = _compaction_problem(need, configs)
        if compaction:
            problems.append(compaction)
        retention = _number(configs, "retention.ms")
        short = None if retention is None else _retention_problem(need, retention)
        if short:
            warnings.append(short)
        size = _number(configs, "max.message.bytes")
        if size is not None:
            sizes[resource.name] = size
    problems += [f"{n.name}: max.message.bytes {sizes[n.name]} is smaller than {n.min_message_bytes} (the "
                 "producer's message.max.bytes): larger dead letters or parked records would be refused"
                 for n in written if n.name in sizes and sizes[n.name] < (n.min_message_bytes or 0)]
    problems += [p for p in _write_problems(admin, written, timeout_s) if "cannot describe" not in p]
    producer = producer_message_max_bytes(config)
    warnings += [f"{n.name}: max.message.bytes {sizes[n.name]} takes records the relay could not dead-letter or "
                 f"park: its producer's message.max.bytes is {producer}, and a record gains up to {HEADROOM_BYTES} "
                 f"bytes of relay headers; set deadletter.producer message.max.bytes to at least "
                 f"{sizes[n.name] + HEADROOM_BYTES} (and the dead-letter and retry topics' max.message.bytes)"
                 for n in needs if not n.written and n.name in sizes and sizes[n.name] + HEADROOM_BYTES > producer]
    return problems, warnings
