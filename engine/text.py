"""A BERT/ALBERT-compatible transformer text encoder, and the post-LN layer that
the per-modality transformers of engine/model.py reuse. Imports only torch.

Parameter names follow our own layout; engine/text_weights.py maps HuggingFace
BERT and ALBERT checkpoints onto it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from engine.dims import ModelDims


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, T, D); keep (B, T) bool, True for keys that may be attended (never all False)."""
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, D // self.heads).transpose(1, 2) for p in (self.query, self.key, self.value))
        # q, k, v: (B, h, T, hs)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D // self.heads)  # (B, h, T, T)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = self.dropout(scores.softmax(dim=-1).type(x.dtype))
        y = (weights @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out(y)


class TransformerLayer(nn.Module):
    """Post-LN encoder layer (BERT, ALBERT and torch's nn.TransformerEncoderLayer default)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, act: str, eps: float):
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.attention_norm = LayerNorm(dim, eps=eps)
        self.ff_in = nn.Linear(dim, ff)
        self.act = activation(act)
        self.ff_out = nn.Linear(ff, dim)
        self.ff_norm = LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, keep)))
        return self.ff_norm(x + self.dropout(self.ff_out(self.act(self.ff_in(x)))))


class TextEncoder(nn.Module):
    """BERT (or ALBERT: factorised embeddings, one shared layer) returning the [CLS] vector."""

    def __init__(self, dims: ModelDims):
        super().__init__()
        width = dims.text_embedding_size or dims.text_hidden
        self.pad_id = dims.text_pad_id
        self.n_layers = dims.text_layers
        self.word_embeddings = nn.Embedding(dims.text_vocab, width)
        self.position_embeddings = nn.Embedding(dims.text_max_positions, width)
        self.token_type_embeddings = nn.Embedding(dims.text_type_vocab, width)
        self.embedding_norm = LayerNorm(width, eps=dims.text_eps)
        self.embedding_proj = nn.Linear(width, dims.text_hidden) if dims.text_embedding_size else nn.Identity()
        self.dropout = nn.Dropout(dims.text_dropout)
        n_distinct = 1 if dims.text_share_layers else dims.text_layers
        self.layers = nn.ModuleList(
            TransformerLayer(dims.text_hidden, dims.text_heads, dims.text_ff, dims.text_dropout, dims.text_act, dims.text_eps)
            for _ in range(n_distinct)
        )
        self.max_positions = dims.text_max_positions
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens (B, L) int64, mask (B, L) bool -> (B, text_hidden) [CLS] vectors.

        A row with an all-False mask gets a finite (meaningless) vector: its first
        position stays attendable so that no softmax runs over nothing.
        """
        B, L = tokens.shape
        tokens = torch.where(mask, tokens, torch.full_like(tokens, self.pad_id))
        positions = torch.arange(L, device=tokens.device)  # (L,)
        x = self.word_embeddings(tokens) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(torch.zeros_like(tokens))  # (B, L, E)
        x = self.embedding_proj(self.dropout(self.embedding_norm(x)))  # (B, L, H)
        first = torch.arange(L, device=tokens.device)[None, :] == 0  # (1, L)
        keep = mask | first  # (B, L)
        for i in range(self.n_layers):
            x = self.layers[i % len(self.layers)](x, keep)
        return x[:, 0]  # (B, H)


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
