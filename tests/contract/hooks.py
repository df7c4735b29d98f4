"""Schemathesis hooks for pretext's contract test.

- Archive bodies: Schemathesis would send random bytes, which the server
  rightly refuses (415: not an archive), so no dataset would ever be stored
  and every operation on a dataset would only meet 404s. Archive media types
  are generated as small, real archives of images instead (zip, tar, tar.gz,
  labelled or not), so uploads succeed and their ids feed the stateful phase.
- Label files as JSON Lines: sent as the text the schema describes.
"""

import io
import tarfile
import zipfile

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _png(size, shade):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 255 - shade, (shade * 7) % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def _entries(labelled, count):
    names = [f"{'cat' if i % 2 else 'dog'}/{i}.png" if labelled else f"{i}.png" for i in range(count)]
    return [(name, _png(8 + i % 5, (i * 37) % 256)) for i, name in enumerate(names)]


def _zip(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar(entries, compressed):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compressed else "w") as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


_SHAPES = st.tuples(st.booleans(), st.integers(min_value=1, max_value=6))
ZIPS = _SHAPES.map(lambda shape: _zip(_entries(*shape)))
TARS = _SHAPES.map(lambda shape: _tar(_entries(*shape), compressed=False))
TAR_GZS = _SHAPES.map(lambda shape: _tar(_entries(*shape), compressed=True))

schemathesis.openapi.media_type("application/zip", ZIPS, aliases=["application/x-zip-compressed"])
schemathesis.openapi.media_type("application/x-tar", TARS)
schemathesis.openapi.media_type(
    "application/gzip", TAR_GZS,
    aliases=["application/x-gzip", "application/x-gtar", "application/x-compressed-tar"])


@schemathesis.serializer("application/jsonl")
def to_json_lines(ctx, value):
    # The schema describes the body as a string: the file's text.
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
