"""Reading and writing webdataset tar shards.

Reading is done here rather than with webdataset's `tar_file_expander` because exact resume needs the
byte offset of every sample: a resumed worker seeks straight to its next sample (no decode, and for
local files no read) and re-fetches the few samples that sat in its shuffle buffer by offset.
Opening goes through `webdataset.gopen`, so "pipe:CMD", local paths and URLs all work; non-seekable
streams are fast-forwarded by reading headers and skipping member data.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import webdataset as wds

BLOCK = tarfile.BLOCKSIZE


@dataclass
class RawSample:
    """One undecoded sample: `fields` maps extension ("png", "txt", "json", ...) to bytes."""

    key: str
    fields: dict[str, bytes]
    offset: int  # byte offset of the sample's first tar header within the shard
    end: int  # byte offset just past its last member (= the next sample's offset)


class ShardReadError(RuntimeError):
    """The shard could not be opened or read (`reason` "unreadable_shard"), or its tar structure
    breaks after some members (`reason` "truncated_tar": cut short, corrupt header)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def split_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, extension = the rest."""
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _open(url: str, offset: int) -> tuple[io.IOBase, int]:
    """Open `url` positioned at `offset`; returns (stream, position reached by seeking)."""
    if not url.startswith("pipe:") and "://" not in url:
        f = open(url, "rb")
        f.seek(offset)
        return f, offset
    return wds.gopen(url, "rb"), 0


def iter_samples(url: str, offset: int = 0) -> Iterator[RawSample]:
    """Yield the samples of one shard starting at byte `offset` (a sample boundary).

    Raises ShardReadError when the shard cannot be opened or is cut short; samples read before the
    break have already been yielded.
    """
    try:
        stream, base = _open(url, offset)
    except OSError as e:
        raise ShardReadError("unreadable_shard", f"cannot open shard {url}: {e}") from e
    members_read = 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        key, fields, start, end = None, {}, 0, 0
        for member in tar:
            tar.members = []  # streaming: don't let TarFile keep every header in memory
            if not member.isfile():
                continue
            position = base + member.offset
            if position < offset:  # non-seekable stream: fast-forward without reading data
                continue
            member_key, ext = split_key(member.name)
            if key is not None and member_key != key:
                yield RawSample(key, fields, start, end)
                key, fields = None, {}
            if key is None:
                key, fields, start = member_key, {}, position
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated")
            fields[ext] = data
            members_read += 1
            end = base + member.offset_data + ((member.size + BLOCK - 1) // BLOCK) * BLOCK
        if key is not None:
            yield RawSample(key, fields, start, end)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = "truncated_tar" if members_read else "unreadable_shard"
        raise ShardReadError(reason, f"shard {url}: tar read failed after {members_read} members from byte {offset}: {e}") from e
    finally:
        stream.close()


def fetch_samples(url: str, offsets: Iterable[int]) -> dict[int, RawSample]:
    """Re-read the samples starting at the given offsets of one shard (used to refill a shuffle buffer)."""
    wanted = sorted(set(offsets))
    found: dict[int, RawSample] = {}
    for offset in wanted:
        if offset in found:
            continue
        for sample in iter_samples(url, offset):
            found[sample.offset] = sample
            break  # one sample per seek; the next wanted offset may be far ahead
    return found


def write_shard(path: str, samples: Iterable[dict[str, bytes | str]]) -> int:
    """Write samples ({"__key__": key, ext: bytes|str, ...}) to `path` atomically and reproducibly
    (fixed mtime/owner, members sorted by extension). Returns the number of samples written."""
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, user="hiclip", group="hiclip", mtime=0.0, encoder=False)
        for sample in samples:
            writer.write({k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v) for k, v in sample.items()})
            count += 1
        writer.close()
    os.replace(tmp, path)  # a shard that exists is complete: builders skip it on re-run
    return count
