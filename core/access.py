"""Per-cell authorization: may these credentials act for this cell? Pure (adr/0021).

GitLab's ``RULE_ALLOW_MATCHING_CELL_ONLY``: a cell's credential acts for that cell only; an
admin credential (``RULE_ALLOW_ANY_ADMIN``) for any. Every door (HTTP claims, gRPC) builds
the :class:`Binding` of each credential a request presented (its bearer token, its client
certificate) and asks :func:`refusal`; a request is allowed when **every** presented
credential allows the cell it names, so a cell certificate cannot be widened by an admin
token, nor the reverse.

How a client certificate names its cell (``topology up`` issues such certificates,
``cli/devpki.py``): a URI subject alternative name ``topology://cell/<cell id>`` binds it to
that cell, ``topology://admin`` makes it an admin credential. A certificate with neither
(or with both, or two cells) is bound to no cell at all: it may connect, it may not act for
any cell.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CELL_URI_PREFIX = "topology://cell/"
ADMIN_URI = "topology://admin"


@dataclass(frozen=True, slots=True)
class Binding:
    """What one credential may act for: ``cell`` (a cell id) or, when ``admin``, any cell."""

    credential: str  # "bearer token" or "client certificate", for the refusal's message
    cell: str | None = None
    admin: bool = False


def certificate_binding(uris: Iterable[str]) -> Binding:
    """The binding a client certificate's URI SANs name (see the module docstring)."""
    cells = set()
    admin = False
    for uri in uris:
        if uri == ADMIN_URI:
            admin = True
        elif uri.startswith(CELL_URI_PREFIX) and len(uri) > len(CELL_URI_PREFIX):
            cells.add(uri[len(CELL_URI_PREFIX):])
    if admin and not cells:
        return Binding("client certificate", admin=True)
    if len(cells) == 1 and not admin:
        return Binding("client certificate", cell=cells.pop())
    return Binding("client certificate")  # ambiguous or unmarked: acts for no cell


def refusal(bindings: Iterable[Binding], cell: str) -> str | None:
    """None when every credential may act for ``cell``; else why not (the first that may not)."""
    for binding in bindings:
        if binding.admin or binding.cell == cell:
            continue
        if binding.cell is None:
            return f"the {binding.credential} is bound to no cell and is not an admin credential; it may not act for {cell}"
        return f"the {binding.credential} is bound to {binding.cell}; it may not act for {cell}"
    return None
