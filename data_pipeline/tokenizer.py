"""CLIP BPE tokenizer, built offline from the vocabulary shipped inside the open-clip-torch wheel.

The ids follow open_clip's convention: <start_of_text>=49406, <end_of_text>=49407, padding 0, and
truncation keeps <end_of_text> as the last token. The BPE itself runs in transformers' (Rust-backed)
CLIPTokenizer, which is much faster than open_clip's pure-Python SimpleTokenizer in data workers.
"""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources

import torch

# The tokenizer is used in forked DataLoader workers; Rust-side thread pools do not survive a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from transformers import CLIPTokenizer

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
# open_clip keeps the first 49152 - 256 - 2 merges of the file (the rest are unused by CLIP).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def open_clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Read `bpe_simple_vocab_16e6.txt.gz` from the installed open_clip and return (vocab, merges)
    in the same id order as open_clip's SimpleTokenizer."""
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert vocab["<|startoftext|>"] == SOT_ID and vocab["<|endoftext|>"] == EOT_ID
    return vocab, merges


class Tokenizer:
    """`Tokenizer(context_length=77)(list_of_str) -> LongTensor [n, context_length]`."""

    def __init__(self, context_length: int = 77, vocab: dict[str, int] | None = None, merges: list[str] | None = None):
        if vocab is None or merges is None:
            vocab, merges = open_clip_vocab_and_merges()
        self.context_length = context_length
        self._vocab, self._merges = vocab, merges
        # transformers 5 silently ignores `vocab_file=`; the in-memory `vocab=`/`merges=` path is the one that works.
        self._hf = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
        self.vocab_size = len(vocab)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = self._hf(list(texts), truncation=True, max_length=self.context_length)["input_ids"]
        out = torch.full((len(ids), self.context_length), PAD_ID, dtype=torch.long)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    def save(self, folder: str) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json: everything `from_folder` needs."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump(self._vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, MERGES_FILE), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(self._merges) + "\n")
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({"context_length": self.context_length, "sot_id": SOT_ID, "eot_id": EOT_ID, "pad_id": PAD_ID}, f)

    def save_transformers(self, folder: str) -> None:
        """The same BPE as a transformers tokenizer folder (tokenizer.json + config), for `AutoTokenizer`.
        It pads with <end_of_text>, as transformers' CLIP does; the ids up to and including it are ours."""
        self._hf.model_max_length = self.context_length
        self._hf.save_pretrained(folder)

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        with open(os.path.join(folder, VOCAB_FILE), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, MERGES_FILE), encoding="utf-8") as f:
            merges = [line for line in f.read().split("\n")[1:] if line]
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        return cls(context_length=config["context_length"], vocab=vocab, merges=merges)
