"""
Tests that pin blurdm.py to the paper (BLURDM.md): schedule values, the physics of blur formation, the forward and
reverse processes, the architectures' parameter counts, inference at any size, training, checkpoints and metrics.
Run: python -m pytest -q test_blurdm.py
"""

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blurdm
from blurdm import BlurDM, BlurDMConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))
ASSETS = Path(__file__).parent / "assets"


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BlurDM(BlurDMConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def photo():
    """A real photograph (a crop of KDE's "Evening Glow" by Ian Hex, see README), (1, 3, 192, 256) in [0, 1]."""
    return blurdm.read_image(ASSETS / "photo_crop.png")[None]


def exposure_sequence(sharp, seed=0, length=12.0, rotation=2.0, zoom=0.02):
    cfg = BlurDMConfig()
    alpha, _, _ = blurdm.blur_schedule(cfg.T, cfg.alpha_start, cfg.alpha_end, cfg.beta_start, cfg.beta_end)
    path = blurdm.camera_shake(40, length, rotation, zoom, generator=torch.Generator().manual_seed(seed))
    B, e = blurdm.render_exposures(sharp.double(), path, alpha)
    return alpha, B, e


# ------------------------------------------------------------------------------------------------ schedule (§2)


def test_schedule_alpha_runs_1_to_2_and_beta_bar_follows_the_per_step_rule():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    assert torch.allclose(d.alpha, torch.tensor([1.0, 1.2, 1.4, 1.6, 1.8, 2.0]))
    assert torch.allclose(d.beta, torch.tensor([0.0, 0.0, 0.005, 0.01, 0.015, 0.02]))
    assert torch.allclose(d.beta_bar, torch.tensor([0.0, 0.0, 0.005, 0.010915, 0.017864, 0.025661]), atol=1e-6)


def test_official_beta_bar_rule_reproduces_the_official_code():
    _, _, beta_bar = blurdm.blur_schedule(5, 1.0, 2.0, 0.0, 0.02, rule="official")
    expected = torch.tensor([0.0, 0.0, 0.060609, 0.102317, 0.141857, 0.180278], dtype=torch.float64)
    assert torch.allclose(beta_bar, expected, atol=1e-6)


def test_reverse_step_coefficients_match_the_official_code():
    alpha = blurdm.BlurDiffusion(BlurDMConfig()).alpha.double()
    t = torch.arange(5, 0, -1)
    assert torch.allclose(alpha[t] / alpha[t - 1], torch.tensor([1.1111, 1.125, 1.1429, 1.1667, 1.2]).double(), atol=1e-4)
    assert torch.allclose(1 / alpha[t - 1], torch.tensor([0.5556, 0.625, 0.7143, 0.8333, 1.0]).double(), atol=1e-4)


def test_timesteps_are_1_to_T_and_the_chain_visits_T_down_to_1():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    seen = []

    def estimator(x_t, t_frac, c):
        seen.append(round(t_frac[0, 0].item() * d.T))
        return torch.zeros_like(x_t)

    d.p_sample_loop(torch.zeros(2, 4), torch.zeros(2, 4), estimator, lambda x, t, c: torch.zeros_like(x))
    assert seen == [5, 4, 3, 2, 1]
    assert len(d.alpha) == len(d.beta_bar) == d.T + 1 and d.beta_bar[0] == 0


def test_alpha_starting_at_zero_is_refused():
    with pytest.raises(ValueError, match="divides"):
        BlurDMConfig(alpha_start=0.0)


# ------------------------------------------------------------------------------------------ blur formation (§1)


def test_exposures_accumulate_blur_residuals_exactly():
    alpha, B, e = exposure_sequence(torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1)))
    assert B.shape == e.shape == (6, 2, 3, 24, 32)
    for t in range(1, 6):  # α_t B_t = α_{t-1} B_{t-1} + e_t
        assert torch.allclose(alpha[t] * B[t], alpha[t - 1] * B[t - 1] + e[t], atol=1e-12)
    assert e[0].abs().max() == 0 and all(e[t].abs().max() > 0 for t in range(1, 6))


def test_still_camera_gives_every_exposure_equal_to_the_sharp_image():
    sharp = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    path = torch.zeros(40, 4, dtype=torch.float64)
    B, _ = blurdm.render_exposures(sharp, path, torch.linspace(1, 2, 6))
    for t in range(6):
        assert torch.allclose(blurdm.linear_to_srgb(B[t]), sharp, atol=1e-9)


def test_the_middle_subframe_is_the_sharp_image():
    path = blurdm.camera_shake(40, 25.0, 3.0, 0.03, generator=torch.Generator().manual_seed(3))
    assert torch.equal(path[20], torch.zeros(4, dtype=torch.float64))
    travelled = (path[1:, :2] - path[:-1, :2]).norm(dim=1).sum()
    assert travelled == pytest.approx(25.0)


def high_frequency_energy(x):
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def test_blur_removes_high_frequency_energy_and_grows_with_exposure(photo):
    _, B, _ = exposure_sequence(photo, length=20.0)
    energy = [high_frequency_energy(B[t]).item() for t in range(6)]
    assert energy[5] < 0.5 * high_frequency_energy(blurdm.srgb_to_linear(photo.double())).item()
    assert energy[5] < energy[0]  # B_0 (half the path) is already mildly blurred, B_T more so


def test_synthetic_pair_is_blurred_8bit_and_deterministic(photo):
    g = lambda: torch.Generator().manual_seed(7)
    blurry = blurdm.synthesize_blur(photo[0], generator=g(), length=(15.0, 15.0))
    assert blurry.shape == photo[0].shape
    assert torch.equal(blurry, blurdm.synthesize_blur(photo[0], generator=g(), length=(15.0, 15.0)))
    assert torch.equal(blurry * 255, (blurry * 255).round())
    assert high_frequency_energy(blurry) < 0.6 * high_frequency_energy(photo[0])
    assert blurdm.psnr(blurdm.to_uint8(blurry), blurdm.to_uint8(photo[0])) < 30


# --------------------------------------------------------------------------------------- forward process (§2)


def test_closed_form_matches_iterated_forward_steps_in_mean_and_variance():
    d = blurdm.BlurDiffusion(BlurDMConfig()).double()
    sharp = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    alpha, B, e = exposure_sequence(sharp, length=6.0)
    g = torch.Generator().manual_seed(5)
    draws = 20000
    x = B[0].expand(draws, -1, -1, -1)  # I_0 = the sharp state
    for t in range(1, 6):
        x = d.q_step(x, t, e[t], torch.randn(x.shape, generator=g, dtype=torch.float64))
        mean_error = (x.mean(0) - B[t][0]).abs().max().item()
        assert mean_error < 5 * d.beta_bar[t].item() / math.sqrt(draws) + 1e-6  # 1e-6: the float32 schedule
        assert x.std(0).mean().item() == pytest.approx(d.beta_bar[t].item(), rel=0.02, abs=1e-12)


def test_chain_ends_at_blurred_plus_noise():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    B_T, eps = torch.rand(3, 5), torch.randn(3, 5)
    assert torch.allclose(d.q_sample(B_T, 5, eps), B_T + 0.025661 * eps, atol=1e-6)


# --------------------------------------------------------------------------------------- reverse process (§3)


def test_reverse_chain_with_true_residuals_returns_the_sharp_image_exactly(photo):
    d = blurdm.BlurDiffusion(BlurDMConfig()).double()
    _, B, e = exposure_sequence(photo)
    eps = torch.randn(B[0].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x_T = d.q_sample(B[5], 5, eps)
    step = {"t": 5}

    def true_blur_residual(x_t, t_frac, c):
        t = round(t_frac[0, 0].item() * 5)
        assert t == step["t"]
        step["t"] -= 1
        return e[t]

    x_0 = d.p_sample_loop(x_T, None, true_blur_residual, lambda x, t, c: eps)
    assert torch.allclose(x_0, B[0], atol=1e-12)
    assert (x_T - B[0]).abs().max() > 0.05  # and the start point was far from it


def test_one_reverse_step_inverts_one_forward_step(photo):
    d = blurdm.BlurDiffusion(BlurDMConfig()).double()
    _, B, e = exposure_sequence(photo)
    eps = torch.randn(B[0].shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for t in range(1, 6):
        x_t = d.q_sample(B[t], t, eps)
        assert torch.allclose(d.p_sample(x_t, t, e[t], eps), d.q_sample(B[t - 1], t - 1, eps), atol=1e-6)  # float32 α


# ------------------------------------------------------------------------------------- architectures (§4-5)


def test_paper_preset_parameter_counts_match_the_official_code():
    model = BlurDM(BlurDMConfig.preset("paper"))
    assert n_params(model.sharp_encoder) == 1_148_224
    assert n_params(model.blur_encoder) == 1_146_688
    assert n_params(model.blur_estimator) == n_params(model.noise_estimator) == 460_544
    assert n_params(model.blur_encoder) + 2 * n_params(model.blur_estimator) == 2_067_776
    assert n_params(model.deblurrer.prior_fusion) == 114_688
    assert n_params(model.deblurrer) == 16_107_651 + 114_688


def test_backbones_without_prior_match_mimo_unet_and_mimo_unet_plus():
    assert n_params(BlurDM(BlurDMConfig.preset("paper", prior=False))) == 16_107_651  # MIMO-UNet+
    assert n_params(BlurDM(BlurDMConfig.preset("mimo-unet", prior=False))) == 6_807_171  # MIMO-UNet
    assert isinstance(BlurDM(BlurDMConfig.preset("paper")).deblurrer.dropout, torch.nn.Dropout2d)


def test_feature_fusion_equals_mixing_the_concatenated_resampled_scales():
    """AFF mixes each scale before resampling (cheaper); it must equal MIMO-UNet's conv(concat(resampled))."""
    fusion = blurdm.FeatureFusion((4, 8, 16), 8)
    g = torch.Generator().manual_seed(13)
    f1, f2, f3 = (torch.randn(2, c, 4 * s, 5 * s, generator=g) for c, s in ((4, 4), (8, 2), (16, 1)))
    half = lambda t: F.interpolate(t, scale_factor=0.5)
    double = lambda t: F.interpolate(t, scale_factor=2.0)
    for size, resampled in (((16, 20), (f1, double(f2), double(double(f3)))), ((8, 10), (half(f1), f2, double(f3)))):
        reference = fusion.out(F.relu(fusion.mix(torch.cat(resampled, 1))))
        assert torch.allclose(fusion((f1, f2, f3), size), reference, atol=1e-5)


def test_sharp_encoder_has_batchnorm_and_blur_encoder_does_not():
    model = BlurDM(BlurDMConfig.preset("tiny"))
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert has_bn(model.sharp_encoder) and not has_bn(model.blur_encoder)


def test_prior_fusion_is_scale_and_shift_without_plus_one():
    pfm = blurdm.PriorFusion(4, 2)
    with torch.no_grad():
        pfm.to_scale_shift.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    x, prior = torch.ones(1, 2, 3, 3), torch.tensor([[2.0, 3.0, 0.5, -1.0]])
    out = pfm(x, prior)
    assert torch.allclose(out[0, 0], torch.full((3, 3), 2.5)) and torch.allclose(out[0, 1], torch.full((3, 3), 2.0))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="paper, mimo-unet, demo, tiny"):
        BlurDMConfig.preset("huge")


# ------------------------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (1, 3, 5, 7), (2, 3, 1, 1), (1, 3, 64, 64)])
def test_deblur_returns_the_input_size_in_range(tiny, shape):
    out = tiny.deblur(torch.rand(*shape))
    assert out.shape == shape and out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_a_batch_gives_the_same_result_as_one_image_at_a_time(tiny):
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(9))
    together = tiny.deblur(images)
    apart = torch.cat([tiny.deblur(images[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, apart, atol=1e-5)


def test_deblur_is_deterministic_given_the_seed_and_leaves_the_model_mode(tiny):
    x = torch.rand(1, 3, 32, 32)
    tiny.train()
    assert torch.equal(tiny.deblur(x, seed=1), tiny.deblur(x, seed=1))
    assert tiny.training
    tiny.set_stage(2)
    tiny.deblur(x)
    assert tiny.blur_encoder.training and not tiny.sharp_encoder.training  # validation keeps SE frozen
    tiny.eval()
    prior = tiny.prior_for(x, seed=1)
    assert prior.shape == (1, 32)
    assert torch.equal(tiny.deblur(x, prior=prior), tiny.deblur(x, seed=1))


# ------------------------------------------------------------------------------------------------ training (§6)


def test_stage_1_loss_falls_when_overfitting_one_pair(photo):
    torch.manual_seed(0)
    model = BlurDM(BlurDMConfig.preset("tiny"))
    sharp = photo[..., 64:128, 96:160]
    blurry = blurdm.synthesize_blur(sharp[0], generator=torch.Generator().manual_seed(0))[None]
    half = lambda x: F.interpolate(x, scale_factor=0.5)
    copy_input_loss = blurdm.deblur_loss([half(half(blurry)), half(blurry), blurry], sharp, model.cfg).item()
    optimizer = torch.optim.Adam(model.set_stage(1), lr=5e-3)
    losses = []
    for _ in range(50):
        loss = model.loss(blurry, sharp, stage=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-5:]) / 5
    assert final < 0.65 * losses[0] and final < 0.75 * copy_input_loss  # better than returning the blurry input


def test_each_stage_trains_only_its_own_parts():
    model = BlurDM(BlurDMConfig.preset("tiny"))
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    trained = {1: {"sharp_encoder", "deblurrer"}, 2: {"blur_encoder", "blur_estimator", "noise_estimator"},
               3: {"blur_encoder", "blur_estimator", "noise_estimator", "deblurrer"}}
    for stage, parts in trained.items():
        model.zero_grad(set_to_none=True)
        params = model.set_stage(stage)
        model.loss(blur, sharp, stage).backward()
        with_grad = {name for name, m in model.named_children()
                     if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())}
        assert with_grad == parts, stage
        assert len(params) == sum(1 for name, m in model.named_children() if name in parts for _ in m.parameters())
    model.set_stage(2)
    assert not model.sharp_encoder.training and model.blur_encoder.training  # SE frozen with its BN statistics


def test_stage_2_returns_the_chain_prior_and_the_sharp_encoder_target():
    model = BlurDM(BlurDMConfig.preset("tiny"))
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    model.set_stage(2)
    torch.manual_seed(0)  # the same start noise ε for both calls
    prior, target = model(blur, sharp, stage=2)
    assert prior.shape == target.shape == (2, 32) and prior.requires_grad and not target.requires_grad
    torch.manual_seed(0)
    assert model.loss(blur, sharp, 2).item() == pytest.approx(F.l1_loss(prior, target).item(), rel=1e-6)


def test_deblur_loss_is_charbonnier_plus_a_tenth_of_the_2d_fft_charbonnier():
    cfg = BlurDMConfig()
    g = torch.Generator().manual_seed(10)
    sharp = torch.rand(1, 3, 16, 16, generator=g)
    outputs = [torch.rand(1, 3, s, s, generator=g) * 1.2 - 0.1 for s in (4, 8, 16)]
    # reference in numpy: bilinear targets from torch, 2-D FFT from numpy
    eps = 1e-3
    charb = lambda a, b: np.sqrt((a - b) ** 2 + eps ** 2).mean()
    total = 0.0
    for out, scale in zip(outputs, (0.25, 0.5, 1.0)):
        target = F.interpolate(sharp, scale_factor=scale, mode="bilinear") if scale < 1 else sharp
        o, t = out.clamp(0, 1).double().numpy(), target.double().numpy()
        fo, ft = np.fft.rfft2(o), np.fft.rfft2(t)
        spectral = charb(np.stack([fo.real, fo.imag], -1), np.stack([ft.real, ft.imag], -1))
        total += charb(o, t) + 0.1 * spectral
    assert blurdm.deblur_loss(outputs, sharp, cfg).item() == pytest.approx(total, rel=1e-5)
    perfect = [F.interpolate(sharp, scale_factor=s, mode="bilinear") for s in (0.25, 0.5)] + [sharp]
    assert blurdm.deblur_loss(perfect, sharp, cfg).item() == pytest.approx(3 * eps * 1.1, rel=1e-3)


def test_baseline_without_prior_trains_the_deblurrer_only():
    model = BlurDM(BlurDMConfig.preset("tiny", prior=False))
    assert [name for name, _ in model.named_children()] == ["deblurrer"]
    assert model.deblurrer.prior_fusion is None
    params = model.set_stage(1)
    model.loss(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).backward()
    assert all(p.grad is not None for p in params)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_save_and_from_checkpoint_give_identical_outputs(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    tiny.save(path, step=12)
    assert not list(tmp_path.glob("*.tmp*"))
    loaded = BlurDM.from_checkpoint(path)
    assert loaded.cfg == tiny.cfg and blurdm.load_checkpoint(path)["step"] == 12
    x = torch.rand(1, 3, 24, 40)
    assert torch.equal(loaded.deblur(x), tiny.deblur(x))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "blurdm", "config": {}, "model": RunsCode()}, path)
    with pytest.raises(blurdm.CheckpointError, match="evil.pt: refused"):
        BlurDM.from_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_files_that_are_not_checkpoints_give_one_line_errors(tmp_path, tiny):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    checkpoint = {"format": "blurdm", "config": {"width": 8, "colour": "red"}, "model": {}}
    torch.save(checkpoint, tmp_path / "future.pt")
    cases = {"text.pt": "not a PyTorch checkpoint", "other.pt": "not a BlurDM checkpoint",
             "future.pt": "unknown config fields colour", "missing.pt": "no such checkpoint"}
    for name, message in cases.items():
        with pytest.raises(blurdm.CheckpointError) as err:
            BlurDM.from_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_from_another_config_is_refused(tmp_path, tiny):
    tiny.save(tmp_path / "tiny.pt")
    other = BlurDM(BlurDMConfig.preset("tiny", width=16, beta_bar_rule="official"))
    with pytest.raises(blurdm.CheckpointError, match=r"another config \(width 8 vs 16, beta_bar_rule 'paper' vs"):
        other.load_weights(blurdm.load_checkpoint(tmp_path / "tiny.pt"), tmp_path / "tiny.pt")
    recipe_only = BlurDM(BlurDMConfig.preset("tiny", lr=0.5, crop=32))  # the training recipe may differ
    recipe_only.load_weights(blurdm.load_checkpoint(tmp_path / "tiny.pt"))


def test_fp16_weights_load_into_a_float32_model(tmp_path, tiny):
    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    torch.save({"format": "blurdm", "config": blurdm.asdict(tiny.cfg), "model": state}, tmp_path / "half.pt")
    loaded = BlurDM.from_checkpoint(tmp_path / "half.pt")
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 16, 16)
    assert (loaded.deblur(x) - tiny.deblur(x)).abs().max() < 0.02


# ------------------------------------------------------------------------------------------------ metrics (§8)


def test_identical_images_score_inf_and_one(photo):
    x = blurdm.to_uint8(photo[0])
    assert blurdm.psnr(x, x) == math.inf and blurdm.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_psnr_is_rgb_peak_255_on_rounded_uint8():
    x = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    y = x.clone()
    y[0, 0, 0] = 110  # one error of 10 over 48 values: mse = 100/48
    assert blurdm.psnr(x, y) == pytest.approx(10 * math.log10(255 ** 2 * 48 / 100))
    assert torch.equal(blurdm.to_uint8(torch.tensor([0.0, 0.6 / 255, 0.499, 1.2, -1.0])),
                       torch.tensor([0, 1, 127, 255, 0], dtype=torch.uint8))


def ssim3d_reference(x, y):
    """A direct float64 transcription of BLURDM.md §8: one 11x11x11 kernel, replicate padding, full average."""
    r = np.arange(11) - 5
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    kernel = torch.from_numpy(np.einsum("i,j,k->ijk", g, g, g))[None, None]  # (1, 1, 11, 11, 11)
    hwc = lambda v: v.permute(1, 2, 0).double()[None, None]  # an H x W x C volume of floats in [0, 255]
    filt = lambda v: F.conv3d(F.pad(v, (5,) * 6, mode="replicate"), kernel)
    a, b = hwc(x), hwc(y)
    mu_a, mu_b = filt(a), filt(b)
    s_aa, s_bb, s_ab = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2, filt(a * b) - mu_a * mu_b
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = (2 * mu_a * mu_b + C1) * (2 * s_ab + C2) / ((mu_a ** 2 + mu_b ** 2 + C1) * (s_aa + s_bb + C2))
    assert ssim_map.shape[2:] == a.shape[2:]  # 'same' output: every voxel, the 3 channels included
    return ssim_map.mean().item()


def test_3d_ssim_agrees_with_a_direct_float64_reference_on_a_real_photo(photo):
    sharp = blurdm.to_uint8(photo[0])
    blurry = blurdm.to_uint8(blurdm.synthesize_blur(photo[0], generator=torch.Generator().manual_seed(11)))
    value = blurdm.ssim(sharp, blurry)
    assert value == pytest.approx(ssim3d_reference(sharp, blurry), abs=1e-10)
    assert 0.2 < value < 0.95
    assert value == pytest.approx(blurdm.ssim(blurry, sharp), abs=1e-12)


def test_3d_ssim_differs_from_the_per_channel_average(photo):
    """The 3-D window mixes colour channels, so it is a different number from per-channel SSIM (never mix them)."""
    sharp = blurdm.to_uint8(photo[0])
    noisy = blurdm.to_uint8(photo[0] + 0.1 * torch.randn(photo[0].shape, generator=torch.Generator().manual_seed(12)))
    per_channel = np.mean([blurdm.ssim(sharp[c:c + 1].expand(3, -1, -1), noisy[c:c + 1].expand(3, -1, -1))
                           for c in range(3)])
    assert abs(blurdm.ssim(sharp, noisy) - per_channel) > 1e-3


# ------------------------------------------------------------------------------------------------ image files


def test_read_image_converts_modes_and_names_bad_files(tmp_path):
    from PIL import Image

    gray16 = np.full((5, 6), 65535 // 2, dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    x = blurdm.read_image(tmp_path / "gray16.png")
    assert x.shape == (3, 5, 6) and x.max().item() == pytest.approx(0.5, abs=1e-4)
    Image.new("RGBA", (4, 3), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    rgb, alpha = blurdm.read_image(tmp_path / "rgba.png", with_alpha=True)
    assert rgb.shape == (3, 3, 4) and alpha.shape == (1, 3, 4) and alpha.max().item() == pytest.approx(128 / 255)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("empty.png", "notes.png", "missing.png"):
        with pytest.raises(ValueError, match=name):
            blurdm.read_image(tmp_path / name)
    blurdm.write_image(rgb, tmp_path / "out.png", alpha)
    back, back_alpha = blurdm.read_image(tmp_path / "out.png", with_alpha=True)
    assert torch.equal(blurdm.to_uint8(back), blurdm.to_uint8(rgb)) and torch.allclose(back_alpha, alpha)
