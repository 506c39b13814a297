"""The trained tiny model's text side: a word-level tokenizer of the synthetic world's grammar and
a tiny ``UMT5EncoderModel``, so ``WanPipeline`` runs its real text path (tokenize, encode, pad).

A hashed prompt embedding cannot compose: "a blue ball growing" would share nothing with "a blue
square growing". With one token per word and an encoder trained with the transformer, each word
has its own embedding, so a combination absent from training is still made of known words.
Unknown words map to ``<unk>``; every sequence ends with ``</s>`` as Wan's T5 tokenizer does.
"""

from __future__ import annotations

from vidsparse.models.synthetic_world import vocabulary

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
#: The tokenizer's maximum length; ``WanPipeline`` pads every prompt to its ``max_sequence_length``.
MODEL_MAX_LENGTH = 512


def build_tokenizer():
    """A ``transformers.PreTrainedTokenizerFast`` over the world's words (pad 0, eos 1, unk 2)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    # Punctuation becomes a space, so "bouncing," is the word "bouncing".
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
    )


def build_text_encoder(dim: int, vocab_size: int, layers: int = 2, heads: int = 2):
    """A tiny random-init ``UMT5EncoderModel`` of width ``dim`` (the transformer's ``text_dim``)."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=dim,
        d_kv=dim // heads,
        d_ff=2 * dim,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg)


__all__ = ["EOS", "MODEL_MAX_LENGTH", "PAD", "UNK", "build_text_encoder", "build_tokenizer"]
