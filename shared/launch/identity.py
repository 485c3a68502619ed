"""One models folder, one Redis: the pairing that keeps two stacks from training the same runs.

Two stacks (page + worker) on one models folder but with different Redis servers would each rebuild their run
list from the run folders and train the same runs twice. So a folder is paired with one Redis by a random
token kept in both places: the Redis key `resnet_lab:identity` and the file `<models>/.redis-identity`
(JSON: token, the Redis address, when and from which host it was paired). Every process that uses both — the
worker, the page, `up` — calls `claim_models_dir` when it starts. The rule:

1. The folder has no pairing yet: it takes the Redis's token (or a new one, stored in Redis too).
2. The folder's token equals the Redis's token: go ahead.
3. The Redis holds no token (new, or it came back empty: restarted without persistence, flushed) and it is the
   same Redis as far as we can tell — the address (host:port/db, no password) the folder recorded is this one,
   or the caller owns the Redis (`up` holding its lock, whose embedded Redis keeps its data in the folder but
   gets a new port each start) — the token is written back to Redis (and `up` records the new address). The
   page then rebuilds the runs list from the run folders, as before.
4. Anything else — another token, or an empty Redis at another address — is refused with `IdentityMismatch`,
   whose message names both Redis servers and the fixes: point REDIS_URL at the folder's Redis, use another
   models folder, or, when the old Redis is gone for good, delete the pairing file.

Races are safe: the token goes into Redis with SET NX and the file is created with link() (which fails when it
exists), so two processes starting at once either agree or one of them is refused.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from redis.connection import parse_url

from shared.settings import redact_url

log = logging.getLogger(__name__)

IDENTITY_FILE = ".redis-identity"
IDENTITY_KEY = "resnet_lab:identity"


class IdentityMismatch(RuntimeError):
    """The models folder belongs to another Redis; the message says which and what to do."""


@dataclass(frozen=True)
class Pairing:
    """What `<models>/.redis-identity` holds."""

    token: str
    redis: str  # address of the Redis it was paired with: host:port/db, never the password
    paired: float  # Unix time
    host: str  # the machine that paired it

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.paired))
        return f"{self.redis} (identity {self.token[:8]}, paired {when} on {self.host})"


def redis_address(url: str) -> str:
    """`host:port/db` (or `unix:<path>/db`) of a Redis URL, without user or password."""
    try:
        parts = parse_url(url)
    except ValueError:  # redis-py's message quotes the piece it could not read: maybe part of the password
        raise ValueError(f"REDIS_URL {redact_url(url)} is not a Redis URL redis-py can read — percent-encode "
                         "'/', '?', '#' and '@' in its password (e.g. %2F for '/')") from None
    db = parts.get("db", 0)
    if parts.get("path"):
        return f"unix:{parts['path']}/{db}"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 6379)}/{db}"


def read_pairing(models_dir: Path) -> Pairing | None:
    """The folder's pairing, or None when it has none; a damaged file raises IdentityMismatch saying what to do."""
    path = Path(models_dir) / IDENTITY_FILE
    try:
        data = json.loads(path.read_text())
        return Pairing(token=str(data["token"]), redis=str(data["redis"]), paired=float(data["paired"]),
                       host=str(data["host"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise IdentityMismatch(f"{path} is damaged ({exc}): delete it and start again; the folder is then paired "
                               f"with the Redis that REDIS_URL names") from None


def _write(path: Path, pairing: Pairing, *, exclusive: bool) -> bool:
    """Write the pairing atomically; with `exclusive`, only when no file exists yet (False: someone was first)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(asdict(pairing)) + "\n")
    try:
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic create-if-absent
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def claim_models_dir(models_dir: Path, client: redis.Redis, address: str, *, owns_redis: bool = False) -> str:
    """Check (or make) the pairing of `models_dir` with the Redis `client` talks to; returns the shared token.

    `address` is this Redis as `redis_address` gives it. `owns_redis`: the caller started this Redis on the
    folder's own data (`up`), so an empty one is adopted whatever its address. Raises IdentityMismatch (rule in
    the module docstring), redis.RedisError when Redis cannot be reached, OSError when the file cannot be written.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / IDENTITY_FILE
    for _ in range(3):  # another process may pair the folder between our read and our write: read again
        pairing = read_pairing(models_dir)
        current = _text(client.get(IDENTITY_KEY))
        if pairing is None:
            token = current or secrets.token_hex(16)
            if current is None and not client.set(IDENTITY_KEY, token, nx=True):
                continue
            if _write(path, Pairing(token, address, time.time(), socket.gethostname()), exclusive=True):
                log.info("paired models folder %s with the Redis at %s", models_dir, address)
                return token
            continue
        if current == pairing.token:
            if owns_redis and pairing.redis != address:
                _write(path, Pairing(pairing.token, address, pairing.paired, pairing.host), exclusive=False)
            return current
        if current is None and (owns_redis or pairing.redis == address):
            if not client.set(IDENTITY_KEY, pairing.token, nx=True):
                continue
            log.warning("the Redis at %s holds no identity (new, or it came back empty): gave it back the identity "
                        "of models folder %s", address, models_dir)
            if pairing.redis != address:
                _write(path, Pairing(pairing.token, address, pairing.paired, pairing.host), exclusive=False)
            return pairing.token
        raise IdentityMismatch(_mismatch(path, pairing, address, current))
    raise IdentityMismatch(f"the pairing of {models_dir} with Redis keeps changing under us: is another stack "
                           f"starting on the same folder? Start one stack per models folder")


def _mismatch(path: Path, pairing: Pairing, address: str, current: str | None) -> str:
    theirs = f"identity {current[:8]}" if current else "no identity (a new or emptied Redis)"
    return (f"models folder {path.parent} belongs to the Redis at {pairing.describe()}, but REDIS_URL points at "
            f"{address}, which holds {theirs}. One models folder serves one Redis: two stacks on one folder would "
            f"train the same runs twice. Point REDIS_URL at {pairing.redis}, or give this Redis its own folder "
            f"(RESNET_LAB_MODELS_DIR); if {pairing.redis} is gone for good and this Redis replaces it, delete "
            f"{path} and start again.")


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def check_models_dir(models_dir: Path, redis_url: str, *, wait: float = 0.0, owns_redis: bool = False) -> str:
    """`claim_models_dir` for a Redis URL, retrying the connection for up to `wait` seconds.

    Raises IdentityMismatch, or ConnectionError (with the address, never the password) when Redis does not
    answer in time.
    """
    address = redis_address(redis_url)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                return claim_models_dir(models_dir, client, address, owns_redis=owns_redis)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"cannot reach the Redis at {address} to check that models folder "
                                          f"{models_dir} belongs to it ({exc}): start that Redis, or fix "
                                          f"REDIS_URL") from None
                time.sleep(1.0)
    finally:
        client.close()
