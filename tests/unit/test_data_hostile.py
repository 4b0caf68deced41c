"""Hostile shards and images: an empty tar, a header claiming a huge member, a 20000x20000 PNG and libpng's chunk
warnings are each named or counted; the run goes on, or stops with one line when no shard has data."""
import io
import struct
import tarfile
import time
import zlib

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_train_loader
from data_pipeline.reader import DataQualityError
from data_pipeline.synthetic import make_shards
from data_pipeline.tar_io import ShardReadError, iter_samples
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.transforms import SkipSample, decode_rgb


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(side: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels (decoded to RGB: 3 * side**2 bytes) in ~50 KB."""
    row = b"\0" + bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def empty_tar(path) -> str:
    tarfile.open(path, "w").close()  # a valid archive: two zero blocks, no member
    return str(path)


def huge_header_tar(path, good_shard: str) -> str:
    """A copy of a good shard whose third member's header claims 2**40 bytes (GNU base-256, checksum fixed)."""
    data = bytearray(open(good_shard, "rb").read())
    offset = next(iter_samples(good_shard)).end  # the second sample's first header
    data[offset + 124:offset + 136] = b"\x80" + (2**40).to_bytes(11, "big")
    data[offset + 148:offset + 156] = b" " * 8
    data[offset + 148:offset + 156] = b"%06o\0 " % sum(data[offset:offset + 512])
    open(path, "wb").write(bytes(data))
    return str(path)


def shard_with_huge_image(path, good_shard: str) -> str:
    """A good shard with one more sample whose image is the 20000x20000 PNG."""
    with tarfile.open(path, "w") as out:
        with tarfile.open(good_shard) as src:
            for member in src.getmembers():
                out.addfile(member, src.extractfile(member))
        for name, payload in (("huge.png", huge_png()), ("huge.txt", b"a very large square")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            out.addfile(info, io.BytesIO(payload))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_empty_shard_is_named(tmp_path):
    path = empty_tar(tmp_path / "empty.tar")
    with pytest.raises(ShardReadError, match="empty.tar holds no samples") as error:
        list(iter_samples(path))
    assert error.value.reason == "empty_shard"


@pytest.mark.parametrize("pipe", [False, True])
def test_huge_member_size_is_refused_before_reading(tmp_path, pipe):
    good = make_shards(str(tmp_path), 1, 4, image_size=16)[0]
    path = huge_header_tar(tmp_path / "huge.tar", good)
    keys = []
    start = time.perf_counter()
    with pytest.raises(ShardReadError, match=r"claims 1099511627776 bytes") as error:
        for sample in iter_samples(f"pipe:cat {path}" if pipe else path):  # a stream: no file size to compare with
            keys.append(sample.key)
    assert error.value.reason == "oversized_member"
    assert keys == ["s000_0000"] and time.perf_counter() - start < 5


def test_pixel_limit_skips_before_decoding():
    start = time.perf_counter()
    with pytest.raises(SkipSample, match="pixels") as error:
        decode_rgb(huge_png(), max_pixels=36_000_000)
    assert error.value.reason == "oversized_image" and time.perf_counter() - start < 2
    small = io.BytesIO()
    Image.new("RGB", (64, 48)).save(small, "PNG")
    assert decode_rgb(small.getvalue(), max_pixels=64 * 48).shape == (3, 48, 64)
    with pytest.raises(SkipSample, match="64x48 = 3072 pixels, limit 3071"):
        decode_rgb(small.getvalue(), max_pixels=64 * 48 - 1)


def test_libpng_chunk_warnings_are_silenced(capfd):
    image = io.BytesIO()
    palette = Image.new("P", (8, 8))
    palette.putpalette(list(range(256)) * 3)
    palette.save(image, "PNG")
    data = image.getvalue()
    at = data.index(b"IDAT") - 4
    data = data[:at] + png_chunk(b"sRGB", b"\0") + data[at:]  # after PLTE: "out of place"
    decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert "sRGB: out of place" in capfd.readouterr().err  # what the decoder does on its own
    assert decode_rgb(data).shape == (3, 8, 8)
    assert capfd.readouterr().err == ""


def test_hostile_shards_are_counted_and_the_epoch_goes_on(tmp_path, tokenizer):
    good = make_shards(str(tmp_path / "good"), 2, 6, image_size=16)
    bad = tmp_path / "bad"
    bad.mkdir()
    shards = [*good, empty_tar(bad / "empty.tar"), huge_header_tar(bad / "header.tar", good[0]),
              shard_with_huge_image(bad / "image.tar", good[1])]
    cfg = DataConfig(train_shards="::".join(shards), workers=0, shuffle_buffer=2, resampled=False, max_skip_rate=0.5)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=1, rank=0, world_size=1, seed=0,
                                pyramid=False)
    keys = [k for batch in loader for k in batch["key"]]
    assert loader.skip_counts() == {"empty_shard": 1, "oversized_member": 1, "oversized_image": 1}
    # every sample of the good shards twice (once from the copy holding the huge image), plus the one sample
    # of the huge-header copy before its bad header
    assert sorted(keys) == sorted([f"s000_{i:04d}" for i in range(6)] + [f"s001_{i:04d}" for i in range(6)] * 2
                                  + ["s000_0000"])


@pytest.mark.parametrize("resampled,workers", [(True, 0), (False, 0), (False, 1)])
def test_only_empty_shards_stop_with_one_line(tmp_path, tokenizer, resampled, workers):
    spec = "::".join(empty_tar(tmp_path / f"empty{i}.tar") for i in range(3))
    cfg = DataConfig(train_shards=spec, workers=workers, shuffle_buffer=2, resampled=resampled)
    loader = build_train_loader(cfg, tokenizer, image_size=16, batch_size=2, rank=0, world_size=1, seed=0,
                                pyramid=False)
    start = time.perf_counter()
    with pytest.raises(DataQualityError) as error:
        for _ in range(5):  # what the trainer does: epoch after epoch
            for _ in loader:
                pass
    assert time.perf_counter() - start < 30
    assert len(str(error.value).splitlines()) == 1
    assert ("empty_shard" in str(error.value)) and ("empty" in str(error.value))
