"""The local Apache Kafka broker's cluster ids (cli/apache_kafka.py): what the storage
tool accepts, every time."""

from __future__ import annotations

import base64

from topology_store.cli.apache_kafka import new_cluster_id


def test_cluster_ids_are_16_bytes_of_url_safe_base64_never_starting_with_a_dash() -> None:
    # One id in 64 would start with "-", which the storage tool reads as an option (a CI
    # run failed so): 5,000 draws see that case with near certainty.
    ids = [new_cluster_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert {len(base64.urlsafe_b64decode(i + "==")) for i in ids} == {16}
    assert len(set(ids)) == len(ids)
