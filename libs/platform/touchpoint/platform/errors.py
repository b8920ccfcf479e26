"""gRPC errors as google.rpc.Status with ErrorInfo and BadRequest details.

Servicers raise ``ServiceError``; the error interceptor (server.py) turns it into a rich status,
and every unexpected exception into INTERNAL without leaking its text. Clients read the details
back with ``details_of(rpc_error)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "touchpoint.dev"


@dataclass
class Violation:
    """One bad field: its name in the caller's terms, a stable reason code, and a sentence."""

    field: str
    reason: str
    description: str


@dataclass
class ServiceError(Exception):
    """An error answered to the caller as a google.rpc.Status."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    retry_after_seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        details = []
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
        details.append(info)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=f"{v.reason}: {v.description}"
                    )
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        if self.retry_after_seconds is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
            packed = any_pb2.Any()
            packed.Pack(retry)
            details.append(packed)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def invalid_argument(reason: str, message: str, violations: Iterable[Violation] = ()) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, violations=list(violations))


def not_found(reason: str, message: str, **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, message, metadata=metadata)


def unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def unavailable(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message)


def resource_exhausted(reason: str, message: str, retry_after_seconds: float) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, retry_after_seconds=retry_after_seconds
    )


@dataclass
class ErrorDetails:
    """What a client reads back from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_seconds: float | None = None


def details_of(error: grpc.RpcError) -> ErrorDetails:
    """Reads the google.rpc.Status of a failed call (works for sync and aio errors)."""
    code = error.code()
    out = ErrorDetails(code=code, message=error.details() or "")
    status = rpc_status.from_call(error)
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason = info.reason
            out.metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_after_seconds = retry.retry_delay.ToNanoseconds() / 1e9
    return out


CODE_NAMES = {c: c.name for c in grpc.StatusCode}
_ = code_pb2  # the numeric codes of google.rpc.Code match grpc.StatusCode values
