"""Grow a trained demo text encoder to a longer word list, so that a pretraining run can go on from a model whose
tokenizer predates new words (world.all_words() extended at its end, e.g. the pattern nouns).

The tokenizer of the longer list keeps every earlier token, and tokenizes the earlier words as before, since
merges of words added at the end rank after all earlier ones (word_tokenizer.build_vocab); only the ids of the
special tokens move (they come last). So the grown embedding table takes every known token's row by name, and
each new token starts at the mean of the known rows plus a little noise: a new word begins as an average word
rather than as an outlier whose attention logits and layer norms the trained encoder never saw (Hewitt, "Initializing
new word embeddings for pretrained language models", 2021; the noise breaks the symmetry between new words).
"""

from __future__ import annotations

import torch

#: how the token-embedding tensor's key of a transformers CLIPTextModel state dict ends (older versions put
#: ``text_model.`` before it)
EMBEDDING_KEY = "embeddings.token_embedding.weight"


def grow_token_embedding(weight: torch.Tensor, old_vocab: dict[str, int], new_vocab: dict[str, int],
                         seed: int = 0, noise_std: float = 0.02) -> torch.Tensor:
    """The embedding table of ``new_vocab`` (token → id): the row of ``weight`` (indexed by ``old_vocab``) for
    every token both know, the mean of ``weight``'s rows plus N(0, ``noise_std``²) noise for each new one.
    Refuses a ``new_vocab`` that lacks a token of ``old_vocab`` (a grown vocabulary only adds)."""
    if weight.shape[0] != len(old_vocab):
        raise ValueError(f"the embedding table has {weight.shape[0]} rows but the old vocabulary {len(old_vocab)} "
                         "tokens: they do not belong together")
    lost = sorted(set(old_vocab) - set(new_vocab))
    if lost:
        raise ValueError(f"the new vocabulary lacks {len(lost)} token(s) of the old one (e.g. {lost[:3]}): it must "
                         "only add words")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(new_vocab), weight.shape[1], generator=generator, dtype=torch.float32) * noise_std
    grown = (weight.detach().float().mean(0, keepdim=True) + noise).to(weight.dtype)
    ids = torch.tensor([new_vocab[token] for token in old_vocab])
    grown[ids] = weight.detach()[torch.tensor(list(old_vocab.values()))]
    return grown


def grow_text_state(state: dict[str, torch.Tensor], old_vocab: dict[str, int], new_vocab: dict[str, int],
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """``state`` (a CLIPTextModel state dict trained with ``old_vocab``) with its token embeddings grown to
    ``new_vocab`` (:func:`grow_token_embedding`); every other tensor as it was."""
    keys = [k for k in state if k == EMBEDDING_KEY or k.endswith("." + EMBEDDING_KEY)]
    if len(keys) != 1:
        raise ValueError(f"expected one token-embedding tensor (…{EMBEDDING_KEY}) in the text encoder, found {len(keys)}")
    return state | {keys[0]: grow_token_embedding(state[keys[0]], old_vocab, new_vocab, seed)}
