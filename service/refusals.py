"""A request a GitLab door answers with a gRPC status other than OK (adr/0021, adr/0022).

Raised by the service code that maps GitLab's contract (``gitlab_classify``, ``gitlab_claims``);
each door turns it into its own answer: the gRPC status and message, or the HTTP status
GitLab's grpc-gateway gives that code.
"""

from __future__ import annotations

import grpc


class Refusal(Exception):
    """A request this door answers with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> Refusal:
    """Bad input: INVALID_ARGUMENT, saying what is wrong."""
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)
