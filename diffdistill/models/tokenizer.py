"""Offline CLIP tokenizers for SD-family pipelines: the real CLIP BPE vocabulary rebuilt from the file open_clip ships
(``open_clip/bpe_simple_vocab_16e6.txt.gz``), and the 23-token vocabulary of transformers' CLIP tokenizer tests.

Nothing is downloaded: SD pipelines need a ``CLIPTokenizer``, and the hub's copy is the same vocabulary as
open_clip's ``SimpleTokenizer`` (same IDs; only padding differs, HF pads with ``<|endoftext|>`` = 49407).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# transformers' tests/models/clip/test_tokenization_clip.py
TINY_VOCAB = [
    *"lowerstidn",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
    "er</w>",
    "lowest</w>",
    "newer</w>",
    "wider",
    "<unk>",
    BOS,
    EOS,
]
TINY_MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>")]


def bpe_file() -> Path:
    """open_clip's bundled BPE merges file (no import of open_clip itself)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("the offline CLIP vocabulary is read from open_clip's package: pip install open_clip_torch")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip is installed but '{path}' is missing")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-unicode table (open_clip ``tokenizer.bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of CLIP, built as open_clip's ``SimpleTokenizer`` builds them (49,408 entries)."""
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(folder: str | Path | None = None, kind: str = "clip"):
    """A ``transformers.CLIPTokenizer`` built offline (``model_max_length = 77``, as SD pipelines pad to it).

    Args:
        folder: if given, the tokenizer is also saved there (``save_pretrained``), so a pipeline folder loads it.
        kind: ``"clip"`` (the real CLIP vocabulary, 49,408 tokens) or ``"tiny"`` (23 tokens, for fast tests).
    """
    from transformers import CLIPTokenizer

    if kind == "clip":
        vocab, merges = clip_vocab()
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)
    elif kind == "tiny":
        vocab = {t: i for i, t in enumerate(TINY_VOCAB)}
        tok = CLIPTokenizer(vocab=vocab, merges=list(TINY_MERGES), unk_token="<unk>", model_max_length=CLIP_MAX_LENGTH)
    else:
        raise ValueError(f"tokenizer kind must be 'clip' or 'tiny', got '{kind}'")
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(folder))
    return tok


def write_vocab_files(folder: str | Path) -> Path:
    """Write CLIP's ``vocab.json`` + ``merges.txt`` (``CLIPTokenizer.from_pretrained(folder)`` reads them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder
