"""CUDA paths: the torch backend (eager, CUDA graphs + fp16), sparse layers and a
training step on the GPU, each against the CPU. Skipped where torch sees no GPU
(CI has none; they ran on an H100, see BENCHMARKS.md)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.backends.torch_backend import TorchBackend
from engine.dims import preset_dims
from engine.features import Batch
from engine.model import build_model
from engine.sparse import SparseStage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

N_PERSONS, VOCAB = 6, 300


def _model(name: str):
    torch.manual_seed(0)
    model = build_model(preset_dims("tiny", name, N_PERSONS, text_vocab=VOCAB)).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if name == "mme2e_sparse":
        model.set_sparse_budget([0.5, 0.5, 0.5])
    return model


def _batch(B: int, F: int, C: int, L: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = lambda n: torch.arange(n)[None, :] < torch.randint(1, n + 1, (B,), generator=g)[:, None]  # noqa: E731
    face_mask, audio_mask, text_mask = mask(F), mask(C), mask(L)
    face_mask[0] = False  # one sample without a face
    return Batch(faces=torch.randn(B, F, 3, 48, 48, generator=g), face_mask=face_mask,
                 audio=torch.randn(B, C, 1, 128, 32, generator=g), audio_mask=audio_mask,
                 text=torch.randint(5, VOCAB, (B, L), generator=g), text_mask=text_mask)


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse"])
def test_cuda_backends_match_cpu(name):
    model = _model(name)
    cpu = TorchBackend(copy.deepcopy(model), device="cpu")
    eager = TorchBackend(copy.deepcopy(model), device="cuda")
    graphs = TorchBackend(copy.deepcopy(model), device="cuda", cuda_graphs=True, half=True)
    for seed, shape in enumerate([(4, 6, 8, 14), (4, 6, 8, 14), (1, 3, 2, 5), (9, 6, 8, 20)]):
        batch = _batch(*shape, seed=seed)
        ref = cpu.run(batch)
        fp32 = eager.run(batch)
        half = graphs.run(batch)  # the second (4, 6, 8, 14) batch replays the first one's graph
        for key in ("logits", "modality_logits", "embedding"):
            torch.testing.assert_close(fp32[key], ref[key], atol=2e-3, rtol=2e-3)  # cuDNN convs may use TF32
            torch.testing.assert_close(half[key], ref[key], atol=5e-2, rtol=5e-2)
        assert (fp32["present"] == ref["present"]).all() and (half["present"] == ref["present"]).all()
        assert (half["logits"].argmax(1) == ref["logits"].argmax(1)).mean() >= 0.75
    assert len(graphs._graphs) == 3  # one capture per distinct shape


def test_cuda_graphs_refuse_the_cdf_rule():
    model = _model("mme2e_sparse")
    model.set_sparse_budget(None)
    with pytest.raises(ValueError, match="static shapes"):
        TorchBackend(model, device="cuda", cuda_graphs=True)


@pytest.mark.parametrize("budget", [None, 0.3])
def test_sparse_stage_cuda_equals_cpu_forward_and_backward(budget):
    torch.manual_seed(0)
    stage = SparseStage(8, 16, 2, 12).train()
    x = torch.randn(5, 8, 12, 10)
    candidates = torch.rand(5, 12, 10) < 0.7
    guide = torch.randn(5, 12)
    results = []
    for device in ("cpu", "cuda"):
        s = copy.deepcopy(stage).to(device)
        xi = x.detach().to(device).requires_grad_(True)
        pooled, active, count = s(xi, candidates.to(device), guide.to(device), 0.8, budget)
        (pooled * torch.linspace(-1, 1, pooled.numel(), device=device).view_as(pooled)).sum().backward()
        grads = [p.grad.cpu() for p in s.parameters()]
        results.append((pooled.detach().cpu(), active.cpu(), count.cpu(), xi.grad.cpu(), grads))
    (p0, a0, c0, g0, w0), (p1, a1, c1, g1, w1) = results
    assert torch.equal(a0, a1) and torch.equal(c0, c1)  # the same sites kept
    torch.testing.assert_close(p1, p0, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(g1, g0, atol=2e-3, rtol=2e-3)
    for a, b in zip(w1, w0):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("name", ["mme2e", "mme2e_sparse"])
def test_training_steps_on_cuda(name):
    model = _model(name).cuda().train()
    if name == "mme2e_sparse":
        model.set_sparse_budget(None)  # training uses the CDF rule
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = _batch(6, 4, 5, 9, seed=7).to("cuda")
    labels = torch.arange(6, device="cuda") % N_PERSONS
    losses = []
    for _ in range(15):
        out = model(*batch.model_inputs())
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7  # it learns the six labels


def test_batched_face_detector_on_cuda_matches_cpu():
    import numpy as np

    from engine.bench import stream_frames
    from engine.face_detect import BatchedMTCNN

    frames = np.stack(stream_frames(12) + [np.zeros((224, 224, 3), np.uint8)])
    x = torch.from_numpy(frames)
    cpu = BatchedMTCNN("cpu").largest_boxes(x)
    gpu = BatchedMTCNN("cuda").largest_boxes(x)
    assert torch.equal(torch.isnan(cpu), torch.isnan(gpu)) and torch.isnan(cpu[-1]).all()
    assert torch.isfinite(cpu[:-1]).all()
    assert (cpu[:-1] - gpu[:-1]).abs().max() < 1.0


def test_cuda_graphs_share_a_capture_within_a_bucket():
    """Shapes that pad to the same bucket sizes replay one graph; the answers keep each
    batch's own rows."""
    model = _model("mme2e")
    cpu = TorchBackend(copy.deepcopy(model), device="cpu")
    graphs = TorchBackend(copy.deepcopy(model), device="cuda", cuda_graphs=True, half=True)
    for seed, shape in enumerate([(7, 5, 7, 13), (8, 6, 8, 16), (7, 6, 7, 15)]):  # all pad to (8, 6, 8, 16)
        batch = _batch(*shape, seed=seed)
        ref, half = cpu.run(batch), graphs.run(batch)
        assert half["logits"].shape == ref["logits"].shape
        torch.testing.assert_close(half["logits"], ref["logits"], atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(half["embedding"], ref["embedding"], atol=5e-2, rtol=5e-2)
    assert len(graphs._graphs) == 1


def test_stream_engine_with_cuda_graphs_gives_the_cpu_answers():
    """``[engine] cuda_graphs = true`` on a GPU: the stream's engine (the shipped one) is served
    by the CUDA-graphs backend (fp16 with ``fp16``) and gives the ONNX engine's probabilities
    on the CPU (to fp16's tolerance), on raw windows of several shapes."""
    import numpy as np

    from engine.config import load_config, replace
    from engine.runtime import Engine
    from stream.demo import SHIPPED_ENGINE
    from stream.engine_identifier import EngineIdentifier

    gpu = EngineIdentifier.from_path(SHIPPED_ENGINE, replace(load_config(), engine={"cuda_graphs": True})).engine
    assert gpu.backend_name == "torch-graphs-fp16"
    cpu = Engine.load(SHIPPED_ENGINE, backend="onnx")
    rng = np.random.default_rng(0)
    size, words = gpu.feature_params.face_size, "so what did you think about the plan we made".split()
    for frames, seconds, n_words in [(6, 3.0, 9), (4, 2.0, 3), (6, 3.0, 0), (5, 2.5, 7)]:
        windows = [(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), np.ones(frames, bool),
                    (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), " ".join(words[:n_words]))
                   for _ in range(3)]
        for g, c in zip(gpu.identify_raw(windows), cpu.identify_raw(windows)):
            np.testing.assert_allclose(g.probabilities, c.probabilities, atol=5e-2)
