"""Least-privilege Redis ACL rules for the worker and for feature readers, from the key layout.

The worker needs the commands below on keys under its namespace and nothing else: no
``KEYS``/``SCAN``, no ``FLUSH*``, no ``CONFIG``, no keys outside ``<namespace>:*``. Its Lua
scripts (the fenced batch write, the alert lease) run with the caller's permissions: Redis checks
every ``redis.call`` inside ``EVAL`` against the same command list and key patterns, so the
commands the scripts call are listed here too.

A reader (a recommender using :class:`~eventpulse.tables.client.FeatureClient`) may only read:
the feature maps and sketches of entities (``<namespace>:{s:<k>}:<entity>:<id>:f``, ``...:hll:...``,
``...:sk:...``), the published definitions (``<namespace>:features``) and the meta hash
(``<namespace>:{s:ctl}:meta``); not the fences (offsets), not the alert state, nothing outside the
namespace, and no write at all. Fences share the shard tags of entities, so the reader's patterns
name the entity keys' endings (a consumer group whose name ends in ``:f`` would be readable).

Both may ask a Redis Cluster for its topology (``CLUSTER SLOTS``/``SHARDS``/``NODES``), which
redis-py's cluster client needs to route commands. Neither needs ``INFO``: the start-up check of
the URL's mode is skipped when the user may not run it.

The rules work on Redis 6.2 and 7 (no ``%R~`` read-only key patterns, which need 7.0: a reader's
commands are all read-only, so plain key patterns suffice). ``eventpulse redis-acl`` prints them.
"""

from __future__ import annotations

from eventpulse.tables.client import registry_key
from eventpulse.tables.keys import meta_key, shard_entity_key

#: the topology queries of redis-py's cluster client
CLUSTER_COMMANDS = ("cluster|slots", "cluster|shards", "cluster|nodes")

#: What the worker runs: the batch write (EVALSHA, its script's TIME/HGET/HSET/GET/SET/PFADD/
#: HINCRBY/PEXPIRE/RPUSH), offsets and definitions (HMGET, HGETALL, DEL, HSET in MULTI/EXEC), the alert
#: store (ZADD, ZRANGE, ZREMRANGEBYSCORE, LRANGE, LREM, MGET, HDEL, SET...), health (PING).
WORKER_COMMANDS = (
    "ping", "get", "set", "mget", "del", "hget", "hset", "hsetnx", "hmget", "hgetall", "hdel",
    "hincrby",
    "pfadd", "pexpire", "rpush", "lrange", "lrem", "zadd", "zrange", "zremrangebyscore",
    "multi", "exec", "discard", "eval", "evalsha", "script|load", "script|exists",
    # WAIT for replicas (EVENTPULSE_REDIS_WAIT_REPLICAS); the one-off layout migration's
    # EXISTS/RENAME (its SCAN is not granted: without it the migration is skipped, logged)
    "wait", "exists", "rename", "time", *CLUSTER_COMMANDS,
)

#: What a feature read runs (one pipeline: HGET meta, MGET feature maps, PFCOUNT, HGETALL), and
#: the definitions' HGETALL at connect.
READER_COMMANDS = ("ping", "get", "mget", "hget", "hgetall", "pfcount", *CLUSTER_COMMANDS)


def _glob_escape(text: str) -> str:
    """Key patterns are globs: a namespace with ``*?[]\\`` must match only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def worker_rules(namespace: str) -> list[str]:
    """``ACL SETUSER <user> on >password`` followed by these."""
    return ["resetkeys", "resetchannels", "-@all", *(f"+{c}" for c in WORKER_COMMANDS),
            f"~{_glob_escape(namespace)}:*"]


def reader_rules(namespace: str) -> list[str]:
    # "<namespace>:{s:" then the shard, entity and id; the endings of what a read touches
    # (a digit first: the control tag {s:ctl} of the alert keys is not an entity shard)
    entities = _glob_escape(shard_entity_key(namespace, 0, "\0", "\0").split("0}", 1)[0]) + "[0-9]*}:"
    keys = [entities + "*:f", entities + "*:hll:*", entities + "*:sk:*",
            _glob_escape(registry_key(namespace)), _glob_escape(meta_key(namespace))]
    return ["resetkeys", "resetchannels", "-@all", *(f"+{c}" for c in READER_COMMANDS),
            *(f"~{k}" for k in keys)]


def acl_setuser(user: str, rules: list[str], password_placeholder: str = "<password>") -> str:
    """The ``ACL SETUSER`` line an operator runs (or puts in an ACL file as ``user ...``)."""
    return " ".join(["ACL SETUSER", user, "on", f">{password_placeholder}", *rules])
