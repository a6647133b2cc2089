"""How API and worker processes reach Temporal: the dev server, a self-hosted cluster with
(mutual) TLS, or Temporal Cloud with an API key or certificates, all from the same settings."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import TLSConfig

from federation import telemetry
from federation.settings import Settings


class TemporalSettingsError(ValueError):
    """The Temporal connection settings contradict each other or name unreadable files."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise TemporalSettingsError(f"cannot read the {what} {path}: {exc.strerror}") from None


def tls_config(settings: Settings) -> TLSConfig | bool:
    """The TLS to use: a TLSConfig, True (TLS with system roots) or False (plaintext)."""
    cert, key = settings.temporal_tls_cert, settings.temporal_tls_key
    if (cert is None) != (key is None):
        raise TemporalSettingsError(
            "set both FEDAGENT_TEMPORAL_TLS_CERT and FEDAGENT_TEMPORAL_TLS_KEY (mutual TLS) "
            "or neither"
        )
    wants_tls = (
        settings.temporal_tls
        or cert is not None
        or settings.temporal_tls_server_ca is not None
        or settings.temporal_tls_server_name is not None
        or settings.temporal_api_key is not None
    )
    if not wants_tls:
        return False
    if cert is None and settings.temporal_tls_server_ca is None:
        if settings.temporal_tls_server_name is None:
            return True
    return TLSConfig(
        server_root_ca_cert=(
            _read(
                settings.temporal_tls_server_ca, "server CA file (FEDAGENT_TEMPORAL_TLS_SERVER_CA)"
            )
            if settings.temporal_tls_server_ca
            else None
        ),
        domain=settings.temporal_tls_server_name,
        client_cert=_read(cert, "client certificate (FEDAGENT_TEMPORAL_TLS_CERT)")
        if cert
        else None,
        client_private_key=_read(key, "client key (FEDAGENT_TEMPORAL_TLS_KEY)") if key else None,
    )


def metrics_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime that serves SDK metrics for Prometheus, when a metrics port is set."""
    if settings.metrics_port is None:
        return None
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=f"{settings.metrics_host}:{settings.metrics_port}",
                durations_as_seconds=True,
            ),
            global_tags={"instance": settings.instance_name},
        )
    )


async def connect_temporal(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """A client of this instance's namespace, with the TLS and credentials the settings name."""
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=tls_config(settings),
        api_key=api_key,
        runtime=runtime,
        # OpenTelemetry on: spans of workflows and activities, for this client's workers too.
        interceptors=telemetry.temporal_interceptors(),
    )
