"""OpenTelemetry traces of one instance's processes: off unless configured the standard way.

Tracing is on in a process when the OpenTelemetry settings name somewhere to send spans:
`OTEL_TRACES_EXPORTER` lists an exporter (`otlp`, `console`), or `OTEL_EXPORTER_OTLP_ENDPOINT`
/ `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the exporter is then `otlp`); `OTEL_SDK_DISABLED=
true` turns it off whatever else is set. Everything else is the SDK's own reading of the
environment: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
`OTEL_EXPORTER_OTLP_*` (endpoint, headers, timeout; OTLP over HTTP/protobuf), `OTEL_BSP_*`,
`OTEL_PROPAGATORS`, `OTEL_PYTHON_FASTAPI_EXCLUDED_URLS`.

`setup()` installs one tracer provider per process (the API's lifespan, the worker's start);
`instrument_app`, `instrument_client` and `temporal_interceptors` add the FastAPI, httpx and
Temporal instrumentation to what the process builds. Off, none of them does anything, and
`enabled()` is a module attribute read: the spans of `federation.tracing` cost nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
EXPORTERS = ("otlp", "console", "none")
_provider: TracerProvider | None = None


class TelemetrySettingsError(ValueError):
    """The OpenTelemetry settings name an exporter or protocol this build does not have."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def exporter_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the settings ask for ([]: tracing is off)."""
    env = os.environ if environ is None else environ
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return []
    listed = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in listed if n]
    if not names and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = ["otlp"]
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise TelemetrySettingsError(
            f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}; fedagent has {', '.join(EXPORTERS)}"
        )
    return [n for n in names if n != "none"]


def _check_otlp_protocol(env: Mapping[str, str]) -> None:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise TelemetrySettingsError(
            f"OTLP protocol {protocol!r} is not available; fedagent exports OTLP over "
            "http/protobuf (an OpenTelemetry Collector can forward to gRPC backends)"
        )


def check_settings(environ: Mapping[str, str] | None = None) -> None:
    """Refuse settings that name an exporter or protocol this build does not have (a
    process checks before it starts, and refuses to start)."""
    env = os.environ if environ is None else environ
    if "otlp" in exporter_names(env):
        _check_otlp_protocol(env)


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the settings turn tracing on in this process."""
    return bool(exporter_names(environ))


def enabled() -> bool:
    """Whether this process records spans (its provider is installed)."""
    return _provider is not None


def provider() -> TracerProvider | None:
    """This process's tracer provider (None: tracing is off)."""
    return _provider


def tracer(name: str) -> Any:
    """A tracer of this process's provider (call only when `enabled()`)."""
    assert _provider is not None
    return _provider.get_tracer(name)


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    _check_otlp_protocol(env)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*


def setup(
    role: str,
    instance: str,
    *,
    exporter: SpanExporter | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Install this process's tracer provider, once; True when tracing is on.

    `role` (api, worker) and `instance` name the service unless `OTEL_SERVICE_NAME` /
    `OTEL_RESOURCE_ATTRIBUTES` say otherwise. `exporter` (tests: an in-memory one) is used
    instead of what the settings name, turns tracing on by itself, and leaves OpenTelemetry's
    global provider alone (what is instrumented then names the provider: `provider()`).
    """
    global _provider
    env = os.environ if environ is None else environ
    if _provider is not None:
        return True
    names = [] if exporter is not None else exporter_names(env)
    if exporter is None and not names:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # Ours first, then what the settings say (theirs win).
    ours = Resource.create({"service.name": f"fedagent-{role}", "service.namespace": instance})
    made = TracerProvider(resource=ours.merge(OTELResourceDetector().detect()))
    if exporter is not None:
        made.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        made.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    if exporter is None:
        trace.set_tracer_provider(made)
    _provider = made
    log.info("OpenTelemetry traces on (%s)", ", ".join(names) or "in-process exporter")
    return True


def flush(timeout_millis: int = 5000) -> None:
    """Send what is buffered (a process about to stop)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def reset() -> None:
    """Stop recording spans in this process (tests; the SDK keeps its global provider)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
    _provider = None


def instrument_app(app: FastAPI) -> None:
    """A server span for each request (the caller's `traceparent` header continued). Decided
    when the app is built, before the middleware stack is: by the settings alone."""
    if not wanted():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # The ASGI receive/send sub-spans add nothing a reader needs.
    FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"])


def instrument_client(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """A client span for each request the client sends, its context in the request's
    `traceparent` header."""
    if enabled():
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=_provider)
    return client


def temporal_interceptors() -> list[Any]:
    """Spans for starting, signalling and running workflows and activities, their context
    carried in Temporal's headers (for the client, and so for the workers built on it)."""
    if not enabled():
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(tracer("temporalio.contrib.opentelemetry"))]
