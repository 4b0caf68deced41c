"""Reading and writing webdataset tar shards.

Reading is done here rather than with webdataset's `tar_file_expander` because exact resume needs the
byte offset of every sample: a resumed worker seeks straight to its next sample (no decode, and for
local files no read) and re-fetches the few samples that sat in its shuffle buffer by offset.
Opening goes through `webdataset.gopen`, so "pipe:CMD", local paths and URLs all work; non-seekable
streams are fast-forwarded by reading headers and skipping member data. The member reader is ours too:
it is strict about truncation (tarfile's stream mode treats a shard cut at a header as a clean end) and
about twice as fast as tarfile for small members.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import webdataset as wds

BLOCK = tarfile.BLOCKSIZE
# No sample member is read if it claims more than this (or more than is left of a local file): a corrupt or hostile
# size field must not become one huge allocation. Images are bounded again by pixels (DataConfig.max_image_pixels).
MAX_MEMBER_BYTES = 256 * 2**20
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # sample members that hold the image, in preference order


@dataclass
class RawSample:
    """One undecoded sample: `fields` maps extension ("png", "txt", "json", ...) to bytes."""

    key: str
    fields: dict[str, bytes]
    offset: int  # byte offset of the sample's first tar header within the shard
    end: int  # byte offset just past its last member (= the next sample's offset)


def image_extension(fields: dict[str, bytes]) -> str | None:
    """The extension of the sample member holding a non-empty image, if any."""
    return next((ext for ext in IMAGE_EXTENSIONS if fields.get(ext)), None)


class ShardReadError(RuntimeError):
    """The shard could not be opened or read (`reason` "unreadable_shard"), or its tar structure
    breaks after some members (`reason` "truncated_tar": cut short, corrupt header)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _OversizedMember(tarfile.ReadError):
    pass


def split_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, extension = the rest."""
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def is_local(url: str) -> bool:
    """A plain file path (seekable), as opposed to a `pipe:` command or a URL."""
    return not url.startswith("pipe:") and "://" not in url


def _open(url: str, offset: int) -> tuple[io.IOBase, int, int | None]:
    """Open `url` positioned at `offset`; returns (stream, position reached by seeking, file size if known)."""
    if is_local(url):
        f = open(url, "rb")
        f.seek(offset)
        return f, offset, os.fstat(f.fileno()).st_size
    return wds.gopen(url, "rb"), 0, None


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _read_exact(stream: io.IOBase, n: int) -> bytes:
    chunks, missing = [], n
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


class _TarStream:
    """A strict, minimal tar reader: a stream that ends anywhere but at the zero blocks closing an archive
    raises (tarfile's stream mode stops silently at a cut header). Headers and data are read separately,
    so a sample is known complete as soon as the next member's header has been parsed."""

    def __init__(self, stream: io.IOBase, position: int, total: int | None = None):
        self.stream, self.position, self.total = stream, position, total

    def next_header(self) -> tuple[str, int, int] | None:
        """(name, offset of its first header block, data size) of the next regular file; None at the end."""
        long_name, start = None, self.position
        while True:
            header = _read_exact(self.stream, BLOCK)
            if len(header) < BLOCK:
                raise tarfile.ReadError(f"cut inside or before a header at byte {self.position}")
            if header == bytes(BLOCK):
                return None  # end-of-archive marker
            if _octal(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise tarfile.ReadError(f"bad header checksum at byte {self.position}")
            self.position += BLOCK
            size, kind = _octal(header[124:136]), header[156:157]
            if kind in (b"0", b"\0", b"7"):  # regular file
                return long_name or _ustar_name(header), start, size
            data = self.read_data(size)
            if kind == b"L":  # GNU long name of the next member
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            elif kind == b"x":  # PAX extended header: only `path` matters here
                for record in data.split(b"\n"):
                    if b" path=" in record:
                        long_name = record.split(b" path=", 1)[1].decode("utf-8", "replace")
            elif kind != b"g":
                long_name, start = None, self.position  # directories, links, ...: not sample data

    def read_data(self, size: int) -> bytes:
        if size > MAX_MEMBER_BYTES:
            raise _OversizedMember(f"member at byte {self.position - BLOCK} claims {size} bytes "
                                   f"(limit {MAX_MEMBER_BYTES})")
        if self.total is not None and self.position + size > self.total:  # a cut file: don't allocate for it
            raise tarfile.ReadError(f"member at byte {self.position - BLOCK} claims {size} bytes, "
                                    f"{self.total - self.position} left in the file")
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(self.stream, padded)
        if len(data) < padded:
            raise tarfile.ReadError(f"member data cut short at byte {self.position + len(data)}")
        self.position += padded
        return data[:size]


def iter_samples(url: str, offset: int = 0) -> Iterator[RawSample]:
    """Yield the samples of one shard starting at byte `offset` (a sample boundary).

    Raises ShardReadError when the shard cannot be opened, is cut short, has a member larger than the file
    or MAX_MEMBER_BYTES ("oversized_member"), or holds no sample at all ("empty_shard": read from the start,
    a shard must yield something, or a reader drawing shards forever would spin); complete samples before
    the break have been yielded (the one being assembled when it broke is dropped).
    """
    try:
        stream, base, total = _open(url, offset)
    except OSError as e:
        raise ShardReadError("unreadable_shard", f"cannot open shard {url}: {e}") from e
    tar, members_read = _TarStream(stream, base, total), 0
    try:
        key, fields, start = None, {}, 0
        while (header := tar.next_header()) is not None:
            name, member_offset, size = header
            members_read += 1
            if member_offset < offset:  # non-seekable stream: fast-forward to the resume point
                tar.read_data(size)
                continue
            member_key, ext = split_key(name)
            if key is not None and member_key != key:
                yield RawSample(key, fields, start, member_offset)
                key = None
            if key is None:
                key, fields, start = member_key, {}, member_offset
            fields[ext] = tar.read_data(size)
        if key is not None:
            yield RawSample(key, fields, start, tar.position)
        elif offset == 0 and not members_read:
            raise ShardReadError("empty_shard", f"shard {url} holds no samples (a tar with no file members)")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = ("oversized_member" if isinstance(e, _OversizedMember)
                  else "truncated_tar" if members_read else "unreadable_shard")
        raise ShardReadError(reason, f"shard {url}: tar read failed after {members_read} members from byte {offset}: {e}") from e
    finally:
        try:
            stream.close()
        except OSError:  # a `pipe:` command's exit status; the read above has already reported trouble
            pass


def fetch_samples(url: str, offsets: Iterable[int]) -> dict[int, RawSample]:
    """Re-read the samples starting at the given offsets of one shard (used to refill a shuffle buffer):
    one seek per sample for a local file, one streaming pass from the first offset for a `pipe:`/URL."""
    wanted = sorted(set(offsets))
    if not wanted:
        return {}
    if is_local(url):
        found = {o: next(iter_samples(url, o), None) for o in wanted}
        return {o: sample for o, sample in found.items() if sample is not None}
    found: dict[int, RawSample] = {}
    targets = set(wanted)
    for sample in iter_samples(url, wanted[0]):
        if sample.offset in targets:
            found[sample.offset] = sample
            if len(found) == len(targets):
                break
    return found


def write_shard(path: str, samples: Iterable[dict[str, bytes | str]]) -> int:
    """Write samples ({"__key__": key, ext: bytes|str, ...}) to `path` atomically and reproducibly
    (fixed mtime/owner, members sorted by extension). Returns the number of samples written."""
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    with open(tmp, "wb") as f:
        # integer mtime: a float one makes tarfile add a PAX header to every member (slower to read)
        writer = wds.TarWriter(f, user="hiclip", group="hiclip", mtime=0, encoder=False)
        for sample in samples:
            writer.write({k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v) for k, v in sample.items()})
            count += 1
        writer.close()
    os.replace(tmp, path)  # a shard that exists is complete: builders skip it on re-run
    return count
