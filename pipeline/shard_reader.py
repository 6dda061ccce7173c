"""Reading webdataset tar shards in one sequential pass, each member's data in one read.

``iter_samples(url)`` yields what webdataset's ``tar_file_iterator`` + ``group_by_keys`` yield for
the same shard: ``{"__key__", "__url__", <extension>: bytes, ...}``, one dict per run of
consecutive members sharing a key. Names follow webdataset's convention: the key is the member
name up to the first dot of its last path component, the extension (lower-cased) everything after
it, so ``a.b.npy`` is key ``a``, extension ``b.npy``. Non-regular members and ``__meta__`` names
are skipped, as webdataset skips them.

Why not tarfile: in stream mode (what webdataset uses, so that pipes and HTTP work) tarfile reads
in 10 KB pieces and joins and slices them again, so a 2.4 MB Jukebox array is copied about three
times through hundreds of small reads; that, not the disk, bounded read-back. Here a local file is
read without Python-level buffering: a member's data is one ``read`` straight into the bytes object
that is yielded (the one copy out of the page cache), and the padding and next header one more.
Other URLs (``pipe:``, ``http(s)``, ``s3`` via ``pipe:``, ...) are opened with webdataset's
``gopen`` and read through a 1 MiB buffer the same way.

Errors name the shard and the byte offset of the member header at fault
(:class:`ShardReadError` and its subclasses): a file that ends inside a member, its padding or a
header, or without the end-of-archive blocks (:class:`TruncatedShard`; Python's tarfile silently
treats most of these as the end of the archive), a header that does not parse
(:class:`CorruptShard`), a pickle-typed member (:class:`PickledMember`: refused by name, never
decoded) and the same extension twice in one sample (:class:`DuplicateMember`).
:func:`npy_array` decodes ``.npy`` bytes without a copy and without ever unpickling.

:func:`iter_members` is the member-level layer (every member, regular or not, with its offsets),
shared with ``validate-shards``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from stat import S_ISREG as stat_is_regular
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from pipeline.errors import PipelineError

BLOCK = 512
STREAM_BUFFER = 1 << 20
LARGEST_READ = 1 << 26  # bigger members are read in pieces: a corrupt size must not allocate it at once
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
ZERO_BLOCK = bytes(BLOCK)
EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# tarfile skips the data of these types only; other types' size fields are not followed
DATA_TYPES = set(tarfile.REGULAR_TYPES) | ({bytes([c]) for c in range(256)} - set(tarfile.SUPPORTED_TYPES))
META_NAME = re.compile(r"__[^/]*__($|/)")
TAR_ENCODING, TAR_ERRORS = tarfile.ENCODING, "surrogateescape"


class ShardReadError(PipelineError, ValueError):
    """A shard that cannot be read on from ``offset`` (the header of the member at fault)."""

    code = "bad_tar"

    def __init__(self, shard: str, offset: int, message: str, name: str | None = None):
        super().__init__(f"{shard} @ byte {offset}: {message}")
        self.shard, self.offset, self.reason, self.name = shard, offset, message, name

    @property
    def key(self) -> str | None:
        return split_name(self.name)[0] if self.name else None


class TruncatedShard(ShardReadError):
    code = "truncated"


class CorruptShard(ShardReadError):
    code = "bad_header"


class PickledMember(ShardReadError):
    code = "pickled_payload"


class DuplicateMember(ShardReadError):
    code = "duplicate_member"


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member: ``offset`` is its first header (extended headers included), ``data`` its
    content (empty for links, directories and devices)."""

    name: str
    type: bytes
    offset: int
    data_offset: int
    data: bytes

    def isreg(self) -> bool:
        return self.type in tarfile.REGULAR_TYPES


def split_name(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` as webdataset splits a member name; ``(None, None)`` without an extension."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


def is_pickle_extension(extension: str) -> bool:
    extension = extension.lower()
    return extension in PICKLE_EXTENSIONS or extension.rsplit(".", 1)[-1] in PICKLE_EXTENSIONS


def local_path(url: str) -> str | None:
    """The file a shard URL names on this machine, or None for URLs only ``gopen`` can open."""
    if url == "-":
        return None
    parsed = urlparse(url)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return url
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return None


def open_shard(url: str) -> BinaryIO:
    """A local path unbuffered (members are read whole), any other URL through webdataset's gopen."""
    path = local_path(url)
    if path is None:
        from webdataset.gopen import gopen, rewrite_url

        rewritten = rewrite_url(url)
        path = local_path(rewritten)
        if path is None:
            return gopen(rewritten, "rb", bufsize=STREAM_BUFFER)
    return open_file(path)


def open_file(path: str | os.PathLike) -> BinaryIO:
    """A local shard file, unbuffered: members are read whole."""
    fh = open(path, "rb", buffering=0)
    try:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead
    except (AttributeError, OSError):  # not on Linux, or not a regular file
        pass
    return fh


def _file_size(fh: BinaryIO) -> int | None:
    """The size of a regular file from its start, or None for pipes and other streams."""
    try:
        if fh.tell() != 0:
            return None
        stat = os.fstat(fh.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return stat.st_size if stat_is_regular(stat.st_mode) else None


def _read_exact(fh: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the file (pipes may return short reads)."""
    data = fh.read(min(size, LARGEST_READ))
    if data is None or len(data) == size or not data:
        return data or b""
    parts, got = [data], len(data)
    while got < size:
        more = fh.read(min(size - got, LARGEST_READ))
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pax_records(data: bytes, shard: str, offset: int) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptShard(shard, offset, "an unreadable pax extended header") from None
        record = data[space + 1 : pos + length - 1]
        if length < 1 or pos + length > len(data) or data[pos + length - 1] != 0x0A or b"=" not in record:
            raise CorruptShard(shard, offset, "an unreadable pax extended header")
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", TAR_ERRORS)] = value.decode("utf-8", TAR_ERRORS)
        pos += length
    return records


def iter_members(fh: BinaryIO, shard: str) -> Iterator[Member]:
    """Every member of a tar stream, in order, until its end-of-archive blocks; see the module doc.

    A member's padding is read when the next member is asked for, so a file cut inside the last
    member's padding yields that member whole and then raises.
    """
    file_size = _file_size(fh)
    pos = 0  # bytes consumed
    padding = 0  # the previous member's padding, not read yet
    global_pax: dict[str, str] = {}
    while True:
        member_offset = pos + padding
        pax: dict[str, str] = {}
        long_name = None
        while True:  # extended headers, then the member's own header
            header_offset = pos + padding
            chunk = _read_exact(fh, padding + BLOCK)
            pos += len(chunk)
            if len(chunk) < padding:
                raise TruncatedShard(shard, header_offset, f"the file ends at byte {pos}, inside the padding of the "
                                     "last member")
            block, padding = chunk[padding:], 0
            if not block:
                where = "is empty" if pos == 0 else f"ends at byte {pos}, after the last whole member,"
                raise TruncatedShard(shard, header_offset, f"the file {where} without the end-of-archive blocks")
            if len(block) < BLOCK:
                raise TruncatedShard(shard, header_offset, f"the file ends at byte {pos}, inside a member header")
            if block == ZERO_BLOCK and header_offset == member_offset:
                second = _read_exact(fh, BLOCK)
                pos += len(second)
                if len(second) < BLOCK:
                    raise TruncatedShard(shard, header_offset, f"the file ends at byte {pos}, inside the "
                                         "end-of-archive blocks")
                if second != ZERO_BLOCK:
                    raise CorruptShard(shard, header_offset, "a zero block followed by more data (an unreadable member "
                                       "header, or a cut-out member)")
                return
            try:
                info = tarfile.TarInfo.frombuf(block, TAR_ENCODING, TAR_ERRORS)
            except tarfile.HeaderError as exc:
                raise CorruptShard(shard, header_offset, f"an unreadable member header ({exc})") from None
            size = info.size
            if info.type in EXTENDED_HEADER_TYPES or info.type in LONG_NAME_TYPES:
                data = _read_exact(fh, size + (-size % BLOCK))
                pos += len(data)
                if len(data) < size + (-size % BLOCK):
                    raise TruncatedShard(shard, header_offset, f"the file ends at byte {pos}, inside an extended "
                                         "header")
                data = data[:size]
                if info.type == tarfile.XGLTYPE:
                    global_pax.update(_pax_records(data, shard, header_offset))
                elif info.type in EXTENDED_HEADER_TYPES:
                    pax.update(_pax_records(data, shard, header_offset))
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode(TAR_ENCODING, TAR_ERRORS)
                continue
            break
        fields = {**global_pax, **pax}
        name = fields.get("path", long_name if long_name is not None else info.name)
        if "size" in fields:
            try:
                size = int(fields["size"])
            except ValueError:
                raise CorruptShard(shard, member_offset, f"pax size {fields['size']!r} is not a number") from None
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise ShardReadError(shard, member_offset, f"member {name!r} is a GNU sparse file, which shards never hold",
                                 name)
        data_offset = pos
        data = b""
        if info.type in DATA_TYPES and size:
            if file_size is not None and data_offset + size > file_size:
                raise TruncatedShard(shard, member_offset, f"member {name!r} declares {size} bytes from byte "
                                     f"{data_offset}, but the file ends at byte {file_size}", name)
            data = _read_exact(fh, size)
            pos += len(data)
            if len(data) < size:
                raise TruncatedShard(shard, member_offset, f"member {name!r} declares {size} bytes from byte "
                                     f"{data_offset}, but the file ends at byte {pos}", name)
            padding = -size % BLOCK
        yield Member(name=name, type=info.type, offset=member_offset, data_offset=data_offset, data=data)


def iter_samples(url: str, *, shard: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard, as webdataset's reader groups them (see the module doc).

    ``url``: a local path or ``file:`` URL (read unbuffered), or any URL webdataset's ``gopen``
    opens. ``shard``: the name errors give (default: ``url``).
    """
    shard = shard or url
    fh = open_shard(url)
    try:
        sample: dict[str, Any] | None = None
        for member in iter_members(fh, shard):
            name = member.name
            if not member.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            if META_NAME.match(name):
                continue
            key, extension = split_name(name)
            if key is None:
                continue
            extension = extension.lower()
            if is_pickle_extension(extension):
                raise PickledMember(shard, member.offset, f"{name!r} is a pickle; refused without decoding it", name)
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if extension in sample:
                raise DuplicateMember(shard, member.offset, f"{name!r}: a second .{extension} in sample {key!r}", name)
            sample[extension] = member.data
        if sample is not None:
            yield sample
    finally:
        fh.close()


def npy_array(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The array in ``.npy`` bytes, as a read-only view of them (no copy); object arrays (whose data
    is a pickle), other format versions than 1.0 and 2.0, and data of the wrong length raise ValueError."""
    view = memoryview(data).cast("B")
    if len(view) < 12 or bytes(view[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy array (no magic string)")
    version = (view[6], view[7])
    if version == (1, 0):
        header_end = 10 + int.from_bytes(view[8:10], "little")
        read_header = np.lib.format.read_array_header_1_0
    elif version == (2, 0):
        header_end = 12 + int.from_bytes(view[8:12], "little")
        read_header = np.lib.format.read_array_header_2_0
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
    if header_end > len(view):
        raise ValueError("a .npy header longer than the data")
    stream = io.BytesIO(view[:header_end].tobytes())
    np.lib.format.read_magic(stream)
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError(f"an object array ({dtype}): its data is a pickle; refused")
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - header_end != count * dtype.itemsize:
        raise ValueError(f"{len(view) - header_end} bytes of data for shape {shape} of {dtype.str}")
    array = np.frombuffer(view, dtype=dtype, count=count, offset=header_end)
    return array.reshape(shape, order="F" if fortran_order else "C")
