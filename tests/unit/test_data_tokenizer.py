import open_clip
import torch

from data_pipeline.tokenizer import EOT_ID, PAD_ID, SOT_ID, Tokenizer

CAPTIONS = [
    "an emoji of a dove, nature emoji",
    "Hello   WORLD!! it's 3.14 café naïve 😀",
    "The quick brown fox's jumps—over the lazy dog & friends",
    "",
    "word " * 120,  # longer than the context: truncated, EOT kept last
]


def test_ids_equal_open_clip():
    ours = Tokenizer(context_length=77)(CAPTIONS)
    reference = open_clip.tokenize(CAPTIONS, context_length=77)
    assert ours.dtype == torch.long and ours.shape == (len(CAPTIONS), 77)
    assert torch.equal(ours, reference)


def test_conventions():
    ids = Tokenizer(context_length=16)(["a dog", "word " * 40])
    assert ids[0, 0] == SOT_ID and ids[0, 3] == EOT_ID and (ids[0, 4:] == PAD_ID).all()
    assert ids[1, 0] == SOT_ID and ids[1, -1] == EOT_ID and (ids[1, 1:-1] != PAD_ID).all()


def test_save_and_from_folder_round_trip(tmp_path):
    tokenizer = Tokenizer(context_length=40)
    tokenizer.save(str(tmp_path))
    rebuilt = Tokenizer.from_folder(str(tmp_path))
    assert rebuilt.context_length == 40 and rebuilt.vocab_size == 49408
    assert torch.equal(rebuilt(CAPTIONS), tokenizer(CAPTIONS))
