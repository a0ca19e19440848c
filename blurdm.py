"""
BlurDM: a blur diffusion model for image deblurring, in one file.

Paper: J.-T. He, F.-J. Tsai, Y.-T. Peng, M.-H. Chen, C.-W. Lin, Y.-Y. Lin, "BlurDM: A Blur Diffusion Model for
Image Deblurring", NeurIPS 2025, arXiv:2512.03979. Official code: github.com/Jin-Ting-He/BlurDM (MIMO-UNet+).

Motion blur is light integrated over a growing exposure. BlurDM's forward process adds that light (a blur residual)
and Gaussian noise step by step, so a sharp image diffuses into "blurred + noise"; the reverse process removes both.
It runs on a 256-d latent vector and its output, a sharp prior, modulates the decoder of a MIMO-UNet deblurrer.

Time steps run t = 1..T as in the paper. Every schedule tensor has length T + 1 and index 0 is the sharp state.

    code             paper        meaning
    alpha[t]         α_t          exposure length after step t (α_0 < α_1 < ... < α_T)
    beta[t]          β_t          noise scale of step t (beta[0] = 0, unused)
    beta_bar[t]      β̄_t          total noise: I_t = B_t + β̄_t ε
    B[t]             B_t          image exposed for α_t (B_0 sharp, B_T blurred), linear light
    e[t]             e_t          blur residual: light gathered between α_{t-1} and α_t (e[0] = 0)
    x_t              I_t, Z_t     diffusion state, pixels or a latent vector
    eps              ε            standard Gaussian noise
    e_hat, eps_hat   ê_t, ε̂_t     outputs of the blur and noise residual estimators
    z_sharp          Z^S          sharp encoder latent SE(blur, sharp): the stage-2 target
    z_blur           Z^B          blur encoder latent BE(blur, blur): start point and condition c
    prior            Z_0^B        end of the reverse chain, fused into the deblurrer

Sections, in reading order:
    1. Config                BlurDMConfig and its presets
    2. Blur formation        camera shake -> exposures B_0..B_T; synthetic training pairs (METHOD.md §1, §7)
    3. Blur diffusion        schedule, q_step / q_sample, p_sample / p_sample_loop        (§2-3)
    4. Latent prior          encoders, residual estimators, prior fusion module           (§4)
    5. Deblurring network    MIMO-UNet / MIMO-UNet+ with a fusion module per decoder level
    6. The full model        BlurDM on any deblurrer: stages, losses, deblur() in tiles   (§5)
    7. Metrics               PSNR and the 3-D SSIM of the paper's tables                  (§6)
    8. Files                 checkpoints, images, data sets on disk, device and precision

METHOD.md, beside this file, derives the equations the code cites.
"""

import math
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class BlurDMConfig:
    # deblurring network: MIMO-UNet+ by default (the paper's "MIMO-UNet" row)
    width: int = 32  # channels at full resolution; 2x and 4x at the 1/2 and 1/4 scales
    num_res: int = 20  # residual blocks per encoder and decoder stage (MIMO-UNet: 8)
    dropout: float = 0.1  # Dropout2d on the two feature-fusion outputs (MIMO-UNet+ only)
    prior: bool = True  # False: the backbone alone, the paper's baseline
    # latent prior (official LE_arch and estimators)
    latent_dim: int = 256
    encoder_width: int = 64
    encoder_blocks: int = 6
    estimator_layers: int = 6
    # blur diffusion schedule
    T: int = 5
    alpha_start: float = 1.0
    alpha_end: float = 2.0
    beta_start: float = 0.0
    beta_end: float = 0.02
    beta_bar_rule: str = "paper"  # "paper": Σ (α_i/α_t)² β_i²; "official": the official code's variant
    # losses
    fft_weight: float = 0.1
    charbonnier_eps: float = 1e-3
    prior_loss: str = "l1"  # "l1" as in the paper, "charbonnier" as in the official code
    # training recipe (used by train.py; not part of the weights)
    crop: int = 256
    batch_size: int = 20
    lr: float = 1e-4
    lr_min: float = 1e-6
    stage_epochs: tuple = (3000, 500, 3000)
    seed: int = 2023

    def __post_init__(self):
        """Types and ranges are checked, as a checkpoint's config is read from a file (width 1e6 would ask for TBs)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool)) or \
                (kind is float and type(value) is int) or (kind is tuple and isinstance(value, list))
            if not ok or (kind is float and not math.isfinite(value)):
                what = "a finite float" if kind is float else kind.__name__
                raise ValueError(f"config field {f.name} must be {what}, not {value!r}")
            if f.name in LIMITS and not LIMITS[f.name][0] <= value <= LIMITS[f.name][1]:
                low, high = LIMITS[f.name]
                raise ValueError(f"config field {f.name} must be in [{low}, {high}], not {value!r}")
        self.stage_epochs = tuple(self.stage_epochs)
        if len(self.stage_epochs) != 3 or not all(type(e) in (int, float) and 0 <= e < 1e9 for e in self.stage_epochs):
            raise ValueError(f"config field stage_epochs must be three numbers of epochs, not {self.stage_epochs!r}")
        if self.beta_bar_rule not in ("paper", "official"):
            raise ValueError(f"beta_bar_rule must be 'paper' or 'official', not {self.beta_bar_rule!r}")
        if self.prior_loss not in ("l1", "charbonnier"):
            raise ValueError(f"prior_loss must be 'l1' or 'charbonnier', not {self.prior_loss!r}")
        if self.alpha_start <= 0 or self.alpha_end <= self.alpha_start:
            raise ValueError("the exposure schedule needs 0 < alpha_start < alpha_end (the reverse step divides by α)")

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields {', '.join(unknown)}")
        return cls(**d)

    def weight_fields_differing_from(self, other):
        """Names of the fields that change the model (not the training recipe) and differ between two configs."""
        return [f.name for f in fields(self)
                if f.name not in RECIPE_FIELDS and getattr(self, f.name) != getattr(other, f.name)]


LIMITS = dict(width=(1, 512), num_res=(1, 100), dropout=(0.0, 1.0), latent_dim=(1, 4096), encoder_width=(1, 1024),
              encoder_blocks=(0, 100), estimator_layers=(1, 100), T=(1, 1000), beta_start=(0.0, 10.0),
              beta_end=(0.0, 10.0), crop=(4, 8192), batch_size=(1, 1 << 16), lr=(0.0, 1e30), lr_min=(0.0, 1e30))
RECIPE_FIELDS = ("fft_weight", "charbonnier_eps", "prior_loss", "crop", "batch_size", "lr", "lr_min", "stage_epochs",
                 "seed")

PRESETS = {
    "paper": {},  # MIMO-UNet+ + BlurDM, the official recipe
    "mimo-unet": dict(num_res=8, dropout=0.0),
    # sized for CPUs: 1280x720 in about 3 s on 2 cores; trained on photographs for the shipped demo weights
    "demo": dict(width=16, num_res=2, dropout=0.0, latent_dim=64, encoder_width=16, encoder_blocks=2,
                 crop=128, batch_size=8, lr=5e-4, lr_min=1e-5, stage_epochs=(1334, 334, 1000)),
    "tiny": dict(width=8, num_res=1, dropout=0.0, latent_dim=32, encoder_width=16, encoder_blocks=1,
                 crop=64, batch_size=4, lr=1e-3, stage_epochs=(2, 1, 2)),
}

# ----------------------------------------------------------------------------------------------------------------
# 2. Blur formation (METHOD.md §1): a camera integrates light while the shutter is open


def srgb_to_linear(x):
    x = x.clamp(0, 1)  # IEC 61966-2-1
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x):
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def camera_shake(num_subframes=41, length=20.0, rotation=0.0, zoom=0.0, turn=120.0, generator=None):
    """
    A random camera path over one exposure. Returns (N, 4) float64, one row per sub-frame: shift dx, dy in pixels,
    rotation in radians, log zoom. The camera moves at constant speed along a heading that turns smoothly (its rate
    of turn is a random walk, `turn` degrees its typical total), which gives the straight lines, arcs and S-curves of
    blur kernels in hand-held video. `length` is the path length in pixels; `rotation` (degrees) and `zoom`
    (relative) are the total change over the exposure, which makes the blur vary across the image.
    The sharp image is the time centre of the exposure (the middle sub-frame when N is odd: GoPro's convention).
    Constant speed is what makes that target learnable: the time centre is then the middle of the streak the blurred
    image shows. Under a speed that varies (a shaky random walk) it is not: a sharp image moved to the streak's
    centroid scores no better than the blurry input, and a network can only learn to hedge (METHOD.md §7).
    """
    n, g = num_subframes, generator
    f64 = dict(generator=g, dtype=torch.float64)
    rate = torch.randn((), **f64) + torch.cumsum(torch.randn(n, **f64), 0) / math.sqrt(n)  # rate of turn, smooth
    heading = 2 * math.pi * torch.rand((), **f64) + torch.cumsum(rate, 0) * math.radians(turn) / n
    steps = torch.stack([heading.cos(), heading.sin()], 1) * (length / max(n - 1, 1))
    position = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.cumsum(steps[:-1], 0)])
    ramp = torch.linspace(-0.5, 0.5, n, dtype=torch.float64)
    path = torch.cat([position, (math.radians(rotation) * ramp)[:, None], (math.log1p(zoom) * ramp)[:, None]], 1)
    return path - (path[(n - 1) // 2] + path[n // 2]) / 2


def warp(image, dx, dy, angle, log_zoom):
    """Resample (B, C, H, W) moved by (dx, dy) pixels, rotated and zoomed about the centre (bilinear)."""
    _, _, H, W = image.shape
    s = math.exp(log_zoom)
    cos, sin = s * math.cos(angle), s * math.sin(angle)
    # the affine map in pixel units, rescaled to grid_sample's [-1, 1] coordinates on a non-square image
    theta = torch.tensor([[cos, -sin * H / W, 2 * dx / W], [sin * W / H, cos, 2 * dy / H]],
                         dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta.expand(image.shape[0], 2, 3), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def render_exposures(sharp, path, alpha):
    """
    Blur formation (METHOD.md §1). Moves `sharp` (B, 3, H, W, sRGB in [0, 1]) along `path` (N, 4) and integrates
    the scene radiance H(τ) in linear light. Sub-frame k lights the time interval [k, k+1) · α_T / N.
    Returns B and e, each (T+1, B, 3, H, W) in linear light:
        B[t] = (1/α_t) ∫_0^{α_t} H(τ) dτ          the image exposed for α_t
        e[t] = ∫_{α_{t-1}}^{α_t} H(τ) dτ          the blur residual (e[0] = 0)
    Both integrals are exact for the piecewise-constant H, partial sub-frames weighted by their overlap.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    n = path.shape[0]
    tau = alpha * n / alpha[-1]  # exposure ends in units of sub-frames
    k = torch.arange(n, dtype=torch.float64)

    def overlap(start, end):  # (T+1, N) length of [start, end) ∩ [k, k+1)
        return (torch.minimum(end[:, None], k + 1) - torch.maximum(start[:, None], k)).clamp(min=0)

    dtau = alpha[-1] / n
    exposure_weight = (overlap(torch.zeros_like(tau), tau) * dtau).to(sharp)  # (T+1, N)
    residual_weight = (overlap(torch.cat([tau[:1], tau[:-1]]), tau) * dtau).to(sharp)  # row 0 is empty
    radiance = srgb_to_linear(sharp)
    integral = torch.zeros(len(alpha), *sharp.shape, dtype=sharp.dtype, device=sharp.device)  # ∫_0^{α_t} H
    e = torch.zeros_like(integral)
    for j in range(n):
        frame = warp(radiance, *path[j].tolist())
        integral += exposure_weight[:, j].view(-1, 1, 1, 1, 1) * frame
        e += residual_weight[:, j].view(-1, 1, 1, 1, 1) * frame
    B = integral / alpha.to(sharp).view(-1, 1, 1, 1, 1)
    return B, e


BLUR_LENGTH = (4.0, 30.0)  # camera path lengths in pixels: GoPro-like blurs, from slight to strong


def synthesize_blur(sharp, generator=None, length=BLUR_LENGTH, subframes=41, max_rotation=2.0, max_zoom=0.02,
                    noise=(0.0, 0.01), window=None):
    """
    A blurred copy of a sharp sRGB image (3, H, W) in [0, 1], made as GoPro was made: a random camera path
    (length drawn from `length` pixels, a random rotation and zoom on half the draws), averaged in linear light,
    re-gammed, Gaussian sensor noise (std drawn from `noise`) and 8-bit rounding. The sharp target is the input.
    subframes=None renders one sub-frame per pixel of path (an odd number, so the sharp image is one of them): over
    51 dB from a 161-sub-frame render, and 2-3x cheaper than 41 on GoPro-like lengths.
    window=(top, left, h, w) blurs that window of a larger image and returns (blurry, sharp) windows; it is rendered
    with a margin (half the longest path, the path being centred, plus room for rotation and zoom) so that the
    resampling's reflected border stays outside it.
    """
    if window is not None:
        top, left, h, w = window
        m = math.ceil(length[1] / 2) + 8
        t, l = max(top - m, 0), max(left - m, 0)
        region = sharp[:, t:top + h + m, l:left + w + m]
        blurry = synthesize_blur(region, generator, length, subframes, max_rotation, max_zoom, noise)
        inner = (slice(None), slice(top - t, top - t + h), slice(left - l, left - l + w))
        return blurry[inner], region[inner]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()

    varying = torch.rand((), generator=generator).item() < 0.5
    path_length = uniform(*length)
    n = subframes or 2 * math.ceil(path_length / 2) + 1
    path = camera_shake(n, path_length, uniform(-max_rotation, max_rotation) * varying,
                        uniform(-max_zoom, max_zoom) * varying, generator=generator)
    B, _ = render_exposures(sharp[None], path, alpha=(1.0,))  # one exposure window: the whole path
    blurry = linear_to_srgb(B[-1, 0])
    blurry = blurry + uniform(*noise) * torch.randn(blurry.shape, generator=generator).to(blurry)
    return (blurry.clamp(0, 1) * 255).round() / 255


# ----------------------------------------------------------------------------------------------------------------
# 3. Blur diffusion (METHOD.md §2-3), on tensors of any shape


def blur_schedule(T, alpha_start, alpha_end, beta_start, beta_end, rule="paper"):
    """α_0..α_T, β_0..β_T (β_0 = 0) and β̄_0..β̄_T, in float64."""
    alpha = torch.linspace(alpha_start, alpha_end, T + 1, dtype=torch.float64)
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(beta_start, beta_end, T, dtype=torch.float64)])
    beta_bar = torch.zeros(T + 1, dtype=torch.float64)
    for t in range(1, T + 1):
        i = torch.arange(1, t + 1)
        if rule == "paper":  # Var(I_t) from the per-step rule: α_t² Var_t = α_{t-1}² Var_{t-1} + α_t² β_t²
            beta_bar[t] = ((alpha[i] / alpha[t]) ** 2 * beta[i] ** 2).sum().sqrt()
        else:  # the official code: α shifted by one and β not squared
            beta_bar[t] = ((alpha[i - 1] / alpha[t]) ** 2 * beta[i]).sum().sqrt()
    return alpha, beta, beta_bar


class BlurDiffusion(nn.Module):
    """Dual noise and blur diffusion (forward) and dual denoising and deblurring (reverse)."""

    def __init__(self, cfg):
        super().__init__()
        self.T = cfg.T
        alpha, beta, beta_bar = blur_schedule(cfg.T, cfg.alpha_start, cfg.alpha_end, cfg.beta_start, cfg.beta_end,
                                              cfg.beta_bar_rule)
        # derived from the config, so kept out of the checkpoint
        self.register_buffer("alpha", alpha.float(), persistent=False)
        self.register_buffer("beta", beta.float(), persistent=False)
        self.register_buffer("beta_bar", beta_bar.float(), persistent=False)

    def q_step(self, x_prev, t, e_t, eps):
        """One forward step (METHOD.md §2): I_t = (α_{t-1}/α_t) I_{t-1} + e_t/α_t + β_t ε_t."""
        a = self.alpha
        return a[t - 1] / a[t] * x_prev + e_t / a[t] + self.beta[t] * eps

    def q_sample(self, B_t, t, eps):
        """Closed form of q(I_t | I_0) (§2): I_t = B_t + β̄_t ε."""
        return B_t + self.beta_bar[t] * eps

    def p_sample(self, x_t, t, e_hat, eps_hat):
        """One reverse step (§3), deterministic:
        I_{t-1} = (α_t I_t - ê_t)/α_{t-1} - (α_t β̄_t/α_{t-1} - β̄_{t-1}) ε̂_t."""
        a, bb = self.alpha, self.beta_bar
        return (a[t] * x_t - e_hat) / a[t - 1] - (a[t] * bb[t] / a[t - 1] - bb[t - 1]) * eps_hat

    def p_sample_loop(self, x_T, c, blur_estimator, noise_estimator):
        """The reverse chain t = T..1. Each estimator is called as estimator(x_t, t / T, c)."""
        x_t = x_T
        for t in range(self.T, 0, -1):
            t_frac = torch.full((x_t.shape[0], 1), t / self.T, dtype=x_t.dtype, device=x_t.device)
            x_t = self.p_sample(x_t, t, blur_estimator(x_t, t_frac, c), noise_estimator(x_t, t_frac, c))
        return x_t


# ----------------------------------------------------------------------------------------------------------------
# 4. Latent prior networks (METHOD.md §4)


class EncoderBlock(nn.Module):
    def __init__(self, channels, batch_norm):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batch_norm else nn.Identity
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm(), nn.LeakyReLU(0.1),
                                  nn.Conv2d(channels, channels, 3, padding=1), norm())

    def forward(self, x):
        return x + self.body(x)


class LatentEncoder(nn.Module):
    """
    Two images -> one latent vector (the official LE_arch). Used twice: as the sharp encoder SE(blur, sharp), with
    BatchNorm, and as the blur encoder BE(blur, blur), without. Inputs need H and W divisible by 4.
    """

    def __init__(self, cfg, batch_norm):
        super().__init__()
        w, d = cfg.encoder_width, cfg.latent_dim
        lrelu = lambda: nn.LeakyReLU(0.1)
        self.stem = nn.Sequential(nn.Conv2d(2 * 48, w, 3, padding=1), lrelu())
        self.blocks = nn.Sequential(*[EncoderBlock(w, batch_norm) for _ in range(cfg.encoder_blocks)])
        self.head = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1), lrelu(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), lrelu(),
            nn.Conv2d(2 * w, d, 3, padding=1), lrelu(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(d, d), lrelu(), nn.Linear(d, d), lrelu())

    def forward(self, x, y):
        h = torch.cat([F.pixel_unshuffle(x, 4), F.pixel_unshuffle(y, 4)], 1)  # (B, 96, H/4, W/4)
        return self.head(self.blocks(self.stem(h)))  # (B, latent_dim)


class ResidualEstimator(nn.Module):
    """
    The blur residual estimator (ê_t) and the noise residual estimator (ε̂_t) share this form: an MLP on
    concat[c, t/T, x_t], LeakyReLU after every layer (the last included), t/T the only time embedding (official).
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg.latent_dim
        layers = [nn.Linear(2 * d + 1, d), nn.LeakyReLU(0.1)]
        for _ in range(cfg.estimator_layers - 1):
            layers += [nn.Linear(d, d), nn.LeakyReLU(0.1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_t, t_frac, c):
        return self.net(torch.cat([c, t_frac, x_t], 1))  # (B, 2d + 1) -> (B, d)


class PriorFusion(nn.Module):
    """Prior fusion module: features · k + v, with (k, v) a bias-free linear map of the prior (no "+1" on k)."""

    def __init__(self, latent_dim, channels):
        super().__init__()
        self.to_scale_shift = nn.Linear(latent_dim, 2 * channels, bias=False)

    def forward(self, x, prior):
        k, v = self.to_scale_shift(prior)[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
        return x * k + v


# ----------------------------------------------------------------------------------------------------------------
# 5. Deblurring network: MIMO-UNet (Cho et al., ICCV 2021) with a prior fusion module per decoder level


def conv(c_in, c_out, kernel, stride=1, relu=True, transpose=False):
    """MIMO-UNet's BasicConv (no normalisation): a conv, or a transposed conv for x2 upsampling, then ReLU."""
    if transpose:
        layer = nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding=kernel // 2 - 1)
    else:
        layer = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2)
    return nn.Sequential(layer, nn.ReLU(inplace=True)) if relu else layer


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, 3), conv(channels, channels, 3, relu=False))

    def forward(self, x):
        return x + self.body(x)


class ShallowConv(nn.Module):
    """SCM: features for a downscaled input image, which keeps its 3 channels alongside."""

    def __init__(self, channels):
        super().__init__()
        c = channels
        self.body = nn.Sequential(conv(3, c // 4, 3), conv(c // 4, c // 2, 1), conv(c // 2, c // 2, 3),
                                  conv(c // 2, c - 3, 1))
        self.out = conv(c, c, 1, relu=False)

    def forward(self, image):
        return self.out(torch.cat([image, self.body(image)], 1))


class FeatureAttention(nn.Module):
    """FAM: x + conv(x ⊙ z), merging encoder features x with the shallow features z of the scaled input."""

    def __init__(self, channels):
        super().__init__()
        self.merge = conv(channels, channels, 3, relu=False)

    def forward(self, x, z):
        return x + self.merge(x * z)


class FeatureFusion(nn.Module):
    """
    AFF: the encoder features of all three scales, resampled to one scale, mixed into one skip connection:
    conv3x3(ReLU(conv1x1(concat[f1, f2, f3] at that scale))). Nearest resampling commutes with a 1x1 conv, so each
    scale is mixed at the smaller of its own size and the target size and only the mixed result is resampled: the
    same numbers as the concatenation, without building 7c channels at full resolution.
    """

    def __init__(self, channels, c_out):
        super().__init__()
        self.channels = channels  # input channels of each scale, e.g. (c, 2c, 4c)
        self.mix = nn.Conv2d(sum(channels), c_out, 1)
        self.out = conv(c_out, c_out, 3, relu=False)

    def forward(self, features, size):
        h = self.mix.bias.view(1, -1, 1, 1)
        for f, w in zip(features, self.mix.weight.split(self.channels, dim=1)):
            if f.shape[-1] > size[-1]:
                f = F.interpolate(f, size=size)  # nearest downsampling picks pixels: do it before the conv
            f = F.conv2d(f, w)
            h = h + (F.interpolate(f, size=size) if f.shape[-1] < size[-1] else f)
        return self.out(F.relu(h))


class MIMOUNet(nn.Module):
    """
    MIMO-UNet (num_res 8) / MIMO-UNet+ (num_res 20, dropout 0.1): multi-input, multi-output, three scales.
    Input (B, 3, H, W) in [-0.5, 0.5] with H, W divisible by 4; returns the restored image at 1/4, 1/2 and full
    scale, each the network's residual added to the equally scaled input. With cfg.prior the prior fusion modules
    modulate the input of each decoder stage; without, the network is the plain backbone.
    """

    def __init__(self, cfg):
        super().__init__()
        c, n = cfg.width, cfg.num_res
        stage = lambda ch: nn.Sequential(*[ResBlock(ch) for _ in range(n)])
        self.stem = conv(3, c, 3)
        self.encoders = nn.ModuleList([stage(c), stage(2 * c), stage(4 * c)])
        self.down = nn.ModuleList([conv(c, 2 * c, 3, stride=2), conv(2 * c, 4 * c, 3, stride=2)])
        self.shallow = nn.ModuleList([ShallowConv(2 * c), ShallowConv(4 * c)])
        self.attention = nn.ModuleList([FeatureAttention(2 * c), FeatureAttention(4 * c)])
        self.fusion = nn.ModuleList([FeatureFusion((c, 2 * c, 4 * c), c), FeatureFusion((c, 2 * c, 4 * c), 2 * c)])
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.decoders = nn.ModuleList([stage(4 * c), stage(2 * c), stage(c)])
        self.up = nn.ModuleList([conv(4 * c, 2 * c, 4, stride=2, transpose=True),
                                 conv(2 * c, c, 4, stride=2, transpose=True)])
        self.squeeze = nn.ModuleList([conv(4 * c, 2 * c, 1), conv(2 * c, c, 1)])
        self.to_image = nn.ModuleList([conv(4 * c, 3, 3, relu=False), conv(2 * c, 3, 3, relu=False),
                                       conv(c, 3, 3, relu=False)])
        for layer in self.to_image:  # start as the identity (out = input), not as the input plus random residuals
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.prior_fusion = nn.ModuleList([PriorFusion(cfg.latent_dim, ch) for ch in (4 * c, 2 * c, c)]) \
            if cfg.prior else None

    def decode(self, level, x, prior):
        if self.prior_fusion is not None:
            x = self.prior_fusion[level](x, prior)
        return self.decoders[level](x)

    def forward(self, x, prior=None):
        half = lambda t: F.interpolate(t, scale_factor=0.5)  # nearest, as everywhere inside MIMO-UNet
        x2, x4 = half(x), half(half(x))
        f1 = self.encoders[0](self.stem(x))  # (B, c, H, W)
        f2 = self.encoders[1](self.attention[0](self.down[0](f1), self.shallow[0](x2)))  # (B, 2c, H/2, W/2)
        f3 = self.encoders[2](self.attention[1](self.down[1](f2), self.shallow[1](x4)))  # (B, 4c, H/4, W/4)
        skip2 = self.dropout(self.fusion[1]((f1, f2, f3), f2.shape[-2:]))
        skip1 = self.dropout(self.fusion[0]((f1, f2, f3), f1.shape[-2:]))

        z = self.decode(0, f3, prior)
        out4 = self.to_image[0](z) + x4
        z = self.decode(1, self.squeeze[0](torch.cat([self.up[0](z), skip2], 1)), prior)
        out2 = self.to_image[1](z) + x2
        z = self.decode(2, self.squeeze[1](torch.cat([self.up[1](z), skip1], 1)), prior)
        out1 = self.to_image[2](z) + x
        return [out4, out2, out1]


# ----------------------------------------------------------------------------------------------------------------
# 6. The full model (METHOD.md §4-5)


def charbonnier(x, y, eps):
    return torch.sqrt((x - y) ** 2 + eps ** 2).mean()


def spectrum(x):
    return torch.view_as_real(torch.fft.rfft2(x))  # 2-D real FFT, real and imaginary parts stacked


def deblur_loss(outputs, sharp, cfg):
    """
    MIMO-UNet's loss: Σ_s Charbonnier(out_s, sharp_s) + 0.1 Σ_s Charbonnier(FFT out_s, FFT sharp_s), sharp_s the
    bilinear downscale of the target to each output's size. `outputs` is one image or a list of scales.
    """
    content = frequency = 0.0
    for out in (outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        target = sharp if out.shape == sharp.shape else F.interpolate(sharp, size=out.shape[-2:], mode="bilinear")
        out = out.clamp(0, 1)
        content = content + charbonnier(out, target, cfg.charbonnier_eps)
        frequency = frequency + charbonnier(spectrum(out), spectrum(target), cfg.charbonnier_eps)
    return content + cfg.fft_weight * frequency


def prior_loss(prior, target, cfg):
    """Stage 2: ‖Z_0^B - Z^S‖₁ (paper) or its Charbonnier form (official code)."""
    if cfg.prior_loss == "l1":
        return F.l1_loss(prior, target)
    return charbonnier(prior, target, cfg.charbonnier_eps)


INFERENCE_SEED = 2023  # the official code's seed for the start noise of the reverse chain
PRIOR_MAX_PIXELS = 16_000_000  # larger images: the blur encoder sees an area-downscaled copy (<= 4.8 GB at d 256)


class CheckpointError(ValueError):
    """A file that is not a loadable BlurDM checkpoint; the message names the file and the problem."""


class BlurDM(nn.Module):
    """
    Latent BlurDM on a deblurring network: MIMO-UNet(+) by default, or any `deblurrer` module whose forward is
    deblurrer(x, prior) -> image or list of scales (full resolution last), with x in [-0.5, 0.5], prior (B, d) or
    None, and PriorFusion modules where its decoder wants the prior. Images enter and leave in [0, 1].
    Training stages (METHOD.md §5):
        1. prior = SE(blur, sharp); train SE and the deblurrer with the deblurring loss;
        2. prior = chain(BE(blur)), target = SE(blur, sharp) with SE frozen; train BE and both estimators;
        3. prior = chain(BE(blur)); train BE, the estimators and the deblurrer with the deblurring loss.
    """

    def __init__(self, cfg=None, deblurrer=None):
        super().__init__()
        self.cfg = cfg = cfg or BlurDMConfig()
        self.deblurrer = deblurrer if deblurrer is not None else MIMOUNet(cfg)
        if cfg.prior:
            self.sharp_encoder = LatentEncoder(cfg, batch_norm=True)
            self.blur_encoder = LatentEncoder(cfg, batch_norm=False)
            self.blur_estimator = ResidualEstimator(cfg)
            self.noise_estimator = ResidualEstimator(cfg)
            self.diffusion = BlurDiffusion(cfg)

    def blur_prior(self, blur, eps=None):
        """Z_0^B: the reverse chain from x_T = Z^B + β̄_T ε, conditioned on c = Z^B. `blur` is in [-0.5, 0.5]."""
        z_blur = self.blur_encoder(blur, blur)  # (B, d)
        z_blur = z_blur.to(torch.promote_types(z_blur.dtype, torch.float32))  # the chain's sums in fp32 at least
        if eps is None:
            eps = torch.randn_like(z_blur)
        x_T = self.diffusion.q_sample(z_blur, self.cfg.T, eps.to(z_blur))
        return self.diffusion.p_sample_loop(x_T, z_blur, self.blur_estimator, self.noise_estimator)

    def forward(self, blur, sharp=None, stage=3, eps=None):
        """
        blur, sharp: (B, 3, H, W) in [0, 1], H and W divisible by 4.
        Stages 1 and 3 (and a model without prior) return the deblurrer's outputs shifted back to [0, 1]
        (MIMO-UNet: 1/4, 1/2 and full scale); stage 2 returns (prior, target): the chain's output and SE's latent.
        """
        if blur.shape[-1] % 4 or blur.shape[-2] % 4:
            raise ValueError(f"H and W must be divisible by 4, got {tuple(blur.shape[-2:])}; deblur() pads for you")
        x = blur - 0.5
        prior = None
        if self.cfg.prior:
            if stage == 1:
                prior = self.sharp_encoder(x, sharp - 0.5)
            else:
                prior = self.blur_prior(x, eps)
            if stage == 2:
                with torch.no_grad():
                    target = self.sharp_encoder(x, sharp - 0.5)
                return prior, target
        out = self.deblurrer(x, prior)
        return [o + 0.5 for o in out] if isinstance(out, (list, tuple)) else out + 0.5

    def loss(self, blur, sharp, stage=3, outputs=None):
        """The stage's loss. `outputs`: what forward() returned through a wrapper (DistributedDataParallel)."""
        outputs = self(blur, sharp, stage=stage) if outputs is None else outputs
        if self.cfg.prior and stage == 2:
            return prior_loss(*outputs, self.cfg)
        return deblur_loss(outputs, sharp, self.cfg)

    def set_stage(self, stage):
        """Put the model in training mode for a stage; returns the parameters that stage optimises."""
        parts = {1: ["sharp_encoder", "deblurrer"],
                 2: ["blur_encoder", "blur_estimator", "noise_estimator"],
                 3: ["blur_encoder", "blur_estimator", "noise_estimator", "deblurrer"]}
        if stage not in parts:
            raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
        trained = parts[stage] if self.cfg.prior else ["deblurrer"]
        self.train()
        for name, module in self.named_children():
            module.requires_grad_(name in trained)
            if name not in trained:
                module.eval()  # the frozen sharp encoder of stage 2 keeps its BatchNorm statistics
        return [p for p in self.parameters() if p.requires_grad]

    def start_noise(self, n, seed, device):
        """ε for x_T: one draw from `seed`, shared by the batch, so a batch gives what one image at a time gives."""
        eps = torch.randn(self.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
        return eps.expand(n, -1).to(device)

    @torch.inference_mode()
    def sharp_prior(self, blurry, sharp):
        """Z^S = SE(blur, sharp) for images in [0, 1] of any size: the stage-1 prior (validation of stage 1)."""
        return self.sharp_encoder(pad_to_multiple(blurry, 8) - 0.5, pad_to_multiple(sharp, 8) - 0.5)

    @torch.inference_mode()
    def prior_for(self, blurry, seed=INFERENCE_SEED):
        """
        The sharp prior Z_0^B for (B, 3, H, W) images in [0, 1] (None for a model without prior). The blur encoder
        ends in a global average pool, so the prior describes the whole image; over PRIOR_MAX_PIXELS it sees an
        area-downscaled copy.
        """
        if not self.cfg.prior:
            return None
        H, W = blurry.shape[-2:]
        if H * W > PRIOR_MAX_PIXELS:
            scale = math.sqrt(PRIOR_MAX_PIXELS / (H * W))
            blurry = F.interpolate(blurry, size=(max(8, int(H * scale)), max(8, int(W * scale))), mode="area")
        x = pad_to_multiple(blurry, 8) - 0.5
        return self.blur_prior(x, self.start_noise(x.shape[0], seed, x.device))

    @torch.inference_mode()
    def deblur(self, blurry, seed=INFERENCE_SEED, prior=None, tile=0, overlap=64):
        """
        Inference: (B, 3, H, W) in [0, 1], any H and W -> the sharp estimate, same shape, in [0, 1]. All T steps
        run; `seed` fixes ε (official: 2023). With `tile`, an image larger than tile x tile runs in overlapping
        tiles blended with ramps (deblur_tiled), all of them modulated by one prior computed on the whole image,
        as the untiled run is; `prior` may also be passed in.
        """
        modes = [(module, module.training) for module in self.modules()]  # restored exactly: SE stays frozen
        self.eval()
        try:
            if prior is None:
                prior = self.prior_for(blurry, seed)
            if tile and max(blurry.shape[-2:]) > tile:
                return deblur_tiled(self.deblur_whole, blurry, prior, tile, overlap)
            return self.deblur_whole(blurry, prior)
        finally:
            for module, training in modes:
                module.training = training

    def deblur_whole(self, blurry, prior):
        """The deblurrer on one image or tile, padded to a multiple of 8 (reflect) and cropped back."""
        H, W = blurry.shape[-2:]
        x = pad_to_multiple(blurry, 8) - 0.5
        if x.device.type == "cpu":  # the layout propagates through the convs: 1.2-1.9x faster on CPU (bench.py)
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.deblurrer(x, prior)
        out = out[-1] if isinstance(out, (list, tuple)) else out
        return (out[..., :H, :W] + 0.5).clamp(0, 1).contiguous()

    # checkpoints
    def save(self, path, **extra):
        """Write config + weights (+ anything in `extra`) atomically: a temp file, then a rename."""
        with atomic_path(path) as tmp:
            torch.save({"format": "blurdm", "config": asdict(self.cfg), "model": self.state_dict(), **extra}, tmp)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", deblurrer=None):
        checkpoint = load_checkpoint(path, map_location)
        model = cls(BlurDMConfig.from_dict(checkpoint["config"]), deblurrer)
        model.load_weights(checkpoint, path)
        return model.eval()

    def load_weights(self, checkpoint, path="checkpoint"):
        """Load the weights of a checkpoint dict (see load_checkpoint) whose config must match this model's."""
        stored = BlurDMConfig.from_dict(checkpoint["config"])
        differing = stored.weight_fields_differing_from(self.cfg)
        if differing:
            detail = ", ".join(f"{k} {getattr(stored, k)!r} vs {getattr(self.cfg, k)!r}" for k in differing)
            raise CheckpointError(f"{path}: saved with another config ({detail})")
        try:
            self.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not match its config ({str(err).splitlines()[0]})") from None


def deblur_tiled(deblur_whole, x, prior, tile, overlap):
    """
    (B, 3, H, W) -> deblur_whole on overlapping tiles, blended with normalised weights. Tiles are as few as `tile`
    allows, all one size, neighbours sharing >= `overlap` pixels, every start a multiple of 8 so that the network's
    1/2 and 1/4 sampling grids fall where they fall in the untiled run.
    """
    H, W = x.shape[-2:]
    overlap = 8 * math.ceil(overlap / 8)
    tile = max(8 * (tile // 8), overlap + 8)
    x = pad_to_multiple(x, 8)  # as deblur_whole pads the untiled image
    (ys, th), (xs, tw) = tile_starts(x.shape[-2], tile, overlap), tile_starts(x.shape[-1], tile, overlap)
    out, weight = torch.zeros_like(x), torch.zeros_like(x[:, :1])
    for top in ys:
        for left in xs:
            w = blend_ramp(th, overlap, top > 0, top + th < x.shape[-2], x.device)[:, None] * \
                blend_ramp(tw, overlap, left > 0, left + tw < x.shape[-1], x.device)  # (th, tw)
            out[..., top:top + th, left:left + tw] += deblur_whole(x[..., top:top + th, left:left + tw], prior) * w
            weight[..., top:top + th, left:left + tw] += w
    return (out / weight)[..., :H, :W]


def tile_starts(length, tile, overlap):
    """Starts and size of the tiles covering [0, length), a multiple of 8: n * size - (n - 1) * overlap >= length."""
    if length <= tile:
        return [0], length
    n = math.ceil((length - overlap) / (tile - overlap))
    size = 8 * math.ceil((length + (n - 1) * overlap) / n / 8)
    return [min(i * (size - overlap), length - size) for i in range(n)], size


def blend_ramp(size, overlap, rise, fall, device):
    """
    Blend weights along one axis of a tile. On a side with a neighbour the weight rises linearly across the middle
    half of the overlap and is ~0 in its outer quarter: a tile's output is worst at its own edge (padding where the
    untiled run sees image), so each tile gives way to its neighbour before its edge error matters.
    """
    w = torch.ones(size, device=device)
    d = torch.arange(overlap, device=device) + 0.5  # distance from the tile's edge
    edge = ((d - overlap / 4) / (overlap / 2)).clamp(1e-4, 1)  # never exactly 0: weights are divided by their sum
    if rise and overlap:
        w[:overlap] = torch.minimum(w[:overlap], edge)
    if fall and overlap:
        w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


def pad_to_multiple(x, multiple):
    """Pad the bottom and right of (B, C, H, W) to a multiple: reflect, or replicate where the image is too small."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < H and pw < W else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# ----------------------------------------------------------------------------------------------------------------
# 7. Metrics (METHOD.md §6): on uint8-rounded RGB, full image, no border crop


def to_uint8(x):
    """[0, 1] float -> uint8, rounded: what a saved PNG holds and what the paper's metrics see."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def psnr(x, y):
    """PSNR in dB between two uint8 RGB images (C, H, W), peak 255; inf when identical."""
    mse = (x.double() - y.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


SSIM_RECIPE = "3-D SSIM (11x11x11 Gaussian, sigma 1.5, replicate padding; NAFNet ssim3d / MATLAB-equivalent)"


def gaussian_window(size=11, sigma=1.5):
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x, y):
    """
    The 3-D SSIM of the BlurDM tables between two uint8 RGB images (C, H, W): the image is one H x W x C volume
    of floats in [0, 255], filtered by the separable 11x11x11 Gaussian (σ 1.5) with replicate padding of 5 on all
    three axes ('same' output), C1 = (0.01·255)², C2 = (0.03·255)²; the map is averaged over every voxel.
    """
    g = gaussian_window().to(x.device)

    def blur3d(v):  # (1, 1, C, H, W) -> same shape, one axis at a time
        v = F.pad(v, (5,) * 6, mode="replicate")
        for shape in ((11, 1, 1), (1, 11, 1), (1, 1, 11)):
            v = F.conv3d(v, g.view(1, 1, *shape))
        return v

    x, y = x.double()[None, None], y.double()[None, None]
    mu_x, mu_y = blur3d(x), blur3d(y)
    var_x = blur3d(x * x) - mu_x ** 2
    var_y = blur3d(y * y) - mu_y ** 2
    cov = blur3d(x * y) - mu_x * mu_y
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = (2 * mu_x * mu_y + C1) * (2 * cov + C2) / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2))
    return ssim_map.mean().item()


# ----------------------------------------------------------------------------------------------------------------
# 8. Files: checkpoints and images


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (a checkpoint can never run code), and a one-line error for a bad file."""
    import pickle

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable or truncated)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # garbage bytes surface as any of a dozen exception types
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):  # a class or function to import
            raise CheckpointError(f"{path}: refused, it holds Python objects that could run code "
                                  "(only weights_only checkpoints are loaded)") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable or truncated)") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "blurdm" or \
            not isinstance(checkpoint.get("model"), dict) or not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{path}: not a BlurDM checkpoint (no config and weights)")
    try:
        BlurDMConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config cannot be read ({err})") from None
    for name, value in checkpoint["model"].items():
        if not isinstance(value, torch.Tensor) or (value.is_floating_point() and not torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: weight {name} is " + ("not finite" if isinstance(value, torch.Tensor)
                                                                 else "not a tensor"))
    return checkpoint


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what read_image is used on


def list_images(folder, recursive=True):
    """Image files in `folder` (and its sub-folders), sorted; hidden files and folders are left out."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


PARTNER = {"blur": "sharp", "input": "target"}  # GoPro (not blur_gamma), its flat copy, and blur/ + sharp/ folders


def find_pairs(root):
    """
    A data set on disk -> ({split: [(blurry path or None, sharp path)]}, [problems, one line each]). A blurry image
    under a folder named blur/ (input/) pairs with the file of the same relative path, any suffix, under sharp/
    (target/); HIDE's with the file of its name in GT/; RealBlur's as its list files say (pass the folder or a list).
    With none of these, the folder holds sharp photographs (blurry None: blurred on the fly). The split is the nearest
    train/ or test/ folder above a file (train if none). Pairs are matched by name, never by sorted position.
    """
    root, splits, problems, missing = Path(root), {}, [], []
    if not (root.is_dir() or (root.suffix == ".txt" and root.is_file())):
        raise ValueError(f"{root}: " + ("not a folder (nor a RealBlur list file)" if root.exists() else
                                        "no such folder"))
    if root.suffix == ".txt":  # one list, and its partner if the name says train or test
        lists = [root.with_name(re.sub("_(train|test)_", f"_{s}_", root.name)) for s in ("train", "test")] \
            if re.search("_(train|test)_", root.name) else [root]
    else:  # RealBlur-J preferred where both kinds are present
        lists = next(([root / f"RealBlur_{k}_{s}_list.txt" for s in ("train", "test")] for k in "JR"
                      if any((root / f"RealBlur_{k}_{s}_list.txt").is_file() for s in ("train", "test"))), [])
    for split, list_file in zip(("train", "test"), lists):
        if list_file.is_file():
            try:
                rows = [line.split() for line in list_file.read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"{list_file}: not a RealBlur list file ({err})") from None
            pairs = [(list_file.parent / row[1], list_file.parent / row[0]) for row in rows if len(row) >= 2]
            splits[split] = [(str(b), str(s)) for b, s in pairs if b.is_file() and s.is_file()]
            missing += [str(p) for pair in pairs for p in pair if not p.is_file()]
    images = {} if lists else {p.relative_to(root).with_suffix("").as_posix(): p for p in list_images(root)}
    folders = lambda key: key.split("/")[:-1]
    split_of = lambda key: next((f for f in reversed(folders(key)) if f in ("train", "test")), "train")
    gt = {key.rsplit("/", 1)[-1]: p for key, p in images.items() if "GT" in folders(key)}
    used = set()
    for key, path in images.items():
        parts = key.split("/")
        i = max((i for i, part in enumerate(parts[:-1]) if part in PARTNER), default=None)
        if i is not None:
            partner = images.get("/".join([*parts[:i], PARTNER[parts[i]], *parts[i + 1:]]))
        elif gt and "GT" not in parts and {"train", "test"} & set(folders(key)):
            partner = gt.get(parts[-1])
        else:
            continue
        used.add(path)
        if partner is None:
            missing.append(str(path))
        else:
            used.add(partner)
            splits.setdefault(split_of(key), []).append((str(path), str(partner)))
    if used:  # a paired data set: say what it leaves out (but GoPro's blur_gamma/ and HIDE's GT/ of another split)
        unused = {key: str(p) for key, p in images.items() if p not in used
                  and not {"blur_gamma", "GT"} & set(folders(key))}
        missing += [p for key, p in unused.items() if {"sharp", "target"} & set(folders(key))]
        others = [p for key, p in unused.items() if not {"sharp", "target"} & set(folders(key))]
        if others:
            problems.append(f"{root}: {len(others)} images outside the paired folders, not used ({others[0]}, ...)")
    elif images:  # sharp photographs
        lone = next((key for key in images if {"sharp", "target", "GT"} & set(folders(key))), None)
        if lone:
            raise ValueError(f"{root}: found {lone} but no blurry partner folder (blur/, input/, or HIDE's train/ and "
                             "test/)")
        for key, path in images.items():
            splits.setdefault(split_of(key), []).append((None, str(path)))
    if missing:
        problems.insert(0, f"{root}: {len(missing)} images with no partner ({', '.join(missing[:3])}"
                           f"{', ...' * (len(missing) > 3)})")
    splits = {split: pairs for split, pairs in splits.items() if pairs}
    if not splits:
        raise ValueError(f"{root}: " + (f"no blurry/sharp pairs matched ({problems[0]})" if problems else
                                        f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})"))
    return splits, problems


@contextmanager
def atomic_path(path):
    """Yields a temporary name beside `path` (same suffix) to write to; renamed over `path` only on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_image(path, with_alpha=False):
    """
    Read an image file as float RGB (3, H, W) in [0, 1], EXIF orientation applied; 8- and 16-bit, grayscale,
    palette and alpha modes are converted (Pillow reads 16-bit RGB files at 8 bits; 16-bit grayscale keeps its
    precision). With with_alpha, returns (rgb, alpha (1, H, W) or None).
    Raises ValueError naming the file for anything that is not a readable image.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: image too large (over Pillow's {Image.MAX_IMAGE_PIXELS * 2:,}-pixel bomb limit)") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, SyntaxError, Image.UnidentifiedImageError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit (or float) grayscale
        scale = 1.0 if img.mode == "F" else 65535.0
        gray = torch.from_numpy(np.asarray(img, dtype=np.float32) / scale).clamp(0, 1)
        rgb, alpha = gray.expand(3, *gray.shape).contiguous(), None
    else:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (C, H, W)
        rgb, alpha = tensor[:3], (tensor[3:] if has_alpha else None)
    return (rgb, alpha) if with_alpha else rgb


def write_image(image, path, alpha=None):
    """Write (3, H, W) RGB or (1, H, W) grayscale in [0, 1], and an optional alpha (1, H, W), as an 8-bit image;
    the format follows the suffix (JPEG and BMP drop the alpha)."""
    from PIL import Image

    if alpha is not None and Path(path).suffix.lower() not in (".jpg", ".jpeg", ".bmp"):
        image = torch.cat([image, alpha.to(image)], 0)
    arr = to_uint8(image.float().cpu()).permute(1, 2, 0).numpy()
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)


def has_native_bf16():
    """Whether this CPU computes bf16 natively (x86 AVX-512 BF16 or AMX, Arm's BF16 extension, from Linux's
    /proc/cpuinfo); elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def pick_device(name="auto"):
    """'auto' (CUDA when there is one), 'cpu', 'cuda' or 'cuda:N' -> torch.device; ValueError if CUDA is absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available to this PyTorch build")
    return torch.device(name)


def autocast(device, amp):
    """
    The one mapping from --amp to what runs: (context manager, precision name, note or None). fp16 on CUDA, bf16 on
    GPUs and CPUs that have it natively; fp32 otherwise, with a note saying why.
    """
    device = torch.device(device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    native = {"cuda": amp == "fp16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()),
              "cpu": amp == "bf16" and has_native_bf16()}.get(device.type, False)
    if amp in dtypes and native:
        return torch.autocast(device.type, dtype=dtypes[amp]), amp, None
    note = None if amp in (None, "none", "fp32") else f"--amp {amp} runs in fp32 on {device}: " + (
        "fp16 is for CUDA" if amp == "fp16" else f"this {device.type.upper()} has no native bf16 (emulated, it is "
                                                 "several times slower)")
    return nullcontext(), "fp32", note


def out_of_memory(err):
    """Whether an exception is an allocation failure (of the CPU, CUDA, or Python itself)."""
    return isinstance(err, MemoryError) or any(s in str(err) for s in ("out of memory", "can't allocate memory"))
