"""One Settings object for an instance, read from FEDAGENT_* environment variables."""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Everything one instance (its API and its workers) needs to run."""

    model_config = SettingsConfigDict(env_prefix="FEDAGENT_", extra="ignore")

    instance_name: str = Field(
        default="local",
        description=(
            "This instance's name: its identity card, logs and metrics, its master key file and its"
            " agents' workspace directory are named after it."
        ),
    )
    # The URL peers use to reach this instance's API (goes into the identity card).
    public_url: str = "http://127.0.0.1:8100"
    api_host: str = Field(
        default="127.0.0.1", description="Address `fedagent serve` binds the API to."
    )
    api_port: int = Field(default=8100, description="Port `fedagent serve` binds the API to.")

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/fedagent",
        description=(
            "PostgreSQL URL of this instance's own database (its API and workers share it)."
        ),
    )
    temporal_address: str = Field(
        default="127.0.0.1:7233", description="Temporal frontend `host:port`."
    )
    temporal_namespace: str = Field(
        default="default", description="Temporal namespace of this instance's workflows."
    )
    task_queue: str = Field(
        default="fedagent",
        description=(
            "Task queue of this instance's workflows and activities; agents run on "
            "`TASK_QUEUE-agents`."
        ),
    )
    temporal_ui_url: str = Field(
        default="http://127.0.0.1:8233",
        description="Temporal Web UI the console links this instance's workflows to.",
    )
    # Where the console links a peer's (the executor's) workflows: a URL of a Temporal Web UI
    # namespace with {peerName} / {peerInstanceId} placeholders, e.g.
    # "http://127.0.0.1:8233/namespaces/{peerName}" (unset: the console shows the workflow id).
    temporal_ui_peer_url: str | None = None

    data_dir: Path = Field(
        default=Path(".fedagent"),
        description=(
            "Where the master key file (`secrets/`) and the agents' workspaces (`workspaces/`) "
            "live."
        ),
    )
    # --- signed messages ---
    # Accepted clock skew for signed messages, in seconds.
    timestamp_window: int = Field(default=300, ge=5)
    # How long a signed call to a peer may take before it counts as failed.
    peer_request_timeout: float = Field(default=15.0, gt=0)
    # How long a requester keeps trying to deliver a spawn before giving up.
    spawn_deadline: int = Field(default=600, ge=5)
    # Requester falls back to polling agent.status when no event came for this long
    # (workflows started before quiet-poll; newer ones use poll_after_quiet).
    status_poll_interval: int = Field(default=15, ge=1)
    # Requester asks agent.status once this many seconds passed without news from the
    # executor (its events bring every state change at once; the check finds a lost one).
    poll_after_quiet: float = Field(default=2.0, ge=0, le=60)
    status_check_max: float = Field(
        default=300.0,
        ge=1,
        description=(
            "Longest quiet spell, in seconds, between two checks of a remote run's state by its "
            "requester: each check that finds nothing new doubles the spell from "
            "`poll_after_quiet` up to this (events bring every change at once; a check finds "
            "a lost one)."
        ),
    )
    # --- orchestration ---
    # Maximum agents one worker process runs at once (more wait in the agents task queue).
    max_concurrent_agents: int = Field(default=8, ge=1)
    # Maximum agents this instance runs at once for all peers; past it a spawn is refused with
    # 429 unless it asked to queue (options.queue).
    max_running_agents: int = Field(default=64, ge=1)
    # On SIGTERM a worker stops polling and gives running agents this long to finish before
    # they are cancelled (and retried by another worker).
    worker_shutdown_grace: float = Field(default=30.0, ge=0)
    heartbeat_interval: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Seconds between two heartbeats of a running agent to Temporal (each carries the "
            "latest progress; a worker is counted lost after 4 missed). Kills reach the sandbox "
            "at once by NOTIFY; a cancellation from Temporal alone waits for the next heartbeat."
        ),
    )
    # Worker versioning: workers declare a Worker Deployment version (deployment name + build
    # id; the build id defaults to the package version and a hash of the workflow code). With
    # worker_versioning on, Temporal routes each workflow to the version made current with
    # `temporal worker deployment set-current-version` (workflows auto-upgrade: changes sit
    # behind workflow.patched()).
    worker_deployment: str = Field(
        default="fedagent",
        description="Worker Deployment name the workers declare their version under.",
    )
    worker_build_id: str = Field(
        default="",
        description=(
            "Build id of the workers' deployment version (empty: the package version plus a hash of"
            " the workflow code)."
        ),
    )
    worker_versioning: bool = Field(
        default=False,
        description=(
            "Let Temporal route each workflow to the deployment version made current (`temporal "
            "worker deployment set-current-version`)."
        ),
    )
    reconcile_interval: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds between the instance's reconciler rounds (worked by one process of the"
            " instance at a time), each looking at the next 100 open runs quiet this long and"
            " recording the final state of those whose workflow closed without recording it."
        ),
    )
    store_outage_wait: float = Field(
        default=300.0,
        ge=0,
        description=(
            "Seconds a running agent's store writes (checkpoints, transcript, progress, its"
            " outcome and artifacts) wait for a database that is away, heartbeating meanwhile,"
            " before its attempt gives up; the next attempt starts a minute later and waits"
            " again. A database that refuses a write fails it at once."
        ),
    )
    reconcile_start_grace: float = Field(
        default=900.0,
        gt=0,
        description=(
            "Seconds a peer's spawn whose workflow could not be started here (Temporal away: the"
            " peer was answered 503 and retries) keeps its slot before the reconciler records it"
            " failed; longer than the peers' `FEDAGENT_SPAWN_DEADLINE`."
        ),
    )

    model_provider: str = Field(
        default="scripted",
        description=(
            "Model provider agents run with: `scripted` (offline: each instruction line starting "
            "with `$ ` is one command) or `anthropic` (the Messages API)."
        ),
    )
    log_level: str = Field(
        default="info",
        description="Log level of the API and workers (`debug`, `info`, `warning`, `error`).",
    )

    # --- production ---
    # Temporal beyond the dev server: TLS (mutual with a client certificate and key, PEM files),
    # the CA that signed the server's certificate (default: the system roots) and the name to
    # verify it by; or an API key (Temporal Cloud), which implies TLS.
    temporal_tls: bool = Field(
        default=False,
        description="TLS to Temporal with the system roots and no client certificate.",
    )
    temporal_tls_cert: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS to Temporal."
    )
    temporal_tls_key: Path | None = Field(
        default=None,
        description="Client certificate's private key (PEM) for mutual TLS to Temporal.",
    )
    temporal_tls_server_ca: Path | None = Field(
        default=None, description="CA of Temporal's server certificate (unset: the system roots)."
    )
    temporal_tls_server_name: str | None = Field(
        default=None,
        description=(
            "Name to verify Temporal's server certificate by, when it differs from the address."
        ),
    )
    temporal_api_key: SecretStr | None = Field(
        default=None, description="Temporal Cloud API key (implies TLS)."
    )
    # Workers serve the Temporal SDK's metrics in Prometheus format here (unset: off).
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address workers serve the Temporal SDK's metrics on (Prometheus format).",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port workers serve the Temporal SDK's metrics on (unset: off).",
    )
    # json: one JSON object per line with instance, agentId, workflowId, messageId.
    log_format: Literal["json", "text"] = "text"

    # --- trust ---
    # "dev" tolerates placeholder secrets (with a warning); anything else refuses them.
    environment: Literal["dev", "production"] = "production"
    # Master key sealing the instance's private keys: 32 bytes in base64, or a passphrase of
    # at least 32 characters. Unset: a key file (mode 0600) is created on the first start.
    secret_key: SecretStr | None = None
    # Default: DATA_DIR/secrets/INSTANCE_NAME.key
    secret_key_file: Path | None = Field(
        default=None,
        description=(
            "File holding the master key when FEDAGENT_SECRET_KEY is unset (unset: "
            "DATA_DIR/secrets/INSTANCE_NAME.key): created mode 0600 on the first start; one "
            "that others can read is refused outside environment=dev (a warning in dev)."
        ),
    )
    # How long a rotated-out key still verifies, in seconds (a rotation request may override).
    key_rotation_grace: int = Field(default=24 * 3600, ge=0)
    # At most one identity-card fetch per peer in this many seconds for unknown key ids.
    key_refresh_interval: float = Field(default=1.0, ge=0)
    # Request bodies above this many bytes get 413 before they are parsed.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # The longest agent timeout (seconds) this instance accepts from any peer.
    max_agent_timeout: int = Field(default=24 * 3600, ge=1)

    # --- hostile peers ---
    # Hosts (names, addresses or CIDR networks) a peer may name although they are loopback,
    # private or link-local (refused outside environment=dev otherwise), comma-separated: for
    # peer URLs (plain http is accepted to them outside dev too) and for clones.
    outbound_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Largest answer read from a peer (a RESPONSE to a signed message), in bytes.
    peer_reply_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Refused messages per source address: a burst of this many, refilled at this rate per
    # second; past it a refusal is a 429 rate_limited, counted in a metric, not audited.
    refusal_burst: int = Field(
        default=60,
        ge=1,
        description=(
            "Refused messages per source address allowed in a burst; past it (and the refill rate) "
            "a refusal is a 429 `rate_limited`, counted in a metric, not audited."
        ),
    )
    refusal_rate: float = Field(
        default=1.0,
        gt=0,
        description="Refused messages per second per source address that refill the burst.",
    )
    # Audit rows older than this many days are dropped (whole daily partitions); 0: kept.
    audit_retention_days: int = Field(default=365, ge=0)
    # --- retention of what runs leave (operations/retention.py) ---
    workspace_retention: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Seconds a run's workspace (its files, baseline repository, diff file and /tmp) is "
            "kept on the worker's disk after the run ended; 0: removed as soon as it ended (its "
            "diff and log are in the store by then)."
        ),
    )
    run_data_retention: float = Field(
        default=30 * 86400.0,
        ge=1,
        description=(
            "Seconds the messages, events, transcripts and conversation checkpoints of an ended "
            "run are kept (messages of no run, and the commands users sent: from when they were "
            "received)."
        ),
    )
    artifact_retention: float = Field(
        default=30 * 86400.0,
        ge=1,
        description=(
            "Seconds the artifacts (diff, log, transcript) of an ended run stay downloadable; "
            "stored content goes once no run refers to it any more."
        ),
    )
    run_retention: float = Field(
        default=90 * 86400.0,
        ge=1,
        description=(
            "Seconds the record of an ended run (its state, result and error, as lists and "
            "`GET /agents/{id}` show it) is kept."
        ),
    )
    retention_interval: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Seconds between two passes of the retention job (once per instance, in a worker); "
            "workspaces of ended runs are looked for every 10 s or this often if shorter."
        ),
    )
    # Default limit of one peer's agents running here at once when its grants set none, and
    # how many more of its spawns may wait queued (options.queue).
    peer_max_running_agents: int = Field(
        default=8,
        ge=1,
        description=(
            "Agents one peer may run here at once when its grants set no `maxConcurrentAgents`."
        ),
    )
    peer_max_queued_agents: int = Field(
        default=16,
        ge=0,
        description=(
            "Spawns of one peer that may wait queued (`options.queue`) beyond its running limit."
        ),
    )
    # --- local runs (agents this instance runs for its own users) ---
    local_agent_types: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Agent types local users (REST without a connection, `fedagent spawn --here`, A2A)"
            " may run here, comma-separated; empty: every type this instance offers."
        ),
    )
    local_repositories: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description=(
            "Glob patterns (fnmatch) a local run's `context.repository` must match,"
            " comma-separated, as in a connection's grants."
        ),
    )
    local_max_timeout: int = Field(
        default=4 * 3600,
        ge=1,
        description=(
            "Longest `options.timeout` (seconds) of a local run (`FEDAGENT_MAX_AGENT_TIMEOUT`"
            " bounds it too)."
        ),
    )
    local_max_running_per_workspace: int = Field(
        default=4,
        ge=1,
        description=(
            "Unfinished local runs one workspace may have at once; past it a spawn is refused"
            " (429 `capacity_exceeded`). The instance-wide `FEDAGENT_MAX_RUNNING_AGENTS` counts"
            " local runs too."
        ),
    )
    a2a_conformance: bool = Field(
        default=False,
        description=(
            "For the A2A conformance kit (TCK) only: A2A messages whose messageId starts with"
            " `tck-` and asks for a direct message or an artifact of a given shape are answered"
            " at once, without a run; see docs/a2a.md. Never on in production."
        ),
    )
    # Connection requests from strangers waiting (PENDING) for the admin at once; past it a
    # new request is a 429 too_many_pending_requests until the admin accepts or rejects some.
    max_pending_requests: int = Field(default=50, ge=1)
    max_pending_per_source: int = Field(
        default=5,
        ge=1,
        description="Pending connection requests from one sending address (IPv6: one /64); "
        "past it 429 too_many_pending_from_source.",
    )
    max_pending_per_host: int = Field(
        default=5,
        ge=1,
        description="Pending connection requests naming one host as their URL (one card server "
        "minting ids); past it 429 too_many_pending_for_host.",
    )
    pending_request_ttl: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="Seconds after which a connection request nobody answered expires "
        "(DISCONNECTED, audited connection.request_expired).",
    )
    # Cards of strangers (connection requests) are read through an HTTP client of their own,
    # never the one peers' notices, commands and artifacts use.
    stranger_fetch_concurrency: int = Field(
        default=8,
        ge=1,
        description="Strangers' cards read at once; past it 503 connect_busy.",
    )
    stranger_fetches_per_source: int = Field(
        default=2,
        ge=1,
        description="Strangers' cards read at once for one sending address (IPv6: per /64); "
        "past it 429 rate_limited, before anything is fetched.",
    )
    stranger_fetches_per_host: int = Field(
        default=2,
        ge=1,
        description="Strangers' cards read at once from one named host; past it 429 "
        "rate_limited, before anything is fetched.",
    )
    stranger_fetch_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a stranger's card may take to be read, in all."
    )
    stranger_dns_threads: int = Field(
        default=4,
        ge=1,
        description="Threads that resolve the host names strangers name (none of the shared "
        "resolver's).",
    )
    # What suspending or disconnecting a connection does to its runs: those this instance
    # executes for the peer and those it asked of the peer.
    on_connection_end: Literal["kill", "finish"] = "kill"

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment != "dev" and self.secret_key is not None:
            if is_placeholder_secret(self.secret_key.get_secret_value()):
                raise ValueError(
                    "FEDAGENT_SECRET_KEY is a placeholder or too short (needs 32 bytes in "
                    "base64 or a passphrase of 32+ characters); only environment=dev accepts it"
                )
        return self

    # --- agent runtime ---
    # Where agents run: bwrap (bubblewrap, the default), docker (a container per run), or
    # process (no isolation at all; for tests and machines where neither can run).
    sandbox: Literal["bwrap", "docker", "process"] = "bwrap"
    sandbox_memory_mb: int = Field(
        default=2048, ge=16, description="Memory limit of one run's sandbox, in MiB."
    )
    sandbox_pids: int = Field(
        default=256, ge=8, description="Processes one run's sandbox may hold at once."
    )
    sandbox_cpus: float = Field(default=2.0, gt=0, description="CPUs one run's sandbox may use.")
    # Largest file an agent's command may write (bwrap: RLIMIT_FSIZE).
    sandbox_file_mb: int = Field(default=1024, ge=1)
    # What a run's workspace and /tmp may hold together; past it the run ends `disk_quota`.
    sandbox_disk_mb: int = Field(default=4096, ge=1)
    peer_disk_budget_mb: int = Field(
        default=8192,
        ge=0,
        description=(
            "What all of one peer's runs here may hold on disk together (workspaces, baselines, "
            "diffs, /tmp), in MiB; the run whose step goes past it ends `peer_disk_budget`, and "
            "a try that finds it passed does not start (0: no budget, only the per-run quota)."
        ),
    )
    # Seconds one command may run before everything it started is killed.
    command_timeout: float = Field(default=600.0, gt=0)
    # Host uid (and gid) sandboxes run as when the worker runs as root; used by nothing else.
    sandbox_uid: int = Field(default=61000, ge=1)
    # False: limits by rlimits only, even where cgroups could be written.
    sandbox_cgroups: bool = True
    # Extra host directories mounted read-only in bwrap sandboxes (toolchains), comma-separated.
    sandbox_ro_paths: Annotated[list[str], NoDecode] = Field(default_factory=list)
    bwrap_path: str = Field(
        default="bwrap", description="The bubblewrap binary the bwrap sandbox runs."
    )
    docker_image: str = Field(
        default="python:3.12-bookworm",
        description="Image of the docker sandbox's containers (pulled if missing).",
    )
    # Docker daemon URL (unix:///..., tcp://...); unset: the SDK's DOCKER_HOST / default socket.
    docker_host: str | None = None
    # anthropic provider (model_provider=anthropic); unset key/URL fall back to the SDK's
    # ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL.
    anthropic_model: str = Field(
        default="claude-sonnet-4-5", description="Model the anthropic provider asks."
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        description="API key of the anthropic provider (unset: the SDK's `ANTHROPIC_API_KEY`).",
    )
    anthropic_base_url: str | None = Field(
        default=None,
        description=(
            "Base URL of the Messages API (unset: the SDK's `ANTHROPIC_BASE_URL` or its default)."
        ),
    )
    # Other models a spawn may ask for (context.model), comma-separated.
    allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    agent_max_turns: int = Field(
        default=50,
        ge=1,
        description="Model turns one run may take (its whole conversation, resumes included).",
    )
    # Input + output tokens one run may use (0: no budget).
    agent_token_budget: int = Field(default=2_000_000, ge=0)
    agent_max_output_tokens: int = Field(
        default=8192, ge=1, description="Output tokens the model may write in one turn."
    )
    # Retries of a transient model API error (429, 529, 5xx, connection), with backoff from
    # model_api_backoff seconds, doubling, at most 30 s.
    model_api_retries: int = Field(default=6, ge=0)
    model_api_backoff: float = Field(
        default=1.0,
        ge=0,
        description=(
            "First wait before retrying a transient model API error, in seconds (doubling, at most "
            "30 s; Retry-After honoured)."
        ),
    )
    # Local repository paths a spawn may clone from (comma-separated); none: only git URLs.
    agent_repo_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    clone_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a workspace's clone may take."
    )
    workspace_snapshot_mb: int = Field(
        default=64,
        ge=0,
        description="MiB of file bytes a run's workspace (and its baseline repository) may "
        "hold for it to be saved with each checkpoint, so that a retry on another worker "
        "restores it; past it (or 0) the checkpoint records the workspace as not saved and a "
        "retry on another host is told it was lost.",
    )
    workspace_snapshot_max_entries: int = Field(
        default=100_000,
        ge=1,
        description="Files, directories and symlinks a workspace snapshot may hold (past it: "
        "not saved, as over FEDAGENT_WORKSPACE_SNAPSHOT_MB).",
    )
    # --- artifacts (results by reference) ---
    # The whole diff is written, streaming, up to this many bytes (past it: diffTruncated, and
    # the stored diff is its first diff_max_bytes bytes).
    diff_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # A changed file bigger than this is listed in diffOmittedFiles, not inlined in the diff.
    diff_file_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Bytes of the diff and of the log that results and events carry inline (diffPreview,
    # logTail); the whole of each is an artifact, fetched by reference.
    artifact_preview_bytes: int = Field(default=16 * 1024, ge=256, le=64 * 1024)
    # Largest artifact this instance stores (its own runs' and those it fetches from peers).
    artifact_max_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    # Chunk size in the store and of one signed agent.artifact answer (base64 in JSON).
    artifact_chunk_bytes: int = Field(default=256 * 1024, ge=1024, le=512 * 1024)
    # Bytes of transcript kept per run (executor and requester); past it a `truncated` entry.
    transcript_limit: int = Field(default=2 * 1024 * 1024, ge=4096)
    # Entries of a peer's transcript kept per run (the requester's copy); past it, or past
    # `transcript_limit` bytes, one `truncated` entry and no more.
    transcript_max_entries: int = Field(default=20_000, ge=10)
    # Event streams (SSE) one API token may hold open at once, across the instance's API
    # processes; one more is 429 `too_many_streams`.
    sse_max_streams_per_token: int = Field(default=8, ge=1)
    # Seconds between two checks of an open stream's token: a revoked token's streams end at
    # once (NOTIFY), an expired one's within this.
    sse_token_check_interval: float = Field(default=10.0, gt=0)
    # Least seconds between two transcript events sent to the requester while a run goes on.
    transcript_event_interval: float = Field(default=0.3, ge=0)

    @field_validator(
        "sandbox_ro_paths",
        "allowed_models",
        "agent_repo_roots",
        "outbound_allowlist",
        "local_agent_types",
        "local_repositories",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def agent_task_queue(self) -> str:
        """Agents run on their own queue so each worker can cap how many it runs."""
        return f"{self.task_queue}-agents"

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces" / self.instance_name


PLACEHOLDER_WORDS = ("change", "placeholder", "example", "secret", "password", "todo", "xxx")


def decode_master_key(value: str) -> bytes | None:
    """The 32 raw bytes of a base64 (or base64url) master key; None for a passphrase."""
    text = value.strip()
    if len(text) not in (43, 44):
        return None
    try:
        raw = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (ValueError, binascii.Error):
        return None
    return raw if len(raw) == 32 else None


def is_placeholder_secret(value: str) -> bool:
    """A value nobody should run a real instance with: short, made-up, or low in entropy."""
    raw = decode_master_key(value)
    if raw is not None:
        # Random base64 shows ~30 distinct characters; a word repeated to length, a handful.
        return len(set(raw)) < 8 or len(set(value.strip())) < 16
    text = value.strip()
    if len(text) < 32 or len(set(text)) < 8:
        return True
    lowered = text.lower()
    return any(word in lowered for word in PLACEHOLDER_WORDS)


@lru_cache
def get_settings() -> Settings:
    return Settings()
