"""The one way a service connects to the bus: a URL with its credentials, TLS files, and cluster or not.

    redis://[user:password@]host:port/db     plain; AUTH as `user` (an ACL user, docs/deployment.md) when given
    rediss://[user:password@]host:port/db    TLS; `ca_file` is the CA the server's certificate must chain to,
                                             `cert_file` + `key_file` a client certificate (tls-auth-clients yes)

With `cluster`, the URL names any one node of a Redis Cluster and the client is `redis.asyncio.RedisCluster`,
which follows the cluster's slot map; every multi-key command the services send stays in one hash slot
(services/vita/bus/README.md, "Redis Cluster").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from redis.asyncio import Redis, RedisCluster

from vita.errors import VitaError


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    ca_file: str | None = None  # rediss://: trust this CA (default: the system's roots)
    cert_file: str | None = None  # rediss://: client certificate, for servers with tls-auth-clients yes
    key_file: str | None = None

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss"):
            raise VitaError(f"Redis URL {redacted(self.url)!r} must start with redis:// or rediss:// (TLS)")
        tls_files = [f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None]
        if tls_files and scheme != "rediss":
            raise VitaError("--redis-ca/--redis-cert/--redis-key need a rediss:// URL (TLS)")
        if (self.cert_file is None) != (self.key_file is None):
            raise VitaError("--redis-cert and --redis-key go together")
        for f in tls_files:
            if not Path(f).is_file():
                raise VitaError(f"Redis TLS file {f} does not exist")
        if self.cluster and urlsplit(self.url).path not in ("", "/", "/0"):
            raise VitaError("a Redis Cluster has only database 0: drop the /db from the URL")


def connect(settings: RedisSettings, *, socket_timeout: float | None = None,
            socket_connect_timeout: float | None = 5.0) -> Redis | RedisCluster:
    """A client for the bus (binary replies: entries are protobuf). No I/O happens until the first command."""
    kwargs: dict[str, object] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    if settings.ca_file is not None:
        kwargs["ssl_ca_certs"] = settings.ca_file
    if settings.cert_file is not None:
        kwargs["ssl_certfile"], kwargs["ssl_keyfile"] = settings.cert_file, settings.key_file
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **kwargs)
    return Redis.from_url(settings.url, **kwargs)


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
