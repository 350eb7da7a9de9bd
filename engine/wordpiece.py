"""A deterministic WordPiece vocabulary learned from transcripts: the tokenizer of
presets without a pretrained text encoder (training) and of random-weight bench
engines. In engine/ so that both sides build it the same way.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: list[str], out_file: str | Path, vocab_size: int = 500) -> Path:
    """Build a lower-cased WordPiece vocabulary from ``texts`` and save ``tokenizer.json``.

    Deterministic (the ``tokenizers`` trainer is not: equal counts come out in
    varying order): the special tokens take ids 0..4 in the order of
    ``SPECIAL_TOKENS`` ([PAD] = 0, as in BERT), then every character seen, as a
    word start and as a ``##`` continuation, then the most frequent whole words
    (ties broken alphabetically) up to ``vocab_size``. Unknown words fall back to
    characters, so nothing but unseen characters maps to [UNK].
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_file))
    return out_file
