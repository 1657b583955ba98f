"""The event contract: Avro schemas (``*.avsc``), their wire codec and the pydantic edge models.

The ``.avsc`` files are the single definition of every event. Everything in this
package is derived from them (the codec, the registry of writer schemas) or is
tested against them (the pydantic models, see ``tests/unit/test_contract.py``).
"""
