"""One rule for a learned token's name, wherever tokens are added: training (``LearnedTokens.add``), loading an
embedding into a pipeline (``register_tokens``) and merging tokens into a model folder. A name is taken when the
tokenizer has a row for it: a vocabulary entry, or a word it encodes as exactly one token (CLIP spells whole
words ``sks</w>``, so ``sks`` is not an entry but is taken)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def pipe():
    from lorax.zoo.tiny import tiny_pipeline

    return tiny_pipeline("sd1", words=["sks"])


def test_a_word_the_tokenizer_knows_as_one_token_is_taken_everywhere(pipe, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from lorax.adapters.apply import register_tokens
    from lorax.errors import InputError, MismatchError
    from lorax.models.tokens import taken, vector_names
    from lorax.progress import NullProgress
    from lorax.services.merge import add_embeddings_to_folder
    from lorax.training.inversion import LearnedTokens

    assert "sks" not in pipe.tokenizer.get_vocab() and "sks</w>" in pipe.tokenizer.get_vocab()
    assert taken(pipe.tokenizer, ["sks", "<s1>"]) == ["sks"]
    assert vector_names("<s1>", 3) == ["<s1>", "<s1>_1", "<s1>_2"]
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = {"sks": {"text_encoder": torch.zeros(1, width)}}
    before = len(pipe.tokenizer)
    with pytest.raises(MismatchError, match="token sks is already in the model's vocabulary"):
        register_tokens(pipe, vectors)
    with pytest.raises(InputError, match="--token sks is already in the model's vocabulary"):
        LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, ["sks"])
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    with pytest.raises(MismatchError, match="token sks is already in the model's tokenizer"):
        add_embeddings_to_folder(folder, vectors, NullProgress())
    assert len(pipe.tokenizer) == before  # nothing was added on the way to the refusals
    assert register_tokens(pipe, {"<s1>": {"text_encoder": torch.ones(2, width)}}) == ["<s1>"]
    assert taken(pipe.tokenizer, ["<s1>", "<s1>_1"]) == ["<s1>", "<s1>_1"]
