"""Tiny ONNX models written as protobuf bytes, for the host-side helper graphs the runtime runs with
ONNX Runtime (fp16 casts in ``kv/host_gather.py``, page selection in ``kv/page_select.py``): the runtime
does not depend on the ``onnx`` package. Tests check every model with ``onnx.checker``.

    model(opsets={"": 17}, graph=graph("name", [node("Relu", ["x"], ["y"])],
                                       inputs=[value("x", FLOAT, ["N"])], outputs=[value("y", FLOAT, ["N"])]))
"""

from __future__ import annotations

import struct

FLOAT, BOOL, FLOAT16, INT64 = 1, 9, 10, 7  # onnx.TensorProto element types
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7  # onnx.AttributeProto types
IR_VERSION = 8


def model(graph_bytes: bytes, opsets: dict[str, int]) -> bytes:
    """ModelProto: IR version 8, the given opsets (domain -> version), one graph."""
    imports = b"".join(_message(8, [_text(1, domain), _varint(2, version)]) for domain, version in opsets.items())
    return _varint(1, IR_VERSION) + imports + graph_bytes


def graph(name: str, nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """GraphProto (field 7 of ModelProto) of ``nodes`` with ``inputs`` and ``outputs`` (see ``value``)."""
    return _message(7, [*nodes, _text(2, name), *(_bytes(11, v) for v in inputs), *(_bytes(12, v) for v in outputs)])


def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> bytes:
    """NodeProto (field 1 of GraphProto); attributes int, float or a list of ints."""
    parts = [*(_text(1, i) for i in inputs), *(_text(2, o) for o in outputs), _text(4, op)]
    for key, val in attrs.items():
        if isinstance(val, float):
            attr = [_text(1, key), _key(2, 5) + struct.pack("<f", val), _varint(20, _ATTR_FLOAT)]
        elif isinstance(val, (list, tuple)):
            attr = [_text(1, key), *(_varint(8, v) for v in val), _varint(20, _ATTR_INTS)]
        else:
            attr = [_text(1, key), _varint(3, int(val)), _varint(20, _ATTR_INT)]
        parts.append(_message(5, attr))
    if domain:
        parts.append(_text(7, domain))
    return _message(1, parts)


def value(name: str, elem_type: int, dims: list[str | int]) -> bytes:
    """ValueInfoProto payload: a tensor of ``elem_type`` with named (symbolic) or fixed dims."""
    shape = b"".join(_message(1, [_varint(1, d) if isinstance(d, int) else _text(2, d)]) for d in dims)
    tensor = _message(1, [_varint(1, elem_type), _bytes(2, shape)])
    return _text(1, name) + _bytes(2, tensor)


def _key(field: int, wire: int) -> bytes:
    return _encode(field << 3 | wire)


def _encode(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _varint(field: int, number: int) -> bytes:
    return _key(field, 0) + _encode(number & (2**64 - 1))  # negative ints as two's complement, as protobuf


def _bytes(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _encode(len(payload)) + payload


def _text(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


def _message(field: int, parts: list[bytes]) -> bytes:
    return _bytes(field, b"".join(parts))
