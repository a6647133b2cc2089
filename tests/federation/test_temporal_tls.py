"""`connect_temporal` reaches Temporal over mutual TLS, as against a real cluster: the test puts
a TLS-terminating proxy (client certificates required, ALPN h2) in front of the real dev server."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

from cli.devstack import DevStack
from federation.settings import Settings
from federation.temporal import TemporalSettingsError, connect_temporal, tls_config
from tests.conftest import free_port_block

pytestmark = pytest.mark.e2e
SERVER_NAME = "temporal.fedagent.test"


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.with_suffix(".key").chmod(0o600)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fedagent test CA", ca_key, None, ca=True)
    _write(tmp_path / "ca", ca, None)
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(tmp_path / name, _cert(name, key, (ca, ca_key), server=server), key)
    return tmp_path


@pytest.fixture
async def tls_front(stack: DevStack, pki: Path) -> AsyncIterator[str]:
    """host:port of a TLS proxy to the dev server that only admits the CA's clients."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(pki / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    host, port = stack.temporal_address.split(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    listen = free_port_block(1)
    server = await asyncio.start_server(handle, "127.0.0.1", listen, ssl=context)
    try:
        yield f"127.0.0.1:{listen}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=5)


async def test_mutual_tls_with_client_certificate(tls_front: str, pki: Path) -> None:
    settings = Settings(
        temporal_address=tls_front,
        temporal_namespace="hub",
        temporal_tls_cert=pki / "client.pem",
        temporal_tls_key=pki / "client.key",
        temporal_tls_server_ca=pki / "ca.pem",
        temporal_tls_server_name=SERVER_NAME,
    )
    client = await connect_temporal(settings)
    info = await client.workflow_service.get_system_info(GetSystemInfoRequest())
    assert info.server_version
    assert await client.count_workflows("") is not None


async def test_without_a_client_certificate_the_cluster_refuses(tls_front: str, pki: Path) -> None:
    settings = Settings(
        temporal_address=tls_front,
        temporal_namespace="hub",
        temporal_tls_server_ca=pki / "ca.pem",
        temporal_tls_server_name=SERVER_NAME,
    )
    with pytest.raises(RuntimeError):
        client = await asyncio.wait_for(connect_temporal(settings), timeout=20)
        await client.workflow_service.get_system_info(GetSystemInfoRequest())


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    assert tls_config(Settings()) is False
    assert tls_config(Settings(temporal_tls=True)) is True
    assert tls_config(Settings(temporal_api_key="k" * 40)) is True  # Temporal Cloud: TLS
    with pytest.raises(TemporalSettingsError, match="FEDAGENT_TEMPORAL_TLS_KEY"):
        tls_config(Settings(temporal_tls_cert=tmp_path / "c.pem"))
    with pytest.raises(TemporalSettingsError, match="cannot read the client certificate"):
        tls_config(Settings(temporal_tls_cert=tmp_path / "c.pem", temporal_tls_key=tmp_path / "k"))
