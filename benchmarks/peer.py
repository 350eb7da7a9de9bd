"""The ORIGINAL MME2E workload, re-implemented for side-by-side timing (not used for serving).

What it models (Dai et al. 2021's released code path, as described in issue 5):
- dense, eager PyTorch, fp32, no export;
- MTCNN face detection INSIDE the forward pass, one sample at a time, on the
  window's 6 frames of 224x224 (facenet-pytorch MTCNN, 48x48 crops);
- a VGG-style CNN per face frame and per audio chunk (8 log-mel chunks of
  128x32): 5x5 stem conv 64 + pool, four 3x3 convs at 64, then stages of two
  3x3 convs at 128/256/512 each followed by a 2x2 pool; flatten -> 1024 -> 64;
  a 4-layer nn.TransformerEncoder (d=64, 4 heads, ff 2048) over frames/chunks;
- an ALBERT-base text encoder with random weights (transformers AlbertModel),
  on a transcript ALWAYS padded to 100 tokens;
- per-modality linear heads and a softmax-weighted late fusion.

Run: ``python benchmarks/peer.py [--threads 2] [--json]`` or ``mmid bench --peer``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

N_FRAMES, N_CHUNKS, PADDED_TOKENS = 6, 8, 100
FACE_MEAN = torch.tensor([159.0, 111.0, 102.0]).view(3, 1, 1)
FACE_STD = torch.tensor([37.0, 33.0, 32.0]).view(3, 1, 1)


def _block(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()]


class PeerCNN(nn.Module):
    def __init__(self, cin: int, flat: int):
        super().__init__()
        layers = _block(cin, 64, 5) + [nn.MaxPool2d(2)]
        for _ in range(4):
            layers += _block(64, 64)
        for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
            layers += _block(c_in, c_out) + _block(c_out, c_out) + [nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, 64))
        self.cls = nn.Parameter(torch.zeros(1, 1, 64))
        layer = nn.TransformerEncoderLayer(64, 4, 2048, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (F, Cin, H, W) of ONE sample -> (64,)."""
        h = self.proj(self.body(x).flatten(1))[None]  # (1, F, 64)
        return self.encoder(torch.cat([self.cls, h], 1))[0, 0]


class PeerMME2E(nn.Module):
    def __init__(self, n_persons: int = 10):
        super().__init__()
        from facenet_pytorch import MTCNN
        from transformers import AlbertConfig, AlbertModel

        self.mtcnn = MTCNN(image_size=48, margin=2, post_process=False, keep_all=False, device="cpu")
        self.text = AlbertModel(AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                             embedding_size=128, vocab_size=30000))  # albert-base-v2 sizes, random weights
        self.visual = PeerCNN(3, 512 * 3 * 3)
        self.audio = PeerCNN(1, 512 * 8 * 2)
        self.heads = nn.ModuleList([nn.Linear(768, n_persons), nn.Linear(64, n_persons), nn.Linear(64, n_persons)])
        self.fusion = nn.Parameter(torch.zeros(3))

    def faces(self, frames: list[np.ndarray]) -> torch.Tensor:
        """MTCNN on one sample's frames -> normalised (F, 3, 48, 48) (centre fallback when no face)."""
        crops = self.mtcnn(torch.from_numpy(np.stack(frames)))  # tensor input: torch resizing, no cv2
        out = [c if c is not None else torch.nn.functional.interpolate(
            torch.from_numpy(f).permute(2, 0, 1)[None].float(), size=(48, 48), mode="area")[0] for c, f in zip(crops, frames)]
        return (torch.stack(out) - FACE_MEAN) / FACE_STD

    def forward(self, frames, specs, tokens, token_mask, faces=None):
        """frames: per sample a list of RGB frames (None when ``faces`` is given), specs (B, C, 1, 128, 32),
        tokens/token_mask (B, 100). Loops over samples, as the original does."""
        text = self.text(input_ids=tokens, attention_mask=token_mask.long()).last_hidden_state[:, 0]  # (B, 768)
        logits = []
        for b in range(specs.shape[0]):
            face = faces[b] if faces is not None else self.faces(frames[b])
            parts = [self.heads[0](text[b]), self.heads[1](self.audio(specs[b])), self.heads[2](self.visual(face))]
            logits.append((self.fusion.softmax(0)[:, None] * torch.stack(parts)).sum(0))
        return torch.stack(logits)


def _inputs(frames, audio, transcripts, batch):
    from engine.features import mel_chunks

    specs = torch.stack([mel_chunks(audio[b * 16000: b * 16000 + 48000])[:N_CHUNKS] for b in range(batch)])
    tokens = torch.randint(5, 30000, (batch, PADDED_TOKENS))
    mask = torch.zeros(batch, PADDED_TOKENS, dtype=torch.bool)
    for b in range(batch):
        mask[b, : len(transcripts[b % len(transcripts)].split()) + 2] = True  # padded to 100, as always
    window_frames = [[frames[(2 * b + i) % len(frames)] for i in range(N_FRAMES)] for b in range(batch)]
    return window_frames, specs, tokens, mask


def bench(frames, audio, transcripts, threads: int = 2, batches=(1, 8), iters: int = 3) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PeerMME2E().eval()
    rows = []
    with torch.no_grad():
        for batch in batches:
            if batch > 8:
                continue  # the peer's batch-32 CPU figure was not part of the reference table
            wf, specs, tokens, mask = _inputs(frames, audio, transcripts, batch)
            faces = [model.faces(f) for f in wf]
            for scope, call in (("window", lambda: model(wf, specs, tokens, mask)),
                                ("model", lambda: model(None, specs, tokens, mask, faces=faces))):
                call()
                times = []
                for _ in range(iters):
                    t = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t)
                ms = np.array(times) * 1000
                rows.append({"model": "peer-mme2e", "backend": "torch-eager", "device": "cpu", "scope": scope,
                             "batch": batch, "p50_ms": round(float(np.percentile(ms, 50)), 2),
                             "p95_ms": round(float(np.percentile(ms, 95)), 2),
                             "windows_per_s": round(batch * len(ms) / float(ms.sum() / 1000), 2), "threads": threads})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from engine.bench import TRANSCRIPTS, Stream
    from engine.features import FeatureParams

    stream = Stream.make(FeatureParams())
    for row in bench(stream.frames, stream.audio, list(TRANSCRIPTS), args.threads, [int(b) for b in args.batches.split(",")]):
        print(json.dumps(row) if args.json else row, flush=True)


if __name__ == "__main__":
    main()
