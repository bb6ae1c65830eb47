"""Character-level tokenizer for the arithmetic example, built in code so nothing is downloaded."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = [PAD, EOS, BOS, UNK]
# Every character a prompt or completion of the task may contain; one token each.
CHARS = list("0123456789") + list("+-*=#, \n")


def build_tokenizer(chars: list[str] = CHARS, max_length: int = 64) -> PreTrainedTokenizerFast:
    """One token per character of `chars`, `<bos>` prepended, decoding that joins characters without spaces."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every character (including "\n") so WordLevel sees single-char words.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel has no decoder of its own; Fuse joins tokens as-is (the default would add spaces).
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="right",
        model_max_length=max_length,
    )
