"""MME2E and sparse MME2E: presets, shapes, masking, missing modalities, text
encoder equivalence with transformers, export in fixed-budget mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.dims import ModelDims, preset_dims
from engine.model import MME2E, MME2ESparse, ModelOutput, build_model
from engine.sparse import budget_count
from engine.text import TextEncoder
from engine.text_weights import load_text_weights, minilm_folder, text_weights_folder

N_PERSONS = 5
VOCAB = 1000


def make_batch(lengths: list[tuple[int, int, int]], seed: int = 0):
    """Padded batch for (frames, chunks, tokens) per sample, padding filled with noise."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    F, C, L = (max(x[i] for x in lengths) for i in range(3))
    faces = torch.randn(B, F, 3, 48, 48, generator=g)
    audio = torch.randn(B, C, 1, 128, 32, generator=g)
    text = torch.randint(0, VOCAB, (B, L), generator=g)
    idx = torch.arange(max(F, C, L, 1))
    lens = torch.tensor(lengths).view(B, 3)
    face_mask = idx[None, :F] < lens[:, :1]
    audio_mask = idx[None, :C] < lens[:, 1:2]
    text_mask = idx[None, :L] < lens[:, 2:3]
    return faces, face_mask, audio, audio_mask, text, text_mask


def sample(batch, i: int, lengths):
    f, c, l = lengths
    faces, fm, audio, am, text, tm = batch
    return faces[i:i + 1, :f], fm[i:i + 1, :f], audio[i:i + 1, :c], am[i:i + 1, :c], text[i:i + 1, :l], tm[i:i + 1, :l]


@pytest.fixture(params=["mme2e", "mme2e_sparse"])
def tiny_model(request):
    torch.manual_seed(0)
    return build_model(preset_dims("tiny", request.param, N_PERSONS, text_vocab=VOCAB))


def test_dims_json_round_trip():
    for dims in (preset_dims("tiny", "mme2e", 3, text_vocab=77), preset_dims("paper", "mme2e_sparse", 10),
                 dataclasses.replace(preset_dims("tiny", "mme2e_sparse", 3), sparse_budget=(0.3, 0.5, 0.5))):
        again = ModelDims.from_json(dims.to_json())
        assert again == dims and isinstance(again.stage_channels, tuple)


def test_dims_are_checked():
    with pytest.raises(ValueError, match="name"):
        ModelDims(name="resnet")
    with pytest.raises(ValueError, match="face_size"):
        ModelDims(face_size=40)
    with pytest.raises(ValueError, match="sparse_budget"):
        ModelDims(sparse_budget=(0.5,))
    with pytest.raises(ValueError, match="sparse_budget"):  # one fraction per sparse stage
        ModelDims(sparse_dense_stages=1, sparse_budget=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="sparse_dense_stages"):  # at least one stage stays sparse
        ModelDims(sparse_dense_stages=3)
    with pytest.raises(ValueError, match="preset"):
        preset_dims("huge", "mme2e", 3)


def test_forward_backward_tiny(tiny_model):
    lengths = [(3, 4, 6), (1, 2, 0)]  # second sample: no transcript
    out = tiny_model(*make_batch(lengths))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, N_PERSONS) and out.modality_logits.shape == (2, 3, N_PERSONS)
    assert out.embedding.shape == (2, tiny_model.dims.embedding_dim)
    assert out.present.tolist() == [[True, True, True], [False, True, True]]
    (out.logits.sum() + out.modality_logits.sum()).backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_batch_equals_single_samples(tiny_model):
    """No mixing across the batch: padded batch of 4 == each sample alone (eval)."""
    tiny_model.eval()
    lengths = [(3, 5, 7), (1, 2, 3), (4, 1, 5), (2, 3, 1)]
    batch = make_batch(lengths, seed=1)
    with torch.no_grad():
        together = tiny_model(*batch)
        for i, lens in enumerate(lengths):
            alone = tiny_model(*sample(batch, i, lens))
            torch.testing.assert_close(together.logits[i], alone.logits[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(together.embedding[i], alone.embedding[0], atol=1e-4, rtol=1e-4)


def test_padded_frames_skip_the_cnn_without_changing_outputs(tiny_model):
    """Real-frames-only CNNs (the default) == every frame through the CNNs (the static
    path CUDA graphs use), in eval mode; and in training, padded frames stay out of BatchNorm."""
    if isinstance(tiny_model, MME2ESparse):
        tiny_model.set_sparse_budget([0.5, 0.5, 0.5])  # the static path needs a fixed budget
    tiny_model.eval()
    lengths = [(3, 5, 7), (1, 2, 3), (0, 1, 5), (2, 0, 1)]
    batch = make_batch(lengths, seed=2)
    with torch.no_grad():
        gathered = tiny_model(*batch)
        tiny_model.gather_real_frames = False
        full = tiny_model(*batch)
    tiny_model.gather_real_frames = True
    torch.testing.assert_close(gathered.logits, full.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gathered.embedding, full.embedding, atol=1e-4, rtol=1e-4)
    if isinstance(tiny_model, MME2E):  # dense BN: statistics of a padded batch == of its real frames alone
        bn = tiny_model.visual_cnn[0][0][1]
        tiny_model.train()
        tiny_model(*batch)
        padded_mean = bn.running_mean.clone()
        bn.reset_running_stats()
        real = torch.cat([batch[0][i, :f] for i, (f, _, _) in enumerate(lengths)])  # (6, 3, 48, 48)
        bn.train()
        tiny_model.visual_cnn[0][0](real)
        torch.testing.assert_close(padded_mean, bn.running_mean, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("absent", [0, 1, 2])  # text, audio, visual
def test_missing_modality_is_ignored(tiny_model, absent):
    """A modality whose mask is all False gives finite logits that its tensor cannot change."""
    tiny_model.eval()
    tensor_index = {0: 4, 1: 2, 2: 0}[absent]  # position in the forward arguments
    batch = list(make_batch([(3, 4, 6), (2, 3, 5)]))
    batch[tensor_index + 1] = torch.zeros_like(batch[tensor_index + 1])
    garbage = list(batch)
    if absent == 0:
        garbage[tensor_index] = torch.randint(0, 10**6, batch[tensor_index].shape)  # not even valid ids
    else:
        garbage[tensor_index] = torch.randn_like(batch[tensor_index]) * 1e4
    with torch.no_grad():
        a, b = tiny_model(*batch), tiny_model(*garbage)
    assert torch.isfinite(a.logits).all()
    assert not a.present[:, absent].any() and a.present.sum() == 4
    torch.testing.assert_close(a.logits, b.logits)
    assert (a.modality_logits[:, absent] == 0).all()


def test_all_modalities_absent_or_empty_axes(tiny_model):
    tiny_model.eval()
    B = 2
    empty = (torch.zeros(B, 0, 3, 48, 48), torch.zeros(B, 0, dtype=torch.bool),
             torch.zeros(B, 0, 1, 128, 32), torch.zeros(B, 0, dtype=torch.bool),
             torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, 0, dtype=torch.bool))
    out = tiny_model(*empty)
    assert out.logits.shape == (B, N_PERSONS) and torch.isfinite(out.logits).all()
    assert not out.present.any()


def test_fixed_budget_mode_has_static_site_counts():
    torch.manual_seed(0)
    dims = preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB)
    model = build_model(dims).eval()
    budget = (0.3, 0.5, 0.5)
    model.set_sparse_budget(budget)
    for seed in (0, 1):
        out = model(*make_batch([(3, 4, 6), (2, 2, 3)], seed=seed))
        assert out.logits.shape == (2, N_PERSONS)
        fractions = model.last_active_fractions["visual"]
        grids = model.sparse_grids("visual")
        limits = [budget_count(b, h * w) / (h * w) for b, (h, w, _, _) in zip(budget, grids)]
        assert fractions[0].item() == pytest.approx(limits[0])  # stage 0: every position is a candidate
        assert (fractions <= torch.tensor(limits) + 1e-6).all()
    model.set_sparse_budget(budget, audio=(0.6, 0.5, 0.5))  # the audio CNN's own budget
    model(*make_batch([(3, 4, 6), (2, 2, 3)]))
    for modality, first in (("visual", budget[0]), ("audio", 0.6)):
        h, w, _, _ = model.sparse_grids(modality)[0]
        assert model.last_active_fractions[modality][0].item() == pytest.approx(budget_count(first, h * w) / (h * w))
    model.set_sparse_budget(None)  # back to the CDF rule
    model(*make_batch([(3, 4, 6)]))
    assert set(model.last_active_fractions) == {"audio", "visual"}
    with pytest.raises(ValueError, match="visual"):
        model.set_sparse_budget(None, audio=(0.6, 0.5, 0.5))


def test_dense_first_stage_is_the_sparse_stage_that_keeps_every_site():
    """model.sparse_dense_stages = 1: the first stage runs as dense convolutions in the low-level
    CNN. With the weights of an all-sparse model whose first stage keeps every site (budget 1.0),
    it gives that model's outputs: a submanifold convolution over every site is a dense one."""
    torch.manual_seed(0)
    dims = preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB)
    sparse = build_model(dims).eval()
    for m in sparse.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    first = build_model(dataclasses.replace(dims, sparse_dense_stages=1)).eval()
    assert first.dims.low_channels == dims.stage_channels[0] and len(first.audio_cnn.stages) == len(dims.stage_channels) - 1
    at = 2 + dims.low_convs  # the dense stage's first conv in SparseCNN.low (after stem, pool, low convs)
    state = {}
    for key, value in sparse.state_dict().items():
        for cnn in ("audio_cnn", "visual_cnn"):
            if key.startswith(f"{cnn}.stages.0.blocks."):  # blocks.{i}.conv.weight / .norm.* -> low.{at+i}.0 / .1
                i, part, rest = key[len(f"{cnn}.stages.0.blocks."):].split(".", 2)
                key = f"{cnn}.low.{at + int(i)}.{0 if part == 'conv' else 1}.{rest}"
            elif key.startswith(f"{cnn}.stages.0."):  # the first stage's attention: no longer used
                key = None
            elif key.startswith(f"{cnn}.stages."):
                k, rest = key[len(f"{cnn}.stages."):].split(".", 1)
                key = f"{cnn}.stages.{int(k) - 1}.{rest}"
            if key is None:
                break
        if key is not None:
            state[key] = value
    first.load_state_dict(state)  # strict: every weight of the dense-first model is mapped
    sparse.set_sparse_budget((1.0, 0.5, 0.5))
    first.set_sparse_budget((0.5, 0.5))
    with torch.no_grad():
        for seed in (0, 1):
            batch = make_batch([(3, 4, 6), (2, 2, 3), (1, 3, 2)], seed=seed)
            want, got = sparse(*batch), first(*batch)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.embedding, want.embedding, atol=1e-5, rtol=1e-5)
            assert first.last_active_fractions["visual"].shape == (2,)  # the sparse stages only
    with pytest.raises(ValueError, match="2 fractions"):
        first.set_sparse_budget((0.5, 0.5, 0.5))


@pytest.mark.slow
def test_fixed_budget_exports_with_dynamic_batch():
    from torch.export import Dim

    torch.manual_seed(0)
    dims = dataclasses.replace(preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB), sparse_budget=(0.3, 0.5, 0.5))
    model = build_model(dims).eval()
    model.gather_real_frames = False  # static shapes, as engine/backends/onnx_backend.export_onnx sets
    args = make_batch([(3, 4, 6), (2, 2, 3), (1, 3, 2)])
    batch = Dim("batch", min=1, max=64)
    shapes = tuple({0: batch} for _ in args)
    program = torch.export.export(model, args, dynamic_shapes=shapes)
    other = make_batch([(3, 1, 2), (1, 4, 6)], seed=5)
    torch.testing.assert_close(program.module()(*other).logits, model(*other).logits, atol=1e-5, rtol=1e-5)


def test_text_encoder_equals_transformers_bert_on_minilm():
    transformers = pytest.importorskip("transformers")
    folder = minilm_folder()
    dims = preset_dims("default", "mme2e", N_PERSONS)
    ours = TextEncoder(dims).eval()
    load_text_weights(ours, folder, dims)
    theirs = transformers.BertModel.from_pretrained(folder).eval()
    tokens = torch.randint(1000, 30000, (2, 12))
    tokens[:, 0] = 101
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        expected = theirs(input_ids=tokens, attention_mask=mask.long()).last_hidden_state[:, 0]
        torch.testing.assert_close(ours(tokens, mask), expected, atol=1e-5, rtol=1e-5)


def test_text_encoder_equals_transformers_albert(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=48, max_position_embeddings=40)
    torch.manual_seed(0)
    transformers.AlbertModel(cfg).save_pretrained(tmp_path)
    theirs = transformers.AlbertModel.from_pretrained(tmp_path).eval()
    dims = preset_dims("tiny", "mme2e", N_PERSONS, text_model=str(tmp_path))
    model = build_model(dims, text_weights_dir=tmp_path)
    tokens = torch.randint(0, 99, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        expected = theirs(input_ids=tokens, attention_mask=mask.long()).last_hidden_state[:, 0]
        torch.testing.assert_close(model.text.eval()(tokens, mask), expected, atol=1e-5, rtol=1e-5)


def test_default_preset_loads_minilm():
    dims = preset_dims("default", "mme2e_sparse", N_PERSONS)
    model = build_model(dims, text_weights_dir=text_weights_folder("", "default"))
    assert isinstance(model, MME2ESparse) and dims.text_hidden == 384
    assert model.text.word_embeddings.weight.shape == (30522, 384)


def test_paper_preset_builds_and_runs():
    dims = preset_dims("paper", "mme2e", N_PERSONS)
    assert (dims.trans_dim, dims.trans_layers, dims.trans_heads, dims.sparse_threshold) == (64, 4, 4, 0.8)
    assert (dims.text_hidden, dims.text_embedding_size, dims.text_layers, dims.text_vocab) == (768, 128, 12, 30000)
    model = build_model(dims).eval()
    assert isinstance(model, MME2E) and len(model.text.layers) == 1  # ALBERT: one shared layer
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(1, 1, 3, 48, 48, generator=g), torch.ones(1, 1, dtype=torch.bool),
                torch.randn(1, 1, 1, 128, 32, generator=g), torch.ones(1, 1, dtype=torch.bool),
                torch.randint(0, 30000, (1, 5), generator=g), torch.ones(1, 5, dtype=torch.bool))
        assert torch.isfinite(model(*args).logits).all()


def test_attention_entropy_is_counted_once_per_training_step():
    """A batch without any face after one with faces: only the stages that ran are
    penalised, and backward never reaches the previous step's freed graph."""
    torch.manual_seed(0)
    model = build_model(preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB)).train()
    with_faces = make_batch([(3, 2, 4), (2, 3, 5)], seed=3)
    no_faces = make_batch([(0, 2, 4), (0, 3, 5)], seed=4)
    for batch in (with_faces, no_faces):
        out = model(*batch)
        entropy = model.attention_entropy()
        assert entropy is not None and 0.0 <= entropy.item() <= 1.0
        (out.logits.sum() + entropy).backward()
        assert model.attention_entropy() is None  # read once per step


def test_attention_entropy_target_is_a_hinge():
    """Stages whose entropy is below the target add nothing (and no gradient); above
    it, the excess is penalised."""
    torch.manual_seed(0)
    model = build_model(preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB)).train()
    batch = make_batch([(3, 2, 4), (2, 3, 5)], seed=3)
    model(*batch)
    full = model.attention_entropy()
    model(*batch)
    stages = [s.last_entropy.item() for cnn in (model.audio_cnn, model.visual_cnn) for s in cnn.stages]
    target = sorted(stages)[len(stages) // 2]
    hinged = model.attention_entropy(target=target)
    assert 0.0 < hinged.item() < full.item()
    model(*batch)
    assert model.attention_entropy(target=1.0).item() == 0.0
    model(*batch)  # a floor above every stage's entropy: the mean shortfall below it
    stages = [s.last_entropy.item() for cnn in (model.audio_cnn, model.visual_cnn) for s in cnn.stages]
    floored = model.attention_entropy(target=1.0, floor=1.0)
    per_modality = [sum(1.0 - e for e in stages[i * 3:(i + 1) * 3]) / 3 for i in range(2)]
    assert floored.item() == pytest.approx(sum(per_modality) / 2, rel=1e-5)


def _sparse_with_null_guide(value: float) -> tuple[MME2ESparse, torch.Tensor]:
    """A tiny sparse model whose no-text query is all ``value``, and 64 random text CLS rows."""
    torch.manual_seed(0)
    model = build_model(preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB))
    with torch.no_grad():
        model.null_guide.fill_(value)
    return model, torch.randn(64, model.dims.text_hidden)


def test_guide_dropout_swaps_in_the_null_guide_in_training_only():
    model, text_cls = _sparse_with_null_guide(7.0)
    present = torch.ones(64, dtype=torch.bool)
    model.guide_dropout = 0.5
    model.train()
    guide = model.text_guide(text_cls, present)
    dropped = (guide == 7.0).all(1)
    assert 10 < int(dropped.sum()) < 54  # about half, per sample
    assert torch.equal(guide[~dropped], text_cls[~dropped])
    model.eval()
    assert torch.equal(model.text_guide(text_cls, present), text_cls)


def test_guide_shuffle_hands_a_sample_its_neighbours_guide_in_training_only():
    model, text_cls = _sparse_with_null_guide(7.0)
    present = torch.arange(64) % 4 != 0  # every fourth sample without text
    expected = torch.where(present[:, None], text_cls, torch.full_like(text_cls, 7.0))
    model.guide_shuffle = 0.5
    model.train()
    guide = model.text_guide(text_cls, present)
    own = (guide == expected).all(1)
    neighbour = (guide == expected.roll(1, 0)).all(1)
    assert bool((own | neighbour).all())
    assert 10 < int((neighbour & ~own).sum()) < 54  # about half, per sample
    model.eval()
    assert torch.equal(model.text_guide(text_cls, present), expected)


def test_learned_sparse_guide_ignores_the_transcript():
    """sparse_guide = "learned": the stages' attention is queried by the learned query
    alone, so the kept sites and the audio/visual branches do not change with the
    transcript, while the text branch still reads it."""
    torch.manual_seed(0)
    dims = dataclasses.replace(preset_dims("tiny", "mme2e_sparse", N_PERSONS, text_vocab=VOCAB), sparse_guide="learned")
    model = build_model(dims).eval()
    batch = make_batch([(3, 2, 4), (2, 3, 5)], seed=3)
    other = make_batch([(3, 2, 4), (2, 3, 5)], seed=4)
    tokens_at = [i for i, t in enumerate(batch) if t.dtype == torch.long]
    swapped = list(batch)
    for i in tokens_at:
        swapped[i] = other[i]
    with torch.no_grad():
        a, b = model(*batch), model(*swapped)
    assert torch.equal(a.modality_logits[:, 1:], b.modality_logits[:, 1:])  # audio, visual
    assert not torch.equal(a.modality_logits[:, 0], b.modality_logits[:, 0])  # text
    text_guided = build_model(dataclasses.replace(dims, sparse_guide="text"))
    text_guided.load_state_dict(model.state_dict())
    with torch.no_grad():
        c, d = text_guided.eval()(*batch), text_guided(*swapped)
    assert not torch.equal(c.modality_logits[:, 1:], d.modality_logits[:, 1:])  # the paper's guide reads it
    with pytest.raises(ValueError, match="sparse_guide"):
        dataclasses.replace(dims, sparse_guide="words")
