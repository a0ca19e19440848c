"""BlurDM's specification as tests: blurdm.py's Part I in METHOD.md's order, the original code's
outputs, Part II, train.py, sample.py, the safety floor, the README; helpers last. Run: pytest -q"""

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageCms

import blurdm
import sample
import train
from blurdm import BlurDM, BlurDMConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parent
ASSETS = REPO / "assets"
FAST = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--workers", "0", "--val-crop", "32",
        "--log-every", "1", "--device", "cpu", "--amp", "fp32"]  # values compared: CPU, fp32

# Part I, the method, in METHOD.md's order =========================================================
# §1 blur formation -------------------------------------------------------------------------------

def test_exposures_accumulate_blur_residuals_exactly():
    alpha, B, e = exposure_sequence(torch.rand(2, 3, 24, 32, generator=seeded(1)))
    assert B.shape == e.shape == (6, 2, 3, 24, 32)
    for t in range(1, 6):  # α_t B_t = α_{t-1} B_{t-1} + e_t
        assert torch.allclose(alpha[t] * B[t], alpha[t - 1] * B[t - 1] + e[t], atol=1e-12)
    assert e[0].abs().max() == 0 and all(e[t].abs().max() > 0 for t in range(1, 6))

def test_still_camera_gives_every_exposure_equal_to_the_sharp_image():
    sharp = torch.rand(1, 3, 16, 20, generator=seeded(2), dtype=torch.float64)
    path = torch.zeros(40, 4, dtype=torch.float64)
    B, _ = blurdm.render_exposures(sharp, path, torch.linspace(1, 2, 6))
    for t in range(6):
        assert torch.allclose(blurdm.linear_to_srgb(B[t]), sharp, atol=1e-9)

def test_the_middle_subframe_is_the_sharp_image_and_the_camera_moves_at_constant_speed():
    path = blurdm.camera_shake(41, 25.0, 3.0, 0.03, generator=seeded(3))
    assert torch.equal(path[20], torch.zeros(4, dtype=torch.float64))
    steps = (path[1:, :2] - path[:-1, :2]).norm(dim=1)
    assert steps.sum() == pytest.approx(25.0)
    assert torch.allclose(steps, torch.full_like(steps, 25.0 / 40))  # the centre: mid-streak
    even = blurdm.camera_shake(40, 25.0, 3.0, 0.03, generator=seeded(3))
    assert torch.allclose(even[19] + even[20], torch.zeros(4, dtype=torch.float64), atol=1e-12)

def test_blur_removes_high_frequency_energy_and_grows_with_exposure(photo):
    _, B, _ = exposure_sequence(photo, length=20.0)
    energy = [high_frequency_energy(B[t]).item() for t in range(6)]
    assert energy[5] < 0.5 * high_frequency_energy(blurdm.srgb_to_linear(photo.double())).item()
    assert energy[5] < energy[0]  # B_0 (half the path) is already mildly blurred, B_T more so

# §2 forward process: the schedule, the closed form -----------------------------------------------

def test_schedule_alpha_runs_1_to_2_and_beta_bar_follows_the_per_step_rule():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    assert torch.allclose(d.alpha, torch.tensor([1.0, 1.2, 1.4, 1.6, 1.8, 2.0]))
    assert torch.allclose(d.beta, torch.tensor([0.0, 0.0, 0.005, 0.01, 0.015, 0.02]))
    expected = torch.tensor([0.0, 0.0, 0.005, 0.010915, 0.017864, 0.025661])
    assert torch.allclose(d.beta_bar, expected, atol=1e-6)

def test_official_beta_bar_rule_reproduces_the_official_code():
    _, _, beta_bar = blurdm.blur_schedule(5, 1.0, 2.0, 0.0, 0.02, rule="official")
    expected = torch.tensor([0.0, 0.0, 0.060609, 0.102317, 0.141857, 0.180278], dtype=torch.float64)
    assert torch.allclose(beta_bar, expected, atol=1e-6)

def test_a_config_no_schedule_or_network_can_be_built_from_is_refused():
    for bad in ({"alpha_start": 0.0}, {"alpha_end": 0.5}, {"T": 0}, {"beta_end": -0.1},
                {"width": 0}, {"beta_bar_rule": "Paper"}, {"prior_distance": "l2"}):
        with pytest.raises(ValueError):
            BlurDMConfig(**bad)
    assert BlurDMConfig(T=1, alpha_start=0.5, beta_end=0.0).T == 1  # odd, but possible

def test_closed_form_matches_iterated_forward_steps_in_mean_and_variance():
    d = blurdm.BlurDiffusion(BlurDMConfig()).double()
    sharp = torch.rand(1, 3, 8, 8, generator=seeded(4), dtype=torch.float64)
    alpha, B, e = exposure_sequence(sharp, length=6.0)
    g = seeded(5)
    draws = 20000
    x = B[0].expand(draws, -1, -1, -1)  # I_0 = the sharp state
    for t in range(1, 6):
        x = d.q_step(x, t, e[t], torch.randn(x.shape, generator=g, dtype=torch.float64))
        mean_error = (x.mean(0) - B[t][0]).abs().max().item()
        assert mean_error < 5 * d.beta_bar[t].item() / math.sqrt(draws) + 1e-6  # float32 schedule
        assert x.std(0).mean().item() == pytest.approx(d.beta_bar[t].item(), rel=0.02, abs=1e-12)

def test_chain_ends_at_blurred_plus_noise():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    B_T, eps = torch.rand(3, 5), torch.randn(3, 5)
    assert torch.allclose(d.q_sample(B_T, 5, eps), B_T + 0.025661 * eps, atol=1e-6)

# §3 reverse process ------------------------------------------------------------------------------

def test_timesteps_are_1_to_T_and_the_chain_visits_T_down_to_1():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    seen = []
    def estimator(x_t, t_frac, c):
        seen.append(round(t_frac[0, 0].item() * d.T))
        return torch.zeros_like(x_t)
    zeros = lambda x, t, c: torch.zeros_like(x)
    d.p_sample_loop(torch.zeros(2, 4), torch.zeros(2, 4), estimator, zeros)
    assert seen == [5, 4, 3, 2, 1]
    assert len(d.alpha) == len(d.beta_bar) == d.T + 1 and d.beta_bar[0] == 0

def test_reverse_chain_with_true_residuals_returns_the_sharp_image_exactly(photo):
    d = blurdm.BlurDiffusion(BlurDMConfig()).double()
    _, B, e = exposure_sequence(photo)
    eps = torch.randn(B[0].shape, generator=seeded(6), dtype=torch.float64)
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
    eps = torch.randn(B[0].shape, generator=seeded(8), dtype=torch.float64)
    for t in range(1, 6):
        x_t = d.q_sample(B[t], t, eps)
        back = d.p_sample(x_t, t, e[t], eps)
        assert torch.allclose(back, d.q_sample(B[t - 1], t - 1, eps), atol=1e-6)  # float32 α

# §4 latent BlurDM: encoders, estimators, prior fusion, MIMO-UNet, any backbone -------------------

def test_paper_preset_parameter_counts_match_the_official_code():
    model = BlurDM(BlurDMConfig.preset("paper"))
    assert n_params(model.sharp_encoder) == 1_148_224
    assert n_params(model.blur_encoder) == 1_146_688
    assert n_params(model.blur_estimator) == n_params(model.noise_estimator) == 460_544
    assert n_params(model.blur_encoder) + 2 * n_params(model.blur_estimator) == 2_067_776
    assert n_params(model.deblurrer.prior_fusion) == 114_688
    assert n_params(model.deblurrer) == 16_107_651 + 114_688

def test_an_untrained_deblurrer_is_the_identity(photo):
    assert torch.allclose(BlurDM(BlurDMConfig.preset("tiny")).deblur(photo), photo, atol=1e-6)

def test_backbones_match_mimo_unet_in_parameters_and_aff_and_only_se_has_batchnorm():
    assert n_params(BlurDM(BlurDMConfig.preset("paper", prior=False))) == 16_107_651  # MIMO-UNet+
    assert n_params(BlurDM(BlurDMConfig.preset("mimo-unet", prior=False))) == 6_807_171
    model, bn = BlurDM(BlurDMConfig.preset("paper")), torch.nn.BatchNorm2d
    assert isinstance(model.deblurrer.dropout, torch.nn.Dropout2d)
    assert any(isinstance(m, bn) for m in model.sharp_encoder.modules())
    assert not any(isinstance(m, bn) for m in model.blur_encoder.modules())
    fusion = blurdm.FeatureFusion((4, 8, 16), 8)  # AFF as MIMO-UNet writes it: concatenated scales
    f = [torch.randn(2, c, 32 // s, 48 // s) for c, s in ((4, 1), (8, 2), (16, 4))]
    for size in ((32, 48), (16, 24)):
        assert torch.allclose(fusion(f, size), fusion.plain(f, size), atol=1e-5)

def test_prior_fusion_is_scale_and_shift_without_plus_one():
    pfm = blurdm.PriorFusion(4, 2)
    with torch.no_grad():
        pfm.to_scale_shift.weight.copy_(torch.eye(4))
    x, prior = torch.ones(1, 2, 3, 3), torch.tensor([[2.0, 3.0, 0.5, -1.0]])
    out = pfm(x, prior)
    assert torch.allclose(out[0, 0], torch.full((3, 3), 2.5))
    assert torch.allclose(out[0, 1], torch.full((3, 3), 2.0))

def test_the_prior_plugs_into_a_foreign_backbone_and_trains_through_the_three_stages(photo,
                                                                                      tmp_path):
    cfg = BlurDMConfig.preset("tiny")
    torch.manual_seed(0)
    model = BlurDM(cfg, deblurrer=ForeignBackbone(cfg.latent_dim))
    sharp = photo[..., :32, :32]
    blurry = blurdm.synthesize_blur(sharp[0], seeded(0), length=(8, 8))[None]
    for stage in (1, 2, 3):
        parameters = model.set_stage(stage)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.Adam(parameters, lr=1e-3)
        losses = []
        for _ in range(30):
            loss = model(blurry, sharp, stage)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < (0.9 if stage < 3 else 0.98) * losses[0], (stage, losses)
        changed = {k.split(".")[0] for k, v in model.state_dict().items()
                   if not torch.equal(v, before[k])}
        assert changed == set(blurdm.STAGE_PARTS[stage])
    blurdm.save_checkpoint(tmp_path / "foreign.pt", model)
    loaded = blurdm.load_model(tmp_path / "foreign.pt", deblurrer=ForeignBackbone(cfg.latent_dim))
    assert torch.equal(loaded.deblur(blurry), model.deblur(blurry))

# §5 training: the three stages and their losses --------------------------------------------------

def test_each_stage_trains_only_its_own_parts():
    model = tiny()
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    for stage, parts in blurdm.STAGE_PARTS.items():
        model.zero_grad(set_to_none=True)
        params = model.set_stage(stage)
        model(blur, sharp, stage).backward()
        with_grad = {name for name, m in model.named_children()
                     if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())}
        assert with_grad == set(parts), stage
        assert len(params) == sum(len(list(m.parameters())) for name, m in model.named_children()
                                  if name in parts)
    assert blurdm.STAGE_PARTS[2] == ("blur_encoder", "blur_estimator", "noise_estimator")
    assert blurdm.STAGE_PARTS[1] == ("sharp_encoder", "deblurrer")
    assert blurdm.STAGE_PARTS[3] == (*blurdm.STAGE_PARTS[2], "deblurrer")
    model.set_stage(2)  # SE frozen with its BatchNorm statistics
    assert not model.sharp_encoder.training and model.blur_encoder.training

def test_stage_2_loss_is_l1_between_the_chain_prior_and_the_frozen_sharp_encoder_latent():
    model = BlurDM(BlurDMConfig.preset("tiny"))
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    model.set_stage(2)
    torch.manual_seed(1)  # the chain's ε
    prior, target = model.sharp_prior(blur), model.sharp_latent(blur, sharp)
    assert prior.shape == target.shape == (2, 32)
    torch.manual_seed(1)
    loss = model(blur, sharp, 2)
    assert loss.item() == pytest.approx(F.l1_loss(prior, target).item(), rel=1e-6)
    loss.backward()
    assert model.sharp_encoder.stem[0].weight.grad is None
    assert model.blur_encoder.stem[0].weight.grad is not None

def test_deblur_loss_is_charbonnier_plus_a_tenth_of_the_2d_fft_charbonnier():
    cfg = BlurDMConfig()
    g = seeded(10)
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
    model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).backward()
    assert all(p.grad is not None for p in params)

# deblur: whole images of any size; Part I on its own ----------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (1, 3, 5, 7), (2, 3, 1, 1), (1, 3, 64, 64)])
def test_deblur_returns_the_input_size_in_range(shape):
    out = tiny().deblur(torch.rand(*shape))
    assert out.shape == shape and out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()

def test_a_batch_gives_what_one_image_at_a_time_gives_in_the_inputs_float_type():
    model, images = tiny(), torch.rand(3, 3, 40, 48, generator=seeded(9))
    together = model.deblur(images)
    apart = torch.cat([model.deblur(images[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, apart, atol=1e-5)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = model.deblur(images.to(dtype))
        assert out.dtype == dtype and (out.float() - together).abs().max() < 0.01

def test_deblur_is_deterministic_given_the_seed_or_the_prior_and_runs_in_eval_mode():
    model, x = tiny(dropout=0.5), torch.rand(1, 3, 32, 32, generator=seeded(1))
    reference = model.deblur(x, seed=1)
    model.train()
    assert torch.equal(model.deblur(x, seed=1), reference)  # no dropout: eval mode
    assert not model.training and not torch.equal(model.deblur(x, seed=2), reference)
    eps = model.start_noise(3, 1)  # one CPU draw, shared by the batch
    assert eps.device.type == "cpu" and eps.shape == (3, 32) and torch.equal(eps[0], eps[2])
    prior = model.sharp_prior(blurdm.pad_to(x, 8), eps[:1])
    assert prior.shape == (1, 32) and torch.equal(model.deblur(x, prior=prior), reference)

def test_deblur_takes_floats_in_0_1_and_refuses_anything_else_with_one_value_error():
    model, x = tiny(), torch.rand(1, 3, 16, 24, generator=seeded(4))
    assert torch.equal(model.deblur(x[0]), model.deblur(x)[0])  # (3, H, W), as read_image gives
    nan = x.clone().index_fill_(2, torch.tensor([3]), math.nan)
    bad = {"uint8": (x * 255).to(torch.uint8), "0..255": x * 255, "negative": x - 0.5, "NaN": nan,
           "(H, W)": x[0, 0], "1 channel": x[:, :1], "4 channels": torch.cat([x, x[:, :1]], 1),
           "5-D": x[None], "no image": x[:0]}
    for what, images in bad.items():
        with pytest.raises(ValueError) as err:
            model.deblur(images)
        assert "deblur takes" in str(err.value) and "\n" not in str(err.value), what

def test_deblur_gives_nan_where_the_network_output_is_not_finite_never_a_clamped_value():
    model = tiny()
    model.deblurrer.to_image[2].bias.data[0] = math.inf  # the last head's red channel overflows
    out = model.deblur(torch.rand(1, 3, 16, 24))
    assert out[:, 0].isnan().all() and out[:, 1:].isfinite().all()

def test_part_one_alone_trains_the_three_stages_and_deblurs_exactly_as_the_module(tmp_path):
    source = (REPO / "blurdm.py").read_text()
    part_one = source[:source.index("\n# Part II")]
    assert len(part_one.splitlines()) <= 600
    assert "def q_sample" in "\n".join(part_one.splitlines()[:250])
    imported = {line.split()[1].split(".")[0] for line in part_one.splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= {"math", "dataclasses", "torch"}, imported
    (tmp_path / "blurdm_method.py").write_text(part_one)
    spec = importlib.util.spec_from_file_location("blurdm_method", tmp_path / "blurdm_method.py")
    spec.loader.exec_module(method := importlib.util.module_from_spec(spec))
    blur, sharp = (blurdm.read_image(ASSETS / f"example_{k}.png")[None, :, :64, :96]
                   for k in ("blurry", "sharp"))
    models = []
    for module in (method, blurdm):
        torch.manual_seed(0)
        model = module.BlurDM(module.BlurDMConfig.preset("tiny"))
        for stage in (1, 2, 3):
            optimizer = torch.optim.Adam(model.set_stage(stage), lr=1e-3)
            for step in range(2):
                torch.manual_seed(100 * stage + step)
                model(blur, sharp, stage).backward()
                optimizer.step()
                optimizer.zero_grad()
        models.append(model)
    assert all(map(torch.equal, *(model.state_dict().values() for model in models)))
    assert torch.equal(*(model.deblur(blur[..., :37, :53]) for model in models))

# The original code's outputs (assets/oracle.pt), its files, the golden number =====================

SCHEDULE = ("alphas", "betas_bar", "time_stamps_list")  # dm buffers: the official module's, stored
OFFICIAL = json.loads((ASSETS / "official_keys.json").read_text())  # the original names, shapes
diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
spec = importlib.util.spec_from_file_location("make_oracle", ASSETS / "make_oracle.py")
spec.loader.exec_module(make_oracle := importlib.util.module_from_spec(spec))
oracle_weights = make_oracle.oracle_weights  # the rule the oracle's weights were drawn by

@torch.no_grad()
def test_outputs_equal_the_original_codes_on_the_same_weights(tmp_path, oracle):
    torch.save({"model": oracle_weights(OFFICIAL["mimo_unet_plus"], 0)}, tmp_path / "model.pkl")
    dm = oracle_weights(OFFICIAL["blurdm_dm"], 2) | {k: oracle[k] for k in SCHEDULE}
    deblur = oracle_weights(OFFICIAL["blurdm_deblur"], 1)
    torch.save({"model_state": deblur, "model_dm_state": dm}, tmp_path / "last_x.pth")
    mimo = blurdm.load_model(tmp_path / "model.pkl")  # MIMO-UNet's format; sees [0, 1]
    for s, y in enumerate(mimo.run_deblurrer(oracle["mimo_input"], None)):
        assert diff(y, oracle[f"mimo_out{s}"]) <= 1e-5
    model = blurdm.load_model(tmp_path / "last_x.pth")  # the official BlurDM code's format
    x = blurdm.pad_to(oracle["blurdm_input"], 8)  # reflect, bottom and right, as theirs
    prior = model.sharp_prior(x, oracle["eps"])
    assert diff(prior, oracle["blurdm_prior"]) <= 1e-5
    for s, y in enumerate(model.run_deblurrer(x, prior)):
        assert diff(y, oracle[f"blurdm_out{s}"]) <= 1e-5
    out = model.deblur(oracle["blurdm_input"], seed=2023)  # ε of seed 2023, padding, crop, clamp
    assert diff(out, oracle["blurdm_output"].clamp(0, 1)) <= 1e-5

def test_reverse_step_and_schedule_equal_the_official_codes(oracle):
    d, eye = blurdm.BlurDiffusion(BlurDMConfig(beta_bar_rule="official")), torch.eye(3)
    for t in range(1, d.T + 1):  # unit inputs: x_t, ê_t, ε̂_t in turn
        assert diff(d.p_sample(eye[0], t, eye[1], eye[2]), oracle["step_coef"][t - 1]) <= 1e-6
    assert diff(d.alpha, oracle["alphas"]) <= 1e-6
    assert diff(d.beta_bar[1:], oracle["betas_bar"]) <= 1e-6

def test_the_demo_weights_load_and_deblur_the_example_from_21_19_to_21_83_db():
    model = blurdm.load_model(REPO / "weights" / "blurdm-demo.pt")
    cfg, state, checkpoint = blurdm.read_checkpoint(REPO / "weights" / "blurdm-demo-train.pt")
    assert model.cfg == cfg == BlurDMConfig.preset("demo") and checkpoint["step"] > 0
    assert all(torch.equal(v, state[k].half().float())  # shipped in fp16: its training state's
               for k, v in model.state_dict().items() if v.is_floating_point())
    blurry, sharp = (blurdm.read_image(ASSETS / f"example_{k}.png") for k in ("blurry", "sharp"))
    score = lambda x: blurdm.psnr(blurdm.to_uint8(x), blurdm.to_uint8(sharp))
    assert (round(score(blurry), 2), round(score(model.deblur(blurry)), 2)) == (21.19, 21.83)

def test_mimo_unet_and_official_blurdm_files_load_in_each_of_their_forms(tmp_path, oracle):
    torch.save({"model": oracle_weights(OFFICIAL["mimo_unet"], 0)}, tmp_path / "MIMO-UNet.pkl")
    mimo = blurdm.load_model(tmp_path / "MIMO-UNet.pkl")
    assert mimo.cfg == BlurDMConfig.preset("mimo-unet", prior=False, input_offset=0.0)
    args = argparse.Namespace(model_name="MIMOUNetBlurDM", best_psnr=31.5)  # as theirs pickle it
    parts = {"model_state": oracle_weights(OFFICIAL["blurdm_deblur"], 1), "model_dm_state":
             oracle_weights(OFFICIAL["blurdm_dm"], 2) | {k: oracle[k] for k in SCHEDULE},
             "model_le_state": oracle_weights(OFFICIAL["blurdm_le"], 3)}
    for (key, weights), part in zip(parts.items(), ("deblur", "dm", "le")):
        torch.save({key: weights, "args": args}, tmp_path / f"final_{part}_X.pth")
    torch.save({**parts, "model_le_state": {}, "args": args}, tmp_path / "last_X.pth")  # stage 3's
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: refused, saying why
        with pytest.raises(ValueError, match=r"torch >= 2\.5"):
            blurdm.load_model(tmp_path / "last_X.pth")
        return
    final, last = (blurdm.load_model(tmp_path / f) for f in ("final_deblur_X.pth", "last_X.pth"))
    official = BlurDMConfig.preset("paper", beta_bar_rule="official", prior_distance="charbonnier")
    assert final.cfg == last.cfg == official
    mine, theirs = final.state_dict(), last.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items() if "sharp_encoder" not in k)
    assert torch.equal(mine["sharp_encoder.stem.0.weight"], parts["model_le_state"]["E.0.weight"])

def test_a_backbone_gaining_a_prior_starts_at_its_own_output(tmp_path, photo):
    backbone = tiny(prior=False, input_offset=0.0)  # MIMO-UNet's kind: no prior, sees [0, 1]
    ours = backbone.state_dict()
    theirs = {t: ours[o] for t, o in blurdm.mimo_unet_names(1).items() if o in ours}
    torch.save({"model": theirs}, tmp_path / "MIMO-UNetPlus.pkl")
    assert train_run(["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST, "--iters",
                      1, 0, 0, "--lr", 0, "--lr-min", 0, "--val-count", 0, "--init",
                      tmp_path / "MIMO-UNetPlus.pkl"]) == 0  # lr 0: the weights it started from
    cfg, state, _ = blurdm.read_checkpoint(tmp_path / "o" / "stage1.pt")
    assert cfg.prior and cfg.fusion_residual and cfg.input_offset == 0.0
    model, blur = BlurDM(cfg).eval(), photo[..., :32, :48]
    model.load_state_dict(state)
    for prior in (model.sharp_latent(blur, photo[..., 32:64, :48]), model.sharp_prior(blur)):
        assert torch.equal(model.run_deblurrer(blur, prior)[-1],
                           backbone.run_deblurrer(blur, None)[-1])

# Part II: tiles, metrics, checkpoints, data sets, the training blur ===============================

def test_tiles_sharing_the_whole_images_prior_stay_within_a_grey_level_of_the_whole(photo):
    # 140 x 203 in 2 x 2 tiles of 136 px overlapping by 64: each keeps what lies 32 px or more from
    # its border. Measured: 0 grey levels on four seeded tiny networks, 1 with Kaiming-initialised
    # convolutions; without overlap, seams of 43 to 82 levels (77 on this one).
    model, x, shapes = tiny(), photo[0, :, 20:160, 30:233], []
    whole, sharp_prior = blurdm.to_uint8(model.deblur(x)).int(), model.sharp_prior
    model.sharp_prior = lambda x, eps=None: shapes.append(tuple(x.shape)) or sharp_prior(x, eps)
    tiled = blurdm.to_uint8(blurdm.deblur_tiled(model, x, tile=136, overlap=64)).int()
    assert shapes == [(1, 3, 144, 208)]  # one prior, from the whole (padded) image
    assert tiled.shape == whole.shape and (tiled - whole).abs().max() <= 1
    seams = blurdm.to_uint8(blurdm.deblur_tiled(model, x, tile=64, overlap=0)).int()
    assert (seams - whole).abs().max() > 30  # this network does see a tile's border
    assert torch.equal(blurdm.deblur_tiled(model, x, tile=0), model.deblur(x))

def test_psnr_is_rgb_peak_255_on_rounded_uint8():
    x = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    y = x.clone()
    y[0, 0, 0] = 110  # one error of 10 over 48 values: mse = 100/48
    assert blurdm.psnr(x, y) == pytest.approx(10 * math.log10(255 ** 2 * 48 / 100))
    assert blurdm.psnr(x, x) == math.inf and blurdm.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(blurdm.to_uint8(torch.tensor([0.0, 0.6 / 255, 0.499, 1.2, -1.0])),
                       torch.tensor([0, 1, 127, 255, 0], dtype=torch.uint8))

def test_3d_ssim_agrees_with_a_direct_float64_reference_and_differs_from_per_channel_ssim(photo):
    crop = photo[0, :, 48:144, 64:192]
    sharp = blurdm.to_uint8(crop)
    blurry = blurdm.to_uint8(blurdm.synthesize_blur(crop, generator=seeded(11)))
    value = blurdm.ssim(sharp, blurry)
    assert value == pytest.approx(ssim3d_reference(sharp, blurry), abs=1e-10)
    assert 0.2 < value < 0.95 and value == pytest.approx(blurdm.ssim(blurry, sharp), abs=1e-12)
    per_channel = np.mean([blurdm.ssim(sharp[c:c + 1].expand(3, -1, -1),
                                       blurry[c:c + 1].expand(3, -1, -1)) for c in range(3)])
    assert abs(value - per_channel) > 1e-3  # the 3-D window mixes the colour channels

def test_checkpoints_load_back_bit_exact_and_older_ones_with_prior_loss_load(tmp_path):
    model, x = tiny(), torch.rand(1, 3, 24, 40)
    blurdm.save_checkpoint(tmp_path / "tiny.pt", model, step=12)
    loaded = blurdm.load_model(tmp_path / "tiny.pt")
    assert loaded.cfg == model.cfg and blurdm.read_checkpoint(tmp_path / "tiny.pt")[2]["step"] == 12
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.deblur(x), model.deblur(x)) and os.listdir(tmp_path) == ["tiny.pt"]
    checkpoint = torch.load(tmp_path / "tiny.pt", weights_only=True)
    config = {**checkpoint["config"], "prior_loss": "charbonnier"}  # the field's older name
    torch.save({**checkpoint, "config": config}, tmp_path / "both.pt")  # l1 and charbonnier
    with pytest.raises(ValueError, match="disagree"):
        blurdm.load_model(tmp_path / "both.pt")
    del config["prior_distance"]
    torch.save({**checkpoint, "config": config}, tmp_path / "old.pt")
    old = blurdm.load_model(tmp_path / "old.pt").cfg
    assert old == replace(model.cfg, prior_distance="charbonnier")

def test_gopro_its_flat_copy_and_paired_folders_pair_by_name_across_suffixes(tmp_path):
    gopro(tmp_path / "GOPRO_Large")  # blur/, sharp/ and blur_gamma/ (never used) per sequence
    for split, k in ((split, k) for split in ("train", "test") for k in range(2)):
        for kind in ("input", "target"):
            png(tmp_path / "flat" / split / kind / f"GOPR0001-{k:06d}.png", k)
        png(tmp_path / "paired" / split / "blur" / "scene" / f"{k}.jpg", k)
        png(tmp_path / "paired" / split / "sharp" / "scene" / f"{k}.png", k)
    layouts = {"GOPRO_Large": ("blur", "sharp", 4), "flat": ("input", "target", 2),
               "paired": ("blur", "sharp", 2)}
    for folder, (kind, partner, n) in layouts.items():
        splits, problems = blurdm.find_pairs(tmp_path / folder)
        assert problems == [] and {k: len(v) for k, v in splits.items()} == {"train": n, "test": 2}
        for blur, sharp in splits["train"] + splits["test"]:
            blur, sharp = Path(blur).with_suffix(""), Path(sharp).with_suffix("")
            assert str(blur).replace(f"/{kind}/", f"/{partner}/") == str(sharp)

def test_pairs_are_matched_by_name_never_by_position_and_the_unmatched_reported(tmp_path):
    for blur, sharp in zip("abc", "bcd"):  # by position, blur a, b, c would meet sharp b, c, d
        png(tmp_path / "blur" / f"{blur}.png", ord(blur))
        png(tmp_path / "sharp" / f"{sharp}.png", ord(sharp))
    splits, problems = blurdm.find_pairs(tmp_path)
    assert [(Path(b).name, Path(s).name) for b, s in splits["train"]] == [("b.png", "b.png"),
                                                                         ("c.png", "c.png")]
    assert re.search(r"\b2 image", " ".join(problems)), problems  # a.png and d.png

def test_realblur_lists_and_hide_folders_pair_as_their_data_sets_say(tmp_path):
    lines = {"train": ["RealBlur-J_ECC/scene009/gt/gt_1.png RealBlur-J_ECC/scene009/blur/b.png"],
             "test": []}  # a pair whose files are missing: reported
    for split, scene in (("train", 1), ("train", 2), ("test", 3)):
        gt, blur = (f"RealBlur-J_ECC/scene{scene:03d}/{k}/{k}_1.png" for k in ("gt", "blur"))
        png(tmp_path / "realblur" / gt, scene)
        png(tmp_path / "realblur" / blur, scene + 50)
        lines[split].append(f"{gt} {blur}")
    for split in lines:
        (tmp_path / "realblur" / f"RealBlur_J_{split}_list.txt").write_text("\n".join(lines[split]))
    splits, problems = blurdm.find_pairs(tmp_path / "realblur")
    assert [len(splits[k]) for k in ("train", "test")] == [2, 1] and "scene009" in str(problems)
    assert all(b.endswith("/blur/blur_1.png") and s == b.replace("/blur/blur_", "/gt/gt_")
               for b, s in splits["train"] + splits["test"])
    for name in ("test/test-close-ups/1fromGOPR0950.png", "test/test-long-shot/2fromGOPR1096.png",
                 "test/test-long-shot/x.png", "GT/1fromGOPR0950.png", "GT/2fromGOPR1096.png",
                 "GT/9fromGOPR0001.png"):  # HIDE: GT/ holds the train images too; x.png has none
        png(tmp_path / "HIDE_dataset" / name, len(name))
    splits, problems = blurdm.find_pairs(tmp_path / "HIDE_dataset")
    assert sorted((Path(b).name, Path(s).parent.name) for b, s in splits["test"]) == [
        ("1fromGOPR0950.png", "GT"), ("2fromGOPR1096.png", "GT")]
    assert list(splits) == ["test"] and re.search(r"\b1 image", " ".join(problems)), problems

def test_photographs_are_unpaired_and_split_by_the_nearest_train_or_test_folder(tmp_path):
    for name, where in (("c", "train"), ("d", "test"), ("e", "set/test/deeper"), ("f", "")):
        png(tmp_path / "photos" / where / f"{name}.png", 3)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    splits, problems = blurdm.find_pairs(tmp_path / "photos")
    names = {k: sorted(Path(s).stem for _, s in v) for k, v in splits.items()}
    assert problems == [] and names == {"train": ["c", "f"], "test": ["d", "e"]}
    assert all(b is None for pairs in splits.values() for b, _ in pairs)

def test_synthetic_blur_is_8_bit_seeded_and_a_batch_of_it_equals_its_images_one_by_one(tmp_path):
    png(tmp_path / "photo.png", 3, size=(80, 96))
    data = blurdm.PairDataset([(None, str(tmp_path / "photo.png"))], 32, (4.0, 30.0), seed=0)
    items = [data[(1, step, k)] for step in range(3) for k in range(2)]
    blur, sharp = blurdm.training_batch(torch.utils.data.default_collate(items), "cpu")
    assert len({count for _, _, count, _ in items}) > 1  # paths of several lengths in one batch
    again = data[(1, 2, 1)]  # every draw seeded by the item
    assert all(torch.equal(*map(torch.as_tensor, pair)) for pair in zip(again, items[-1]))
    for j, (region, path, count, noise) in enumerate(items):
        alone = blurdm.blur_images(region[None], path[None, :count], torch.tensor([count]),
                                   noise[None])[0]
        assert torch.equal(blur[j], alone) and torch.equal(alone * 255, (alone * 255).round())
        assert torch.equal(sharp[j], blurdm.centre(region, (32, 32)))  # the crop's sharp centre

# train.py =========================================================================================

def test_three_stages_end_to_end_give_a_stage3_pt_that_sample_py_runs(tmp_path, capsys):
    g, out = gopro(tmp_path / "g"), tmp_path / "o"
    assert train_run(["--data", g, "--out", out, *FAST, "--iters", 2, 1, 2, "--val-every", 1]) == 0
    stdout = capsys.readouterr().out
    assert re.findall(r"^stage (\d) step (\d)/", stdout, re.M) == [
        ("1", "1"), ("1", "2"), ("2", "1"), ("3", "1"), ("3", "2")]
    assert len(re.findall(r"^val stage", stdout, re.M)) == 5  # validated at every step
    last = blurdm.read_checkpoint(out / "last.pt")[2]
    assert (last["stage"], last["step"]) == (3, 2) and last["config"]["prior"] is True
    w1, w2, w3 = (blurdm.read_checkpoint(out / f"stage{s}.pt")[1] for s in (1, 2, 3))
    same = lambda a, b, part: all(torch.equal(a[k], b[k]) for k in a if k.startswith(part + "."))
    assert same(w1, w2, "deblurrer") and not same(w2, w3, "deblurrer")  # each its own parts
    assert not same(w1, w2, "blur_encoder") and same(w1, w3, "sharp_encoder")
    with pytest.raises(ValueError, match="stage.1"):  # its blur diffusion is untrained
        blurdm.load_model(out / "stage1.pt")
    png(tmp_path / "x.png", 1, size=(37, 53))
    assert sample_run([tmp_path / "x.png", "--ckpt", out / "stage3.pt"], capsys)[0] == 0
    assert read_png(tmp_path / "x_deblurred.png").shape == (37, 53, 3)

def test_the_time_left_for_the_run_counts_the_later_stages_steps(tmp_path, capsys, monkeypatch):
    clock = iter(range(10 ** 6))  # a second a call: the pace is whole seconds, the same each run
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: float(next(clock))))
    assert train_run(["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST,
                      "--iters", 2, 3, 4, "--val-count", 0]) == 0
    left = re.findall(r"left: stage (\S+), run (\S+)", capsys.readouterr().out)
    seconds = lambda text: sum(int(n) * 60 ** i for i, n in enumerate(reversed(text.split(":"))))
    stage, run = (seconds(t) for t in left[0])  # at stage 1 step 1 of 2
    assert len(left) == 9 and stage > 0 and run == (1 + 3 + 4) * stage  # 1 step, then 3 + 4
    assert left[-1] == ("0:00:00", "0:00:00")

def test_eval_only_writes_a_row_of_scores_for_each_test_image(tmp_path, ckpt):
    data = gopro(tmp_path / "g")
    assert train_run(["--data", data, "--eval-only", "--init", ckpt, "--out", tmp_path / "e",
                      "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "e" / "scores.csv")))
    test_pairs, model = blurdm.find_pairs(data)[0]["test"], blurdm.load_model(ckpt)
    assert [r["input"] for r in rows] == [b for b, _ in test_pairs]
    for row, (blur, sharp) in zip(rows, test_pairs):
        out = blurdm.to_uint8(model.deblur(blurdm.read_image(blur)))
        sharp = blurdm.to_uint8(blurdm.read_image(sharp))
        assert float(row["psnr_db"]) == pytest.approx(blurdm.psnr(out, sharp), abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(blurdm.ssim(out, sharp), abs=1e-6)

def test_two_gloo_processes_give_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    args = ["--data", gopro(tmp_path / "g"), *FAST, "--batch", 4, "--iters", 3, 0, 0,
            "--val-count", 0, "--no-prior"]  # no BatchNorm, no noise: ranks must average gradients
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(s.getsockname()[1]),
               "OMP_NUM_THREADS": "1"}  # one thread each: the same sums
    runs = [({**env, "WORLD_SIZE": "2", "RANK": r, "LOCAL_RANK": r}, "ddp") for r in "01"]
    runs = [subprocess.Popen([sys.executable, "train.py", *map(str, args), "--out",
                              str(tmp_path / out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for env, out in [*runs, (env, "one")]]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    a, b = (blurdm.read_checkpoint(tmp_path / d / "last.pt")[1] for d in ("ddp", "one"))
    assert max(diff(a[k], b[k]) for k in a) < 1e-5

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_on_cuda_trains_a_tiny_stage_within_5_minutes_or_prints_every_stack(tmp_path):
    argv = ["-X", "faulthandler", "train.py", "--data", gopro(tmp_path / "g"), "--out",
            tmp_path / "o", "--preset", "tiny", "--crop", 32, "--iters", 2, 0, 0, "--compile",
            "--val-count", 0]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # a cold compile
    run = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=env, text=True,
                           stderr=subprocess.PIPE)
    try:
        err = run.communicate(timeout=300)[1]
    except subprocess.TimeoutExpired:  # SIGABRT: faulthandler prints every thread's stack
        run.send_signal(signal.SIGABRT)
        pytest.fail(f"--compile did not finish in 5 minutes:\n{run.communicate()[1][-8000:]}")
    assert run.returncode == 0, err

# sample.py ========================================================================================

def test_sample_writes_the_models_fp32_output_beside_the_input(tmp_path, capsys, ckpt):
    png(tmp_path / "blurry.png", 0, size=(37, 53))
    assert sample_run([tmp_path / "blurry.png", "--ckpt", ckpt], capsys)[0] == 0
    written = read_png(tmp_path / "blurry_deblurred.png")
    out = blurdm.load_model(ckpt).deblur(blurdm.read_image(tmp_path / "blurry.png"))
    assert np.array_equal(written, blurdm.to_uint8(out).permute(1, 2, 0).numpy())
    assert not np.array_equal(written, read_png(tmp_path / "blurry.png"))
    assert sorted(os.listdir(tmp_path)) == ["blurry.png", "blurry_deblurred.png"]

def test_sample_keeps_grayscale_and_the_colour_profile(tmp_path, capsys, ckpt):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    png(tmp_path / "gray.png", 1, mode="L")
    Image.fromarray(png(tmp_path / "icc.png", 2)).save(tmp_path / "icc.png", icc_profile=icc)
    assert sample_run([tmp_path / "gray.png", tmp_path / "icc.png", "-o", tmp_path / "out",
                       "--ckpt", ckpt], capsys)[0] == 0
    out = blurdm.load_model(ckpt).deblur(blurdm.read_image(tmp_path / "gray.png"))
    with Image.open(tmp_path / "out" / "gray_deblurred.png") as gray:
        assert gray.mode == "L" and np.array_equal(gray, blurdm.to_uint8(out.mean(0)).numpy())
    with Image.open(tmp_path / "out" / "icc_deblurred.png") as colour:
        assert colour.mode == "RGB" and colour.info.get("icc_profile") == icc

def test_sample_mirrors_folders_skips_outputs_that_exist_and_takes_o_file_for_one_input(
        tmp_path, capsys, ckpt):
    d, out = tmp_path / "in", tmp_path / "out"
    for k, name in enumerate(("a.png", "sub/b.jpg", "sub/deeper/c.png", "old_deblurred.png")):
        png(d / name, k)
    assert sample_run([d, "-o", out, "--ckpt", ckpt], capsys)[0] == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a_deblurred.png", "sub/b_deblurred.png", "sub/deeper/c_deblurred.png"]
    (out / "a_deblurred.png").write_bytes(b"an older result")
    assert sample_run([d / "a.png", "-o", out, "--ckpt", ckpt], capsys)[0] == 0
    assert (out / "a_deblurred.png").read_bytes() == b"an older result"  # skipped
    assert sample_run([d / "a.png", "-o", out, "--force", "--ckpt", ckpt], capsys)[0] == 0
    assert read_png(out / "a_deblurred.png").shape == (40, 48, 3)
    assert sample_run([d / "a.png", "-o", tmp_path / "one.png", "--ckpt", ckpt], capsys)[0] == 0
    assert read_png(tmp_path / "one.png").shape == (40, 48, 3)
    code, _, err = sample_run([d / "a.png", d / "sub", "-o", tmp_path / "two.png", "--ckpt", ckpt],
                              capsys)  # -o FILE for three inputs: an error naming -o, not --ckpt
    assert code == 1 and "two.png" in err and str(ckpt) not in err
    assert not (tmp_path / "two.png").exists()

# The safety floor, a test a property. 1. No code runs from any file ===============================

def test_no_code_runs_from_a_checkpoint_in_load_model_sample_py_or_train_py(tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # where RunsCode would write ran.txt
    torch.save({"format": "blurdm", "config": {}, "model": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        blurdm.load_model(tmp_path / "evil.pt")
    png(tmp_path / "a.png")
    code, _, err = sample_run([tmp_path / "a.png", "--ckpt", tmp_path / "evil.pt"], capsys)
    assert code == 1 and "evil.pt" in one_error_line(err, "error:")
    assert train_run(["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST,
                      "--init", tmp_path / "evil.pt"]) == 1
    assert "evil.pt" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "ran.txt").exists() and not (tmp_path / "a_deblurred.png").exists()

# 2. Nothing lost ----------------------------------------------------------------------------------

def test_an_input_is_never_overwritten(tmp_path, capsys, ckpt):
    before = png(tmp_path / "a.png")
    code, _, err = sample_run([tmp_path / "a.png", "-o", tmp_path / "a.png", "--force", "--ckpt",
                               ckpt], capsys)
    assert code == 1 and "a.png" in one_error_line(err, "error:")
    assert np.array_equal(read_png(tmp_path / "a.png"), before)
    assert os.listdir(tmp_path) == ["a.png"]

def test_a_failed_write_leaves_the_previous_file_intact_and_no_temp_file(tmp_path, capsys, ckpt,
                                                                         monkeypatch):
    png(tmp_path / "a.png")
    (tmp_path / "a_deblurred.png").write_bytes(b"the previous result")
    save, saved = torch.save, []
    def full_disk(obj, path, *args, **kwargs):  # as write_image, and as torch.save after one file
        saved.append(path)
        if torch.is_tensor(obj) or len(saved) > 1:
            Path(path).write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(blurdm, "write_image", full_disk)
    code, _, err = sample_run([tmp_path / "a.png", "--force", "--ckpt", ckpt], capsys)
    assert code == 1 and "No space left" in one_error_line(err, "error:")
    assert (tmp_path / "a_deblurred.png").read_bytes() == b"the previous result"
    saved.clear()
    monkeypatch.setattr(torch, "save", full_disk)
    assert train_run(["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST, "--iters",
                      2, 0, 0, "--save-every", 1, "--val-count", 0]) == 1
    assert "No space left" in one_error_line(capsys.readouterr().err)
    assert blurdm.read_checkpoint(tmp_path / "o" / "last.pt")[2]["step"] == 1
    assert not list(tmp_path.rglob(".*")) and not (tmp_path / "o" / "stage1.pt").exists()

def test_sigterm_during_training_saves_last_pt_and_exits_143(tmp_path, monkeypatch):
    watch_items(monkeypatch, stop=(1, 2, 0))  # SIGTERM while step 3 loads
    assert train_run(["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST, "--iters",
                      1000, 0, 0, "--val-count", 0]) == 128 + signal.SIGTERM
    assert blurdm.read_checkpoint(tmp_path / "o" / "last.pt")[2]["step"] == 3

def test_a_run_stopped_in_stage_2_or_3_and_resumed_ends_bit_identical_to_one_never_stopped(
        tmp_path, monkeypatch):
    args = ["--data", gopro(tmp_path / "g"), *FAST, "--iters", 2, 4, 4]
    assert train_run([*args, "--out", tmp_path / "straight"]) == 0
    straight = blurdm.read_checkpoint(tmp_path / "straight" / "last.pt")[2]
    moments = lambda c: [t for s in c["optimizer"]["state"].values() for t in s.values()]
    for stage in (2, 3):
        watch_items(monkeypatch, stop=(stage, 2, 0))  # stopped in step 3 of that stage
        assert train_run([*args, "--out", tmp_path / f"s{stage}"]) == 128 + signal.SIGTERM
        loaded = watch_items(monkeypatch)
        assert train_run([*args, "--out", tmp_path / f"s{stage}"]) == 0
        assert loaded[0] == (stage, 3, 0)  # resumed where it stopped, not from the start
        resumed = blurdm.read_checkpoint(tmp_path / f"s{stage}" / "last.pt")[2]
        assert all(torch.equal(v, straight["model"][k]) for k, v in resumed["model"].items())
        assert len(moments(straight)) > 0 and all(
            torch.equal(a, b) for a, b in zip(moments(resumed), moments(straight), strict=True))

def test_resume_is_refused_naming_the_setting_or_the_data_that_changed(tmp_path, capsys):
    data = gopro(tmp_path / "g")
    args = ["--data", data, "--out", tmp_path / "o", *FAST, "--iters", 1, 0, 0]
    assert train_run(args) == 0
    for change, named in ((["--batch", 4], "batch_size"), (["--iters", 2, 0, 0], "steps"),
                          (["--blur-length", 0, 9], "blur_length"), (["--no-prior"], "no_prior")):
        assert train_run([*args, *change]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "last.pt" in line and named in line, line
    png(data / "train" / "GOPR0370_07_00" / "sharp" / "000001.png", 99, size=(40, 52))
    assert train_run(args) == 1
    assert "data" in one_error_line(capsys.readouterr().err).split("last.pt")[1]

def test_a_damaged_last_pt_is_one_error_line_naming_the_file(tmp_path, capsys):
    args = ["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST, "--iters", 2, 0, 0]
    assert train_run(args) == 0
    last = tmp_path / "o" / "last.pt"
    good = torch.load(last, weights_only=True)
    for damaged in ({**good, "settings": [1]}, {k: v for k, v in good.items() if k != "step"},
                    {**good, "stage": 7}, {**good, "step": "2"}):
        torch.save(damaged, last)
        assert train_run(args) == 1
        assert str(last) in one_error_line(capsys.readouterr().err)

# 3. No hang ---------------------------------------------------------------------------------------

def test_a_folder_link_back_up_the_tree_ends_the_walk(tmp_path, capsys, ckpt):
    png(tmp_path / "L" / "a.png")
    png(tmp_path / "L" / "sub" / "b.png", 1)
    (tmp_path / "L" / "sub" / "up").symlink_to(tmp_path / "L", target_is_directory=True)
    assert [p.name for p in blurdm.list_images(tmp_path / "L")] == ["a.png", "b.png"]
    assert sample_run([tmp_path / "L", "-o", tmp_path / "out", "--ckpt", ckpt], capsys)[0] == 0
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2

def test_a_second_ctrl_c_aborts_a_run_whose_data_worker_is_busy(tmp_path):
    script = ("import os, signal, sys, time, blurdm, train\n"
              "load = blurdm.PairDataset.__getitem__\n"
              "def item(self, key):  # Ctrl-C twice while the worker loads the first step\n"
              "    for _ in range(2 * (key == (1, 0, 0))):\n"
              "        os.kill(os.getppid(), signal.SIGINT), time.sleep(0.3)\n"
              "    return time.sleep(1.5 * (key == (1, 0, 0))) or load(self, key)\n"
              "blurdm.PairDataset.__getitem__ = item\n"
              "sys.exit(train.cli(sys.argv[1:]))\n")
    argv = ["--data", gopro(tmp_path / "g"), "--out", tmp_path / "o", *FAST, "--workers", 1,
            "--val-count", 0, "--iters", 5, 0, 0]
    result = subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, timeout=60,
                            capture_output=True, text=True)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o" / "last.pt").exists()  # aborted, not stopped after the step

# 4. No silent wrong output ------------------------------------------------------------------------

def test_a_non_finite_network_output_is_never_written(tmp_path, capsys):
    model = tiny()
    with torch.no_grad():
        model.deblurrer.to_image[2].weight.fill_(3e38)  # the last head overflows to ±inf
    blurdm.save_checkpoint(tmp_path / "overflow.pt", model)
    png(tmp_path / "a.png")
    code, _, err = sample_run([tmp_path / "a.png", "--ckpt", tmp_path / "overflow.pt"], capsys)
    assert code == 1 and "a.png" in one_error_line(err, "error:")
    assert sorted(os.listdir(tmp_path)) == ["a.png", "overflow.pt"]

def test_a_nan_loss_stops_training_before_a_checkpoint_holds_it(tmp_path, capsys):
    out = tmp_path / "o"  # lr 1e30: stage 2's prior loss (unclamped) overflows at its 2nd step
    assert train_run(["--data", gopro(tmp_path / "g"), "--out", out, *FAST, "--iters", 1, 5, 0,
                      "--lr", 1e30, "--val-count", 0]) == 1
    assert re.search(r"\b(nan|inf)\b", one_error_line(capsys.readouterr().err))
    last = blurdm.read_checkpoint(out / "last.pt")[2]
    assert (last["stage"], last["step"]) == (1, 1) and not (out / "stage2.pt").exists()

def test_pixel_values_outside_every_known_range_are_refused_never_rescaled(tmp_path):
    for name, values in (("over_1.tif", np.linspace(0, 1.02, 48).astype(np.float32)),
                         ("int32.tif", np.linspace(0, 200_000, 48).astype(np.int32)),
                         ("negative.tif", np.linspace(-0.1, 0.9, 48).astype(np.float32))):
        Image.fromarray(values.reshape(6, 8)).save(tmp_path / name)
        with pytest.raises(ValueError, match=name):
            blurdm.read_image(tmp_path / name)
    whole = np.arange(0, 240, 5, dtype=np.float32).reshape(6, 8)  # 8-bit values stored as floats
    Image.fromarray(whole).save(tmp_path / "floats.tif")
    assert torch.allclose(blurdm.read_image(tmp_path / "floats.tif")[0],
                          torch.from_numpy(whole) / 255)
    deep = np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000 + 7  # 16-bit: not 8-bit steps
    Image.fromarray(deep).save(tmp_path / "gray16.png")
    x = blurdm.read_image(tmp_path / "gray16.png").double()
    assert (x * 65535 - torch.from_numpy(deep.astype(np.float64))).abs().max() < 0.01

def test_an_empty_name_is_an_error_that_writes_nothing(tmp_path, capsys, ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png(tmp_path / "data" / "a.png")
    for argv in (["", "--ckpt", ckpt], ["data/a.png", "-o", "", "--ckpt", ckpt],
                 ["data/a.png", "--ckpt", " "]):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(sample.parser.parse_args([str(a) for a in argv]))
        assert exit_info.value.code == 2 and "empty" in capsys.readouterr().err
    for flag in ("--data", "--out", "--init"):
        argv = {"--data": "data", "--out": "o", "--init": str(ckpt), flag: ""}
        with pytest.raises(SystemExit) as exit_info:
            train.cli([*FAST, *(x for pair in argv.items() for x in pair)])
        assert exit_info.value.code == 2 and "empty" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "data", "data/a.png"]

# 5. No traceback from a script on bad input, and any error line is short --------------------------

def test_a_truncated_image_among_good_ones_is_reported_and_the_others_are_deblurred(
        tmp_path, capsys, ckpt):
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / name)
    whole = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(whole[:len(whole) // 2])
    code, _, err = sample_run([tmp_path, "--ckpt", ckpt], capsys)
    assert code == 1 and "b.png" in one_error_line(err, "error:")
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a_deblurred.png", "b.png", "c.png",
                                            "c_deblurred.png"]

def test_bad_checkpoints_and_data_are_one_short_line_from_either_script(tmp_path, capsys):
    png(tmp_path / "a.png")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    weight = lambda *shape: torch.zeros(shape)  # an official file whose schedule is 300,001 long
    torch.save({"model_state": {"feat_extract.0.main.0.weight": weight(32, 3, 3, 3),
                                "Encoder.0.layers.0.main.0.main.0.weight": weight(32, 32, 3, 3),
                                "Decoder.0.kv.weight": weight(256, 256)},
                "model_dm_state": {"alphas": torch.linspace(1, 2, 300_001),
                                   "betas_bar": torch.rand(300_000)}}, tmp_path / "last_long.pth")
    for ckpt in ("notes.pt", "a.png", "missing.pt", "last_long.pth"):
        code, _, err = sample_run([tmp_path / "a.png", "--ckpt", tmp_path / ckpt], capsys)
        assert code == 1 and ckpt in one_error_line(err, "error:")
    gopro(tmp_path / "g")
    for data, init in (("g", "notes.pt"), ("g", "last_long.pth"), ("missing", None)):
        argv = ["--data", tmp_path / data, "--out", tmp_path / "o", *FAST]
        assert train_run(argv + (["--init", tmp_path / init] if init else [])) == 1
        assert (init or data) in one_error_line(capsys.readouterr().err)

# README ===========================================================================================

def test_the_readmes_first_python_block_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    for entry in REPO.iterdir():  # the repository's files, where it writes its own
        (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})

# Helpers: THE test model, images and data sets, the two scripts in this process ===================

def tiny(**overrides):
    """THE test model: tiny, seeded, in eval mode, its output heads random (not the identity)."""
    torch.manual_seed(0)
    model = BlurDM(BlurDMConfig.preset("tiny", **overrides))
    for head in model.deblurrer.to_image:
        head.reset_parameters()
    return model.eval()

class ForeignBackbone(nn.Module):
    """Someone else's deblurring network: a few convolutions, the prior fused where it wants it."""
    def __init__(self, latent_dim, width=8):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.fuse = blurdm.PriorFusion(latent_dim, width)
        self.decode = nn.Conv2d(width, 3, 3, padding=1)
    def forward(self, x, prior):
        features = self.encode(x)
        return x + self.decode(features if prior is None else self.fuse(features, prior))

class RunsCode:
    def __reduce__(self):  # unpickling this would run a shell command
        return (os.system, ("echo ran > ran.txt",))

def seeded(seed):
    return torch.Generator().manual_seed(seed)

def n_params(module):
    return sum(p.numel() for p in module.parameters())

def exposure_sequence(sharp, seed=0, length=12.0, rotation=2.0, zoom=0.02):
    alpha = torch.linspace(1, 2, 6, dtype=torch.float64)  # the paper's α_0..α_T
    path = blurdm.camera_shake(40, length, rotation, zoom, generator=seeded(seed))
    return (alpha, *blurdm.render_exposures(sharp.double(), path, alpha))

def high_frequency_energy(x):
    dy, dx = x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
    return dy.pow(2).mean() + dx.pow(2).mean()

def ssim3d_reference(x, y):
    """A direct float64 transcription of METHOD.md §6: one 11x11x11 kernel, replicate padding."""
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    kernel = torch.from_numpy(np.einsum("i,j,k->ijk", g, g, g) / g.sum() ** 3)[None, None]
    filt = lambda v: F.conv3d(F.pad(v, (5,) * 6, mode="replicate"), kernel)
    a, b = (v.permute(1, 2, 0).double()[None, None] for v in (x, y))  # H x W x C in [0, 255]
    mu_a, mu_b = filt(a), filt(b)
    s_aa, s_bb, s_ab = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2, filt(a * b) - mu_a * mu_b
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + C1) * (2 * s_ab + C2)
                / ((mu_a ** 2 + mu_b ** 2 + C1) * (s_aa + s_bb + C2)))
    return ssim_map.mean().item()  # over every voxel, the 3 channels included

def png(path, seed=0, size=(40, 48), mode="RGB"):
    """A smooth random image (H, W) = size written to `path` in `mode`; returns its pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size[0] // 8 + 1, size[1] // 8 + 1, 3))
    smooth = np.kron(coarse, np.ones((8, 8, 1)))[:size[0], :size[1]]
    image = Image.fromarray((smooth * 200 + rng.random((*size, 3)) * 55).astype(np.uint8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path)
    return np.asarray(image.convert(mode))

def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image)

def gopro(root, train=2, test=1):
    """A GOPRO_Large-like tree: blur/ frames their sharp/ ones shifted a pixel; blur_gamma/."""
    for split, count in (("train", train), ("test", test)):
        for s, k in ((s, k) for s in range(2) for k in range(count)):
            folder, name = Path(root) / split / f"GOPR037{s}_07_00", f"{k:06d}.png"
            sharp = png(folder / "sharp" / name, 10 * s + k)
            png(folder / "blur_gamma" / name, 7)
            (folder / "blur").mkdir(exist_ok=True)
            Image.fromarray(np.roll(sharp, 1, axis=1)).save(folder / "blur" / name)
    return Path(root)

def train_run(argv):
    """train.py's entry point in this process, its signal handlers restored: the exit code."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train.cli([str(a) for a in argv])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)

def sample_run(argv, capsys):
    """sample.py's main in this process, on the CPU in fp32: (exit code, stdout, stderr)."""
    argv = [*map(str, argv), "--device", "cpu", "--amp", "fp32"]
    return (sample.main(sample.parser.parse_args(argv)), *capsys.readouterr())

def one_error_line(stderr, prefix="train.py: error:"):
    """The one error line of a script's stderr, short and without a traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and len(lines[0]) < 400 and "Traceback" not in stderr, stderr
    return lines[0]

def watch_items(monkeypatch, stop=None, load=blurdm.PairDataset.__getitem__):  # the original
    """The items train.py loads, in order; SIGTERM to this process while it loads `stop`."""
    loaded = []
    def getitem(self, key):
        loaded.append(key)
        if key == stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return load(self, key)
    monkeypatch.setattr(blurdm.PairDataset, "__getitem__", getitem)
    return loaded

@pytest.fixture(scope="module")
def photo():  # a real photograph: a crop of KDE's "Evening Glow" by Ian Hex, (1, 3, 192, 256)
    return blurdm.read_image(ASSETS / "photo_crop.png")[None]

@pytest.fixture(scope="module")
def oracle():  # the original code's outputs: assets/make_oracle.py
    return torch.load(ASSETS / "oracle.pt", weights_only=True)

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    blurdm.save_checkpoint(path, tiny())
    return path
