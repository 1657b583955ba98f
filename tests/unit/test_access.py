"""Per-cell authorization (adr/0021): the pure rule, the certificate's binding, and tokens
bound to a cell in the token configuration."""

from __future__ import annotations

import pytest

from topology_store.core.access import Binding, certificate_binding, refusal
from topology_store.query_api.auth import Authorizer, TokenConfigError, parse_tokens

CELL_1 = Binding("client certificate", cell="cell-1")
ADMIN = Binding("bearer token", admin=True)


def test_a_cell_credential_acts_for_its_cell_only_and_an_admin_for_any() -> None:
    assert refusal([CELL_1], "cell-1") is None
    assert refusal([CELL_1], "cell-2") == "the client certificate is bound to cell-1; it may not act for cell-2"
    assert refusal([ADMIN], "cell-2") is None
    assert refusal([], "cell-2") is None  # no credential bound: the doors' scope checks decide
    # Every credential presented must allow the cell: an admin token does not widen a cell's certificate.
    assert refusal([ADMIN, CELL_1], "cell-2") is not None
    assert refusal([ADMIN, CELL_1], "cell-1") is None
    unbound = Binding("client certificate")
    assert "bound to no cell" in (refusal([unbound], "cell-1") or "")


def test_a_certificate_names_its_cell_or_admin_by_uri_san() -> None:
    assert certificate_binding(["topology://cell/cell-1"]) == CELL_1
    assert certificate_binding(["spiffe://x", "topology://admin"]) == Binding("client certificate", admin=True)
    for ambiguous in ([], ["topology://cell/"], ["topology://cell/a", "topology://cell/b"],
                      ["topology://cell/a", "topology://admin"], ["https://cell/a"]):
        binding = certificate_binding(ambiguous)
        assert binding.cell is None and not binding.admin, ambiguous


def test_tokens_can_be_bound_to_a_cell_and_the_list_form_stays_an_admin() -> None:
    tokens = parse_tokens('{"legacy-token-1": ["claims:write"], '
                          '"cell-1-token": {"scopes": ["claims:write"], "cell": "cell-1"}, '
                          '"admin-token-1": {"scopes": ["claims:write"], "admin": true}}', "t")
    authorizer = Authorizer.from_tokens(tokens)
    for token in ("legacy-token-1", "admin-token-1"):
        assert authorizer.check_cell(f"Bearer {token}".encode(), "claims:write", "cell-7") is None
    bound = b"Bearer cell-1-token"
    assert authorizer.check_cell(bound, "claims:write", "cell-1") is None
    status, code, message = authorizer.check_cell(bound, "claims:write", "cell-2") or (0, "", "")
    assert (status, code) == (403, "wrong_cell") and "cell-1" in message and "cell-2" in message
    # The scope check comes first, and a certificate bound elsewhere refuses even an admin token.
    assert (authorizer.check_cell(bound, "claims:read", "cell-1") or ())[:2] == (403, "insufficient_scope")
    assert (authorizer.check_cell(None, "claims:write", "cell-1") or ())[:2] == (401, "unauthenticated")
    assert (authorizer.check_cell(b"Bearer admin-token-1", "claims:write", "cell-2", CELL_1) or ())[:2] == (
        403, "wrong_cell")
    for bad, says in (('{"zq-token-1": {"scopes": ["a"]}}', "exactly one"),
                      ('{"zq-token-1": {"scopes": ["a"], "cell": "c", "admin": true}}', "exactly one"),
                      ('{"zq-token-1": {"scopes": ["a"], "cell": ""}}', "cell must be"),
                      ('{"zq-token-1": {"scopes": ["a"], "admin": "yes"}}', "admin must be"),
                      ('{"zq-token-1": {"scopes": "a", "admin": true}}', "scopes must be"),
                      ('{"zq-token-1": {"scopes": [], "cells": ["c"]}}', "unknown keys")):
        with pytest.raises(TokenConfigError) as error:
            parse_tokens(bad, "TOPOLOGY_API_TOKENS")
        assert says in str(error.value) and "zq" not in str(error.value)


def test_tls_settings_go_together() -> None:
    from pydantic import ValidationError

    from topology_store.runtime.settings import Settings

    with pytest.raises(ValidationError, match="TOPOLOGY_TLS_CERT and TOPOLOGY_TLS_KEY go together"):
        Settings(tls_cert="server.pem")
    with pytest.raises(ValidationError, match="TOPOLOGY_TLS_CLIENT_CA needs TOPOLOGY_TLS_CERT"):
        Settings(tls_client_ca="ca.pem")
    assert Settings(tls_cert="s.pem", tls_key="k.pem", tls_client_ca="ca.pem").tls_client_ca == "ca.pem"
