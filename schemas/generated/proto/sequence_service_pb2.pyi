from topology_store.schemas.generated.proto import cell_info_pb2 as _cell_info_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
