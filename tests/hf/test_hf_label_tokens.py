"""Label words must be the token the model predicts after the label prefix (issue: SentencePiece/Metaspace
tokenizers that split " 1" into ['▁', '1'])."""
from __future__ import annotations

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from abft_kernels.recipes.icl import PromptBuilder, Template  # noqa: E402

TEMPLATE = Template("review: ", "sentiment:", ("1", "2"))


def metaspace_tokenizer(pieces):
    """A fast SentencePiece-style (Unigram + Metaspace) tokenizer built offline from `pieces`."""
    vocab = [("<unk>", -10.0)] + [(piece, -1.0 if len(piece) > 1 else -2.0) for piece in pieces]  # longest wins
    tokenizer = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=0))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = tokenizers.decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


WORDS = ["▁review:", "▁a", "▁sentiment:", "▁", "1", "2", "\n", "a"]


def test_leading_space_as_a_separate_token_is_refused():
    tokenizer = metaspace_tokenizer(WORDS)
    assert tokenizer.tokenize("sentiment: 1") == ["▁sentiment:", "▁", "1"]
    with pytest.raises(ValueError, match="label word '1'.*'▁'"):
        PromptBuilder(tokenizer, TEMPLATE)


def test_label_word_with_its_space_in_one_token_is_accepted():
    tokenizer = metaspace_tokenizer(WORDS + ["▁1", "▁2"])
    builder = PromptBuilder(tokenizer, TEMPLATE)
    assert tokenizer.convert_ids_to_tokens(builder.label_token_ids) == ["▁1", "▁2"]
