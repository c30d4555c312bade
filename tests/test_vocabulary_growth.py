"""Growing a trained text encoder to a longer word list (kernels/demo/vocabulary_growth.py): the grown encoder
reads every old caption exactly as before, and the new words get rows of their own."""

import numpy as np
import pytest
import torch

from fewshot_personalize.kernels.demo import world as W
from fewshot_personalize.kernels.demo.vocabulary_growth import grow_text_state, grow_token_embedding
from fewshot_personalize.kernels.testing.word_tokenizer import write_clip_tokenizer

OLD_WORDS = [w for w in W.all_words() if w not in W.PATTERN_NOUNS.values()]  # the list before the pattern nouns


def _encoder(words, directory, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fewshot_personalize.kernels.demo.model import TEXT_CONFIG

    ids = write_clip_tokenizer(words, directory)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=ids["vocab_size"], bos_token_id=ids["bos_token_id"],
                                        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
                                        **TEXT_CONFIG)).eval()
    return text, CLIPTokenizer.from_pretrained(str(directory))


def _captions(n, seed, name_patterns=False):
    from fewshot_personalize.kernels.demo.world_patterns import add_patterns

    rng = np.random.default_rng(seed)
    scenes = [W.sample_scene(rng, p_two=0.5) for _ in range(n)]
    for s in scenes:
        add_patterns(s, rng, 0.5, set())
    return [s.caption(name_patterns) for s in scenes]


def test_words_added_at_the_end_leave_the_old_captions_tokens_alone(tmp_path):
    _, old_tok = _encoder(OLD_WORDS, tmp_path / "old", 0)
    _, new_tok = _encoder(W.all_words(), tmp_path / "new", 0)
    for caption in _captions(200, 1) + ["an orange ball with a city in the background", "a sks toy"]:
        assert new_tok.tokenize(caption) == old_tok.tokenize(caption), caption
    for noun in W.PATTERN_NOUNS.values():  # each new word one token of its own, which the old list split up
        assert new_tok.tokenize(noun) == [noun + "</w>"] and len(old_tok.tokenize(noun)) > 1


def test_the_grown_encoder_reads_old_captions_exactly_as_before(tmp_path):
    old, old_tok = _encoder(OLD_WORDS, tmp_path / "old", 0)
    new, new_tok = _encoder(W.all_words(), tmp_path / "new", 1)  # other random weights, to be overwritten
    new.load_state_dict(grow_text_state(old.state_dict(), old_tok.get_vocab(), new_tok.get_vocab()), strict=True)
    captions = _captions(24, 2)
    with torch.no_grad():
        a = old(**old_tok(captions, padding="max_length", max_length=48, truncation=True, return_tensors="pt"))
        b = new(**new_tok(captions, padding="max_length", max_length=48, truncation=True, return_tensors="pt"))
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=0, atol=0)
    named = _captions(24, 2, name_patterns=True)
    assert any("stripes" in c or "half" in c for c in named)
    with torch.no_grad():  # a caption naming a pattern now reads differently from the same caption without it
        c = new(**new_tok(named, padding="max_length", max_length=48, truncation=True, return_tensors="pt")).pooler_output
    changed = [i for i, (x, y) in enumerate(zip(named, captions)) if x != y]
    assert changed and not torch.allclose(c[changed], b.pooler_output[changed])


def test_new_rows_start_near_the_mean_and_apart():
    old_vocab = {"a": 0, "b": 1, "<end>": 2}
    new_vocab = {"a": 0, "b": 1, "x": 2, "y": 3, "<end>": 4}
    weight = torch.randn(3, 16)
    grown = grow_token_embedding(weight, old_vocab, new_vocab, seed=0, noise_std=0.01)
    assert torch.equal(grown[[0, 1, 4]], weight)
    mean = weight.mean(0)
    assert (grown[2] - mean).abs().max() < 0.06 and (grown[3] - mean).abs().max() < 0.06
    assert not torch.equal(grown[2], grown[3])
    assert torch.equal(grown, grow_token_embedding(weight, old_vocab, new_vocab, seed=0, noise_std=0.01))


def test_growth_refuses_what_is_not_growth():
    weight = torch.randn(3, 4)
    with pytest.raises(ValueError, match="only add words"):
        grow_token_embedding(weight, {"a": 0, "b": 1, "c": 2}, {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="do not belong together"):
        grow_token_embedding(weight, {"a": 0, "b": 1}, {"a": 0, "b": 1, "c": 2})
    with pytest.raises(ValueError, match="one token-embedding tensor"):
        grow_text_state({"other.weight": weight}, {"a": 0}, {"a": 0, "b": 1})
