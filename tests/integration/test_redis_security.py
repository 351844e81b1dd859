"""The bus behind Redis AUTH, an ACL user and TLS: a real redis-server on a free loopback port holds only the
services' ACL user (vita.bus.acl, printed in docs/deployment.md), and the stack's traffic runs through it:
Generate with text and with an image (vision encoder, embedding blobs), a Converse session (session store,
transactions, pending media), cancellation. Users without the rule are refused with a clear error."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import grpc
import pytest
import redis

from tests.bus_stack import bus_traffic, channel, check_traffic, generate, running_stack
from tests.certs import CertificateAuthority
from vita.bus.acl import acl_rule
from vita.bus.streams import BusConfig
from vita.inference import VitaPipeline
from vita.runtime.redis_client import RedisSettings, connect
from vita.stack import RedisServer
from vita.v1 import assistant_pb2_grpc

PASSWORD = "bus-secret"


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def _acl_file(directory, prefix: str):
    path = directory / "users.acl"
    path.write_text("\n".join([
        "user default off",  # no anonymous access at all
        acl_rule("vita", prefix, f">{PASSWORD}"),
        # Every command, but another deployment's keys: the prefix part of the rule is what keeps it out.
        f"user intruder on >{PASSWORD} resetkeys ~other:* resetchannels &other:* +@all",
    ]) + "\n")
    return path


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory, prefix):
    directory = tmp_path_factory.mktemp("redis-acl")
    server = RedisServer(str(directory), args=("--aclfile", str(_acl_file(directory, prefix))))
    server.probe = lambda: redis.Redis(port=server.port, username="vita", password=PASSWORD).ping()
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, prefix):
    directory = tmp_path_factory.mktemp("redis-tls")
    ca = CertificateAuthority(directory, "redis CA")
    server_cert, client_cert = ca.issue("redis", server=True), ca.issue("vita-service", server=False)
    server = RedisServer(str(directory), tls=True, args=(
        "--aclfile", str(_acl_file(directory, prefix)), "--tls-cert-file", str(server_cert.cert),
        "--tls-key-file", str(server_cert.key), "--tls-ca-cert-file", str(ca.ca_file), "--tls-auth-clients", "yes"))
    server.probe = lambda: redis.Redis(port=server.port, username="vita", password=PASSWORD, ssl=True,
                                       ssl_ca_certs=str(ca.ca_file), ssl_certfile=str(client_cert.cert),
                                       ssl_keyfile=str(client_cert.key)).ping()
    server.start()
    yield server, ca, client_cert
    server.stop()


def test_the_acl_user_is_enough_for_all_bus_traffic(pipeline, tiny_model_dir, acl_redis, prefix, wide_png):
    settings = RedisSettings(f"redis://vita:{PASSWORD}@127.0.0.1:{acl_redis.port}/0")
    check_traffic(*asyncio.run(bus_traffic(pipeline, tiny_model_dir, settings, prefix, wide_png.read_bytes())))


def test_a_user_without_the_rule_is_refused_clearly(pipeline, tiny_model_dir, acl_redis, prefix):
    async def intruder():
        client = connect(RedisSettings(f"redis://intruder:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"))
        bus = BusConfig(prefix=prefix)
        try:
            async with running_stack(pipeline, tiny_model_dir, client, bus, workers_may_fail=True) as stack, \
                    channel(stack.target) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await generate(assistant_pb2_grpc.AssistantStub(ch), "hello")
                return err.value
        finally:
            await client.aclose()

    err = asyncio.run(intruder())
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "the bus refused the orchestrator's Redis user" in err.details() and "no permissions to access one of the keys" in err.details()

    # Anonymous access is off, and a wrong password stops a service at start-up, in one line, password hidden.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=acl_redis.port).set(f"{prefix}:x", 1)
    started = subprocess.run(
        [sys.executable, "-m", "vita.cli", "serve", "orchestrator", "--redis",
         f"redis://vita:wrong@127.0.0.1:{acl_redis.port}/0", "--prefix", prefix, "--plain-logs"],
        capture_output=True, text=True, timeout=120)
    assert started.returncode == 2, started
    lines = started.stderr.strip().splitlines()
    assert lines[-1].startswith("vita serve orchestrator: error: cannot use Redis at redis://vita:***@"), started.stderr
    assert "AuthenticationError" in lines[-1] and "wrong" not in lines[-1]


def test_bus_traffic_over_tls_with_client_certificates(pipeline, tiny_model_dir, tls_redis, prefix, wide_png):
    server, ca, client_cert = tls_redis
    url = f"rediss://vita:{PASSWORD}@127.0.0.1:{server.port}/0"
    settings = RedisSettings(url, ca_file=str(ca.ca_file), cert_file=str(client_cert.cert),
                             key_file=str(client_cert.key))
    check_traffic(*asyncio.run(bus_traffic(pipeline, tiny_model_dir, settings, prefix, wide_png.read_bytes())))

    async def ping(settings: RedisSettings):
        client = connect(settings)
        try:
            return await client.ping()
        finally:
            await client.aclose()

    # The system's roots do not vouch for the test CA; a client without a certificate is turned away.
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        asyncio.run(ping(RedisSettings(url, cert_file=str(client_cert.cert), key_file=str(client_cert.key))))
    with pytest.raises(redis.ConnectionError):
        asyncio.run(ping(RedisSettings(url, ca_file=str(ca.ca_file))))
    with pytest.raises(redis.ConnectionError):  # plaintext to the TLS port
        asyncio.run(ping(RedisSettings(f"redis://vita:{PASSWORD}@127.0.0.1:{server.port}/0")))


@pytest.mark.parametrize("server", ["open", "acl"])
def test_a_password_the_server_does_not_ask_for_is_warned_about(server, acl_redis, tmp_path, caplog):
    """A Redis with no password takes any: the service says its password protects nothing; the ACL server refuses
    a client without one, so nothing is said (and the check adds no outage wait)."""
    import logging
    import time

    from vita.runtime.serve import _check_redis

    if server == "acl":
        url = f"redis://vita:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    else:
        open_redis = RedisServer(str(tmp_path / "open")).start()
        url = f"redis://:not-the-password@127.0.0.1:{open_redis.port}/0"

    async def check() -> float:
        client = connect(RedisSettings(url=url), retry=None)
        start = time.monotonic()
        try:
            await _check_redis(client, url)
        finally:
            await client.aclose()
        return time.monotonic() - start

    try:
        with caplog.at_level(logging.WARNING, logger="vita.runtime.serve"):
            took = asyncio.run(check())
    finally:
        if server == "open":
            open_redis.stop()
    warned = "Redis answers without a password" in caplog.text
    assert warned == (server == "open")
    assert "not-the-password" not in caplog.text and took < 5
