"""Small tokenizers shaped like BERT's, T5's, GPT-2's, LLaMA 3's and Qwen's, trained in the test on a
few lines (no downloads)."""

from __future__ import annotations

import io

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
T5_SPECIALS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>", "start": "<pad>"}
GPT2_EOS = "<|endoftext|>"
LLAMA_BOS, LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"
QWEN_PAD, QWEN_EOS = "<|endoftext|>", "<|im_end|>"  # Qwen2.5-Instruct's pad and eos; it has no bos
QWEN_SPECIALS = (QWEN_PAD, "<|im_start|>", QWEN_EOS)
QWEN_SPLIT = (  # Qwen's pre-tokenizing pattern: GPT-4's, with every digit a word of its own
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Café society meets in İstanbul on Tuesdays, naïvely.",
    "A résumé of 12 pages was sent at 09:30 by the committee!",
    "Transformers read text as pieces; the pieces become vectors.",
    "Marrowby's harbour froze twice that winter, and the ferries stopped.",
    "summarize: the council voted to repair the old bridge before spring.",
]


def bert_wordpiece(lines: list[str], vocab_size: int = 300) -> Tokenizer:
    """An uncased BERT tokenizer: BERT's normaliser (lower-case, strip accents), pre-tokenizer,
    WordPiece model, [CLS] A [SEP] post-processor and decoder, as bert-base-uncased's tokenizer.json."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = list(BERT_SPECIALS.values())
    tokenizer.train_from_iterator(
        lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def t5_sentencepiece(lines: list[str], vocab_size: int = 80) -> bytes:
    """A sentencepiece model with T5's special ids: <pad> 0, </s> 1, <unk> 2, no <s>."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def gpt2_byte_bpe(
    lines: list[str],
    vocab_size: int = 400,
    specials: tuple[str, ...] = (GPT2_EOS,),
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
) -> Tokenizer:
    """A GPT-2 tokenizer: byte-level pre-tokenizer (no prefix space), BPE over the 256 byte symbols,
    byte-level decoder, and <|endoftext|> as its one special token, as gpt2's tokenizer.json
    (LLaMA 3's and Qwen's are the same kind, with other `specials` and, Qwen's, `pre_tokenizer`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tokenizer


def llama_byte_bpe(lines: list[str], vocab_size: int = 400) -> Tokenizer:
    """A LLaMA 3 tokenizer: GPT-2's kind with <|begin_of_text|> and <|end_of_text|>, and a
    post-processor that puts <|begin_of_text|> in front of every text."""
    tokenizer = gpt2_byte_bpe(lines, vocab_size, specials=(LLAMA_BOS, LLAMA_EOS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", special_tokens=[(LLAMA_BOS, tokenizer.token_to_id(LLAMA_BOS))]
    )
    return tokenizer


def qwen_byte_bpe(lines: list[str], vocab_size: int = 400) -> Tokenizer:
    """A Qwen2 / Qwen3 tokenizer: NFC normaliser, QWEN_SPLIT then byte-level symbols, byte-level BPE
    with QWEN_SPECIALS, and a post-processor that adds nothing (no bos), as Qwen's tokenizer.json."""
    split = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = gpt2_byte_bpe(lines, vocab_size, QWEN_SPECIALS, pre_tokenizers.Sequence([split, byte_level]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer
