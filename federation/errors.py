"""The domain's error hierarchy: every refusal has a stable machine-readable code.

The API maps these to RFC 9457 problem+json; activities map them to non-retryable
Temporal ApplicationErrors whose type is the code.
"""

from __future__ import annotations

from typing import Any


class FederationError(Exception):
    """Root of every error a user or a peer can be told about."""

    code = "federation_error"
    status = 400
    title = "Federation error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


# Envelope verification (401): each failure has its own code.
class EnvelopeError(FederationError):
    code = "envelope_invalid"
    status = 401
    title = "Signed message refused"


class MalformedEnvelope(EnvelopeError):
    code = "envelope_malformed"
    status = 422
    title = "Malformed signed message"


class UnsupportedProtocol(EnvelopeError):
    code = "protocol_unsupported"
    title = "Unsupported protocol version"


class UnknownSender(EnvelopeError):
    code = "sender_unknown"
    title = "Unknown sender"


class UnknownKey(EnvelopeError):
    code = "key_unknown"
    title = "Unknown signing key"


class SignatureInvalid(EnvelopeError):
    code = "signature_invalid"
    title = "Signature does not verify"


class TimestampOutOfWindow(EnvelopeError):
    code = "timestamp_out_of_window"
    title = "Timestamp outside the accepted window"


class ReplayedMessage(EnvelopeError):
    code = "message_replayed"
    title = "Message id seen before"


class WrongRecipient(EnvelopeError):
    code = "recipient_mismatch"
    title = "Message is addressed to another instance"


# Trust state (403).
class ConnectionNotActive(FederationError):
    code = "connection_not_active"
    status = 403
    title = "Connection is not active"


class GrantDenied(FederationError):
    code = "grant_denied"
    status = 403
    title = "Not allowed by the connection's grants"


# Local users.
class Unauthenticated(FederationError):
    code = "unauthenticated"
    status = 401
    title = "Missing or invalid API token"


class Forbidden(FederationError):
    code = "forbidden"
    status = 403
    title = "Not allowed for this user"


# Resources and requests.
class NotFound(FederationError):
    code = "not_found"
    status = 404
    title = "Not found"


class AgentNotFound(NotFound):
    code = "agent_not_found"
    title = "Agent not found"


class ConnectionNotFound(NotFound):
    code = "connection_not_found"
    title = "Connection not found"


class Conflict(FederationError):
    code = "conflict"
    status = 409
    title = "Conflict"


class ConnectionStateConflict(Conflict):
    code = "connection_state_conflict"
    title = "Connection is not in a state that allows this"


class AgentEnded(Conflict):
    code = "agent_ended"
    title = "The run has reached its final state"


class AgentIdConflict(Conflict):
    code = "agent_id_conflict"
    title = "This agentId is already used by a different spawn"


class InvalidPayload(FederationError):
    code = "payload_invalid"
    status = 422
    title = "Invalid message payload"


class UnsupportedCommand(FederationError):
    code = "command_unsupported"
    status = 422
    title = "Unsupported command type"


class PeerUnreachable(FederationError):
    code = "peer_unreachable"
    status = 502
    title = "Peer instance could not be reached"


class PeerRefused(FederationError):
    code = "peer_refused"
    status = 502
    title = "Peer instance refused the request"

    def __init__(self, detail: str, *, peer_code: str, peer_status: int) -> None:
        super().__init__(detail, peerCode=peer_code, peerStatus=peer_status)
        self.peer_code = peer_code
        self.peer_status = peer_status


class PeerResponseInvalid(FederationError):
    code = "peer_response_invalid"
    status = 502
    title = "Peer instance answered with an invalid message"


class A2ACardInvalid(PeerResponseInvalid):
    code = "a2a_card_invalid"
    title = "The URL did not answer with a usable A2A agent card"


class A2AAnswerInvalid(PeerResponseInvalid):
    code = "a2a_answer_invalid"
    title = "The A2A agent answered with an invalid message"


class A2ARefused(PeerRefused):
    """A JSON-RPC error (or an HTTP refusal) of an A2A agent; `peer_code` is its code."""

    code = "a2a_refused"
    title = "The A2A agent refused the request"


class PeerNotTold(FederationError):
    """A change that an A2A peer is never told of (it has no fedagent/1 side)."""

    code = "peer_not_told"
    status = 409
    title = "The peer is not told of this change"


class PeerSpeaksA2A(Conflict):
    code = "peer_speaks_a2a"
    title = "The peer is an A2A agent: it takes no fedagent/1 message"


class ServiceUnavailable(FederationError):
    code = "service_unavailable"
    status = 503
    title = "A backing service is unavailable"


class LocalConnectionNotActive(Conflict):
    """A local user asked to use a connection that is not ACTIVE."""

    code = "connection_not_active"
    title = "Connection is not active"


class InvalidRequest(FederationError):
    code = "request_invalid"
    status = 422
    title = "Invalid request"


class CapacityExceeded(FederationError):
    code = "capacity_exceeded"
    status = 429
    title = "This instance runs as many agents as it may"


# --- trust ----------------------------------------------------------------------------------


class KeyUnacceptable(EnvelopeError):
    """A peer's key this instance never verifies with (RSA: e other than 65537, or a modulus
    outside 2048-4096 bits; material that does not match its algorithm)."""

    code = "key_unacceptable"
    status = 422
    title = "The key is not one this instance accepts"


class KeyNotEndorsed(EnvelopeError):
    """A connected peer's card lists a new key that no key the connection trusts endorsed."""

    code = "key_not_endorsed"
    title = "The new key is not signed by a key this instance trusts"


class KeyExpired(EnvelopeError):
    code = "key_expired"
    title = "Signing key is past its validity"


class GrantCommandType(GrantDenied):
    code = "grant_command_type"
    title = "Command type not granted to this peer"


class GrantAgentType(GrantDenied):
    code = "grant_agent_type"
    title = "Agent type not granted to this peer"


class GrantRepository(GrantDenied):
    code = "grant_repository"
    title = "Repository not in this peer's allowlist"


class GrantTimeout(GrantDenied):
    code = "grant_timeout"
    title = "Timeout above what this peer is granted"


class GrantConcurrency(GrantDenied):
    code = "grant_concurrency"
    status = 429
    title = "This peer runs as many agents as it is granted"


class BodyTooLarge(FederationError):
    code = "body_too_large"
    status = 413
    title = "Request body too large"


class KillNotDelivered(FederationError):
    code = "kill_not_delivered"
    status = 502
    title = "The kill could not be delivered to the executor"


class CommandNotFound(NotFound):
    code = "command_not_found"
    title = "Command not found"


class TooManyPendingRequests(FederationError):
    code = "too_many_pending_requests"
    status = 429
    title = "Too many connection requests are waiting for this instance's admin"


class TooManyPendingFromSource(TooManyPendingRequests):
    code = "too_many_pending_from_source"
    title = "Too many connection requests from this address are waiting"


class TooManyPendingForHost(TooManyPendingRequests):
    code = "too_many_pending_for_host"
    title = "Too many connection requests naming this host are waiting"


class ConnectBusy(FederationError):
    """As many strangers' cards are being read as this instance reads at once."""

    code = "connect_busy"
    status = 503
    title = "Too many connection requests are being checked; try again later"


class TooManyStreams(FederationError):
    code = "too_many_streams"
    status = 429
    title = "This API token holds as many event streams open as it may"


class RateLimited(FederationError):
    code = "rate_limited"
    status = 429
    title = "Too many refused messages from this address"


class QueueFull(FederationError):
    code = "queue_full"
    status = 429
    title = "This peer has as many spawns waiting here as it may"


# --- artifacts (a run's whole diff, log, transcript by reference) ---------------------------


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"
    title = "This instance holds no such artifact of the run"


class ArtifactNotReady(Conflict):
    code = "artifact_not_ready"
    title = "The run has no such artifact yet"


class ArtifactUnavailable(FederationError):
    code = "artifact_unavailable"
    status = 502
    title = "The executor could not give the artifact"


class ArtifactMismatch(FederationError):
    code = "artifact_mismatch"
    status = 502
    title = "The executor's artifact does not match its sha256 or size"


class ArtifactTooLarge(FederationError):
    code = "artifact_too_large"
    status = 502
    title = "Artifact larger than this instance keeps"
