"""
The specification of blurdm, as tests, on the tiny preset and small images. The helpers come first. Then Part I of
blurdm.py, the method, in METHOD.md's order: blur formation, the forward and reverse processes (the schedule's values
against the official code), the architectures' parameter counts and any backbone, the three training stages and their
losses, whole-image deblur, and Part I pasted alone. Then Part II: tiles, metrics, checkpoints (this project's, the
published formats, export), image files, data-set layouts, the synthetic training blur, precision. Then train.py
(stages, log, resume, several processes, faults), sample.py (inputs and outputs, precision, bad input), the README's
code, and the CUDA paths (skipped without a GPU).
Run: python -m pytest -q test_blurdm.py
"""

import argparse
import copy
import csv
import gc
import importlib.util
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import blurdm
import sample
import train
from blurdm import BlurDiffusion, BlurDM, BlurDMConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))


# ================================================================================================================
# helpers: models, images, data sets on disk, and the two scripts run in this process


ASSETS = Path(__file__).parent / "assets"


_REPO = Path(__file__).resolve().parent


_FAST = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--workers", "0", "--val-crop", "32", "--log-every", "1",
         "--device", "cpu"]  # tests compare values: pinned to the CPU, on a CUDA machine too


_SAMPLE_PY = Path(__file__).resolve().parent / "sample.py"


OFFICIAL = json.loads((ASSETS / "official_keys.json").read_text())  # key names and shapes of the original code


SCHEDULE_BUFFERS = ("alphas", "betas_bar", "time_stamps_list")  # the official diffusion's, checked and dropped


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def untrained(preset="tiny", **overrides):
    """A fresh model whose output heads get PyTorch's default init instead of zeros, so that its output depends on
    every part (the prior included) rather than being the input itself."""
    model = BlurDM(BlurDMConfig.preset(preset, **overrides))
    for head in model.deblurrer.to_image:
        head.reset_parameters()
    return model


def kaiming(model):
    """Kaiming-initialised convolutions: like a trained network (unlike the zero-initialised output heads, which make
    an untrained model the identity) the output moves by ~0.2 on average, depends on the prior, and a tile edge 16 px
    away changes it by tens of grey levels, so tiling mistakes show."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


def strong(**overrides):
    """The tiny preset, Kaiming-initialised from a fixed seed: the same strong network whatever ran before."""
    torch.manual_seed(0)
    return kaiming(BlurDM(BlurDMConfig.preset("tiny", **overrides)))


def randomised(model):
    """Every weight and BatchNorm statistic random, so that a misplaced tensor shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=g) * (1 if "running_var" in name else 0.2) + 0.01)
    return model


def in_official_names(model, num_res):
    """This model's weights under the original code's names: (deblurrer, diffusion, sharp encoder) state dicts."""
    ours = model.state_dict()
    names = blurdm.mimo_unet_names(num_res) | (blurdm.official_prior_names(model.cfg) if model.cfg.prior else {})
    theirs = {t: ours[o] for t, o in names.items() if o in ours}
    deblur = {k: v for k, v in theirs.items() if k[0].isupper() or k.startswith(("feat_extract", "SCM", "FAM"))}
    dm = {k: v for k, v in theirs.items() if k.startswith(("lcr_model", "noise_model", "condition_encoder"))}
    return deblur, dm, {k.removeprefix("le."): v for k, v in theirs.items() if k.startswith("le.")}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return untrained().eval()


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


def high_frequency_energy(x):
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def ssim3d_reference(x, y):
    """A direct float64 transcription of METHOD.md §6: one 11x11x11 kernel, replicate padding, full average."""
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


class ForeignBackbone(nn.Module):
    """Someone else's deblurring network: a few convolutions, the prior fused where its decoder wants it."""

    def __init__(self, latent_dim, width=8):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.fuse = blurdm.PriorFusion(latent_dim, width)
        self.decode = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x, prior):
        features = self.encode(x)
        if prior is not None:
            features = self.fuse(features, prior)
        return x + self.decode(features)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _malformed(tmp_path):
    """{file: what its one-line error must say} for files of a known kind whose contents are malformed."""
    weight = torch.zeros(8, 3, 3, 3)
    cases = {"list.pth": ({"model_state": [1], "model_dm_state": {}}, "its model_state is a list"),
             "none.pth": ({"model_state": None}, "its model_state is a NoneType"),
             "intkeys.pkl": ({"model": {1: weight}}, "a weight named 1; names are strings"),
             "string.pkl": ({"model": {"feat_extract.0.main.0.weight": weight, "Decoder.0.kv.weight": "x"}},
                            "weight Decoder.0.kv.weight is a str, not a tensor"),
             "scalar.pkl": ({"model": {"feat_extract.0.main.0.weight": torch.tensor(1.0)}},
                            "weight feat_extract.0.main.0.weight is (), not a convolution's"),
             "complex.pkl": ({"model": {"feat_extract.0.main.0.weight": weight.to(torch.complex64)}},
                             "weight feat_extract.0.main.0.weight is complex"),
             "twice.pkl": ({"model": {"feat_extract.0.main.0.weight": weight, "module.feat_extract.0.main.0.weight":
                                      weight}}, "weight feat_extract.0.main.0.weight is there twice")}
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
    torch.save({"model_state": {"feat_extract.0.main.0.weight": weight}}, tmp_path / "final_deblur_x.pth")
    torch.save({"model_dm_state": None}, tmp_path / "final_dm_x.pth")
    cases["final_deblur_x.pth"] = (None, f"{tmp_path / 'final_dm_x.pth'}: its model_dm_state is a NoneType")
    return {tmp_path / name: message for name, (_, message) in cases.items()}


def _png(path, seed, size=(40, 48)):
    """A smooth random RGB image (H, W) = size, written as PNG; returns its uint8 array."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = rng.random((size[0] // 8 + 1, size[1] // 8 + 1, 3))
    pixels = (np.kron(coarse, np.ones((8, 8, 1)))[:size[0], :size[1]] * 200 + rng.random((*size, 3)) * 55)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return pixels.astype(np.uint8)


def _gopro(root, sequences=("GOPR0372_07_00", "GOPR0374_11_01"), per_sequence=3, test_per_sequence=1):
    """A fake GOPRO_Large tree: blurry frames are the sharp frame shifted by a pixel, plus a blur_gamma decoy."""
    root = Path(root)
    for split, count in (("train", per_sequence), ("test", test_per_sequence)):
        for s, sequence in enumerate(sequences):
            for k in range(count):
                sharp = _png(root / split / sequence / "sharp" / f"{k:06d}.png", seed=100 * s + k)
                (root / split / sequence / "blur").mkdir(exist_ok=True)
                Image.fromarray(np.roll(sharp, 1, axis=1)).save(root / split / sequence / "blur" / f"{k:06d}.png")
                _png(root / split / sequence / "blur_gamma" / f"{k:06d}.png", seed=7)
    return root


def _counts(splits):
    return {k: len(v) for k, v in splits.items()}


def _float_rgb_tiff(path, arr):
    """A float32 RGB TIFF (SampleFormat 3) written by hand: Pillow reads float grayscale but not this."""
    h, w, _ = arr.shape
    data = arr.astype("<f4").tobytes()
    bits, formats, ifd = 8 + len(data), 14 + len(data), 20 + len(data)
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bits), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 8),
            (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1), (339, 3, 3, formats)]
    entries = b"".join(struct.pack("<HHII", *t) if t[1] == 4 or t[2] > 1 else struct.pack("<HHIHH", *t, 0) for t in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd) + data + struct.pack("<6H", 32, 32, 32, 3, 3, 3)
                     + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0))


def _sample_photo(h, w, seed=0):
    """A smooth, textured RGB test image (H, W, 3) uint8: gradients, waves and a little noise."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rng = np.random.default_rng(seed)
    img = np.stack([0.5 + 0.3 * np.sin(12 * xx + 5 * yy + seed), 0.5 + 0.3 * np.cos(9 * yy), xx * yy], -1)
    img = img + 0.08 * rng.random((h, w, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _sample_save(path, h=24, w=40, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_sample_photo(h, w, seed)).convert(mode).save(path)
    return path


def _photos(folder, count):
    """A folder of `count` sharp 80 x 80 photographs p0.png, p1.png, ...; returns the folder."""
    for k in range(count):
        _sample_save(Path(folder) / f"p{k}.png", 80, 80, seed=k)
    return Path(folder)


def _sample_png16(path, arr, size=None):
    """
    Write a 16-bit PNG (H, W, C) uint16 by hand (Pillow cannot write 16-bit RGB). `size` (W, H) overrides the size in
    the header: a decompression bomb whose pixels are never there.
    """
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    w, h = size or (w, h)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _sample_read(path):
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture
def one_thread():
    """One intra-op thread, as the OMP_NUM_THREADS=1 subprocesses a test compares with: bit-identical sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(argv, monkeypatch=None):
    """train.py's entry point in this process; its signal handlers are restored afterwards. Returns the exit code."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train.cli([str(a) for a in argv])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _checkpoint(path):
    return blurdm.read_checkpoint(path)[2]


def _weights(path):
    return _checkpoint(path)["model"]


def _sample_run(argv, capsys):
    """main(argv) in-process, on the CPU in fp32 unless --device or --amp is given (tests compare with the exact
    CPU results): (exit code, stdout, stderr)."""
    argv = [str(a) for a in argv]
    code = sample.main(argv + ["--device", "cpu"] * ("--device" not in argv) + ["--amp", "fp32"] * ("--amp" not in argv))
    out, err = capsys.readouterr()
    return code, out, err


def _sample_expected(ckpt, src, **kwargs):
    """What the model itself gives for an image file, (H, W, 3) uint8 as a PNG stores it."""
    model = blurdm.load_model(ckpt)
    return blurdm.to_uint8(model.deblur(blurdm.read_image(src)[None], **kwargs)[0]).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def sample_strong_ckpt(tmp_path_factory):
    """A tiny model that really changes an image (see kaiming), as a checkpoint file."""
    path = tmp_path_factory.mktemp("ckpt") / "strong.pt"
    blurdm.save_checkpoint(path, strong())
    return path


# ================================================================================================================
# Part I, the method, in METHOD.md's order
# ----------------------------------------------------------------------------------------------------------------
# §1 blur formation


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


def test_the_middle_subframe_is_the_sharp_image_and_the_camera_moves_at_constant_speed():
    path = blurdm.camera_shake(41, 25.0, 3.0, 0.03, generator=torch.Generator().manual_seed(3))
    assert torch.equal(path[20], torch.zeros(4, dtype=torch.float64))
    steps = (path[1:, :2] - path[:-1, :2]).norm(dim=1)
    assert steps.sum() == pytest.approx(25.0)
    assert torch.allclose(steps, torch.full_like(steps, 25.0 / 40))  # the time centre is the streak's middle
    even = blurdm.camera_shake(40, 25.0, 3.0, 0.03, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(even[19] + even[20], torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_blur_removes_high_frequency_energy_and_grows_with_exposure(photo):
    _, B, _ = exposure_sequence(photo, length=20.0)
    energy = [high_frequency_energy(B[t]).item() for t in range(6)]
    assert energy[5] < 0.5 * high_frequency_energy(blurdm.srgb_to_linear(photo.double())).item()
    assert energy[5] < energy[0]  # B_0 (half the path) is already mildly blurred, B_T more so


# ----------------------------------------------------------------------------------------------------------------
# §2 forward process: the schedule, the closed form


def test_schedule_alpha_runs_1_to_2_and_beta_bar_follows_the_per_step_rule():
    d = blurdm.BlurDiffusion(BlurDMConfig())
    assert torch.allclose(d.alpha, torch.tensor([1.0, 1.2, 1.4, 1.6, 1.8, 2.0]))
    assert torch.allclose(d.beta, torch.tensor([0.0, 0.0, 0.005, 0.01, 0.015, 0.02]))
    assert torch.allclose(d.beta_bar, torch.tensor([0.0, 0.0, 0.005, 0.010915, 0.017864, 0.025661]), atol=1e-6)


def test_official_beta_bar_rule_reproduces_the_official_code():
    _, _, beta_bar = blurdm.blur_schedule(5, 1.0, 2.0, 0.0, 0.02, rule="official")
    expected = torch.tensor([0.0, 0.0, 0.060609, 0.102317, 0.141857, 0.180278], dtype=torch.float64)
    assert torch.allclose(beta_bar, expected, atol=1e-6)


def test_alpha_starting_at_zero_is_refused():
    with pytest.raises(ValueError, match="divides"):
        blurdm.check_config({"alpha_start": 0.0})


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


# ----------------------------------------------------------------------------------------------------------------
# §3 reverse process


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


# ----------------------------------------------------------------------------------------------------------------
# §4 latent BlurDM: encoders, estimators, prior fusion, MIMO-UNet, any backbone


def test_paper_preset_parameter_counts_match_the_official_code():
    model = BlurDM(BlurDMConfig.preset("paper"))
    assert n_params(model.sharp_encoder) == 1_148_224
    assert n_params(model.blur_encoder) == 1_146_688
    assert n_params(model.blur_estimator) == n_params(model.noise_estimator) == 460_544
    assert n_params(model.blur_encoder) + 2 * n_params(model.blur_estimator) == 2_067_776
    assert n_params(model.deblurrer.prior_fusion) == 114_688
    assert n_params(model.deblurrer) == 16_107_651 + 114_688


def test_an_untrained_deblurrer_is_the_identity(photo):
    out = BlurDM(BlurDMConfig.preset("tiny")).eval().deblur(photo)
    assert torch.allclose(out, photo, atol=1e-6)


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


def test_the_prior_plugs_into_a_foreign_backbone_and_trains_through_the_three_stages(photo, tmp_path):
    cfg = BlurDMConfig.preset("tiny")
    torch.manual_seed(0)
    model = BlurDM(cfg, deblurrer=ForeignBackbone(cfg.latent_dim))
    sharp = photo[..., :32, :32]
    blurry = blurdm.synthesize_blur(sharp[0], torch.Generator().manual_seed(0), length=(8, 8))[None]
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
        assert losses[-1] < (0.9 if stage < 3 else 0.98) * losses[0], (stage, losses)  # stage 3 starts trained
        changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {1: {"sharp_encoder", "deblurrer"}, 2: {"blur_encoder", "blur_estimator", "noise_estimator"},
                           3: {"blur_encoder", "blur_estimator", "noise_estimator", "deblurrer"}}[stage]
    blurdm.save_checkpoint(tmp_path / "foreign.pt", model)
    loaded = blurdm.load_model(tmp_path / "foreign.pt", deblurrer=ForeignBackbone(cfg.latent_dim))
    assert torch.equal(loaded.deblur(blurry), model.deblur(blurry))


def test_the_model_runs_forward_and_backward_in_float64(photo):
    model = untrained().double()
    sharp = photo[..., :32, :40].double()
    blurry = sharp.roll(2, -1)
    assert model.deblur(blurry).dtype == torch.float64
    for stage in (2, 3):
        model.set_stage(stage)
        loss = model(blurry, sharp, stage)
        loss.backward()
        assert loss.dtype == torch.float64 and all(p.grad.dtype == torch.float64 for p in model.parameters()
                                                   if p.grad is not None)


# ----------------------------------------------------------------------------------------------------------------
# §5 training: the three stages and their losses


def test_stage_1_loss_falls_when_overfitting_one_pair(photo):
    torch.manual_seed(0)
    model = BlurDM(BlurDMConfig.preset("tiny"))
    sharp = photo[..., 64:128, 96:160]
    blurry = blurdm.synthesize_blur(sharp[0], generator=torch.Generator().manual_seed(0))[None]
    half = lambda x: F.interpolate(x, scale_factor=0.5)
    copy_input_loss = blurdm.deblur_loss([half(half(blurry)), half(blurry), blurry], sharp, model.cfg).item()
    optimizer = torch.optim.Adam(model.set_stage(1), lr=5e-3)
    losses = []
    for _ in range(100):
        loss = model(blurry, sharp, stage=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-5:]) / 5
    assert losses[0] == pytest.approx(copy_input_loss)  # it starts as the identity
    assert final < 0.75 * copy_input_loss  # and learns to do better than returning the blurry input


def test_each_stage_trains_only_its_own_parts():
    model = untrained()
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    trained = {1: {"sharp_encoder", "deblurrer"}, 2: {"blur_encoder", "blur_estimator", "noise_estimator"},
               3: {"blur_encoder", "blur_estimator", "noise_estimator", "deblurrer"}}
    for stage, parts in trained.items():
        model.zero_grad(set_to_none=True)
        params = model.set_stage(stage)
        model(blur, sharp, stage).backward()
        with_grad = {name for name, m in model.named_children()
                     if any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())}
        assert with_grad == parts, stage
        assert len(params) == sum(1 for name, m in model.named_children() if name in parts for _ in m.parameters())
    model.set_stage(2)
    assert not model.sharp_encoder.training and model.blur_encoder.training  # SE frozen with its BN statistics


def test_stage_2_loss_is_l1_between_the_chain_prior_and_the_frozen_sharp_encoder_latent():
    model = BlurDM(BlurDMConfig.preset("tiny"))
    blur, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    model.set_stage(2)
    eps = torch.randn(2, 32)
    prior, target = model.sharp_prior(blur, eps), model.sharp_latent(blur, sharp)
    assert prior.shape == target.shape == (2, 32)
    loss = model(blur, sharp, 2, eps=eps)
    assert loss.item() == pytest.approx(F.l1_loss(prior, target).item(), rel=1e-6)
    loss.backward()
    assert model.sharp_encoder.stem[0].weight.grad is None and model.blur_encoder.stem[0].weight.grad is not None


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
    model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).backward()
    assert all(p.grad is not None for p in params)


# ----------------------------------------------------------------------------------------------------------------
# deblur: whole images of any size and type; Part I on its own


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


def test_deblur_takes_uint8_and_says_in_one_line_what_else_it_cannot_take(tiny):
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    u8 = blurdm.to_uint8(x)
    assert torch.equal(tiny.deblur(u8), tiny.deblur(u8.float() / 255))
    assert torch.equal(tiny.deblur(x[0]), tiny.deblur(x)[0])  # (3, H, W), as read_image returns it
    bad = {"[0, 1] (or uint8), got values in [0.07": x * 255, "not shape (16, 24)": x[0, 0],
           "not shape (1, 1, 16, 24)": x[:, :1], "not shape (1, 4, 16, 24)": torch.cat([x, x[:, :1]], 1),
           "not shape (0, 3, 16, 24)": x[:0], "not a ndarray": x.numpy(), "not a list": [x, x[..., :8]],
           "NaN or infinite": x.clone().index_fill_(2, torch.tensor([3]), math.nan)}
    for message, images in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            tiny.deblur(images)
        assert "\n" not in str(err.value)


def test_half_models_and_inputs_of_any_float_type_deblur(tiny):
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(5))
    reference = tiny.deblur(x)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert (tiny.deblur(x.to(dtype)) - reference).abs().max() < 0.01
    half = copy.deepcopy(tiny).half()
    if blurdm.TORCH_VERSION < (2, 3):
        with pytest.raises(ValueError, match=r"float16 model on the CPU needs torch >= 2\.3"):
            half.deblur(x)
        pytest.skip("a float16 model on the CPU needs torch >= 2.3")
    out = half.deblur(x)
    assert out.dtype == torch.float16 and (out.float() - reference).abs().max() < 0.02


def test_part_one_alone_trains_the_three_stages_and_deblurs_exactly_as_the_module(tmp_path):
    source = (_REPO / "blurdm.py").read_text()
    part_one = source[:source.index("\n# Part II")]
    assert len(part_one.splitlines()) <= 800 and "def q_sample" in "\n".join(part_one.splitlines()[:250])
    imported = {line.split()[1].split(".")[0] for line in part_one.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"math", "contextlib", "dataclasses", "torch"}, imported
    (tmp_path / "blurdm_method.py").write_text(part_one)
    spec = importlib.util.spec_from_file_location("blurdm_method", tmp_path / "blurdm_method.py")
    method = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(method)
    blur, sharp = (blurdm.read_image(ASSETS / f"example_{k}.png")[None, :, :64, :96] for k in ("blurry", "sharp"))
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
    ours, theirs = models
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert torch.equal(ours.deblur(blur[..., :37, :53]), theirs.deblur(blur[..., :37, :53]))


# ================================================================================================================
# Part II, the tools the scripts share
# ----------------------------------------------------------------------------------------------------------------
# tiles


def test_tiles_cover_the_image_aligned_to_8_and_overlapping_by_at_least_the_overlap():
    for length in range(8, 800, 8):
        for tile, overlap in ((64, 0), (64, 32), (128, 64), (1352, 64)):
            starts, size = blurdm.tile_starts(length, tile, overlap)
            assert size <= max(tile, length) and size % 8 == 0 and all(s % 8 == 0 for s in starts)
            assert starts[0] == 0 and starts[-1] + size == length
            assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
            if length > tile:  # as few tiles as the tile size allows
                assert len(starts) == -(-(length - overlap) // (tile - overlap))


def test_tiled_deblur_matches_the_untiled_one_with_one_prior_for_the_whole_image(photo, monkeypatch):
    """
    140 x 203 in 2 x 2 tiles. Near a tile's edge the test network is off by up to ~120 grey levels (padding where
    the untiled run sees image), 32 px in by < 0.05; the blend gives a tile ~0 weight within 16 px of its edge, so
    with a 64 px overlap the tiled result is within a few levels everywhere (2 to 5 measured on eight seeded
    networks, a mean under 0.05). No overlap: seams of > 50.
    """
    model = strong()
    x = photo[..., 20:160, 30:233]
    whole = blurdm.to_uint8(model.deblur(x)).int()
    priors = []
    sharp_prior = model.sharp_prior
    monkeypatch.setattr(model, "sharp_prior", lambda *a: priors.append(a[0].shape) or sharp_prior(*a))
    tiled = blurdm.to_uint8(blurdm.deblur_tiled(model, x, tile=136, overlap=64)).int()
    assert priors == [(1, 3, 144, 208)]  # one prior, from the whole (padded) image
    assert tiled.shape == whole.shape and (tiled - whole).abs().max() <= 6 and (tiled - whole).abs().float().mean() < 0.1
    seams = blurdm.to_uint8(blurdm.deblur_tiled(model, x, tile=64, overlap=0)).int()
    assert (seams - whole).abs().max() > 50


# ----------------------------------------------------------------------------------------------------------------
# §6 metrics


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


def test_3d_ssim_agrees_with_a_direct_float64_reference_on_a_real_photo(photo):
    crop = photo[0, :, 48:144, 64:192]
    sharp = blurdm.to_uint8(crop)
    blurry = blurdm.to_uint8(blurdm.synthesize_blur(crop, generator=torch.Generator().manual_seed(11)))
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


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: this project's, and files that are not what they claim


def test_a_saved_checkpoint_loads_back_with_identical_outputs(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    blurdm.save_checkpoint(path, tiny, step=12)
    assert not list(tmp_path.glob("*.tmp*"))
    loaded = blurdm.load_model(path)
    assert loaded.cfg == tiny.cfg and _checkpoint(path)["step"] == 12
    x = torch.rand(1, 3, 24, 40)
    assert torch.equal(loaded.deblur(x), tiny.deblur(x))


def test_the_demo_weights_and_their_training_state_load_unchanged():
    weights, state = blurdm.load_model(_REPO / "weights" / "blurdm-demo.pt"), blurdm.read_checkpoint(
        _REPO / "weights" / "blurdm-demo-train.pt")
    assert weights.cfg == state[0] == BlurDMConfig.preset("demo") and state[2]["step"] > 0
    assert all(torch.equal(v, state[1][k].half().float()) for k, v in weights.state_dict().items() if v.is_floating_point())


def test_a_checkpoint_saved_before_a_config_field_was_renamed_loads_under_the_new_name(tmp_path, tiny):
    blurdm.save_checkpoint(tmp_path / "new.pt", tiny)
    checkpoint = torch.load(tmp_path / "new.pt", weights_only=True)
    config = {**checkpoint["config"], "prior_loss": "charbonnier"}  # what files said before prior_distance
    del config["prior_distance"]
    torch.save({**checkpoint, "config": config}, tmp_path / "old.pt")
    assert blurdm.load_model(tmp_path / "old.pt").cfg == replace(tiny.cfg, prior_distance="charbonnier")


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "blurdm", "config": {}, "model": RunsCode()}, path)
    with pytest.raises(blurdm.CheckpointError, match="evil.pt: refused"):
        blurdm.load_model(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_files_that_are_not_checkpoints_give_one_line_errors(tmp_path, tiny):
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "words.pt").write_text("colour me surprised")  # bytes that the unpickler reads as opcodes
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    checkpoint = {"format": "blurdm", "config": {"width": 8, "colour": "red"}, "model": {}}
    torch.save(checkpoint, tmp_path / "future.pt")
    cases = {"text.pt": "not a PyTorch checkpoint", "words.pt": "not a PyTorch checkpoint", "other.pt": "not a checkpoint of a known kind",
             "future.pt": "unknown config fields colour", "missing.pt": "no such checkpoint"}
    for name, message in cases.items():
        with pytest.raises(blurdm.CheckpointError) as err:
            blurdm.load_model(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_model_name_the_first_key_and_both_shapes(tmp_path, tiny):
    blurdm.save_checkpoint(tmp_path / "tiny.pt", tiny)
    _, state, _ = blurdm.read_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(blurdm.CheckpointError, match=r"tiny.pt: weight deblurrer.stem.0.weight is \(8, 3, 3, 3\) in the "
                                                     r"file but \(16, 3, 3, 3\) in the model"):
        blurdm.load_weights(BlurDM(BlurDMConfig.preset("tiny", width=16)), state, tmp_path / "tiny.pt")
    config = {**blurdm.asdict(tiny.cfg), "num_res": 2}  # a config that does not describe its own weights
    torch.save({"format": "blurdm", "config": config, "model": state}, tmp_path / "liar.pt")
    with pytest.raises(blurdm.CheckpointError, match="liar.pt: weight deblurrer.encoders.0.1.body.0.0.weight .* is "
                                                     "missing from the file"):
        blurdm.load_model(tmp_path / "liar.pt")
    blurdm.save_checkpoint(tmp_path / "foreign.pt", BlurDM(tiny.cfg, deblurrer=ForeignBackbone(tiny.cfg.latent_dim)))
    with pytest.raises(blurdm.CheckpointError, match="foreign.pt: saved with the custom deblurrer ForeignBackbone"):
        blurdm.load_model(tmp_path / "foreign.pt")


def test_fp16_weights_load_into_a_float32_model(tmp_path, tiny):
    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    torch.save({"format": "blurdm", "config": blurdm.asdict(tiny.cfg), "model": state}, tmp_path / "half.pt")
    loaded = blurdm.load_model(tmp_path / "half.pt")
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 16, 16)
    assert (loaded.deblur(x) - tiny.deblur(x)).abs().max() < 0.02


def test_a_checkpoint_with_a_bad_config_none_for_weights_or_nan_weights_is_refused(tmp_path, tiny):
    good = blurdm.asdict(tiny.cfg)
    cases = {"negative": ({**good, "width": -4}, "width must be in [4, 1024]"),
             "text": ({**good, "width": "16"}, "width must be int"), "fraction": ({**good, "width": 16.5}, "width must be int"),
             "huge": ({**good, "width": 10 ** 6}, "width must be in"), "flag": ({**good, "prior": 1}, "prior must be bool")}
    for name, (config, message) in cases.items():
        torch.save({"format": "blurdm", "config": config, "model": tiny.state_dict()}, tmp_path / f"{name}.pt")
    torch.save({"format": "blurdm", "config": good, "model": None}, tmp_path / "none.pt")
    cases["none"] = (None, "not a BlurDM checkpoint")
    state = tiny.state_dict()
    torch.save({"format": "blurdm", "config": good, "model": {**state, "deblurrer.stem.0.weight":
                                                              state["deblurrer.stem.0.weight"] * math.nan}}, tmp_path / "nan.pt")
    cases["nan"] = (None, "weight deblurrer.stem.0.weight is not finite")
    for name, (_, message) in cases.items():
        with pytest.raises(blurdm.CheckpointError) as err:
            blurdm.load_model(tmp_path / f"{name}.pt")
        assert str(err.value).startswith(str(tmp_path / f"{name}.pt")) and message in str(err.value), str(err.value)


def test_a_config_that_does_not_describe_its_weights_is_refused_before_any_memory_is_spent(tmp_path, tiny,
                                                                                          monkeypatch):
    built = []
    init = blurdm.MIMOUNet.__init__
    monkeypatch.setattr(blurdm.MIMOUNet, "__init__", lambda self, cfg: built.append(torch.empty(0).device.type)
                        or init(self, cfg))
    cases = {"big": ({"width": 128, "num_res": 20}, "weight deblurrer.stem.0.weight is (8, 3, 3, 3) in the file but "
                                                    "(128, 3, 3, 3) in the model"),
             "narrow": ({"width": 1}, "width must be in [4, 1024]"), "eps": ({"charbonnier_eps": -1.0}, "charbonnier_eps"),
             "fft": ({"fft_weight": -5.0}, "fft_weight must be in"), "alpha": ({"alpha_end": 1e308}, "alpha_end must be in")}
    for name, (change, message) in cases.items():
        torch.save({"format": "blurdm", "config": {**blurdm.asdict(tiny.cfg), **change}, "model": tiny.state_dict()},
                   tmp_path / f"{name}.pt")
        with pytest.raises(blurdm.CheckpointError, match=re.escape(message)):
            blurdm.load_model(tmp_path / f"{name}.pt")
    assert built == ["meta"]  # the big one was built without memory, and refused there


def test_a_weight_that_declares_a_huge_shape_or_has_no_data_is_refused_before_memory_is_spent(tmp_path,
                                                                                             sample_strong_ckpt):
    checkpoint = torch.load(sample_strong_ckpt, weights_only=True)
    name = next(iter(checkpoint["model"]))
    for kind, value, message in (("expanded", torch.zeros(1).expand(100000, 100000), "an expanded tensor"),
                                 ("meta", torch.empty(3, device="meta"), "holds no data (a meta tensor)")):
        torch.save({**checkpoint, "model": {**checkpoint["model"], name: value}}, tmp_path / f"{kind}.pt")
        with pytest.raises(blurdm.CheckpointError) as caught:
            blurdm.load_model(tmp_path / f"{kind}.pt")
        assert str(caught.value).startswith(f"{tmp_path / kind}.pt: weight {name} ") and message in str(caught.value)


def test_malformed_files_of_a_known_kind_give_one_line_in_load_model_sample_and_train(tmp_path, capsys):
    for path, message in _malformed(tmp_path).items():
        with pytest.raises(blurdm.CheckpointError) as caught:
            blurdm.load_model(path)
        assert message in str(caught.value) and str(caught.value).count("\n") == 0, (path, caught.value)
        code, _, err = _sample_run([_sample_save(tmp_path / "a.png"), "--ckpt", path], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    _sample_save(tmp_path / "photos" / "p.png", 80, 80)
    path, message = next(iter(_malformed(tmp_path).items()))
    code = _train(["--data", tmp_path / "photos", "--init", path, "--preset", "tiny", "--out", tmp_path / "o",
                   "--iters", "1,0,0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------------------------
# published weights (MIMO-UNet, MIMO-UNet+, the official BlurDM files) and export


def test_every_key_of_the_original_code_maps_to_a_weight_of_its_shape_and_covers_the_model():
    for fixture, preset, num_res in (("mimo_unet", "mimo-unet", 8), ("mimo_unet_plus", "paper", 20)):
        names = blurdm.mimo_unet_names(num_res)
        with torch.device("meta"):
            own = BlurDM(BlurDMConfig.preset(preset, prior=False)).state_dict()
        assert {names[key]: tuple(shape) for key, shape in OFFICIAL[fixture]} == {k: tuple(v.shape) for k, v in own.items()}
    cfg = BlurDMConfig.preset("paper")
    names = blurdm.mimo_unet_names(20) | blurdm.official_prior_names(cfg)
    with torch.device("meta"):
        own = BlurDM(cfg).state_dict()
    stored = [(k, s) for k, s in OFFICIAL["blurdm_deblur"] + OFFICIAL["blurdm_dm"] if k not in SCHEDULE_BUFFERS]
    stored += [("le." + k, s) for k, s in OFFICIAL["blurdm_le"]]
    assert {names[key]: tuple(shape) for key, shape in stored} == {k: tuple(v.shape) for k, v in own.items()}


def test_mimo_unet_files_load_bit_exact_as_the_backbone_on_images_in_0_1(tmp_path):
    model = randomised(BlurDM(BlurDMConfig.preset("paper", prior=False)))
    deblur, _, _ = in_official_names(model, 20)
    torch.save({"model": deblur}, tmp_path / "MIMO-UNetPlus.pkl")  # as published
    torch.save({"model": {"module." + k: v for k, v in deblur.items()}, "optimizer": {"state": {}}, "epoch": 3000},
               tmp_path / "model.pkl")  # a training state, as its train.py writes it (and one DataParallel copy)
    for name in ("MIMO-UNetPlus.pkl", "model.pkl"):
        loaded = blurdm.load_model(tmp_path / name)
        assert loaded.cfg == BlurDMConfig.preset("paper", prior=False, input_offset=0.0)  # MIMO-UNet+: 20 blocks
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    broken = {**deblur, "Encoder.0.layers.0.main.0.main.0.weight": torch.zeros(32, 32, 1, 1)}
    torch.save({"model": broken}, tmp_path / "shape.pkl")
    torch.save({"model": {**deblur, "Extra.weight": torch.zeros(1)}}, tmp_path / "extra.pkl")
    for name, message in (("shape.pkl", "weight Encoder.0.layers.0.main.0.main.0.weight is torch.Size([32, 32, 1, 1]), "
                                        "not (32, 32, 3, 3)"), ("extra.pkl", "weight Extra.weight is not one of")):
        with pytest.raises(blurdm.CheckpointError, match=re.escape(f"{tmp_path / name}: {message}")):
            blurdm.load_model(tmp_path / name)


def test_a_mimo_unet_model_feeds_its_network_the_unshifted_image_and_returns_the_networks_output(tmp_path):
    backbone = strong(prior=False)
    torch.save({"model": in_official_names(backbone, 1)[0]}, tmp_path / "small.pkl")
    model = blurdm.load_model(tmp_path / "small.pkl")
    seen = []
    model.deblurrer.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output[-1])))
    x = torch.rand(1, 3, 32, 40)
    out = model.deblur(x)
    assert torch.equal(seen[0][0], x)  # [0, 1], as MIMO-UNet's eval.py feeds it
    assert torch.equal(out, seen[0][1].clamp(0, 1)) and not torch.equal(out, x)


def test_official_blurdm_files_load_bit_exact_with_the_official_schedule_and_prior_loss(tmp_path):
    cfg = BlurDMConfig.preset("paper", beta_bar_rule="official", prior_distance="charbonnier")
    model = randomised(BlurDM(cfg))
    deblur, dm, le = in_official_names(model, 20)
    d = model.diffusion
    buffers = {"alphas": d.alpha, "betas_bar": d.beta_bar[1:], "time_stamps_list": torch.arange(5, 0, -1)}
    args = argparse.Namespace(model_name="MIMOUNetBlurDM", device=torch.device("cpu"), best_psnr=31.5)
    torch.save({"epoch": 3000, "model_state": deblur, "model_dm_state": {**buffers, **dm}, "optimizer_state": {},
                "args": args}, tmp_path / "last_MIMOUNetBlurDM.pth")  # stage 3's training state: no sharp encoder
    if blurdm.TORCH_VERSION < (2, 5):  # weights_only can allow argparse.Namespace from torch 2.5 on
        with pytest.raises(blurdm.CheckpointError, match=r"pickled argparse.Namespace, .*\(torch >= 2\.5 can\)"):
            blurdm.load_model(tmp_path / "last_MIMOUNetBlurDM.pth")
        pytest.skip("the official files pickle an argparse.Namespace: loading them needs torch >= 2.5")
    for name, part in (("deblur", {"model_state": deblur}), ("dm", {"model_dm_state": {**buffers, **dm}}),
                       ("le", {"model_le_state": le})):
        torch.save({**part, "args": args}, tmp_path / f"final_{name}_MIMOUNetBlurDM.pth")
    own = model.state_dict()
    for name in ("last_MIMOUNetBlurDM.pth", "final_deblur_MIMOUNetBlurDM.pth", "final_dm_MIMOUNetBlurDM.pth"):
        loaded = blurdm.load_model(tmp_path / name)
        assert loaded.cfg == cfg
        assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items()
                   if name != "last_MIMOUNetBlurDM.pth" or not k.startswith("sharp_encoder."))
    for dtype in (torch.float16, torch.bfloat16):  # saved in half precision: the schedule is compared at that precision
        half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in {**buffers, **dm}.items()}
        torch.save({"model_state": deblur, "model_dm_state": half, "args": args}, tmp_path / "half.pth")
        assert blurdm.load_model(tmp_path / "half.pth").cfg == cfg
    paper = {**buffers, "betas_bar": BlurDiffusion(BlurDMConfig()).beta_bar[1:]}  # another schedule: refused
    torch.save({"model_state": deblur, "model_dm_state": {**paper, **dm}, "args": args}, tmp_path / "other.pth")
    with pytest.raises(blurdm.CheckpointError, match="other.pth: schedule betas_bar .* is not the official one"):
        blurdm.load_model(tmp_path / "other.pth")
    torch.save({"model_dm_state": {**buffers, **dm}, "args": args}, tmp_path / "final_dm_BlurDM.pth")  # stage 2's
    with pytest.raises(blurdm.CheckpointError, match="final_dm_BlurDM.pth: the official blur diffusion .* without a "
                                                     "deblurrer"):
        blurdm.load_model(tmp_path / "final_dm_BlurDM.pth")
    (tmp_path / "final_dm_MIMOUNetBlurDM.pth").unlink()
    with pytest.raises(blurdm.CheckpointError, match="final_deblur_MIMOUNetBlurDM.pth: a stage-1 file"):
        blurdm.load_model(tmp_path / "final_deblur_MIMOUNetBlurDM.pth")


def test_a_prior_added_to_a_published_backbone_starts_at_the_backbones_own_output(tmp_path, photo, capsys):
    backbone = strong(prior=False, input_offset=0.0)
    torch.save({"model": in_official_names(backbone, 1)[0]}, tmp_path / "MIMO-UNet.pkl")
    cfg, state, _ = blurdm.read_checkpoint(tmp_path / "MIMO-UNet.pkl")
    model = BlurDM(replace(cfg, prior=True, fusion_residual=True))
    blurdm.load_weights(model, state, "MIMO-UNet.pkl", optional=blurdm.NEW_AT_STAGE[1])
    blur, sharp = photo[..., :32, :48], photo[..., 32:64, :48]
    for prior in (model.sharp_latent(blur, sharp), model.sharp_prior(blur)):
        assert torch.equal(model.run_deblurrer(blur, prior)[-1], backbone.run_deblurrer(blur, None)[-1])
    data = _gopro(tmp_path / "gopro", per_sequence=2)
    assert _train(["--data", data, "--out", tmp_path / "out", *_FAST, "--iters", "1,0,0", "--init",
                   tmp_path / "MIMO-UNet.pkl"]) == 0
    assert "a backbone: the prior networks are new, their fusion starts as the identity" in capsys.readouterr().out
    trained = _checkpoint(tmp_path / "out" / "stage1.pt")["config"]
    assert trained["prior"] and trained["fusion_residual"] and trained["input_offset"] == 0.0  # kept for fine-tuning
    with pytest.raises(blurdm.CheckpointError, match="stage1.pt: a stage-1 checkpoint, its blur diffusion untrained"):
        blurdm.load_model(tmp_path / "out" / "stage1.pt")
    assert _train(["--data", data, "--out", tmp_path / "late", *_FAST, "--iters", "0,1,1", "--init",
                   tmp_path / "MIMO-UNet.pkl"]) == 1
    assert "a backbone without a prior; its prior networks train from stage 1 on" in _error_line(capsys.readouterr().err)


def test_the_exported_program_matches_deblur_at_any_size_without_this_module(tmp_path):
    model = kaiming(untrained()).double().train()
    if blurdm.TORCH_VERSION < (2, 6):
        with pytest.raises(RuntimeError, match=r"export_program needs torch >= 2\.6"):
            blurdm.export_program(model, tmp_path / "tiny.pt2")
        pytest.skip("export_program needs torch >= 2.6")
    blurdm.export_program(model, tmp_path / "tiny.pt2")
    assert model.training and next(model.parameters()).dtype == torch.float64  # the caller's model is untouched
    model = model.float().eval()
    program = torch.export.load(tmp_path / "tiny.pt2").module()  # torch alone: no class of this module inside
    for shape in ((1, 3, 37, 53), (2, 3, 64, 80)):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert (program(x) - model.deblur(x)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# image files


def test_read_image_converts_modes_and_names_bad_files(tmp_path):
    from PIL import Image

    gray16 = np.full((5, 6), 65535 // 2, dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    x = blurdm.read_image(tmp_path / "gray16.png")
    assert x.shape == (3, 5, 6) and x.max().item() == pytest.approx(0.5, abs=1e-4)
    Image.new("RGBA", (4, 3), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    rgb, extras = blurdm.read_image(tmp_path / "rgba.png", extras=True)
    alpha = extras["alpha"]
    assert rgb.shape == (3, 3, 4) and alpha.shape == (1, 3, 4) and alpha.max().item() == pytest.approx(128 / 255)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("empty.png", "notes.png", "missing.png"):
        with pytest.raises(ValueError, match=name):
            blurdm.read_image(tmp_path / name)
    blurdm.write_image(rgb, tmp_path / "out.png", alpha)
    back, extras = blurdm.read_image(tmp_path / "out.png", extras=True)
    assert torch.equal(blurdm.to_uint8(back), blurdm.to_uint8(rgb)) and torch.allclose(extras["alpha"], alpha)


def test_read_image_refuses_negative_float_pixels(tmp_path):
    path = tmp_path / "neg.tif"
    Image.fromarray((np.random.default_rng(0).random((40, 56)) - 0.5).astype("float32"), "F").save(path)
    with pytest.raises(ValueError, match=f"{path}: pixel values down to -0.4"):
        blurdm.read_image(path)


# ----------------------------------------------------------------------------------------------------------------
# data sets on disk (find_pairs)


def test_gopro_tree_pairs_blur_with_sharp_per_sequence_never_blur_gamma(tmp_path):
    _gopro(tmp_path / "GOPRO_Large")
    splits, problems = blurdm.find_pairs(tmp_path)  # the folder the archive was unpacked into
    assert problems == [] and _counts(splits) == {"train": 6, "test": 2}
    for blur, sharp in splits["train"] + splits["test"]:
        assert Path(blur).parent.name == "blur" and Path(sharp).parent.name == "sharp"
        assert Path(blur).name == Path(sharp).name and Path(blur).parents[1] == Path(sharp).parents[1]


def test_pairs_are_matched_by_name_not_position_and_the_unmatched_reported(tmp_path):
    for name in "abc":  # sorted by position, blur a,b,c would meet sharp b,c,d
        _png(tmp_path / "blur" / f"{name}.png", seed=ord(name))
    for name in "bcd":
        _png(tmp_path / "sharp" / f"{name}.png", seed=ord(name))
    splits, problems = blurdm.find_pairs(tmp_path)
    assert [(Path(b).name, Path(s).name) for b, s in splits["train"]] == [("b.png", "b.png"), ("c.png", "c.png")]
    assert len(problems) == 1 and "2 images with no partner" in problems[0]
    assert "a.png" in problems[0] and "d.png" in problems[0]


def test_flat_gopro_and_paired_split_folders_pair_across_suffixes(tmp_path):
    for split in ("train", "test"):
        for k in range(2):
            _png(tmp_path / "flat" / split / "input" / f"GOPR0001-{k:06d}.png", seed=k)
            _png(tmp_path / "flat" / split / "target" / f"GOPR0001-{k:06d}.png", seed=k)
            _png(tmp_path / "paired" / split / "blur" / "scene" / f"{k}.jpg", seed=k)
            _png(tmp_path / "paired" / split / "sharp" / "scene" / f"{k}.png", seed=k)
    for folder in ("flat", "paired"):
        splits, problems = blurdm.find_pairs(tmp_path / folder)
        assert problems == [] and _counts(splits) == {"train": 2, "test": 2}
    assert all(Path(b).stem == Path(s).stem and Path(b).parent.name == "scene" for b, s in splits["test"])


def test_realblur_lists_pair_the_gt_and_blur_columns_and_report_missing_files(tmp_path):
    root = tmp_path / "RealBlur"
    lines = {"train": [], "test": []}
    for split, scenes in (("train", (1, 2)), ("test", (3,))):
        for scene in scenes:
            gt, blur = f"RealBlur-R_ECC/scene{scene:03d}/gt/gt_1.png", f"RealBlur-R_ECC/scene{scene:03d}/blur/blur_1.png"
            _png(root / gt, seed=scene)
            _png(root / blur, seed=scene + 50)
            lines[split].append(f"{gt} {blur}")
    lines["train"].append("RealBlur-R_ECC/scene009/gt/gt_1.png RealBlur-R_ECC/scene009/blur/blur_1.png")  # missing
    for split in lines:
        (root / f"RealBlur_R_{split}_list.txt").write_text("\n".join(lines[split]) + "\n")
    splits, problems = blurdm.find_pairs(root)
    assert _counts(splits) == {"train": 2, "test": 1}
    for blur, sharp in splits["train"]:
        assert "/blur/blur_" in blur and "/gt/gt_" in sharp and Path(blur).parents[1] == Path(sharp).parents[1]
    assert problems == [f"{root / 'RealBlur_R_train_list.txt'}: 2 files it names do not exist "
                        f"({root / 'RealBlur-R_ECC/scene009/blur/blur_1.png'}, {root / 'RealBlur-R_ECC/scene009/gt/gt_1.png'})"]
    splits, _ = blurdm.find_pairs(root / "RealBlur_R_test_list.txt")  # a list file names the data set too
    assert _counts(splits) == {"train": 2, "test": 1}
    (root / "mine.txt").write_text(lines["test"][0])  # a list of another name is one split, never both
    assert _counts(blurdm.find_pairs(root / "mine.txt")[0]) == {"train": 1}


def test_hide_pairs_the_test_subsets_with_gt_by_file_name(tmp_path):
    root = tmp_path / "HIDE_dataset"
    for subset, names in (("test-close-ups", ("1fromGOPR0950.png",)), ("test-long-shot", ("2fromGOPR1096.png", "x.png"))):
        for name in names:
            _png(root / "test" / subset / name, seed=len(name))
    for name in ("1fromGOPR0950.png", "2fromGOPR1096.png", "9fromGOPR0001.png"):  # GT/ also holds train images
        _png(root / "GT" / name, seed=len(name) + 1)
    splits, problems = blurdm.find_pairs(root)
    assert list(splits) == ["test"]
    assert sorted((Path(b).name, Path(s).parent.name) for b, s in splits["test"]) == \
        [("1fromGOPR0950.png", "GT"), ("2fromGOPR1096.png", "GT")]
    assert len(problems) == 1 and "x.png" in problems[0]  # the blurry image with no GT
    _png(root / "train" / "9fromGOPR0001.png", 9)  # HIDE's own train/ pairs with GT/ too
    assert _counts(blurdm.find_pairs(root)[0]) == {"test": 2, "train": 1}


def test_a_folder_of_photographs_is_recursive_unpaired_and_split_by_train_and_test(tmp_path):
    _png(tmp_path / "a" / "a.png", 1)
    _png(tmp_path / "a" / "trip" / "b.jpg", 2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    splits, problems = blurdm.find_pairs(tmp_path / "a")
    assert problems == [] and sorted(Path(s).name for _, s in splits["train"]) == ["a.png", "b.jpg"]
    assert all(b is None for b, _ in splits["train"])
    for split, names in (("train", "abc"), ("test", "d")):
        for k, name in enumerate(names):
            _png(tmp_path / "b" / split / f"{name}.png", k)
    splits, _ = blurdm.find_pairs(tmp_path / "b")
    assert {k: sorted(Path(s).stem for _, s in v) for k, v in splits.items()} == {"train": list("abc"), "test": ["d"]}
    _png(tmp_path / "c" / "e.png", 5)  # a test/ folder at any depth holds test photographs, never trained on
    _png(tmp_path / "c" / "set" / "test" / "f.png", 6)
    splits, _ = blurdm.find_pairs(tmp_path / "c")
    assert {k: [Path(s).stem for _, s in v] for k, v in splits.items()} == {"train": ["e"], "test": ["f"]}


def test_a_folder_of_photographs_leaves_out_sample_outputs_and_says_how_many(tmp_path):
    photos = _photos(tmp_path / "photos", 3)
    _sample_save(photos / "p0_deblurred.png", 80, 80, seed=9)
    splits, problems = blurdm.find_pairs(photos)
    assert sorted(Path(s).name for _, s in splits["train"]) == ["p0.png", "p1.png", "p2.png"]
    assert problems == [f"{photos}: 1 images named *_deblurred.* (sample.py's outputs) left out "
                        f"({photos / 'p0_deblurred.png'}, ...)"]


def test_a_tree_mixing_pairs_and_other_images_says_what_it_leaves_out(tmp_path):
    _png(tmp_path / "heldout" / "blur" / "a.png", 1)
    _png(tmp_path / "heldout" / "sharp" / "a.png", 1)
    _png(tmp_path / "photos" / "b.png", 2)
    splits, problems = blurdm.find_pairs(tmp_path)
    assert _counts(splits) == {"train": 1}
    assert problems == [f"{tmp_path}: 1 images outside the paired folders, not used ({tmp_path / 'photos' / 'b.png'}, ...)"]


def test_find_pairs_names_the_folder_when_it_cannot_be_used(tmp_path):
    for where, match in ((tmp_path / "nowhere", "nowhere: no such folder"), (tmp_path / "empty", "no images found"),
                         (tmp_path / "half", "no blurry/sharp pairs matched"),
                         (tmp_path / "onlysharp", "found sharp/a but no blurry partner folder"),
                         (tmp_path / "photo.jpg", "photo.jpg: not a folder")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        _png(tmp_path / "half" / "blur" / "a.png", 1)
        _png(tmp_path / "onlysharp" / "sharp" / "a.png", 1)
        _png(tmp_path / "photo.jpg", 1)
        with pytest.raises(ValueError, match=match):
            blurdm.find_pairs(where)
    (tmp_path / "RealBlur_J_test_list.txt").write_bytes(b"\xff\xd8\xff binary")
    with pytest.raises(ValueError, match="RealBlur_J_test_list.txt: not a RealBlur list file"):
        blurdm.find_pairs(tmp_path / "RealBlur_J_test_list.txt")


# ----------------------------------------------------------------------------------------------------------------
# §7 synthetic training blur


def test_synthetic_pair_is_blurred_8bit_and_deterministic(photo):
    g = lambda: torch.Generator().manual_seed(7)
    blurry = blurdm.synthesize_blur(photo[0], generator=g(), length=(15.0, 15.0))
    assert blurry.shape == photo[0].shape
    assert torch.equal(blurry, blurdm.synthesize_blur(photo[0], generator=g(), length=(15.0, 15.0)))
    assert torch.equal(blurry * 255, (blurry * 255).round())
    assert high_frequency_energy(blurry) < 0.6 * high_frequency_energy(photo[0])
    assert blurdm.psnr(blurdm.to_uint8(blurry), blurdm.to_uint8(photo[0])) < 30


def test_photographs_blurred_a_batch_at_a_time_where_the_model_trains_equal_those_blurred_one_by_one(tmp_path):
    _png(tmp_path / "photo.png", 3, size=(80, 96))
    pairs = [(None, str(tmp_path / "photo.png"))]
    one_by_one = blurdm.PairDataset(pairs, 32, (4.0, 30.0), seed=0, reuse=2)
    batched = blurdm.PairDataset(pairs, 32, (4.0, 30.0), seed=0, reuse=2, blur_on_device=True)
    items = [(3, step, k) for step in range(3) for k in range(4)]
    blur, sharp = blurdm.blur_batch_on_device(torch.utils.data.default_collate([batched[i] for i in items]), "cpu")
    assert len({batched[i][2] for i in items}) > 1  # paths of several lengths in one batch
    for j, item in enumerate(items):
        assert torch.equal(blur[j], one_by_one[item][0]) and torch.equal(sharp[j], one_by_one[item][1])


# ----------------------------------------------------------------------------------------------------------------
# precision


def test_auto_precision_is_bf16_where_native_and_fp32_elsewhere(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(blurdm, "has_native_bf16", lambda: native)
        _, precision, note = blurdm.autocast("cpu", "auto")
        assert (precision, note) == (expected, None)
    assert blurdm.autocast("cpu", "fp32")[1:] == ("fp32", None)
    assert blurdm.autocast("cpu", "fp16")[1:] == ("fp32", "fp16 runs in fp32 on cpu: fp16 is for CUDA")


# ================================================================================================================
# train.py
# ----------------------------------------------------------------------------------------------------------------
# data and augmentation


def test_train_augmentation_moves_blur_and_sharp_together_and_is_seeded_by_the_step(tmp_path):
    sharp = _png(tmp_path / "s.png", 1, size=(48, 56))
    Image.fromarray(255 - sharp).save(tmp_path / "b.png")  # blur = 1 - sharp, a relation any shared transform keeps
    dataset = blurdm.PairDataset([(str(tmp_path / "b.png"), str(tmp_path / "s.png"))], 32, (0, 0), seed=5)
    seen = set()
    for step in range(12):
        blur, sharp_crop = dataset[(1, step, 0)]
        assert blur.shape == sharp_crop.shape == (3, 32, 32)
        torch.testing.assert_close(blur, 1 - sharp_crop, atol=1e-6, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(dataset[(1, step, 0)], (blur, sharp_crop)))
        seen.add(sharp_crop.sum().item())
    assert len(seen) > 6  # crops, flips and turns vary with the step


def test_train_reuse_serves_one_rendered_crop_for_that_many_steps_each_time_turned_or_flipped(tmp_path):
    _png(tmp_path / "photo.png", 3, size=(96, 96))
    pairs = [(None, str(tmp_path / "photo.png"))]
    dataset = blurdm.PairDataset(pairs, 32, (10.0, 10.0), seed=0, reuse=4)

    def symmetries(x):  # the 8 turns and flips of a square image
        return [torch.rot90(f, r, (-2, -1)) for f in (x, x.flip(-1)) for r in range(4)]

    samples = {step: dataset[(3, step, 0)] for step in range(8)}
    for group in (range(4), range(4, 8)):
        first = symmetries(torch.stack(samples[group[0]]))
        assert all(any(torch.equal(torch.stack(samples[s]), f) for f in first) for s in group)  # the same crop
        assert not all(torch.equal(torch.stack(samples[s]), torch.stack(samples[group[0]])) for s in group)  # turned
    assert not any(torch.equal(torch.stack(samples[4]), f) for f in symmetries(torch.stack(samples[0])))  # a new one
    fresh = blurdm.PairDataset(pairs, 32, (10.0, 10.0), seed=0, reuse=4)  # a resumed run, mid-group: the same samples
    assert all(torch.equal(a, b) for a, b in zip(fresh[(3, 6, 0)], samples[6]))


def test_train_photographs_get_a_synthetic_blur_of_the_same_crop_as_long_as_blur_length_says(tmp_path):
    _png(tmp_path / "photo.png", 3, size=(96, 96))
    pairs, change = [(None, str(tmp_path / "photo.png"))], {}
    for length in ((0.0, 0.0), (30.0, 30.0)):
        dataset = blurdm.PairDataset(pairs, 32, length, seed=0)
        samples = [dataset[(1, step, 0)] for step in range(4)]
        assert all(torch.equal((b * 255).round() / 255, b) for b, _ in samples)  # 8-bit, as a saved photo
        change[length] = sum((b - s).abs().mean().item() for b, s in samples) / 4
    assert change[(0.0, 0.0)] < 0.02  # a still camera: the sharp crop plus sensor noise (σ ≤ 0.01) and rounding
    assert 5 * change[(0.0, 0.0)] < change[(30.0, 30.0)] < 0.25  # blurred, but the same content, not another crop


# ----------------------------------------------------------------------------------------------------------------
# three stages, the log, evaluation


def test_train_three_stages_end_to_end_give_a_checkpoint_sample_py_loads(tmp_path, capsys):
    data, out = _gopro(tmp_path / "gopro"), tmp_path / "out"
    assert _train(["--data", data, "--out", out, *_FAST, "--workers", "1", "--iters", "2,1,2", "--val-every", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "2 test pairs, 6 train pairs" in stdout
    assert re.fullmatch(rf"done in 0:00:\d\d\. deblur with: python sample.py YOUR_IMAGE --ckpt {re.escape(str(out / 'best.pt'))}",
                        stdout.strip().splitlines()[-1])
    last = _checkpoint(out / "last.pt")
    assert (last["stage"], last["step"]) == (3, 2) and last["config"]["prior"] is True
    # each stage trains its own parts only (METHOD.md §5); the frozen sharp encoder keeps its BatchNorm statistics
    w1, w2, w3 = (_weights(out / f"stage{s}.pt") for s in (1, 2, 3))
    part = lambda w, name: torch.cat([v.flatten().float() for k, v in w.items() if k.startswith(name + ".")])
    same = lambda a, b, name: torch.equal(part(a, name), part(b, name))
    assert same(w1, w2, "deblurrer") and not same(w2, w3, "deblurrer") and not same(w1, w2, "blur_encoder")
    assert same(w1, w2, "sharp_encoder") and same(w2, w3, "sharp_encoder")
    log = _log(out)
    assert [(r["stage"], r["step"]) for r in log if "loss" in r] == [(1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]
    assert all(r["step_ms"] >= r["data_ms"] >= 0 for r in log if "loss" in r)
    assert sum("val_psnr" in r for r in log) == 5
    restored = blurdm.load_model(out / "best.pt").deblur(torch.rand(1, 3, 37, 53))  # as sample.py loads it
    assert restored.shape == (1, 3, 37, 53) and torch.isfinite(restored).all()
    assert _train(["--data", data, "--out", out, *_FAST, "--workers", "1", "--iters", "2,1,2", "--val-every", "1"]) == 0
    rerun = capsys.readouterr().out
    assert "stage 3 finished" in rerun and "stage 3 (" not in rerun and "done in" in rerun  # rerun: nothing left


def test_train_log_lines_say_the_steps_of_the_stage_and_the_time_left_and_the_end_the_time_taken(tmp_path, capsys):
    assert _train(["--data", _photos(tmp_path / "photos", 2), "--out", tmp_path / "o", *_FAST, "--iters", "2,1,2",
                   "--val-count", "0", "--blur-length", "4,8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if " step " in line and line.startswith("stage")]
    assert [line.split(" | ")[0] for line in steps] == ["stage 1 step 1/2", "stage 1 step 2/2", "stage 2 step 1/1",
                                                      "stage 3 step 1/2", "stage 3 step 2/2"]
    assert all(" | left: stage " in line and ", run " in line for line in steps)
    assert re.match(r"done in 0:00:\d\d\. deblur with", lines[-1]), lines[-1]


def test_train_later_stages_start_from_init_and_no_prior_trains_the_baseline(tmp_path, capsys):
    data = _gopro(tmp_path / "gopro", per_sequence=2)
    assert _train(["--data", data, "--out", tmp_path / "b", *_FAST, "--iters", "0,1,1"]) == 1
    assert "stage 2 starts from a stage 1 model: pass --init" in capsys.readouterr().err
    _train(["--data", data, "--out", tmp_path / "a", *_FAST, "--iters", "1,0,0"])
    assert _train(["--data", data, "--out", tmp_path / "b", *_FAST, "--iters", "0,1,0", "--init", tmp_path / "a" / "stage1.pt"]) == 0
    assert f"starts from the weights of {tmp_path / 'a' / 'stage1.pt'}" in capsys.readouterr().out
    stage1, stage2 = _weights(tmp_path / "a" / "stage1.pt"), _weights(tmp_path / "b" / "stage2.pt")
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("deblurrer."))
    assert _train(["--data", data, "--out", tmp_path / "c", *_FAST, "--no-prior", "--iters", "1"]) == 0
    baseline = _checkpoint(tmp_path / "c" / "last.pt")
    assert baseline["config"]["prior"] is False and (baseline["stage"], baseline["step"]) == (3, 1)
    assert not any(k.startswith(("sharp_encoder", "blur_encoder")) for k in baseline["model"])


def test_train_eval_only_scores_every_test_image_as_the_tables_do(tmp_path, capsys, tiny):
    data = _gopro(tmp_path / "gopro")
    blurdm.save_checkpoint(tmp_path / "model.pt", tiny)
    assert _train(["--data", data, "--eval-only", "--init", tmp_path / "model.pt", "--out", tmp_path / "eval",
                   "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    splits, _ = blurdm.find_pairs(data)
    assert [r["input"] for r in rows] == [b for b, _ in splits["test"]]
    for row, (blur, sharp) in zip(rows, splits["test"]):
        out = blurdm.to_uint8(tiny.deblur(blurdm.read_image(blur)[None])[0])
        expected = blurdm.to_uint8(blurdm.read_image(sharp))
        assert float(row["psnr_db"]) == pytest.approx(blurdm.psnr(out, expected), abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(blurdm.ssim(out, expected), abs=1e-6)
    assert "mean of 2: PSNR" in capsys.readouterr().out


def test_train_eval_only_on_data_without_a_test_split_says_what_it_scores(tmp_path, capsys, tiny):
    for k in range(2):
        _png(tmp_path / "pairs" / "blur" / f"{k}.png", k)
        _png(tmp_path / "pairs" / "sharp" / f"{k}.png", k + 9)
    blurdm.save_checkpoint(tmp_path / "model.pt", tiny)
    assert _train(["--data", tmp_path / "pairs", "--eval-only", "--init", tmp_path / "model.pt", "--out",
                   tmp_path / "eval", "--device", "cpu"]) == 0
    assert f"note: {tmp_path / 'pairs'} has no test split: scoring its train pairs" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# resume


def test_train_a_run_stopped_in_stage_2_or_3_and_resumed_ends_bit_identical(tmp_path, monkeypatch, capsys):
    data = _gopro(tmp_path / "gopro")
    args = ["--data", data, *_FAST, "--iters", "3,6,6", "--val-every", "0", "--save-every", "1000"]
    assert _train([*args, "--out", tmp_path / "straight"]) == 0
    straight = _checkpoint(tmp_path / "straight" / "last.pt")
    moments = lambda c: [t for state in c["optimizer"]["state"].values() for t in state.values()]
    load = blurdm.PairDataset.__getitem__
    for stop_stage in (2, 3):  # the same command, sent SIGTERM while loading step 3 of that stage, then rerun
        def getitem(self, item):
            if item == (stop_stage, 3, 0):
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # sent twice, as a scheduler and torchrun both do: still saves
            return load(self, item)
        monkeypatch.setattr(blurdm.PairDataset, "__getitem__", getitem)
        out = tmp_path / f"stopped{stop_stage}"
        assert _train([*args, "--out", out]) == 128 + signal.SIGTERM
        assert f"stopped at stage {stop_stage} step 4; saved" in capsys.readouterr().out
        monkeypatch.setattr(blurdm.PairDataset, "__getitem__", load)
        assert _train([*args, "--out", out]) == 0
        assert f"resuming stage {stop_stage} at step 4" in capsys.readouterr().out
        resumed = _checkpoint(out / "last.pt")
        assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])
        assert len(moments(straight)) > 0
        assert all(torch.equal(a, b) for a, b in zip(moments(resumed), moments(straight), strict=True))


def test_train_ctrl_c_twice_says_what_last_pt_holds(tmp_path, capfd, monkeypatch):
    data = _gopro(tmp_path / "gopro", per_sequence=2)
    load = blurdm.PairDataset.__getitem__

    def getitem(self, item):
        if item[1] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks to stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # the second aborts at once
        return load(self, item)
    monkeypatch.setattr(blurdm.PairDataset, "__getitem__", getitem)
    assert _train(["--data", data, "--out", tmp_path / "out", *_FAST, "--iters", "9,0,0", "--save-every", "2"]) == 130
    assert f"aborted; {tmp_path / 'out' / 'last.pt'} holds stage 1 step 2" in capfd.readouterr().out  # os.write


def test_train_resume_refuses_other_settings_or_data_naming_the_setting(tmp_path, capsys):
    data, other = _gopro(tmp_path / "gopro", per_sequence=2), _gopro(tmp_path / "other", per_sequence=2)
    args = ["--out", tmp_path / "out", *_FAST, "--iters", "1,0,0"]
    assert _train(["--data", data, *args]) == 0
    for change, named in ((["--data", other], "data"), (["--data", data, "--blur-length", "0,9"], "blur_length"),
                          (["--data", data, "--batch", "4"], "batch_size"), (["--data", data, "--iters", "2,0,0"], "stage_steps"),
                          (["--data", data, "--no-prior"], "no_prior"), (["--data", data, "--val-count", "1"], "val_count")):
        assert _train([*args, *change]) == 1
        line = _error_line(capsys.readouterr().err)
        assert "saved by a run with other settings" in line and f"{named} " in line, line


def test_train_resume_refuses_changed_photographs_amp_added_and_takes_the_same_folder_by_any_path(tmp_path, capsys,
                                                                                                 monkeypatch):
    data = _gopro(tmp_path / "gopro", per_sequence=2)
    monkeypatch.chdir(tmp_path)
    args = ["--out", tmp_path / "out", *_FAST, "--iters", "1,0,0"]
    assert _train(["--data", "gopro", *args]) == 0
    assert _train(["--data", data.resolve(), *args]) == 0 and "stage 1 finished" in capsys.readouterr().out
    assert _train(["--data", data, *args, "--amp", "bf16"]) == 1
    assert "amp None vs bf16" in _error_line(capsys.readouterr().err)
    changed = data / "train" / "GOPR0372_07_00" / "sharp" / "000001.png"
    _png(changed, seed=99, size=(40, 52))
    assert _train(["--data", data, *args]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "data files added, removed or changed: 1 (train/GOPR0372_07_00/sharp/000001.png)" in line


def test_train_resume_refuses_a_file_whose_modification_time_alone_changed(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", 2)
    args = ["--data", photos, "--out", tmp_path / "o", *_FAST, "--iters", "1,0,0", "--val-count", "0",
            "--blur-length", "4,8"]
    assert _train(args) == 0
    stat = os.stat(photos / "p1.png")
    os.utime(photos / "p1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, a later mtime
    capsys.readouterr()
    assert _train(args) == 1
    assert "data files added, removed or changed: 1 (p1.png)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# several processes


def test_train_two_gloo_processes_agree_with_one_process_on_the_same_global_batch(tmp_path, one_thread):
    data = _gopro(tmp_path / "gopro", per_sequence=2)
    args = ["--data", data, *_FAST, "--batch", "4", "--iters", "3", "--val-every", "0", "--no-prior"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(_REPO / "train.py"), *map(str, args), "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, cwd=_REPO, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # without a prior there is no BatchNorm and no noise: two ranks of batch 2 must follow one process of batch 4,
    # step for step, which they do only if the gradients are averaged across the ranks
    assert _train([*args, "--out", tmp_path / "one"]) == 0
    losses = lambda log: [r["loss"] for r in log if "loss" in r]
    assert len(losses(_log(tmp_path / "ddp"))) == 9
    np.testing.assert_allclose(losses(_log(tmp_path / "ddp")), losses(_log(tmp_path / "one")), rtol=1e-5)
    a, b = _weights(tmp_path / "ddp" / "last.pt"), _weights(tmp_path / "one" / "last.pt")
    # Adam moves a weight whose gradient is near zero by about ±lr whatever its size, so one rounding difference there
    # can show (up to 3e-5 measured, after 9 steps of lr 1e-3); the mean says whether the runs agree (1e-8 measured)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.mean() < 1e-7 and diff.max() < 1e-4


def test_torchrun_with_a_batch_that_does_not_divide_prints_one_line(tmp_path):
    args = ["--data", _gopro(tmp_path / "gopro", per_sequence=2), *_FAST, "--batch", "3", "--out", tmp_path / "out"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(_REPO / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=_REPO,
                            timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert result.returncode != 0 and lines == ["train.py: error: --batch 3 does not divide over the 2 processes"]


def test_more_processes_than_gpus_is_one_line_naming_the_gpu_count(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # set by hand, or by torchrun --nproc_per_node=2 on a one-GPU machine
    assert _train(["--data", tmp_path, "--out", tmp_path / "out", "--device", "cuda"]) == 1
    assert "2 processes on this machine but 1 GPU: one process a GPU (torchrun --nproc_per_node=1)" in \
        _error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------------
# faults and bad input


def test_train_nan_guard_stops_before_a_bad_step_reaches_a_checkpoint(tmp_path, capsys):
    data = _gopro(tmp_path / "gopro", per_sequence=2)
    assert _train(["--data", data, "--out", tmp_path / "good", *_FAST, "--iters", "1,0,0"]) == 0
    out = tmp_path / "bad"  # an absurd learning rate blows the weights up in the first step
    assert _train(["--data", data, "--out", out, *_FAST, "--iters", "0,5,0", "--lr", "1e30", "--init",
                   tmp_path / "good" / "last.pt", "--save-every", "1000"]) == 1
    assert "loss is nan at stage 2 step 1; stopped" in _error_line(capsys.readouterr().err)
    assert not (out / "last.pt").exists()


def test_train_bad_data_and_settings_give_one_line_errors_naming_the_file(tmp_path, capsys):
    _png(tmp_path / "mismatch" / "blur" / "a.png", 1, size=(40, 48))
    _png(tmp_path / "mismatch" / "sharp" / "a.png", 1, size=(40, 40))
    _png(tmp_path / "small" / "tiny.png", 1, size=(16, 16))
    _png(tmp_path / "photo.jpg", 1)
    for data, match in ((tmp_path / "missing", f"{tmp_path / 'missing'}: no such folder"),
                        (tmp_path / "photo.jpg", "photo.jpg: not a folder"),
                        (tmp_path / "mismatch", f"{tmp_path / 'mismatch' / 'blur' / 'a.png'}: 48x40 but its sharp image"),
                        (tmp_path / "small", "16x16 is smaller than the 32px crop")):
        assert _train(["--data", data, "--out", tmp_path / "out", *_FAST, "--iters", "1"]) == 1
        captured = capsys.readouterr()
        assert match in captured.out + _error_line(captured.err)
    assert not (tmp_path / "out" / "last.pt").exists()
    for bad in (["--seed", "99999999999999999999"], ["--blur-length", "4,x"], ["--iters", "1,2"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            train.cli(["--data", str(tmp_path / "small"), *bad])
        assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err


def test_train_settings_that_make_no_sense_get_one_argparse_error_each(tmp_path, capsys):
    cases = ((["--blur-length", "100000"], "--blur-length: paths longer than the 32px crop"),
             (["--lr", "1e-3", "--lr-min", "1e-2"], "--lr-min must be between 0 and --lr"),
             (["--iters", "0,0,0"], "--iters: at least one stage needs iterations"),
             (["--blur-length", "30,4"], "--blur-length LO,HI needs LO <= HI"),
             (["--iters", "-1,1,1"], "takes 3 numbers >= 0"))
    for bad, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.cli(["--data", str(tmp_path), *_FAST, *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_train_truncated_images_are_skipped_with_a_warning_and_one_line_when_none_is_left(tmp_path, capsys):
    data = _gopro(tmp_path / "gopro")
    truncated = data / "train" / "GOPR0372_07_00" / "blur" / "000001.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert _train(["--data", data, "--out", tmp_path / "out", *_FAST, "--iters", "10,0,0"]) == 0
    assert capsys.readouterr().out.count(f"warning: {truncated}: not a readable image") == 1  # however often drawn
    assert _checkpoint(tmp_path / "out" / "last.pt")["step"] == 10
    for png in (data / "train").rglob("blur/*.png"):  # nothing usable left: one line, exit 1
        png.write_bytes(b"garbage")
    assert _train(["--data", data, "--out", tmp_path / "out2", *_FAST, "--iters", "1"]) == 1
    assert "none of the 6 training pairs can be used" in _error_line(capsys.readouterr().err)


def test_train_a_crash_with_data_workers_running_exits_at_once_with_one_line(tmp_path, capsys):
    """An exception in the loop while DataLoader workers (which ignore SIGTERM) run must not hang the exit, and the
    command line shows one line, no traceback."""
    data = _gopro(tmp_path / "gopro")
    crash = ("import sys, train, blurdm\n"
             "def boom(*a, **k): raise RuntimeError('DefaultCPUAllocator: can\\'t allocate memory: you tried 9 GB')\n"
             "blurdm.BlurDM.forward = boom\n"
             f"sys.exit(train.cli(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", crash, "--data", str(data), "--out", str(tmp_path / "out"), *_FAST,
                             "--workers", "2", "--iters", "5"], capture_output=True, text=True, cwd=_REPO, timeout=60)
    assert result.returncode == 1  # within subprocess.run's timeout: no hang
    assert "out of memory" in _error_line(result.stderr) and "--batch or --crop" in result.stderr
    for png in (data / "train").rglob("blur/*.png"):  # an error raised inside a worker: its message, one line
        png.write_bytes(b"garbage")
    assert _train(["--data", data, "--out", tmp_path / "w", *_FAST, "--workers", "2", "--iters", "5"]) == 1
    assert "none of the 6 training pairs can be used" in _error_line(capsys.readouterr().err)
    # its DataLoader was shut down before its workers were killed, not left to a later garbage collection (whose
    # shutdown cannot reach the workers any more, and waits for ever on a lock that a killed worker held)
    assert not [o for o in gc.get_objects() if type(o) is torch.utils.data.DataLoader]


@pytest.mark.parametrize("failure", ["[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                                     "file data/3: file write failed",  # where the writer fails: in a tensor's data
                                     "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 40"])  # its end
def test_train_on_a_full_disk_says_so_keeps_the_last_checkpoint_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch,
                                                                                        failure):
    data, out = _gopro(tmp_path / "gopro", per_sequence=2), tmp_path / "out"
    out.mkdir()
    (out / ".last.tmp99999999.pt").write_bytes(b"left by a killed run")
    (out / f".last.tmp{os.getppid()}.pt").write_bytes(b"a live process's")
    save, calls = torch.save, []

    def filling_up(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 1:
            return save(obj, f, *a, **k)
        Path(f).write_bytes(b"partial")
        raise RuntimeError(failure)

    monkeypatch.setattr(torch, "save", filling_up)
    monkeypatch.setattr(blurdm.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=0))
    assert _train(["--data", data, "--out", out, *_FAST, "--iters", "2,0,0", "--save-every", "1", "--val-count", "0"]) == 1
    assert f"{out}: the disk is full; last.pt was not written (an earlier one is intact)" in _error_line(capsys.readouterr().err)
    assert _checkpoint(out / "last.pt")["step"] == 1
    assert sorted(p.name for p in out.glob(".*")) == [f".last.tmp{os.getppid()}.pt"]


def test_train_the_paper_preset_on_a_cpu_says_which_preset_fits(tmp_path, capsys):
    assert _train(["--data", tmp_path / "missing", "--device", "cpu"]) == 1
    assert "--preset demo is sized for CPUs" in capsys.readouterr().out


# ================================================================================================================
# sample.py
# ----------------------------------------------------------------------------------------------------------------
# inputs and outputs


def test_sample_writes_the_models_output_beside_the_input_at_the_input_size(tmp_path, sample_strong_ckpt, capsys):
    src = _sample_save(tmp_path / "blurry.png", 37, 53)
    code, out, err = _sample_run([src, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0, err
    written = _sample_read(tmp_path / "blurry_deblurred.png")
    assert written.shape == (37, 53, 3)
    expected = _sample_expected(sample_strong_ckpt, src, seed=2023)
    assert np.array_equal(written, expected)  # the model's own output with the official seed, rounded as saved
    assert not np.array_equal(written, _sample_read(src))  # the model did change the image
    assert re.search(r"\[1/1\] .*blurry\.png -> .*blurry_deblurred\.png \| 53x37 \| \d+\.\d\d s", out)
    assert re.search(r"done: 1 written, 0 skipped, 0 failed \| \d+\.\d\d s an image on average \(cpu, fp32\)", out)
    assert "/1" not in err  # no progress bar for one image
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file


def test_sample_reads_every_format_mode_and_size_and_passes_alpha_through(tmp_path, sample_strong_ckpt, capsys):
    """Each odd file must deblur exactly like a plain 8-bit PNG of the picture it shows (ref/)."""
    d, ref = tmp_path / "in", tmp_path / "ref"
    ref.mkdir()
    photo = _sample_photo(12, 20)
    for suffix in ("png", "jpg", "webp", "bmp", "tif"):
        _sample_save(d / f"rgb_{suffix}.{suffix}", 21, 30)
    _sample_save(d / "one_pixel.png", 1, 1)
    _sample_save(d / "odd.png", 7, 13)
    Image.fromarray(photo).convert("P").save(d / "palette.png")
    Image.open(d / "palette.png").convert("RGB").save(ref / "palette.png")
    gray16 = np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 273
    Image.fromarray(gray16).save(d / "gray16.png")
    Image.fromarray((gray16 / 257).round().astype(np.uint8)).save(ref / "gray16.png")
    rgb16 = np.stack([gray16, gray16[::-1], 65535 - gray16], -1)
    _sample_png16(d / "rgb16.png", rgb16)
    Image.fromarray((rgb16 / 257).round().astype(np.uint8)).save(ref / "rgb16.png")
    alpha = np.linspace(0, 255, 12 * 20).reshape(12, 20).astype(np.uint8)
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(d / "rgba.png")
    Image.fromarray(photo).save(ref / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the 12 x 20 file shows as 20 x 12
    Image.fromarray(photo).save(d / "exif.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(photo, -1))).save(ref / "exif.png")

    code, out, err = _sample_run([d, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0, err
    assert "done: 12 written, 0 skipped, 0 failed" in out
    shapes = {p.name: _sample_read(p).shape for p in d.glob("*_deblurred.png")}
    assert shapes == {"rgb_png_deblurred.png": (21, 30, 3), "rgb_jpg_deblurred.png": (21, 30, 3),
                      "rgb_webp_deblurred.png": (21, 30, 3), "rgb_bmp_deblurred.png": (21, 30, 3),
                      "rgb_tif_deblurred.png": (21, 30, 3), "one_pixel_deblurred.png": (1, 1, 3),
                      "odd_deblurred.png": (7, 13, 3), "palette_deblurred.png": (12, 20, 3),
                      "gray16_deblurred.png": (12, 20), "rgb16_deblurred.png": (12, 20, 3),
                      "rgba_deblurred.png": (12, 20, 4), "exif_deblurred.png": (20, 12, 3)}
    assert np.array_equal(_sample_read(d / "rgba_deblurred.png")[..., 3], alpha)  # alpha copied unchanged
    assert _sample_run([ref, "--ckpt", sample_strong_ckpt], capsys)[0] == 0
    for name, tolerance in (("palette", 0), ("rgba", 0), ("exif", 0), ("gray16", 8), ("rgb16", 8)):
        ours = _sample_read(d / f"{name}_deblurred.png").astype(int)
        ours = ours[..., :3] if name == "rgba" else ours
        plain = _sample_read(ref / f"{name}_deblurred.png").astype(int)
        # 16-bit: inputs 1/65535 vs 1/255 apart, which the test network amplifies (4 levels measured); a wrong
        # scale or channel order would be off by tens of levels
        assert np.abs(ours - plain).max() <= tolerance, name


def test_sample_reads_gifs_in_folders_and_names_tiffs_pillow_cannot_decode(tmp_path, sample_strong_ckpt, capsys):
    (tmp_path / "gifs").mkdir()
    Image.fromarray(_sample_photo(16, 24)).save(tmp_path / "gifs" / "anim.gif")
    code, out, _ = _sample_run([tmp_path / "gifs", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "done: 1 written" in out
    _float_rgb_tiff(tmp_path / "float.tif", np.random.default_rng(0).random((4, 5, 3)))
    code, _, err = _sample_run([tmp_path / "float.tif", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "float.tif: a TIFF variant that Pillow cannot decode" in err


def test_sample_grayscale_in_gives_grayscale_out_without_a_colour_tint(tmp_path, sample_strong_ckpt, capsys):
    gray = _sample_save(tmp_path / "gray.png", 24, 40, mode="L")
    _sample_save(tmp_path / "colour.png", 24, 40)
    Image.fromarray(np.dstack([_sample_read(gray), _sample_read(gray)]), "LA").save(tmp_path / "gray_alpha.png")
    code, _, err = _sample_run([tmp_path, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0, err
    rgb = _sample_expected(sample_strong_ckpt, gray).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 2  # the model alone would tint this gray image
    with Image.open(tmp_path / "gray_deblurred.png") as written:
        assert written.mode == "L"
        # the mean of the model's channels (rounded once, from floats: within 1 of the rounded channels' mean)
        assert np.abs(np.asarray(written).astype(int) - rgb.mean(-1)).max() <= 1
    with Image.open(tmp_path / "gray_alpha_deblurred.png") as written:
        assert written.mode == "LA"  # gray with alpha stays gray, alpha kept
    with Image.open(tmp_path / "colour_deblurred.png") as written:
        assert written.mode == "RGB"


def test_sample_output_suffixes_alpha_to_jpeg_quality_and_colour_profile(tmp_path, sample_strong_ckpt, capsys):
    from PIL import ImageCms

    src = tmp_path / "rgba.png"
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(np.dstack([_sample_photo(16, 24), np.full((16, 24), 200, np.uint8)]), "RGBA").save(
        src, icc_profile=profile)
    code, _, err = _sample_run([src, "-o", tmp_path / "res.gif", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "cannot write .gif images" in err and not (tmp_path / "res.gif").exists()
    code, out, _ = _sample_run([src, "-o", tmp_path / "res.jpg", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and ".jpg has no alpha channel; the transparency is dropped" in out
    Image.fromarray(_sample_photo(16, 24)).save(tmp_path / "q95.jpg", quality=95)
    with Image.open(tmp_path / "res.jpg") as ours, Image.open(tmp_path / "q95.jpg") as q95:
        assert ours.quantization == q95.quantization and ours.info.get("icc_profile") == profile
    code, _, _ = _sample_run([src, "--ckpt", sample_strong_ckpt], capsys)
    with Image.open(tmp_path / "rgba_deblurred.png") as png:
        assert png.info.get("icc_profile") == profile and png.mode == "RGBA"
    Image.fromarray(_sample_photo(16, 24)).convert("L").save(tmp_path / "gray.png", icc_profile=profile)
    Image.fromarray(_sample_photo(16, 24)).convert("L").convert("RGB").save(tmp_path / "equal.png", icc_profile=profile)
    code, _, _ = _sample_run([tmp_path / "gray.png", tmp_path / "equal.png", "--ckpt", sample_strong_ckpt], capsys)
    with Image.open(tmp_path / "gray_deblurred.png") as png:  # an RGB profile does not describe a grayscale file
        assert png.mode == "L" and "icc_profile" not in png.info
    with Image.open(tmp_path / "equal_deblurred.png") as png:  # an RGB file of equal channels stays RGB, profiled
        assert png.mode == "RGB" and png.info.get("icc_profile") == profile


def test_sample_folders_mirror_subfolders_and_leave_out_their_own_outputs(tmp_path, sample_strong_ckpt, capsys):
    d = tmp_path / "photos"
    for name in ("a.png", "sub/b.jpg", "sub/deeper/c.png", "old_deblurred.png", ".hidden.png"):
        _sample_save(d / name)
    code, out, _ = _sample_run([d, "--ckpt", sample_strong_ckpt], capsys)  # not recursive: the top folder only
    assert code == 0 and "| 1 image" in out
    assert sorted(p.name for p in d.glob("*_deblurred.png")) == ["a_deblurred.png", "old_deblurred.png"]

    code, out, _ = _sample_run([d, "--recursive", "-o", tmp_path / "out", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a_deblurred.png", "sub/b_deblurred.png", "sub/deeper/c_deblurred.png"]

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _sample_run([empty, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and f"error: {empty}: no images in this folder" in err


def test_a_folder_link_back_up_the_tree_ends_the_walk_in_folders_and_patterns(tmp_path, sample_strong_ckpt, capsys):
    tree = tmp_path / "L"
    _sample_save(tree / "a.png")
    _sample_save(tree / "sub" / "b.png", seed=1)
    (tree / "self").symlink_to(tree)
    (tree / "sub" / "up").symlink_to(tree)
    assert [p.relative_to(tree).as_posix() for p in blurdm.list_images(tree)] == ["a.png", "sub/b.png"]
    code, out, _ = _sample_run([f"{tree}/**/*.png", "-r", "-o", tmp_path / "out", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "done: 2 written" in out


def test_sample_glob_patterns_expand_to_files_and_folders(tmp_path, sample_strong_ckpt, capsys):
    for name in ("s1/blur/1.png", "s2/blur/1.png", "s2/sharp/1.png", "x.png", "x_deblurred.png"):
        _sample_save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hi")
    pattern = str(tmp_path / "*" / "blur")  # matches two folders: sub-folders mirrored from the fixed part
    code, out, err = _sample_run([pattern, str(tmp_path / "*.*"), "-o", tmp_path / "out", "--ckpt",
                                  sample_strong_ckpt], capsys)
    assert code == 0, err
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["s1/blur/1_deblurred.png", "s2/blur/1_deblurred.png", "x_deblurred.png"]

    code, _, err = _sample_run([str(tmp_path / "**" / "sharp" / "*.png"), "-r", "-o", tmp_path / "deep", "--ckpt",
                                sample_strong_ckpt], capsys)  # ** with -r reaches into sub-folders
    assert code == 0, err
    assert [p.relative_to(tmp_path / "deep").as_posix() for p in (tmp_path / "deep").rglob("*.png")] == \
        ["s2/sharp/1_deblurred.png"]
    code, _, err = _sample_run([str(tmp_path / "*.jpg"), "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "no images match this pattern" in err


def test_sample_out_is_a_file_for_one_input_and_must_be_a_folder_for_several(tmp_path, sample_strong_ckpt, capsys):
    a, b = _sample_save(tmp_path / "a.png"), _sample_save(tmp_path / "b.png")
    code, _, _ = _sample_run([a, "-o", tmp_path / "result.png", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and _sample_read(tmp_path / "result.png").shape == (24, 40, 3)
    code, _, err = _sample_run([a, b, "-o", tmp_path / "result2.png", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "give a folder" in err and not (tmp_path / "result2.png").exists()


def test_sample_never_overwrites_an_input_and_skips_existing_outputs_unless_forced(tmp_path, sample_strong_ckpt,
                                                                                   capsys):
    src = _sample_save(tmp_path / "a.png")
    before = src.read_bytes()
    code, _, err = _sample_run([src, "-o", src, "--force", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "is an input; refusing to overwrite it" in err and src.read_bytes() == before

    out_file = tmp_path / "a_deblurred.png"
    out_file.write_bytes(b"an older result")
    code, out, _ = _sample_run([src, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "exists; skipped (--force overwrites it)" in out and "1 skipped" in out
    assert out_file.read_bytes() == b"an older result"
    code, out, _ = _sample_run([src, str(tmp_path / "*.png"), "--force", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "done: 1 written, 0 skipped, 0 failed" in out  # named twice: deblurred once
    assert _sample_read(out_file).shape == (24, 40, 3)


def test_sample_inputs_that_differ_only_in_suffix_keep_it_in_their_output_names_and_a_rerun_skips_both(
        tmp_path, sample_strong_ckpt, capsys):
    png, jpg = _sample_save(tmp_path / "plain.png"), _sample_save(tmp_path / "plain.jpg", seed=1)
    code, out, _ = _sample_run([tmp_path, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "done: 2 written" in out and not (tmp_path / "plain_deblurred.png").exists()
    for src, name in ((png, "plain_png_deblurred.png"), (jpg, "plain_jpg_deblurred.png")):
        assert np.array_equal(_sample_read(tmp_path / name), _sample_expected(sample_strong_ckpt, src))
    code, out, _ = _sample_run([tmp_path, "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "done: 0 written, 2 skipped" in out


def test_sample_refuses_two_inputs_that_would_write_one_output_before_writing_anything(tmp_path, sample_strong_ckpt,
                                                                                      capsys):
    a, b = _sample_save(tmp_path / "A" / "x.png"), _sample_save(tmp_path / "B" / "x.png", seed=1)
    code, _, err = _sample_run([tmp_path / "A", tmp_path / "B", "-o", tmp_path / "out", "--ckpt", sample_strong_ckpt],
                               capsys)
    assert code == 1 and f"{a} and {b} would both write" in err and not (tmp_path / "out").exists()


def test_sample_seed_fixes_the_prior_noise(tmp_path, sample_strong_ckpt, capsys):
    src = _sample_save(tmp_path / "a.png", 32, 32)
    results = []
    for seed, name in ((2023, "x.png"), (2023, "y.png"), (7, "z.png")):
        _sample_run([src, "-o", tmp_path / name, "--seed", seed, "--ckpt", sample_strong_ckpt], capsys)
        results.append(_sample_read(tmp_path / name).astype(int))
    assert np.array_equal(results[0], results[1])
    assert np.abs(results[0] - results[2]).max() > 0


def test_sample_tiled_run_has_the_image_size_and_stays_close_to_the_untiled_one(tmp_path, sample_strong_ckpt,
                                                                                capsys):
    """
    140 x 203 in 2 x 2 tiles of 136 px overlapping by 64 px: every tile shares the whole image's prior and the blend
    gives way before a tile's edge, so the result is within a few grey levels of the untiled run (as the library's
    tiles: 2 to 5 measured on eight seeded networks). Tiles
    that do not overlap show seams of tens of levels: --tile and --overlap do reach the model.
    """
    src = tmp_path / "big.png"
    Image.fromarray(_sample_photo(140, 203)).save(src)
    common = [src, "--ckpt", sample_strong_ckpt]
    for name, flags in (("whole", ["--tile", 0]), ("default", []), ("tiled", ["--tile", 136, "--overlap", 64]),
                        ("seams", ["--tile", 64, "--overlap", 0])):
        assert _sample_run(common + ["-o", tmp_path / f"{name}.png"] + flags, capsys)[0] == 0
    whole, default, tiled, seams = (_sample_read(tmp_path / f"{n}.png").astype(int)
                                    for n in ("whole", "default", "tiled", "seams"))
    assert np.array_equal(default, whole)  # the default 1536 px tile leaves a small image whole
    assert tiled.shape == whole.shape == (140, 203, 3)
    assert np.abs(tiled - whole).max() <= 6 and np.abs(tiled - whole).mean() < 0.1
    assert np.abs(seams - whole).max() > 50


# ----------------------------------------------------------------------------------------------------------------
# precision and device


def test_sample_default_precision_runs_bf16_where_native_within_3_grey_levels_of_fp32(tmp_path, capsys, monkeypatch):
    src = tmp_path / "crop.png"
    Image.open(ASSETS / "example_blurry.png").crop((0, 0, 160, 120)).save(src)  # with the demo weights
    monkeypatch.setattr(blurdm, "has_native_bf16", lambda: True)
    code, out, _ = _sample_run([src, "-o", tmp_path / "auto.png", "--amp", "auto"], capsys)
    assert code == 0 and "on cpu, bf16 |" in out and "(cpu, bf16)" in out
    code, out, _ = _sample_run([src, "-o", tmp_path / "exact.png"], capsys)
    assert code == 0 and "on cpu, fp32 |" in out
    auto, exact = (np.asarray(Image.open(tmp_path / f"{k}.png")).astype(int) for k in ("auto", "exact"))
    assert 0 < np.abs(auto - exact).max() <= 3


def test_sample_amp_that_cannot_run_here_says_so_and_runs_in_fp32(tmp_path, sample_strong_ckpt, capsys, monkeypatch):
    src = _sample_save(tmp_path / "a.png", 48, 64)
    monkeypatch.setattr(blurdm, "has_native_bf16", lambda: False)
    code, out, err = _sample_run([src, "-o", tmp_path / "fp32.png", "--device", "cpu", "--amp", "bf16",
                                  "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0, err
    assert "--amp bf16 runs in fp32 on cpu: this CPU has no native bf16" in out and "(cpu, fp32)" in out
    assert np.array_equal(_sample_read(tmp_path / "fp32.png"), _sample_expected(sample_strong_ckpt, src))
    code, out, _ = _sample_run([src, "-o", tmp_path / "fp16.png", "--device", "cpu", "--amp", "fp16",
                                "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "fp16 is for CUDA" in out and "(cpu, fp32)" in out

    monkeypatch.setattr(blurdm, "has_native_bf16", lambda: True)  # emulated here, but the autocast is the same
    code, out, _ = _sample_run([src, "-o", tmp_path / "bf16.png", "--device", "cpu", "--amp", "bf16",
                                "--ckpt", sample_strong_ckpt], capsys)
    assert code == 0 and "(cpu, bf16)" in out
    difference = np.abs(_sample_read(tmp_path / "bf16.png").astype(int) - _sample_read(tmp_path / "fp32.png"))
    assert 0 < difference.max() <= 16 and difference.mean() < 1.5  # it ran in bf16, and close to fp32


def test_sample_cuda_asked_for_where_there_is_none_is_a_one_line_error(tmp_path, sample_strong_ckpt, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _sample_run([_sample_save(tmp_path / "a.png"), "--device", "cuda", "--ckpt", sample_strong_ckpt],
                               capsys)
    assert code == 1 and err == "error: --device cuda: no CUDA device is available to this PyTorch build\n"


def test_sample_out_of_memory_fails_that_image_with_a_tile_hint_and_carries_on(tmp_path, sample_strong_ckpt, capsys,
                                                                              monkeypatch):
    d = tmp_path / "photos"
    _sample_save(d / "a.png", 24, 40)
    _sample_save(d / "huge.png", 40, 64)
    original = blurdm.BlurDM.deblur_whole

    def deblur_whole(self, x, prior):
        if x.shape[-1] == 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
        return original(self, x, prior)
    monkeypatch.setattr(blurdm.BlurDM, "deblur_whole", deblur_whole)
    code, out, err = _sample_run([d, "--ckpt", sample_strong_ckpt], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and errors == [f"error: {d / 'huge.png'}: CUDA out of memory. Tried to allocate 20.00 GiB "
                                    "(a smaller --tile needs less memory)"]
    assert (d / "a_deblurred.png").exists() and not (d / "huge_deblurred.png").exists()
    assert not list(d.glob(".*"))  # no temporary file left behind
    assert "done: 1 written, 0 skipped, 1 failed" in out


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_sample_an_empty_input_name_is_an_error_and_writes_nothing(tmp_path, sample_strong_ckpt, capsys, monkeypatch):
    _sample_save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    code, _, err = _sample_run(["", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and err.strip() == "error: : an empty input name (an unset variable?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_sample_a_missing_input_with_an_output_file_name_names_the_missing_input(tmp_path, sample_strong_ckpt, capsys):
    code, _, err = _sample_run([tmp_path / "missing.png", "-o", tmp_path / "res.png", "--ckpt", sample_strong_ckpt],
                               capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'missing.png'}: no such file or folder"
    assert not (tmp_path / "res.png").exists()


def test_sample_missing_default_weights_ask_for_ckpt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "DEFAULT_CKPT", tmp_path / "weights" / "blurdm-demo.pt")
    src = _sample_save(tmp_path / "a.png")
    code = sample.main([str(src)])  # no --ckpt: the default
    err = capsys.readouterr().err
    assert code == 1 and "default demo weights are not in this checkout" in err and "--ckpt" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a_deblurred.png").exists()


def test_sample_files_that_are_not_checkpoints_give_one_line_errors_without_traceback(tmp_path, sample_strong_ckpt,
                                                                                      capsys):
    src = _sample_save(tmp_path / "a.png")
    data = sample_strong_ckpt.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases = (("truncated.pt", "not a PyTorch checkpoint"), ("other.pt", "not a checkpoint of a known kind"),
             ("notes.pt", "not a PyTorch checkpoint"), ("missing.pt", "no such checkpoint file"))
    for name, problem in cases:
        code, _, err = _sample_run([src, "--ckpt", tmp_path / name], capsys)
        assert code == 1 and err.startswith(f"error: {tmp_path / name}: {problem}"), err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a_deblurred.png").exists()

    result = subprocess.run([sys.executable, str(_SAMPLE_PY), str(src), "--ckpt", str(tmp_path / "truncated.pt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'truncated.pt'}: not a PyTorch checkpoint " \
                                    "(unreadable or truncated)"


def test_sample_ckpt_that_is_a_folder_and_tiles_that_make_no_sense_are_one_line_errors(tmp_path, sample_strong_ckpt,
                                                                                       capsys, tiny):
    src = _sample_save(tmp_path / "a.png")
    (tmp_path / "somedir.pt").mkdir()
    for args, message in ((["--ckpt", tmp_path / "somedir.pt"], "somedir.pt: a folder, not a checkpoint file"),
                          (["--ckpt", sample_strong_ckpt, "--tile", "1"],
                           "--tile 1 --overlap 64: a tile must be a whole number of at least 128 px"),
                          (["--ckpt", sample_strong_ckpt, "--tile", "64"], "at least 128 px (64, and twice the overlap)"),
                          (["--ckpt", sample_strong_ckpt, "--overlap", "-8"],
                           "the overlap must be a whole number of pixels, 0 or more")):
        code, _, err = _sample_run([src, *args], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    for tile, overlap in ((-5, 64), (128, -8), (100, 64), (np.int64(100), 64), (2.5, 0), (True, 0)):
        with pytest.raises(ValueError, match=r"deblur_tiled\(tile=.*, overlap=.*\): (a tile|the overlap) must be"):
            blurdm.deblur_tiled(tiny, torch.rand(1, 3, 8, 8), tile, overlap)
    assert blurdm.deblur_tiled(tiny, torch.rand(1, 3, 8, 8), np.int64(128), np.int64(64)).shape == (1, 3, 8, 8)


def test_sample_unwritable_output_place_fails_before_the_work(tmp_path, sample_strong_ckpt, capsys, monkeypatch):
    src = _sample_save(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")  # works as root too, unlike chmod
    calls = []
    monkeypatch.setattr(blurdm.BlurDM, "deblur", lambda self, *args, **kwargs: calls.append(1))
    code, _, err = _sample_run([src, "-o", blocker / "out", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and err.startswith(f"error: {blocker / 'out' / 'a_deblurred.png'}: cannot write here")
    assert len(err.strip().splitlines()) == 1 and calls == []  # the model never ran


def test_sample_bad_files_fail_alone_with_one_line_each(tmp_path, sample_strong_ckpt, capsys):
    d = tmp_path / "batch"
    _sample_save(d / "good.png")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("not an image")
    good_bytes = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    _sample_png16(d / "bomb.png", np.zeros((1, 1, 3), np.uint16), size=(20000, 20000))  # 400 MP in 100 bytes

    code, out, err = _sample_run([d, tmp_path / "missing.png", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5
    for name, problem in (("missing.png", "no such file or folder"), ("empty.png", "not a readable image"),
                          ("notes.png", "not a readable image"), ("truncated.png", "not a readable image"),
                          ("bomb.png", "image too large")):
        assert sum(name in e and problem in e for e in errors) == 1, (name, errors)
    assert (d / "good_deblurred.png").exists() and "done: 1 written, 0 skipped, 5 failed | " in out
    assert "5/5" in err  # the progress bar over several images


def test_sample_corrupt_image_does_not_block_a_good_one_with_the_same_output_name(tmp_path, sample_strong_ckpt,
                                                                                   capsys):
    d = tmp_path / "shots"
    good = _sample_save(d / "x.png")
    (d / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # sorted first: read before x.png
    code, out, err = _sample_run([d, "--ckpt", sample_strong_ckpt], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "x.jpg: not a readable image" in errors[0]
    assert np.array_equal(_sample_read(d / "x_png_deblurred.png"), _sample_expected(sample_strong_ckpt, good))
    assert "done: 1 written, 0 skipped, 1 failed" in out


def test_sample_refuses_inputs_it_cannot_make_finite_and_never_writes_a_non_finite_result(tmp_path, sample_strong_ckpt,
                                                                                          capsys, monkeypatch):
    gray = np.full((16, 24), 0.5, dtype=np.float32)
    gray[3, 4] = np.nan
    Image.fromarray(gray, "F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full((16, 24), 127.5, dtype=np.float32), "F").save(tmp_path / "scale255.tif")
    assert torch.allclose(blurdm.read_image(tmp_path / "scale255.tif"), torch.full((3, 16, 24), 0.5))  # 0..255 floats
    code, out, err = _sample_run([tmp_path / "nan.tif", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "nan.tif: holds NaN or infinite pixel values" in err and not (tmp_path / "nan_deblurred.png").exists()
    monkeypatch.setattr(blurdm, "deblur_tiled", lambda model, x, *a: x * math.nan)
    code, out, err = _sample_run([tmp_path / "scale255.tif", "--ckpt", sample_strong_ckpt], capsys)
    assert code == 1 and "output is not finite" in err and not list(tmp_path.glob("*deblurred*")) + list(tmp_path.glob(".*"))


def test_sample_sigterm_removes_the_temp_file_of_the_image_in_progress(tmp_path, sample_strong_ckpt):
    src = _sample_save(tmp_path / "a.png")
    slow = ("import runpy, sys, time, blurdm\n"
            "blurdm.deblur_tiled = lambda *a, **k: time.sleep(60)\n"
            f"sys.argv = ['sample.py', {str(src)!r}, '--ckpt', {str(sample_strong_ckpt)!r}, '--device', 'cpu']\n"
            "runpy.run_path('sample.py', run_name='__main__')\n")
    process = subprocess.Popen([sys.executable, "-c", slow], cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(600):
        if list(tmp_path.glob(".a_deblurred.tmp*")):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err.decode() and not list(tmp_path.glob(".*"))


# ================================================================================================================
# README


def test_the_readmes_python_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (_REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    for name in ("assets", "weights"):
        (tmp_path / name).symlink_to(_REPO / name)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert blurdm.read_image("sharp.png").shape == (3, 720, 1280)
    assert blurdm.load_model("mynet.pt", deblurrer=namespace["MyNet"](64)).cfg == blurdm.BlurDMConfig.preset("demo")


# ================================================================================================================
# the CUDA paths (skipped without a GPU)


@cuda
def test_cuda_deblur_in_bf16_and_fp16_stays_close_to_fp32(tiny):
    model = copy.deepcopy(tiny).cuda()
    x = torch.rand(1, 3, 64, 80, device="cuda")
    reference = model.deblur(x)
    for amp in ("bf16", "fp16"):
        context, precision, note = blurdm.autocast("cuda", amp)
        with context:
            assert precision == amp and note is None and (model.deblur(x) - reference).abs().max() < 0.05


@cuda
def test_cuda_training_on_photographs_blurred_on_the_gpu_with_fp16_grad_scaler(tmp_path):
    for k in range(4):
        _png(tmp_path / "photos" / f"{k}.png", k, size=(64, 72))
    args = ["--data", tmp_path / "photos", *_FAST[:-2], "--device", "cuda", "--iters", "2,1,2", "--blur-length", "4,12"]
    assert _train([*args, "--out", tmp_path / "out", "--amp", "fp16"]) == 0
    assert _checkpoint(tmp_path / "out" / "last.pt")["scaler"]["scale"] > 0
    # --compile in a process of its own, bounded: one graph a stage, compiled on the first step of each
    result = subprocess.run([sys.executable, str(_REPO / "train.py"), *map(str, args), "--out", str(tmp_path / "c"),
                             "--amp", "bf16", "--compile"], capture_output=True, text=True, cwd=_REPO, timeout=900)
    assert result.returncode == 0 and "done in" in result.stdout, result.stderr[-3000:]


@cuda
def test_cuda_ddp_with_nccl_on_one_gpu(tmp_path):
    args = ["--data", _gopro(tmp_path / "gopro", per_sequence=2), *_FAST[:-2], "--device", "cuda", "--iters", "1,1,1",
            "--out", tmp_path / "out"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(_REPO / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=_REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
