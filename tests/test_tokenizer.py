"""The closed-vocabulary CLIPTokenizer: every word one token, any other word still tokenizes."""

from __future__ import annotations

from transformers import CLIPTokenizer

from fairness.models.tokenizer import build_clip_tokenizer

WORDS = ["a", "photo", "of", "banker", "baseball", "basketball", "an", "and", "engineer", "background"]


def test_every_word_is_one_token_and_reloads(tmp_path):
    tok = build_clip_tokenizer(WORDS, tmp_path)
    assert len(tok) > 40  # transformers 5 silently ignores wrong kwarg names and yields 3 tokens
    for w in WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert again("a photo of an engineer").input_ids == tok("a photo of an engineer").input_ids
    unknown = tok("zebra", add_special_tokens=False).input_ids
    assert len(unknown) > 1 and tok.unk_token_id not in unknown
