"""The jukebox encoder on a tiny random-init model of Jukebox's architecture, written in the release's
checkpoint format: the same loading, conditioning, layer cut and pooling code the real weights use."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from pipeline.encoders import jukebox as jb
from pipeline.runner import StageConfigError

TINY = jb.JUKEBOX_TINY
SR = 44_100


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("jukebox-tiny")
    jb.write_random_weights(directory, TINY, seed=0)
    return directory


def tiny_options(weights_dir, **overrides):
    return jb.check_options({"weights_dir": str(weights_dir), "architecture": "tiny", "layer": 3, **overrides})


@pytest.fixture(scope="module")
def encoder(weights_dir):
    return jb.build(tiny_options(weights_dir))


def music(seconds, seed=0):
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * 220 * t * (1 + t)) * np.sin(2 * np.pi * 0.7 * t)
    return (0.5 * tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_the_5b_architecture_is_jukebox_infers():
    from jukebox_infer.hparams import setup_hparams

    vq, prior = setup_hparams("vqvae", {}), setup_hparams("prior_5b", {})
    a = jb.JUKEBOX_5B
    assert (a.vq_levels, a.vq_downs_t, a.vq_strides_t) == (vq.levels, vq.downs_t, vq.strides_t)
    assert (a.vq_emb_width, a.vq_bins, a.vq_width, a.vq_depth) == (vq.emb_width, vq.l_bins, vq.width, vq.depth)
    assert (a.vq_multipliers, a.vq_dilation_growth_rate, a.vq_dilation_cycle) == (
        vq.hvqvae_multipliers, vq.dilation_growth_rate, vq.dilation_cycle)
    assert (a.n_ctx, a.width, a.depth, a.heads, a.attn_order, a.blocks) == (
        prior.n_ctx, prior.prior_width, prior.prior_depth, prior.heads, prior.attn_order, prior.blocks)
    assert (a.init_scale, a.m_attn, a.m_mlp, a.res_scale, a.fp16_params) == (
        prior.init_scale, prior.m_attn, prior.m_mlp, prior.res_scale, prior.fp16_params)
    assert (a.y_bins, a.t_bins, a.max_bow_genre_size, a.min_duration_s, a.max_duration_s) == (
        prior.y_bins, prior.t_bins, prior.max_bow_genre_size, prior.min_duration, prior.max_duration)
    assert prior.use_tokens is False and prior.level == 2 and a.hop_length == 128
    assert prior.restore_prior.endswith("5b/" + jb.PRIOR_FILE) and vq.restore_vqvae.endswith("5b/" + jb.VQVAE_FILE)


def test_layer_cut_equals_jukebox_infers_own_forward_pass(weights_dir, encoder, monkeypatch):
    """Tokens, conditioning and block-3 activations match SimplePrior's forward on the same weights."""
    layer = 3
    vqvae, prior = jb.build_reference_models(dataclasses.replace(TINY, depth=layer))
    vq_state = jb.load_state_dict_file(weights_dir / jb.VQVAE_FILE)
    prior_state = jb.load_state_dict_file(weights_dir / jb.PRIOR_FILE)
    vqvae.load_state_dict(vq_state)
    unexpected = prior.load_state_dict(prior_state, strict=False).unexpected_keys
    assert unexpected and all(".3." in k or "x_out" in k for k in unexpected)  # layer 4 and the output head
    prior.float()
    # The package's prior asserts CUDA tensor types; on CPU, let its checks accept CPU tensors.
    monkeypatch.setattr(torch.cuda, "LongTensor", torch.LongTensor)

    audio = jb.prepare_audio(music(TINY.n_ctx * 128 / SR + 0.05), SR)
    with torch.no_grad():
        reference_tokens = vqvae.encode(torch.from_numpy(audio).view(1, -1, 1))[-1][0]
        tokens = encoder.model.tokens(torch.from_numpy(audio))
        assert torch.equal(tokens, reference_tokens) and len(torch.unique(tokens)) > 3
        total = int(62 * SR) // 128 * 128
        y = torch.tensor([[total, 0, TINY.n_ctx * 128, 0, 0, -1, -1, -1, -1]])
        x_cond, y_cond, _ = prior.get_cond(None, y)
        _, reference = prior.prior.forward(tokens[None, : TINY.n_ctx], x_cond, y_cond, get_acts=True)
        ours = encoder.model.window_activations(tokens[None, : TINY.n_ctx], [0], [total], torch.float32)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)


def test_only_the_needed_layers_are_built_and_loaded(weights_dir, encoder):
    model = encoder.model
    assert len(model.prior.transformer._attn_mods) == 3
    assert not hasattr(model.prior, "x_out") and not hasattr(model, "decoders")
    names = set(model.state_dict())
    assert not any("_attn_mods.3." in n for n in names)
    prior_state = jb.load_state_dict_file(weights_dir / jb.PRIOR_FILE)
    vq_state = jb.load_state_dict_file(weights_dir / jb.VQVAE_FILE)
    selected = jb.select_layer_cut_weights(vq_state, prior_state, TINY, 3)
    assert set(selected) == names
    assert sum(v.numel() for v in selected.values()) < 0.5 * sum(
        v.numel() for v in list(prior_state.values()) + list(vq_state.values()))
    # The release stores the transformer matrices in float16; the CPU path computes in float32.
    assert prior_state["prior.transformer._attn_mods.0.mlp.c_fc.w"].dtype == torch.float16
    assert model.prior.transformer._attn_mods[0].mlp.c_fc.w.dtype == torch.float32


def test_a_checkpoint_with_fewer_layers_than_asked_is_refused(weights_dir):
    deeper = dataclasses.asdict(dataclasses.replace(TINY, depth=6))
    options = jb.check_options({"weights_dir": str(weights_dir), "architecture": deeper, "layer": 5})
    with pytest.raises(jb.JukeboxWeightsError, match="holds 4 transformer layers"):
        jb.build(options)
    with pytest.raises(StageConfigError, match="--layer"):
        tiny_options(weights_dir, layer=5)


def test_shapes_pooling_and_frame_count(encoder):
    """A clip inside one context window: each 10 Hz frame is the mean of its tokens' activations."""
    audio = music(0.33)
    out = encoder.encode(audio, SR)
    n_tokens = len(audio) // 128
    assert out.shape == (int(jb.token_frames(n_tokens - 1, 128)) + 1, TINY.width) == (4, 32)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    with torch.no_grad():
        tokens = encoder.model.tokens(torch.from_numpy(jb.prepare_audio(audio, SR)))
        padded = torch.zeros(1, 128, dtype=torch.long)
        padded[0, :n_tokens] = tokens
        acts = encoder.model.window_activations(padded, [0], [int(62 * SR) // 128 * 128], torch.float32)[0].numpy()
    frames = jb.token_frames(np.arange(n_tokens), 128)
    expected = np.stack([acts[:n_tokens][frames == k].mean(axis=0) for k in range(4)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # 34 or 35 tokens per frame: 100 ms at 344.5 tokens per second
    assert set(np.bincount(jb.token_frames(np.arange(8613), 128)).tolist()) == {34, 35}


def test_a_25_second_clip_gives_250_frames_and_truncate_keeps_the_first_context():
    assert jb.plan_windows(8613, 8192) == [jb.Window(0, 8192, 0, 8192), jb.Window(421, 8192, 8192, 8613)]
    assert jb.plan_windows(8613, 8192, "truncate") == [jb.Window(0, 8192, 0, 8192)]
    assert jb.plan_windows(100, 8192) == [jb.Window(0, 100, 0, 100)]
    windows = jb.plan_windows(20000, 8192)
    kept = np.concatenate([np.arange(w.keep_from, w.keep_to) for w in windows])
    assert np.array_equal(kept, np.arange(20000)) and all(w.length == 8192 for w in windows)
    assert int(jb.token_frames(8613 - 1, 128)) + 1 == 250  # 25 s at 44.1 kHz
    assert int(jb.token_frames(8192 - 1, 128)) + 1 == 238  # the first context window alone


def test_cover_encodes_every_frame_of_a_clip_longer_than_the_context(weights_dir, encoder):
    audio = music(1.0)  # 344 tokens: windows of 128 tokens, the last aligned to the end
    covered = encoder.encode(audio, SR)
    truncated = jb.build(tiny_options(weights_dir, context="truncate")).encode(audio, SR)
    assert covered.shape == (10, 32) and truncated.shape == (int(jb.token_frames(127, 128)) + 1, 32)
    np.testing.assert_allclose(covered[:3], truncated[:3], rtol=1e-5, atol=1e-6)  # frames inside window 1


def test_padding_a_window_does_not_change_the_tokens_before_it(encoder):
    """The prior is causal, so a short window padded to the block size keeps its real positions exact."""
    tokens = torch.randint(0, TINY.vq_bins, (1, 128))
    with torch.no_grad():
        full = encoder.model.window_activations(tokens, [0], [2734080], torch.float32)
        prefix = encoder.model.window_activations(tokens[:, :64], [0], [2734080], torch.float32)
    np.testing.assert_allclose(prefix[0].numpy(), full[0, :64].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(full[0, 64:].numpy(), 0)


def test_deterministic_and_independent_of_the_batch(encoder):
    a, b = music(0.8, seed=1), music(0.5, seed=2)
    first = encoder.encode(a, SR)
    assert np.array_equal(first, encoder.encode(a, SR))
    batched = encoder.encode_batch([(a, SR), (b, SR)])
    np.testing.assert_allclose(batched[0], first, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1], encoder.encode(b, SR), rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0][:2], batched[1][:2])


def test_the_layer_cut_decides_the_output(weights_dir, encoder):
    audio = music(0.4)
    other = jb.build(tiny_options(weights_dir, layer=2)).encode(audio, SR)
    assert other.shape == encoder.encode(audio, SR).shape
    assert not np.allclose(other, encoder.encode(audio, SR), atol=1e-3)


def test_half_precision_path_runs_the_same_modules(weights_dir, encoder):
    """The GPU path's precision handling (transformer matrices in 16 bits, the rest float32), on CPU."""
    half = jb.build(tiny_options(weights_dir, compute_dtype="bfloat16"))
    block = half.model.prior.transformer._attn_mods[0]
    assert block.mlp.c_fc.w.dtype == torch.bfloat16 and block.ln_0.weight.dtype == torch.float32
    assert half.model.prior.x_emb.weight.dtype == torch.float32
    audio = music(0.4)
    out, reference = half.encode(audio, SR), encoder.encode(audio, SR)
    assert out.dtype == np.float32
    assert np.abs(out - reference).max() < 0.05 * np.abs(reference).max()


def test_missing_weights_stop_before_any_work_naming_the_files(tmp_path):
    with pytest.raises(StageConfigError) as exc:
        jb.check_options({"weights_dir": str(tmp_path)})
    message = str(exc.value)
    assert "--weights-dir" in message and str(tmp_path) in message
    assert jb.VQVAE_FILE in message and jb.PRIOR_FILE in message
    (tmp_path / jb.VQVAE_FILE).write_bytes(b"x")
    with pytest.raises(StageConfigError) as exc:
        jb.check_options({"weights_dir": str(tmp_path)})
    assert jb.PRIOR_FILE in str(exc.value) and f"lacks {jb.VQVAE_FILE}" not in str(exc.value)


class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_checkpoints_that_would_run_code_are_refused(tmp_path, weights_dir):
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, tmp_path / "bad.pth.tar")
    with pytest.raises(jb.JukeboxWeightsError, match="refusing to unpickle"):
        jb.load_state_dict_file(tmp_path / "bad.pth.tar")
    (tmp_path / "junk.pth.tar").write_bytes(pickle.dumps([1, 2]) + b"garbage")
    with pytest.raises(jb.JukeboxWeightsError):
        jb.load_state_dict_file(tmp_path / "junk.pth.tar")
    # the release's own format (legacy serialisation, numpy scalars in hps) loads
    assert "prior.x_emb.weight" in jb.load_state_dict_file(weights_dir / jb.PRIOR_FILE)


def test_gpu_memory_estimate_for_the_36_layer_cut():
    estimate = jb.estimate_gpu_memory(jb.JUKEBOX_5B, 36, compute_bytes=2)
    per_layer = 4800 * 3600 + 1200 * 4800 + 2 * 4800 * 4800  # attention and MLP matrices
    assert estimate["transformer_weights"] == 36 * per_layer * 2
    assert 4.9e9 < estimate["transformer_weights"] < 5.1e9
    assert 2.5e8 < estimate["float32_weights"] < 4e8
    assert 5e8 < estimate["activations_per_window"] < 3e9
    assert estimate["total"] < 9e9


def test_device_and_precision_defaults():
    assert jb.resolve_compute_dtype("auto", "cuda:0") == "float16"
    assert jb.resolve_compute_dtype("auto", "cpu") == "float32"
    assert jb.resolve_compute_dtype("bfloat16", "cuda") == "bfloat16"
    if not torch.cuda.is_available():
        assert jb.resolve_device("auto") == "cpu"


def test_devices_of_remote_workers_are_not_checked_here(weights_dir):
    with pytest.raises(StageConfigError, match="--device"):
        jb.check_options({"weights_dir": str(weights_dir), "architecture": "tiny", "layer": 3}, devices_here=False)
    remote = jb.check_options({"weights_dir": str(weights_dir), "architecture": "tiny", "layer": 3, "device": "cuda"},
                              devices_here=False)
    assert (remote["device"], remote["compute_dtype"]) == ("cuda", "float16")
    with pytest.raises(StageConfigError, match="--device"):
        jb.check_options({"weights_dir": str(weights_dir), "architecture": "tiny", "layer": 3, "device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(StageConfigError, match="CUDA is not available"):
            jb.check_options({"weights_dir": str(weights_dir), "architecture": "tiny", "layer": 3, "device": "cuda"})


def test_windows_of_equal_length_share_forward_passes_and_batching_changes_no_bit(encoder, monkeypatch):
    """Clips shorter than the context have one short window, padded to the attention block (16 tokens
    here); such windows are stacked only with windows of the same padded length."""
    clips = [music(s, seed=k) for k, s in enumerate([0.8, 0.1, 0.25, 0.5, 0.12, 0.33])]
    alone = [encoder.encode(clip, SR) for clip in clips]
    shapes = []
    real = encoder.model.window_activations

    def recording(tokens, *args):
        shapes.append(tuple(tokens.shape))
        return real(tokens, *args)

    monkeypatch.setattr(encoder.model, "window_activations", recording)
    for batch_windows in (1, 3, 8):
        monkeypatch.setattr(encoder, "batch_windows", batch_windows)
        shapes.clear()
        batched = encoder.encode_batch([(clip, SR) for clip in clips])
        assert all(np.array_equal(a, b) for a, b in zip(alone, batched))
        assert all(rows <= batch_windows for rows, _ in shapes)
        # windows: 0.8 s -> 3 of 128 tokens; 0.1 s -> 34 (48); 0.25 s -> 86 (96); 0.5 s -> 2 of 128;
        # 0.12 s -> 41 (48); 0.33 s -> 113 (128)
        per_length = {}
        for rows, length in shapes:
            per_length[length] = per_length.get(length, 0) + rows
        assert per_length == {128: 6, 96: 1, 48: 2}
        assert len(shapes) == sum(-(-n // batch_windows) for n in per_length.values())
