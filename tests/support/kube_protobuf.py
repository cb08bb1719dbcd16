"""Reading request bodies in the Kubernetes protobuf encoding, for the API double.

client-go's typed clients send some kinds as ``application/vnd.kubernetes.protobuf``;
helm's release storage writes its Secrets that way, and the API server accepts it, so the
double must read it. The encoding: the magic ``k8s\\x00``, then a ``runtime.Unknown``
message (``typeMeta`` = apiVersion + kind, ``raw`` = the object's own message, as
``k8s.io/api``'s ``generated.proto`` defines it). Answers stay JSON, which the same
clients accept (they send ``Accept: application/vnd.kubernetes.protobuf,application/json``).

Only the messages the platform's tools send are described: ``Secret`` and ``ConfigMap``
with their ``ObjectMeta``, and ``DeleteOptions``. Another kind is refused with 415, as a
server answers a media type it cannot decode for a resource.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

# A field: (name, kind) with kind one of "string", "bytes", "int", "bool", "time",
# "string_map", "bytes_map", a message table (dict), or a list [kind] for repeated fields.
Table = dict[int, tuple[str, Any]]

_TYPE_META: Table = {1: ("apiVersion", "string"), 2: ("kind", "string")}
_UNKNOWN: Table = {
    1: ("typeMeta", _TYPE_META),
    2: ("raw", "bytes"),
    3: ("contentEncoding", "string"),
    4: ("contentType", "string"),
}
_OWNER_REFERENCE: Table = {
    1: ("kind", "string"),
    3: ("name", "string"),
    4: ("uid", "string"),
    5: ("apiVersion", "string"),
    6: ("controller", "bool"),
    7: ("blockOwnerDeletion", "bool"),
}
_OBJECT_META: Table = {
    1: ("name", "string"),
    2: ("generateName", "string"),
    3: ("namespace", "string"),
    4: ("selfLink", "string"),
    5: ("uid", "string"),
    6: ("resourceVersion", "string"),
    7: ("generation", "int"),
    8: ("creationTimestamp", "time"),
    9: ("deletionTimestamp", "time"),
    10: ("deletionGracePeriodSeconds", "int"),
    11: ("labels", "string_map"),
    12: ("annotations", "string_map"),
    13: ("ownerReferences", [_OWNER_REFERENCE]),
    14: ("finalizers", ["string"]),
}
_DELETE_OPTIONS: Table = {
    1: ("gracePeriodSeconds", "int"),
    2: ("preconditions", {1: ("uid", "string"), 2: ("resourceVersion", "string")}),
    3: ("orphanDependents", "bool"),
    4: ("propagationPolicy", "string"),
    5: ("dryRun", ["string"]),
}
MESSAGES: dict[tuple[str, str], Table] = {
    ("v1", "DeleteOptions"): _DELETE_OPTIONS,
    ("meta.k8s.io/v1", "DeleteOptions"): _DELETE_OPTIONS,
    ("v1", "Secret"): {
        1: ("metadata", _OBJECT_META),
        2: ("data", "bytes_map"),
        3: ("type", "string"),
        4: ("stringData", "string_map"),
        5: ("immutable", "bool"),
    },
    ("v1", "ConfigMap"): {
        1: ("metadata", _OBJECT_META),
        2: ("data", "string_map"),
        3: ("binaryData", "bytes_map"),
        4: ("immutable", "bool"),
    },
}
"""The kinds read, by (apiVersion, kind)."""


class ProtobufError(ValueError):
    """A body that is not the protobuf encoding of a kind described here."""


def decode(body: bytes) -> dict[str, Any]:
    """The object a protobuf request body carries, as its JSON form.

    Raises:
        ProtobufError: Not the envelope, a kind not described, or a malformed message.
    """
    if not body.startswith(MAGIC):
        raise ProtobufError("the body does not start with the Kubernetes protobuf magic number")
    envelope = _message(body[len(MAGIC) :], _UNKNOWN)
    type_meta = envelope.get("typeMeta") or {}
    key = (type_meta.get("apiVersion", ""), type_meta.get("kind", ""))
    table = MESSAGES.get(key)
    if table is None:
        raise ProtobufError(f"no protobuf decoding is known here for {key[1]} {key[0]}")
    obj = _message(base64.b64decode(envelope.get("raw", "")), table)
    return {"apiVersion": key[0], "kind": key[1], **obj}


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ProtobufError("a varint runs past the end of the message")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    fields: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, at = _varint(data, at)
            fields.append((number, value))
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise ProtobufError("a length-delimited field runs past the end")
            fields.append((number, data[at : at + length]))
            at += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            fields.append((number, int.from_bytes(data[at : at + size], "little")))
            at += size
        else:
            raise ProtobufError(f"wire type {wire} is not used by these messages")
    return fields


def _message(data: bytes, table: Table) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, raw in _fields(data):
        if number not in table:
            continue
        name, kind = table[number]
        if isinstance(kind, list):
            obj.setdefault(name, []).append(_value(raw, kind[0]))
        elif kind in ("string_map", "bytes_map"):
            value_kind = "string" if kind == "string_map" else "bytes"
            entry = _message(_as_bytes(raw), {1: ("key", "string"), 2: ("value", value_kind)})
            obj.setdefault(name, {})[entry.get("key", "")] = entry.get("value", "")
        else:
            value = _value(raw, kind)
            if value is not None:
                obj[name] = value
    return obj


def _as_bytes(raw: int | bytes) -> bytes:
    if not isinstance(raw, bytes):
        raise ProtobufError("a varint where a length-delimited field belongs")
    return raw


def _value(raw: int | bytes, kind: Any) -> Any:
    if isinstance(kind, dict):
        return _message(_as_bytes(raw), kind)
    if kind == "string":
        return _as_bytes(raw).decode("utf-8")
    if kind == "bytes":
        return base64.b64encode(_as_bytes(raw)).decode("ascii")
    if kind == "int":
        if not isinstance(raw, int):
            raise ProtobufError("a length-delimited field where a number belongs")
        return raw - (1 << 64) if raw >= 1 << 63 else raw
    if kind == "bool":
        return bool(raw)
    if kind == "time":
        seconds = _message(_as_bytes(raw), {1: ("seconds", "int"), 2: ("nanos", "int")})
        if not seconds.get("seconds"):
            return None
        moment = datetime.fromtimestamp(seconds["seconds"], UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    raise ProtobufError(f"unknown field kind {kind!r}")


def openapi_v2_document(title: str, version: str) -> bytes:
    """An OpenAPI v2 document without definitions, in gnostic's protobuf encoding
    (``openapi_v2.Document``: swagger = 1, info = 2 with title = 1 and version = 2), which
    is the only encoding client-go asks ``/openapi/v2`` for (served, as the API server
    does, as ``application/octet-stream``). With no definitions,
    client-side validation finds no schema for a kind and leaves it to the server."""
    info = _string(1, title) + _string(2, version)
    return _string(1, "2.0") + _length_delimited(2, info)


def _string(number: int, text: str) -> bytes:
    return _length_delimited(number, text.encode())


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
