import io
import tarfile

import pytest

from data_pipeline.synthetic import make_shards
from data_pipeline.tar_io import ShardReadError, fetch_samples, iter_samples, write_shard


@pytest.fixture
def shard(tmp_path):
    return make_shards(str(tmp_path), 1, 6, image_size=16)[0]


def test_samples_offsets_and_resume(shard):
    samples = list(iter_samples(shard))
    assert [s.key for s in samples] == [f"s000_{i:04d}" for i in range(6)]
    assert all(sorted(s.fields) == ["jpg", "json", "txt"] for s in samples)
    assert all(a.end == b.offset for a, b in zip(samples, samples[1:]))
    assert [s.key for s in iter_samples(shard, samples[4].offset)] == ["s000_0004", "s000_0005"]
    fetched = fetch_samples(shard, [samples[5].offset, samples[1].offset])
    assert {o: s.key for o, s in fetched.items()} == {samples[5].offset: "s000_0005", samples[1].offset: "s000_0001"}
    assert fetched[samples[1].offset].fields == samples[1].fields


@pytest.mark.parametrize("where", ["header_boundary", "inside_header", "inside_data"])
def test_any_truncation_is_reported(shard, where):
    samples = list(iter_samples(shard))
    cut = {"header_boundary": samples[3].offset, "inside_header": samples[3].offset + 100,
           "inside_data": samples[3].offset + 700}[where]
    with open(shard, "r+b") as f:
        f.truncate(cut)
    keys = []
    with pytest.raises(ShardReadError) as error:
        for sample in iter_samples(shard):
            keys.append(sample.key)
    assert error.value.reason == "truncated_tar" and shard in str(error.value)
    # a sample is complete once the next sample's header parses; a sample that may have had more members
    # after the cut is dropped with the broken tail
    assert keys == (["s000_0000", "s000_0001", "s000_0002"] if where == "inside_data" else ["s000_0000", "s000_0001"])


def test_unreadable_shards(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x01" * 2048)
    for url in (str(garbage), str(tmp_path / "missing.tar"), "pipe:false"):
        with pytest.raises(ShardReadError) as error:
            list(iter_samples(url))
        assert error.value.reason == "unreadable_shard"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_and_unicode_names(tmp_path, fmt):
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for key in ("k" * 150, "folder/caf\u00e9"):
            for ext in ("txt", "tar.json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 2
                tar.addfile(info, io.BytesIO(b"hi"))
    assert [(s.key, sorted(s.fields)) for s in iter_samples(str(path))] == [
        ("k" * 150, ["tar.json", "txt"]), ("folder/caf\u00e9", ["tar.json", "txt"])]


def test_write_shard_is_reproducible(tmp_path):
    samples = [{"__key__": f"{i:03d}", "txt": f"caption {i}", "bin": bytes([i]) * 10} for i in range(3)]
    write_shard(str(tmp_path / "a.tar"), samples)
    write_shard(str(tmp_path / "b.tar"), samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert [s.fields["txt"] for s in iter_samples(str(tmp_path / "a.tar"))] == [b"caption 0", b"caption 1", b"caption 2"]


def test_fetch_from_a_pipe_in_one_pass(shard):
    samples = list(iter_samples(shard))
    offsets = [samples[4].offset, samples[2].offset]
    fetched = fetch_samples(f"pipe:cat {shard}", offsets)
    assert {o: s.key for o, s in fetched.items()} == {samples[4].offset: "s000_0004", samples[2].offset: "s000_0002"}
