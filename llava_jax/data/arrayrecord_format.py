"""One ArrayRecord record of a converted LLaVA dataset (`python -m llava_jax.data.to_arrayrecord`): the LLaVA JSON
record with its images' encoded bytes inline.

Public surface: `encode_record(record, images) -> bytes`, `decode_record(data) -> (record, images)`.
Layout: b"LLVA", a uint32 (little endian) length n, n bytes of UTF-8 JSON (the source record, "image" as in the
source; "_image_sizes": the byte length of each image, in order; "_source": "file:line" it came from; an image that
could not be read has length -1 and "_image_errors" gives its reason; a source record that is not a JSON object is
{"_not_an_object": value}, a JSONL line that is not JSON {"_not_an_object": null, "_json_error": message}: both
read back as malformed records), then the images' bytes back to back.
"""
from __future__ import annotations

import json
import struct
from typing import Optional, Sequence

MAGIC = b"LLVA"


def encode_record(record: dict, images: Sequence[Optional[bytes]], source: str = "",
                  errors: Sequence[Optional[str]] = ()) -> bytes:
    """`images[k]` None: unreadable (its reason in `errors[k]`), kept so the pipeline reports it when read."""
    header = {**record, "_image_sizes": [-1 if image is None else len(image) for image in images],
              "_source": source}
    if any(errors):
        header["_image_errors"] = list(errors)
    text = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return MAGIC + struct.pack("<I", len(text)) + text + b"".join(image for image in images if image is not None)


def decode_record(data: bytes) -> tuple[dict, list[Optional[bytes]]]:
    """(record with the "_image_sizes" / "_source" / "_image_errors" keys, images: bytes or None if unreadable)."""
    if data[:4] != MAGIC:
        raise ValueError("not a llava-jax ArrayRecord record (no LLVA header); convert with "
                         "python -m llava_jax.data.to_arrayrecord")
    (length,) = struct.unpack("<I", data[4:8])
    record = json.loads(data[8:8 + length].decode("utf-8"))
    images, offset = [], 8 + length
    for size in record["_image_sizes"]:
        if size < 0:
            images.append(None)
        else:
            images.append(bytes(data[offset:offset + size]))
            offset += size
    return record, images
