"""Moved: the response documents are ``query_api/documents.py`` (adr/0009).

Kept only while ``query_api/claims_api.py`` imports from here; delete it once that
module (becoming ``query_api/claims.py``) imports ``query_api.documents``.
"""

from topology_store.query_api.documents import ErrorDocument, any_case_pattern

__all__ = ["ErrorDocument", "any_case_pattern"]
