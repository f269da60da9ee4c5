"""Serialises ``tf.train.Example`` protocol buffers without importing TensorFlow.

Workers that write TFRecord shards need only the Example wire format, and importing TensorFlow
costs seconds and hundreds of MB per worker process. The encoding follows
``tensorflow/core/example/{example,feature}.proto``; tests parse the output with TensorFlow's own
``tf.train.Example`` and ``tf.io.parse_example``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def bytes_feature(values: Iterable[bytes]) -> bytes:
    """Encoded ``Feature`` holding a ``BytesList``."""
    return _len_field(1, b"".join(_len_field(1, v) for v in values))


def float_feature(values: np.ndarray) -> bytes:
    """Encoded ``Feature`` holding a packed ``FloatList`` (values cast to little-endian float32)."""
    packed = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return _len_field(2, _len_field(1, packed))


def int64_feature(values: Iterable[int]) -> bytes:
    """Encoded ``Feature`` holding a packed ``Int64List``."""
    packed = b"".join(_varint(int(v)) for v in values)
    return _len_field(3, _len_field(1, packed))


def feature_entry(name: str, feature: bytes) -> bytes:
    """One encoded entry of the ``Features.feature`` map."""
    return _len_field(1, _len_field(1, name.encode()) + _len_field(2, feature))


def encode_entries(entries: Iterable[bytes]) -> bytes:
    """Encoded ``Example`` from encoded map entries (see :func:`feature_entry`)."""
    return _len_field(1, b"".join(entries))


def encode_example(features: Mapping[str, bytes]) -> bytes:
    """Encoded ``Example`` from ``{name: encoded Feature}`` (entries in the given order)."""
    return encode_entries(feature_entry(name, feature) for name, feature in features.items())


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord frame: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    length = struct.pack("<Q", len(record))
    return (
        length
        + struct.pack("<I", _masked_crc32c(length))
        + record
        + struct.pack("<I", _masked_crc32c(record))
    )
