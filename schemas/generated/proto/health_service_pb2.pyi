from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ReadinessProbeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadinessProbeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LivenessProbeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LivenessProbeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
