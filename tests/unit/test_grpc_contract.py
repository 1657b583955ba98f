"""GitLab's Topology Service contract, held (adr/0021).

Two checks. The generated code in ``schemas/generated/`` is what the ``.proto`` files in
``proto/`` produce today, byte for byte (else: ``python -m topology_store.grpc_api.generate``).
And our descriptors carry GitLab's facts: the tables below were decoded from the serialized
FileDescriptorProtos that GitLab's Ruby client embeds (gitlabhq/gitlabhq,
``vendor/gems/gitlab-topology-service-client/lib/proto/``: claims/v1 and types/v1/claim and
classify_service at commit 41946e65, autz, cell_info and cell_service at ccdff2f3; see
docs/gitlab-contract.md), and the health, sequence and UUID facts from the older descriptor
DSL of the same folder (types/v1/uuid at 9f2fc39e, health_service at ba0f3164 with its
services file at 8c16344e, sequence_service at e480ec63). Names are relative to the package
``gitlab.cells.topology_service``; a message without fields is a row of dashes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from topology_store.grpc_api import generate
from topology_store.schemas.generated.proto import (
    autz_pb2,
    cell_info_pb2,
    cell_service_pb2,
    classify_service_pb2,
    health_service_pb2,
    sequence_service_pb2,
)
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2, service_pb2
from topology_store.schemas.generated.proto.types.v1 import claim_pb2, uuid_pb2

PACKAGE = "gitlab.cells.topology_service."
FILES: tuple[FileDescriptor, ...] = tuple(module.DESCRIPTOR for module in (
    autz_pb2, cell_info_pb2, cell_service_pb2, classify_service_pb2, health_service_pb2, sequence_service_pb2,
    messages_pb2, service_pb2, claim_pb2, uuid_pb2,
))

# Decoded from GitLab's serialized descriptors: message, field, number, label, type, type name, presence.
FIELDS = """
AccessControl                    authorization_rules       1  repeated enum    AuthorizationRule         -
SequenceRange                    minval                    1  optional int64   -                         -
SequenceRange                    maxval                    2  optional int64   -                         -
CellInfo                         id                        1  optional int64   -                         -
CellInfo                         address                   3  optional string  -                         -
CellInfo                         session_prefix            4  optional string  -                         -
CellInfo                         sequence_range            5  optional message SequenceRange             -
CellInfo                         sequence_ranges           6  repeated message SequenceRange             -
GetCellsRequest                  -                         -  -        -       -                         -
GetCellsResponse                 cells                     1  repeated message CellInfo                  -
GetCellRequest                   cell_id                   2  optional int64   -                         -
GetCellResponse                  cell_info                 1  optional message CellInfo                  -
types.v1.Claim                   route                     1  optional string  -                         oneof:claim
types.v1.Claim                   organization_path         2  optional string  -                         oneof:claim
types.v1.Claim                   redirect_route            3  optional string  -                         oneof:claim
types.v1.Claim                   username                  4  optional string  -                         oneof:claim
types.v1.Claim                   email                     5  optional string  -                         oneof:claim
types.v1.Claim                   project_id                6  optional int64   -                         oneof:claim
types.v1.Claim                   namespace_id              7  optional int64   -                         oneof:claim
types.v1.Claim                   gpg_key                   8  optional string  -                         oneof:claim
types.v1.Claim                   ssh_key                   9  optional string  -                         oneof:claim
types.v1.Claim                   user_id                   10 optional int64   -                         oneof:claim
types.v1.Claim                   organization_id           11 optional int64   -                         oneof:claim
types.v1.Claim                   service_desk_custom_email 12 optional string  -                         oneof:claim
types.v1.Claim                   gpg_key_fingerprint       13 optional string  -                         oneof:claim
types.v1.Claim                   ssh_key_fingerprint       15 optional string  -                         oneof:claim
types.v1.Claim                   snippet_id                16 optional int64   -                         oneof:claim
types.v1.Claim                   pages_domain              17 optional string  -                         oneof:claim
types.v1.Claim                   pages_unique_domain       18 optional string  -                         oneof:claim
claims.v1.Bucket                 type                      1  optional enum    claims.v1.Bucket.Type     -
claims.v1.Bucket                 value                     2  optional string  -                         -
claims.v1.Subject                type                      1  optional enum    claims.v1.Subject.Type    -
claims.v1.Subject                id                        2  optional int64   -                         -
claims.v1.Source                 type                      1  optional enum    claims.v1.Source.Type     -
claims.v1.Source                 rails_primary_key_id      2  optional bytes   -                         -
claims.v1.Metadata               bucket                    1  optional message claims.v1.Bucket          -
claims.v1.Metadata               subject                   2  optional message claims.v1.Subject         -
claims.v1.Metadata               source                    3  optional message claims.v1.Source          -
claims.v1.Metadata               user_data                 4  optional message google.protobuf.Any       optional
claims.v1.Metadata               claim                     5  optional message types.v1.Claim            optional
claims.v1.Record                 uuid                      1  optional message types.v1.UUID             -
claims.v1.Record                 metadata                  2  optional message claims.v1.Metadata        -
claims.v1.Record                 cell_id                   3  optional int64   -                         -
claims.v1.Record                 status                    4  optional enum    claims.v1.Record.Status   -
claims.v1.Record                 lease_uuid                5  optional message types.v1.UUID             optional
claims.v1.Record                 created_at                6  optional message google.protobuf.Timestamp -
claims.v1.Record                 updated_at                7  optional message google.protobuf.Timestamp -
claims.v1.LeaseRecord            uuid                      1  optional message types.v1.UUID             -
claims.v1.LeaseRecord            created_at                2  optional message google.protobuf.Timestamp -
claims.v1.LeaseRecord            updated_at                3  optional message google.protobuf.Timestamp -
claims.v1.GetRecordRequest       bucket                    1  optional message claims.v1.Bucket          -
claims.v1.GetRecordRequest       claim                     2  optional message types.v1.Claim            optional
claims.v1.GetRecordResponse      record                    1  optional message claims.v1.Record          -
claims.v1.GetRecordResponse      cell_info                 2  optional message CellInfo                  optional
claims.v1.BeginUpdateRequest     create_records            1  repeated message claims.v1.Metadata        -
claims.v1.BeginUpdateRequest     destroy_records           2  repeated message claims.v1.Metadata        -
claims.v1.BeginUpdateRequest     cell_id                   3  optional int64   -                         -
claims.v1.BeginUpdateResponse    cell_id                   1  optional int64   -                         -
claims.v1.BeginUpdateResponse    lease_uuid                2  optional message types.v1.UUID             -
claims.v1.CommitUpdateRequest    cell_id                   1  optional int64   -                         -
claims.v1.CommitUpdateRequest    lease_uuid                2  optional message types.v1.UUID             -
claims.v1.CommitUpdateResponse   -                         -  -        -       -                         -
claims.v1.RollbackUpdateRequest  cell_id                   1  optional int64   -                         -
claims.v1.RollbackUpdateRequest  lease_uuid                2  optional message types.v1.UUID             -
claims.v1.RollbackUpdateResponse -                         -  -        -       -                         -
claims.v1.ListLeasesRequest      cell_id                   1  optional int64   -                         -
claims.v1.ListLeasesRequest      next                      2  optional message google.protobuf.Any       optional
claims.v1.ListLeasesRequest      limit                     3  optional int32   -                         optional
claims.v1.ListLeasesRequest      created_after             4  optional message google.protobuf.Timestamp optional
claims.v1.ListLeasesResponse     leases                    1  repeated message claims.v1.LeaseRecord     -
claims.v1.ListLeasesResponse     next                      2  optional message google.protobuf.Any       optional
claims.v1.ListRecordsRequest     cell_id                   1  optional int64   -                         -
claims.v1.ListRecordsRequest     source_type               2  optional enum    claims.v1.Source.Type     -
claims.v1.ListRecordsRequest     bucket_types              3  repeated enum    claims.v1.Bucket.Type     -
claims.v1.ListRecordsRequest     source_id_gt              4  optional bytes   -                         -
claims.v1.ListRecordsRequest     source_id_lte             5  optional bytes   -                         -
claims.v1.ListRecordsRequest     claim_types               6  repeated enum    types.v1.ClaimType        -
claims.v1.ListRecordsResponse    records                   1  repeated message claims.v1.Record          -
claims.v1.ListRecordsResponse    truncated                 2  optional bool    -                         -
ClassifyRequest                  type                      2  optional enum    ClassifyType              -
ClassifyRequest                  value                     3  optional string  -                         -
ClassifyRequest                  claims                    5  repeated message types.v1.Claim            -
ProxyInfo                        address                   1  optional string  -                         -
ClassifyResponse                 action                    1  optional enum    ClassifyAction            -
ClassifyResponse                 proxy                     2  optional message ProxyInfo                 -
ClassifyResponse                 matched_claim             3  optional message types.v1.Claim            -
"""
# From the descriptor DSL (no serialized form stored for these files).
DSL_FIELDS = """
types.v1.UUID          value 1 optional string - -
ReadinessProbeRequest  - - - - - -
ReadinessProbeResponse - - - - - -
LivenessProbeRequest   - - - - - -
LivenessProbeResponse  - - - - - -
"""
ENUMS = """
AuthorizationRule RULE_UNSPECIFIED=0 RULE_ALLOW_ANY_AUTHENTICATED=1 RULE_ALLOW_ANY_CELL=2
    RULE_ALLOW_MATCHING_CELL_ONLY=3 RULE_ALLOW_ANY_ROUTER=4 RULE_ALLOW_ANY_ADMIN=5
types.v1.ClaimType CLAIM_TYPE_UNSPECIFIED=0 CLAIM_TYPE_ROUTE=1 CLAIM_TYPE_ORGANIZATION_PATH=2
    CLAIM_TYPE_REDIRECT_ROUTE=3 CLAIM_TYPE_USERNAME=4 CLAIM_TYPE_EMAIL=5 CLAIM_TYPE_PROJECT_ID=6
    CLAIM_TYPE_NAMESPACE_ID=7 CLAIM_TYPE_GPG_KEY=8 CLAIM_TYPE_SSH_KEY=9 CLAIM_TYPE_USER_ID=10
    CLAIM_TYPE_ORGANIZATION_ID=11 CLAIM_TYPE_SERVICE_DESK_CUSTOM_EMAIL=12 CLAIM_TYPE_GPG_KEY_FINGERPRINT=13
    CLAIM_TYPE_SSH_KEY_FINGERPRINT=15 CLAIM_TYPE_SNIPPET_ID=16 CLAIM_TYPE_PAGES_DOMAIN=17
    CLAIM_TYPE_PAGES_UNIQUE_DOMAIN=18
claims.v1.Bucket.Type UNSPECIFIED=0 ROUTES=1 ORGANIZATION_PATH=2 REDIRECT_ROUTES=3 USERNAMES=4 EMAILS=5
    PROJECT_IDS=6 NAMESPACE_IDS=7 GPG_KEYS=8 SSH_KEYS=9 USER_IDS=10 ORGANIZATION_IDS=11 SERVICE_DESK_CUSTOM_EMAILS=12
    GPG_KEY_FINGERPRINTS=13 SSH_KEY_FINGERPRINTS=15 SNIPPET_IDS=16 PAGES_DOMAINS=17 PAGES_UNIQUE_DOMAINS=18
claims.v1.Subject.Type UNSPECIFIED=0 ORGANIZATION=1 NAMESPACE=2 PROJECT=3 USER=4
claims.v1.Source.Type UNSPECIFIED=0 RAILS_TABLE_USERS=1 RAILS_TABLE_EMAILS=2 RAILS_TABLE_ROUTES=3
    RAILS_TABLE_PROJECTS=4 RAILS_TABLE_NAMESPACES=5 RAILS_TABLE_ORGANIZATIONS=6 RAILS_TABLE_REDIRECT_ROUTES=7
    RAILS_TABLE_GPG_KEYS=8 RAILS_TABLE_KEYS=9 RAILS_TABLE_SERVICE_DESK_SETTINGS=10 RAILS_TABLE_MEMBERS=11
    RAILS_TABLE_SNIPPETS=12 RAILS_TABLE_PAGES_DOMAINS=13 RAILS_TABLE_PROJECT_SETTINGS=14
claims.v1.Record.Status UNSPECIFIED=0 ACTIVE=1 LEASE_CREATING=2 LEASE_DESTROYING=3
ClassifyType UNSPECIFIED=0 FIRST_CELL=1 SESSION_PREFIX=2 CELL_ID=3
ClassifyAction ACTION_UNSPECIFIED=0 PROXY=1
"""
# Each service, then its methods: name, input -> output, access rules (RULE_ALLOW_ omitted).
METHODS = """
CellService
    GetCell GetCellRequest -> GetCellResponse ANY_AUTHENTICATED
claims.v1.ClaimService
    GetCells GetCellsRequest -> GetCellsResponse ANY_AUTHENTICATED
    GetRecord claims.v1.GetRecordRequest -> claims.v1.GetRecordResponse ANY_ADMIN
    BeginUpdate claims.v1.BeginUpdateRequest -> claims.v1.BeginUpdateResponse MATCHING_CELL_ONLY+ANY_ADMIN
    CommitUpdate claims.v1.CommitUpdateRequest -> claims.v1.CommitUpdateResponse MATCHING_CELL_ONLY+ANY_ADMIN
    RollbackUpdate claims.v1.RollbackUpdateRequest -> claims.v1.RollbackUpdateResponse MATCHING_CELL_ONLY+ANY_ADMIN
    ListLeases claims.v1.ListLeasesRequest -> claims.v1.ListLeasesResponse MATCHING_CELL_ONLY+ANY_ADMIN
    ListRecords claims.v1.ListRecordsRequest -> claims.v1.ListRecordsResponse MATCHING_CELL_ONLY+ANY_ADMIN
ClassifyService
    GetCells GetCellsRequest -> GetCellsResponse ANY_AUTHENTICATED
    Classify ClassifyRequest -> ClassifyResponse ANY_CELL+ANY_ROUTER+ANY_ADMIN
"""
DSL_METHODS = """
HealthService
    ReadinessProbe ReadinessProbeRequest -> ReadinessProbeResponse -
    LivenessProbe LivenessProbeRequest -> LivenessProbeResponse -
SequenceService
    GetCells GetCellsRequest -> GetCellsResponse -
"""
# message -> (reserved numbers, reserved names)
RESERVED = {"ClassifyRequest": ([4], ["claim"])}
ACCESS_CONTROL_EXTENSION = 90000  # on google.protobuf.MethodOptions

_LABELS = {descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL: "optional",
           descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED: "repeated"}


def _short(name: str) -> str:
    return name.lstrip(".").removeprefix(PACKAGE) or "-"


def _fields_table(text: str) -> set[tuple[str, ...]]:
    return {tuple(line.split()) for line in text.strip().splitlines()}


def _fixed_table(text: str) -> list[tuple[str, ...]]:
    """The service/method layout as (service, method, input, output, rules) rows."""
    rows: list[tuple[str, ...]] = []
    service = ""
    for line in text.strip().splitlines():
        if not line.startswith(" "):
            service = line.strip()
            continue
        method, request, _, response, rules = line.split()
        rows.append((service, method, request, response, rules))
    return rows


def _enums_table(text: str) -> dict[str, tuple[tuple[str, int], ...]]:
    enums: dict[str, tuple[tuple[str, int], ...]] = {}
    name = ""
    for token in text.split():
        if "=" not in token:
            name = token
            enums[name] = ()
        else:
            value, number = token.split("=")
            enums[name] += ((value, int(number)),)
    return enums


def _messages() -> list[tuple[str, descriptor_pb2.DescriptorProto]]:
    found: list[tuple[str, descriptor_pb2.DescriptorProto]] = []

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        found.append((prefix + message.name, message))
        for nested in message.nested_type:
            walk(nested, prefix + message.name + ".")

    for file in FILES:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        for message in proto.message_type:
            walk(message, _short(proto.package + ".").replace("-", ""))
    return found


def ours_fields() -> set[tuple[str, ...]]:
    rows: set[tuple[str, ...]] = set()
    type_names = {v: k.removeprefix("TYPE_").lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
    for name, message in _messages():
        if not message.field:
            rows.add((name, *["-"] * 6))
        for field in message.field:
            if field.proto3_optional:
                presence = "optional"
            elif field.HasField("oneof_index"):
                presence = f"oneof:{message.oneof_decl[field.oneof_index].name}"
            else:
                presence = "-"
            rows.add((name, field.name, str(field.number), _LABELS[field.label], type_names[field.type],
                      _short(field.type_name) if field.type_name else "-", presence))
    return rows


def ours_enums() -> dict[str, tuple[tuple[str, int], ...]]:
    enums: dict[str, tuple[tuple[str, int], ...]] = {}
    for file in FILES:
        for enum in file.enum_types_by_name.values():
            enums[_short(enum.full_name)] = tuple((v.name, v.number) for v in enum.values)
        for message in file.message_types_by_name.values():
            for enum in message.enum_types:
                enums[_short(enum.full_name)] = tuple((v.name, v.number) for v in enum.values)
    return enums


def ours_methods() -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for file in FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                rules = method.GetOptions().Extensions[autz_pb2.access_control].authorization_rules
                names = "+".join(autz_pb2.AuthorizationRule.Name(r).removeprefix("RULE_ALLOW_") for r in rules)
                rows.append((_short(service.full_name), method.name, _short(method.input_type.full_name),
                             _short(method.output_type.full_name), names or "-"))
    return rows


def test_the_generated_code_is_what_the_protos_generate() -> None:
    stale = generate.stale_files()
    assert stale == [], f"schemas/generated/ is out of date ({stale}): run python -m topology_store.grpc_api.generate"


def test_the_staleness_check_sees_a_changed_proto(tmp_path: Path) -> None:
    """Not vacuous: a field number changed in a copy of proto/ makes the generated code stale."""
    shutil.copytree(generate.PROTO, tmp_path / "proto")
    cell_info = tmp_path / "proto" / "cell_info.proto"
    text = cell_info.read_text(encoding="utf-8")
    assert "string session_prefix = 4;" in text
    cell_info.write_text(text.replace("string session_prefix = 4;", "string session_prefix = 7;"), encoding="utf-8")
    stale = generate.stale_files(root=tmp_path)
    assert "proto/cell_info_pb2.py: differs" in stale


def test_every_field_of_gitlab_is_ours_with_its_number_and_type() -> None:
    expected = _fields_table(FIELDS) | _fields_table(DSL_FIELDS)
    ours = ours_fields()
    assert expected - ours == set(), "fields GitLab has and we lack or differ on"
    assert ours - expected == set(), "fields we have and GitLab does not"


def test_every_enum_value_of_gitlab_is_ours() -> None:
    assert ours_enums() == _enums_table(ENUMS)


def test_every_rpc_of_gitlab_is_ours_with_its_access_rules() -> None:
    assert sorted(ours_methods()) == sorted(_fixed_table(METHODS) + _fixed_table(DSL_METHODS))


def test_reserved_numbers_and_the_access_control_option() -> None:
    for name, message in _messages():
        reserved = ([n for r in message.reserved_range for n in range(r.start, r.end)], list(message.reserved_name))
        assert reserved == RESERVED.get(name, ([], [])), name
    assert autz_pb2.access_control.number == ACCESS_CONTROL_EXTENSION
    assert autz_pb2.access_control.containing_type.full_name == "google.protobuf.MethodOptions"


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_descriptors_keep_gitlabs_file_names_and_packages(file: FileDescriptor) -> None:
    """Reflection shows GitLab's file names; the packages are GitLab's."""
    assert file.name.startswith("proto/")
    assert file.package.startswith("gitlab.cells.topology_service")
