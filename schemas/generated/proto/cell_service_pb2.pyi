from topology_store.schemas.generated.proto import autz_pb2 as _autz_pb2
from topology_store.schemas.generated.proto import cell_info_pb2 as _cell_info_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCellRequest(_message.Message):
    __slots__ = ("cell_id",)
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    cell_id: int
    def __init__(self, cell_id: _Optional[int] = ...) -> None: ...

class GetCellResponse(_message.Message):
    __slots__ = ("cell_info",)
    CELL_INFO_FIELD_NUMBER: _ClassVar[int]
    cell_info: _cell_info_pb2.CellInfo
    def __init__(self, cell_info: _Optional[_Union[_cell_info_pb2.CellInfo, _Mapping]] = ...) -> None: ...
