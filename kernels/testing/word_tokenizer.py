"""A CLIP byte-level BPE tokenizer built from a word list, for models made in code (tests, the demo model).

Real CLIP vocabularies cannot be downloaded here. This writes ``vocab.json`` + ``merges.txt`` in the exact
format of OpenAI's CLIP tokenizer (byte-to-unicode alphabet, ``</w>`` word ends, ``<|startoftext|>`` /
``<|endoftext|>``), so ``transformers.CLIPTokenizer.from_pretrained`` and ComfyUI's ``SD1Tokenizer`` read it
like the real one. Each listed word gets a ``word</w>`` token, and most words tokenize to it; since BPE applies
merges by rank, a word whose letters start an earlier word's merges can split instead (the demo vocabulary's
"orange" reads or|an|g|e). Words appended to a list leave the earlier words' tokenization as it was (their merges
rank after all earlier ones). Any other text still tokenizes (into characters), and new tokens can be added as
usual.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (printable stand-ins for the 256 byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list in which each word (lower case, ASCII) is a single ``word</w>`` token.

    Ids: 256 byte symbols, 256 word-final byte symbols, the merged pieces in order, then BOS and EOS last
    (as in CLIP, where they are 49406 and 49407).
    """
    alphabet = list(bytes_to_unicode().values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    known = set(vocab)
    merges: list[str] = []
    seen_merges: set[str] = set()
    for word in words:
        word = word.strip().lower()
        if not word or " " in word:
            raise ValueError(f"tokenizer words must be single non-empty words, got {word!r}")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for s in symbols[1:]:
            merge = f"{current} {s}"
            current = current + s
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if current not in known:
                known.add(current)
                vocab.append(current)
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(words: Iterable[str], directory: str | os.PathLike) -> dict[str, int]:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``directory``; return the ids of
    BOS/EOS/PAD and the vocabulary size (what a matching ``CLIPTextConfig`` needs)."""
    vocab, merges = build_vocab(words)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "model_max_length": 77,
        "do_lower_case": True,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=1)
    return {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS], "vocab_size": len(vocab)}
