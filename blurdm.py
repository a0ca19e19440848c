"""
BlurDM: a blur diffusion model for image deblurring, in one file.

Paper: J.-T. He, F.-J. Tsai, Y.-T. Peng, M.-H. Chen, C.-W. Lin, Y.-Y. Lin, "BlurDM: A Blur Diffusion
Model for Image Deblurring", NeurIPS 2025, arXiv:2512.03979. Official code:
github.com/Jin-Ting-He/BlurDM.

Motion blur is light gathered over a growing exposure. BlurDM's forward process adds that light (a
blur residual) and Gaussian noise step by step, so a sharp image diffuses into "blurred + noise";
the reverse process removes both. It runs on a latent vector per image, and its output, the sharp
prior, modulates the decoder of a MIMO-UNet deblurrer. Equation numbers (2.1) ... refer to METHOD.md
beside this file.

Time steps run t = 1..T as in the paper; every schedule tensor has length T + 1, index 0 the start
of the chain: B_0 is the shortest exposure (nearly sharp), B_T the blurred image.

    code              paper      meaning
    alpha[t]          α_t        exposure length after step t (α_0 < α_1 < ... < α_T)
    beta[t]           β_t        noise scale of step t (beta[0] = 0, unused)
    beta_bar[t]       β̄_t        accumulated noise: I_t = B_t + β̄_t ε
    B[t]              B_t        the image exposed for α_t, in linear light
    e[t]              e_t        blur residual: light gathered between α_{t-1} and α_t (e[0] = 0)
    x_t               I_t, Z_t   diffusion state: an image, or a latent vector
    eps               ε          standard Gaussian noise
    e_hat, eps_hat    ê_t, ε̂_t   outputs of the blur and noise residual estimators
    sharp_latent      Z^S        SE(blur, sharp), the sharp encoder's latent: the stage-2 target
    z_blur            Z^B        BE(blur, blur), the blur encoder's latent: start and condition c
    sharp_prior       Z_0^B      end of the reverse chain, fused into the deblurrer

Two parts. Part I is the method, in the paper's order, and needs only torch: config, blur formation,
blur diffusion, the latent prior networks, MIMO-UNet, and BlurDM (its training stages and losses,
deblur() on whole images). To use BlurDM in another project, copy everything above the line
"# Part II": it runs alone. Part II holds the tools train.py and sample.py share: large images in
tiles, metrics, checkpoints (this project's, MIMO-UNet's and the official code's files; export),
image files and data sets, the synthetic blur used to train on photographs, device and precision.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TORCH_VERSION = tuple(int(n) for n in torch.__version__.split("+")[0].split(".")[:2])  # (2, 13)


# --------------------------------------------------------------------------------------------------
# Part I: the method
# --------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class BlurDMConfig:
    """What shapes the weights and the method; the defaults are the paper's (MIMO-UNet+, BlurDM).
    The training recipe (crop, batch, learning rate, stage lengths) is not part of the model."""
    # deblurring network
    width: int = 32  # channels at full resolution; 2x and 4x at the 1/2 and 1/4 scales
    num_res: int = 20  # residual blocks a stage (MIMO-UNet+: 20, MIMO-UNet: 8)
    dropout: float = 0.1  # Dropout2d on the two feature-fusion outputs (MIMO-UNet+ only)
    prior: bool = True  # False: the backbone alone, the paper's baseline
    fusion_residual: bool = False  # fusion as features·(1 + k) + v: PriorFusion
    input_offset: float = 0.5  # networks see image - offset; 0 for MIMO-UNet's weights
    # latent prior (the official code's LE_arch and estimators)
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
    beta_bar_rule: str = "paper"  # "paper": Eq. (2.2); "official": the official code's variant
    # losses
    fft_weight: float = 0.1
    charbonnier_eps: float = 1e-3
    prior_distance: str = "l1"  # the stage-2 loss: "l1" (paper) or "charbonnier" (official code)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "paper": {},  # MIMO-UNet+ with BlurDM: the row the paper's Table 1 calls "MIMO-UNet"
    "mimo-unet": dict(num_res=8, dropout=0.0),  # Cho et al.'s MIMO-UNet: in no row of Table 1
    "demo": dict(width=16, num_res=2, dropout=0.0, latent_dim=64, encoder_width=16,
                 encoder_blocks=2),  # the shipped weights, sized for CPUs
    "tiny": dict(width=8, num_res=1, dropout=0.0, latent_dim=32, encoder_width=16,
                 encoder_blocks=1),  # for tests
}


# --------------------------------------------------------------------------------------------------
# 2. Blur formation (METHOD.md §1): a camera integrates light while its shutter is open


def srgb_to_linear(x):
    """sRGB values in [0, 1] -> linear light in [0, 1] (IEC 61966-2-1); see linear_to_srgb."""
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x):
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def affine_theta(path, height, width):
    """Camera path rows (..., 4): shift dx, dy in pixels, rotation in radians, log zoom -> the affine
    matrices (..., 2, 3) of grid_sample: the shift, and the rotation and zoom about the centre."""
    dx, dy, angle, log_zoom = path.unbind(-1)
    cos, sin = log_zoom.exp() * angle.cos(), log_zoom.exp() * angle.sin()
    aspect = height / width
    return torch.stack([torch.stack([cos, -sin * aspect, 2 * dx / width], -1),
                        torch.stack([sin / aspect, cos, 2 * dy / height], -1)], -2)


def warp(image, theta):
    """Resample (n, C, h, w) by affine matrices (n, 2, 3), bilinear, reflected at the border. The grid
    is built in float64: on a GPU, affine_grid is a matrix product that TF32 would round."""
    grid = F.affine_grid(theta.double(), list(image.shape), align_corners=False).to(image.dtype)
    return F.grid_sample(image, grid, "bilinear", "reflection", align_corners=False)


def integrate_light(radiance, theta, weights):
    """
    The exposure integral over a camera path of N sub-frames, radiance constant on each: for each of
    R integrals, Σ_k weights[r, :, k] · (radiance moved by theta[:, k]). radiance (n, 3, h, w) in
    linear light; theta (n, N, 2, 3), one path per image; weights (R, n, N) -> (R, n, 3, h, w).
    """
    total = radiance.new_zeros(weights.shape[0], *radiance.shape)
    for k in range(theta.shape[1]):
        total += weights[:, :, k, None, None, None] * warp(radiance, theta[:, k])
    return total


def render_exposures(sharp, path, alpha):
    """
    Blur formation (METHOD.md §1): every exposure B_t and blur residual e_t of a sharp sRGB image
    (n, 3, h, w) in [0, 1], moved along a camera path (N, 4) whose sub-frame k lights the time
    [k, k + 1) · α_T / N. Returns B and e, each (T + 1, n, 3, h, w), in linear light:
        B[t] = (1/α_t) ∫_0^{α_t} H(τ) dτ,   e[t] = ∫_{α_{t-1}}^{α_t} H(τ) dτ   (e[0] = 0)
    exact for the piecewise-constant radiance H, a sub-frame cut by a window weighted by its
    overlap.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    N = path.shape[0]
    tau = alpha * N / alpha[-1]  # the exposure ends, in sub-frames
    k = torch.arange(N, dtype=torch.float64)

    def overlap(start, end):  # (T + 1, N): the length of [start, end) ∩ [k, k + 1)
        return (torch.minimum(end[:, None], k + 1) - torch.maximum(start[:, None], k)).clamp(min=0)

    exposure = overlap(torch.zeros_like(tau), tau)  # ∫_0^{α_t}
    residual = overlap(torch.cat([tau[:1], tau[:-1]]), tau)  # ∫_{α_{t-1}}^{α_t}; row 0 is empty
    weights = (torch.cat([exposure, residual]) * alpha[-1] / N).to(sharp)  # (2T + 2, N)
    theta = affine_theta(path, *sharp.shape[-2:]).expand(len(sharp), N, 2, 3)
    weights = weights[:, None].expand(-1, len(sharp), N)  # the same path for every image
    integrals = integrate_light(srgb_to_linear(sharp), theta, weights)
    B, e = integrals.split(len(alpha))
    return B / alpha.to(sharp).view(-1, 1, 1, 1, 1), e


# --------------------------------------------------------------------------------------------------
# 3. Blur diffusion (METHOD.md §2-3), on tensors of any shape


def blur_schedule(T, alpha_start, alpha_end, beta_start, beta_end, rule="paper"):
    """α_0..α_T, β_0..β_T (β_0 = 0) and β̄_0..β̄_T, in float64."""
    if rule not in ("paper", "official"):
        raise ValueError(f"beta_bar rule must be 'paper' or 'official', not {rule!r}")
    alpha = torch.linspace(alpha_start, alpha_end, T + 1, dtype=torch.float64)
    beta = torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.linspace(beta_start, beta_end, T, dtype=torch.float64)])
    beta_bar = torch.zeros(T + 1, dtype=torch.float64)
    for t in range(1, T + 1):
        i = torch.arange(1, t + 1)
        if rule == "paper":  # Eq. (2.2): β̄_t² = Σ_{i≤t} (α_i/α_t)² β_i²
            beta_bar[t] = ((alpha[i] / alpha[t]) ** 2 * beta[i] ** 2).sum().sqrt()
        else:  # the official code: α shifted by one index and β not squared
            beta_bar[t] = ((alpha[i - 1] / alpha[t]) ** 2 * beta[i]).sum().sqrt()
    return alpha, beta, beta_bar


class BlurDiffusion(nn.Module):
    """
    Dual noise and blur diffusion (forward, q_*) and dual denoising and deblurring (reverse, p_*).

    The latent model uses two of these: q_sample at t = T for the start point x_T = Z^B + β̄_T ε,
    and p_sample_loop for the chain. Latent vectors have no exposures, so nothing calls q_step on
    them and the estimators never see a true e_t or ε: they learn through the chain's result (stage
    2). q_step and render_exposures pin the equations on pixels, in the tests. Where the paper's
    abstract says the reverse process starts from "pure Gaussian noise conditioned on the blurred
    image", the code starts where the forward chain ends, Eq. (2.2) at t = T: the blurred latent
    plus β̄_T ε (β̄_T = 0.026 with the paper's schedule), conditioned on c = Z^B.
    """

    def __init__(self, cfg):
        super().__init__()
        self.T = cfg.T
        alpha, beta, beta_bar = blur_schedule(cfg.T, cfg.alpha_start, cfg.alpha_end, cfg.beta_start,
                                              cfg.beta_end, cfg.beta_bar_rule)
        # derived from the config, so kept out of the checkpoint
        self.register_buffer("alpha", alpha.float(), persistent=False)
        self.register_buffer("beta", beta.float(), persistent=False)
        self.register_buffer("beta_bar", beta_bar.float(), persistent=False)

    def q_step(self, x_prev, t, e_t, eps):
        """One forward step, q(I_t | I_{t-1})."""
        a = self.alpha
        return a[t - 1] / a[t] * x_prev + e_t / a[t] + self.beta[t] * eps  # Eq. (2.1)

    def q_sample(self, B_t, t, eps):
        """The closed form of q(I_t | I_0)."""
        return B_t + self.beta_bar[t] * eps  # Eq. (2.2)

    def p_sample(self, x_t, t, e_hat, eps_hat):
        """
        One reverse step, deterministic (no fresh noise). The official code special-cases t = 1 as
        (α_1 I_1 - ê_1)/α_0; that is this line, because β_1 = 0 makes β̄_1 = 0 under both β̄ rules,
        so the noise term's coefficient α_1 β̄_1/α_0 - β̄_0 vanishes.
        """
        a, bb = self.alpha, self.beta_bar
        noise_coefficient = a[t] * bb[t] / a[t - 1] - bb[t - 1]
        return (a[t] * x_t - e_hat) / a[t - 1] - noise_coefficient * eps_hat  # Eq. (3.1)

    def p_sample_loop(self, x_T, c, blur_estimator, noise_estimator):
        """The reverse chain t = T..1 -> x_0; each estimator is called as estimator(x_t, t / T, c)."""
        x_t = x_T
        for t in range(self.T, 0, -1):
            t_frac = torch.full((x_t.shape[0], 1), t / self.T, dtype=x_t.dtype, device=x_t.device)
            e_hat, eps_hat = blur_estimator(x_t, t_frac, c), noise_estimator(x_t, t_frac, c)
            x_t = self.p_sample(x_t, t, e_hat, eps_hat)
        return x_t


# --------------------------------------------------------------------------------------------------
# 4. Latent prior networks (METHOD.md §4)


class EncoderBlock(nn.Module):
    def __init__(self, channels, batch_norm):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batch_norm else nn.Identity
        conv = lambda: nn.Conv2d(channels, channels, 3, padding=1)
        self.body = nn.Sequential(conv(), norm(), nn.LeakyReLU(0.1), conv(), norm())

    def forward(self, x):
        return x + self.body(x)


class LatentEncoder(nn.Module):
    """
    Two images -> one latent vector (the official code's LE_arch). Used twice: as the sharp encoder
    SE(blur, sharp), with BatchNorm, and as the blur encoder BE(blur, blur), without. Inputs: images
    minus cfg.input_offset (in [-0.5, 0.5]), H and W divisible by 4.
    """

    def __init__(self, cfg, batch_norm):
        super().__init__()
        w, d = cfg.encoder_width, cfg.latent_dim
        lrelu = lambda: nn.LeakyReLU(0.1)
        self.stem = nn.Sequential(nn.Conv2d(2 * 48, w, 3, padding=1), lrelu())
        blocks = [EncoderBlock(w, batch_norm) for _ in range(cfg.encoder_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1), lrelu(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), lrelu(),
            nn.Conv2d(2 * w, d, 3, padding=1), lrelu(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(d, d), lrelu(), nn.Linear(d, d), lrelu())

    def forward(self, x, y):
        h = torch.cat([F.pixel_unshuffle(x, 4), F.pixel_unshuffle(y, 4)], 1)  # (B, 96, H/4, W/4)
        return self.head(self.blocks(self.stem(h)))  # (B, latent_dim)


class ResidualEstimator(nn.Module):
    """
    The blur residual estimator (ê_t) and the noise residual estimator (ε̂_t) share this form: an
    MLP on concat[c, t/T, x_t], LeakyReLU after every layer (the last included), t/T the only
    embedding of time (as the official code).
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg.latent_dim
        layers = [nn.Linear(2 * d + 1, d), nn.LeakyReLU(0.1)]
        for _ in range(cfg.estimator_layers - 1):
            layers += [nn.Linear(d, d), nn.LeakyReLU(0.1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_t, t_frac, c):
        h = torch.cat([c, t_frac, x_t], 1).to(self.net[0].weight.dtype)  # (B, 2d + 1)
        return self.net(h).to(x_t.dtype)  # (B, d)


class PriorFusion(nn.Module):
    """
    The prior fusion module: features · k + v, (k, v) a bias-free linear map of the prior (no "+1"
    on k, as the official code). With residual=True it is features · (1 + k) + v with the map
    starting at zero: the identity at first, so that a prior added to a trained backbone starts at
    the backbone's own output (our choice, for fine-tuning published weights; the parameters are the
    same).
    """

    def __init__(self, latent_dim, channels, residual=False):
        super().__init__()
        self.residual = residual
        self.to_scale_shift = nn.Linear(latent_dim, 2 * channels, bias=False)
        if residual:
            nn.init.zeros_(self.to_scale_shift.weight)

    def forward(self, x, prior):
        k, v = self.to_scale_shift(prior.to(x.dtype))[:, :, None, None].chunk(2, 1)  # (B, C, 1, 1)
        return x * (1 + k) + v if self.residual else x * k + v


# --------------------------------------------------------------------------------------------------
# 5. Deblurring network: MIMO-UNet (Cho et al., ICCV 2021), a prior fusion module per decoder level


def basic_conv(c_in, c_out, kernel, stride=1, relu=True, transpose=False):
    """MIMO-UNet's BasicConv (without normalisation): a conv, or a transposed conv for x2
    upsampling, then a ReLU."""
    if transpose:
        layer = nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding=kernel // 2 - 1)
    else:
        layer = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2)
    return nn.Sequential(layer, nn.ReLU(inplace=True)) if relu else layer


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(basic_conv(channels, channels, 3),
                                  basic_conv(channels, channels, 3, relu=False))

    def forward(self, x):
        return x + self.body(x)


class ShallowConv(nn.Module):
    """SCM: features of a downscaled input image, which keeps its 3 channels alongside."""

    def __init__(self, channels):
        super().__init__()
        c = channels
        self.body = nn.Sequential(basic_conv(3, c // 4, 3), basic_conv(c // 4, c // 2, 1),
                                  basic_conv(c // 2, c // 2, 3), basic_conv(c // 2, c - 3, 1))
        self.out = basic_conv(c, c, 1, relu=False)

    def forward(self, image):
        return self.out(torch.cat([image, self.body(image)], 1))


class FeatureAttention(nn.Module):
    """FAM: x + conv(x ⊙ z), merging encoder features x with the shallow features z of the scaled
    input."""

    def __init__(self, channels):
        super().__init__()
        self.merge = basic_conv(channels, channels, 3, relu=False)

    def forward(self, x, z):
        return x + self.merge(x * z)


class FeatureFusion(nn.Module):
    """
    AFF: the encoder features of all three scales, resampled to one scale, mixed into one skip
    connection: conv3x3(ReLU(conv1x1(concat[f1, f2, f3] at that scale))). Nearest resampling
    commutes with a 1x1 conv, so each scale is mixed at the smaller of its own size and the target
    size and only the mixed result is resampled: the numbers of the concatenation, without 7C
    channels at full size.
    """

    def __init__(self, channels, c_out):
        super().__init__()
        self.channels = channels  # input channels of each scale, e.g. (c, 2c, 4c)
        self.mix = nn.Conv2d(sum(channels), c_out, 1)
        self.out = basic_conv(c_out, c_out, 3, relu=False)

    def forward(self, features, size):
        h = self.mix.bias.view(1, -1, 1, 1)
        for f, w in zip(features, self.mix.weight.split(self.channels, dim=1)):
            if f.shape[-1] > size[-1]:
                f = F.interpolate(f, size=size)  # nearest picks pixels: before the conv
            f = F.conv2d(f, w)
            h = h + (F.interpolate(f, size=size) if f.shape[-1] < size[-1] else f)
        return self.out(F.relu(h))


class MIMOUNet(nn.Module):
    """
    MIMO-UNet (num_res 8) / MIMO-UNet+ (num_res 20, dropout 0.1): multi-input, multi-output, three
    scales. Input (B, 3, H, W): the image minus cfg.input_offset, H and W divisible by 4. Returns
    the restored image (in the input's range) at 1/4, 1/2 and full scale, each the network's
    residual added to the equally scaled input. With cfg.prior a prior fusion module modulates the
    input of each decoder stage; without, this is the plain backbone.
    """

    def __init__(self, cfg):
        super().__init__()
        c, n = cfg.width, cfg.num_res
        stage = lambda ch: nn.Sequential(*[ResBlock(ch) for _ in range(n)])
        self.stem = basic_conv(3, c, 3)
        self.encoders = nn.ModuleList([stage(c), stage(2 * c), stage(4 * c)])
        self.down = nn.ModuleList([basic_conv(c, 2 * c, 3, stride=2),
                                   basic_conv(2 * c, 4 * c, 3, stride=2)])
        self.shallow = nn.ModuleList([ShallowConv(2 * c), ShallowConv(4 * c)])
        self.attention = nn.ModuleList([FeatureAttention(2 * c), FeatureAttention(4 * c)])
        self.fusion = nn.ModuleList([FeatureFusion((c, 2 * c, 4 * c), c),
                                     FeatureFusion((c, 2 * c, 4 * c), 2 * c)])
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.decoders = nn.ModuleList([stage(4 * c), stage(2 * c), stage(c)])
        self.up = nn.ModuleList([basic_conv(4 * c, 2 * c, 4, stride=2, transpose=True),
                                 basic_conv(2 * c, c, 4, stride=2, transpose=True)])
        self.squeeze = nn.ModuleList([basic_conv(4 * c, 2 * c, 1), basic_conv(2 * c, c, 1)])
        self.to_image = nn.ModuleList([basic_conv(ch, 3, 3, relu=False) for ch in (4 * c, 2 * c, c)])
        for layer in self.to_image:  # start as the identity (out = input), not with random residuals
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.prior_fusion = None
        if cfg.prior:
            self.prior_fusion = nn.ModuleList([PriorFusion(cfg.latent_dim, ch, cfg.fusion_residual)
                                               for ch in (4 * c, 2 * c, c)])

    def decode(self, level, x, prior):
        if self.prior_fusion is not None:
            x = self.prior_fusion[level](x, prior)
        return self.decoders[level](x)

    def forward(self, x, prior=None):
        x2 = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2))  # nearest, as all inside
        x4 = F.interpolate(x2, size=(x2.shape[-2] // 2, x2.shape[-1] // 2))
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


# --------------------------------------------------------------------------------------------------
# 6. BlurDM: the latent prior on a deblurrer, its three training stages and losses (METHOD.md §4-5)


def charbonnier(x, y, eps):
    return torch.sqrt((x - y) ** 2 + eps ** 2).mean()


def spectrum(x):
    return torch.view_as_real(torch.fft.rfft2(x))  # 2-D real FFT, real and imaginary parts stacked


def deblur_loss(outputs, sharp, cfg):
    """
    MIMO-UNet's loss, Eq. (5.2): Σ_s C(out_s, sharp_s) + 0.1 Σ_s C(FFT out_s, FFT sharp_s), C the
    Charbonnier distance, sharp_s the bilinear downscale of the target to each output's size.
    outputs: a list of scales in [0, 1]; sharp in [0, 1].
    """
    content = frequency = 0.0
    for out in outputs:
        target = sharp
        if out.shape != sharp.shape:
            target = F.interpolate(sharp, size=out.shape[-2:], mode="bilinear")
        out = out.clamp(0, 1)
        content = content + charbonnier(out, target, cfg.charbonnier_eps)
        frequency = frequency + charbonnier(spectrum(out), spectrum(target), cfg.charbonnier_eps)
    return content + cfg.fft_weight * frequency


def prior_loss(prior, target, cfg):
    """Stage 2's L_prior, Eq. (5.1): the mean absolute difference between Z_0^B and Z^S (the paper's
    L1), or its Charbonnier form (the official code)."""
    if cfg.prior_distance == "l1":
        return F.l1_loss(prior, target)
    return charbonnier(prior, target, cfg.charbonnier_eps)


STAGE_PARTS = {  # what each training stage optimises; the rest is frozen (METHOD.md §5)
    1: ("sharp_encoder", "deblurrer"),
    2: ("blur_encoder", "blur_estimator", "noise_estimator"),
    3: ("blur_encoder", "blur_estimator", "noise_estimator", "deblurrer"),
}
INFERENCE_SEED = 2023  # the official code's seed for the start noise of the reverse chain
PRIOR_MAX_PIXELS = 16_000_000  # larger images: the blur encoder sees an area-downscaled copy


class BlurDM(nn.Module):
    """
    Latent BlurDM on a deblurring network: MIMO-UNet(+) by default, or any `deblurrer` module whose
    forward is deblurrer(x, prior) -> image or list of scales (full resolution last), prior (B, d)
    or None, with PriorFusion modules where its decoder takes the prior. Images enter and leave in
    [0, 1]. Training (METHOD.md §5): forward(blur, sharp, stage) returns the stage's loss.
        1. prior Z^S = SE(blur, sharp); SE and the deblurrer learn the deblurring loss;
        2. prior Z_0^B = chain(BE(blur)), target Z^S, SE frozen; BE and both estimators learn L_prior;
        3. prior Z_0^B = chain(BE(blur)); BE, the estimators and the deblurrer learn the deblurring
           loss.
    Inference: deblur(blurry) on whole images.
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

    def to_network(self, image):
        """An image in [0, 1] -> what the networks see: [-0.5, 0.5] (input_offset 0.5), or [0, 1]."""
        return image - self.cfg.input_offset

    def run_deblurrer(self, blur, prior):
        """The deblurrer on blur in [0, 1] (H, W multiples of 4) -> its outputs in [0, 1], full
        resolution last."""
        out = self.deblurrer(self.to_network(blur), prior)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [o + self.cfg.input_offset for o in out]

    def sharp_latent(self, blur, sharp):
        """Z^S = SE(blur, sharp) for images in [0, 1]: the stage-1 prior and the stage-2 target."""
        return self.sharp_encoder(self.to_network(blur), self.to_network(sharp))

    def sharp_prior(self, blur, eps=None):
        """The sharp prior Z_0^B for blur in [0, 1]: the reverse chain from x_T = Z^B + β̄_T ε,
        conditioned on c = Z^B."""
        x = self.to_network(blur)
        z_blur = self.blur_encoder(x, x)  # (B, d)
        z_blur = z_blur.to(torch.promote_types(z_blur.dtype, torch.float32))  # fp32 or wider
        eps = torch.randn_like(z_blur) if eps is None else eps.to(z_blur)
        x_T = self.diffusion.q_sample(z_blur, self.cfg.T, eps)
        return self.diffusion.p_sample_loop(x_T, z_blur, self.blur_estimator, self.noise_estimator)

    def forward(self, blur, sharp, stage=3, eps=None):
        """
        The training loss of a stage. blur, sharp: (B, 3, H, W) in [0, 1], H and W divisible by 4;
        eps: the chain's start noise (drawn if None). Without a prior there is one loss, the
        deblurring loss, whatever the stage.
        """
        if stage not in STAGE_PARTS:
            raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
        if blur.shape[-1] % 4 or blur.shape[-2] % 4:
            raise ValueError(f"H and W must be divisible by 4, got {tuple(blur.shape[-2:])}; "
                             "deblur() pads for you")
        if not self.cfg.prior:
            return deblur_loss(self.run_deblurrer(blur, None), sharp, self.cfg)
        if stage == 1:
            prior = self.sharp_latent(blur, sharp)
            return deblur_loss(self.run_deblurrer(blur, prior), sharp, self.cfg)
        prior = self.sharp_prior(blur, eps)
        if stage == 2:
            with torch.no_grad():
                target = self.sharp_latent(blur, sharp)
            return prior_loss(prior, target, self.cfg)
        return deblur_loss(self.run_deblurrer(blur, prior), sharp, self.cfg)

    def set_stage(self, stage):
        """The model in training mode for a stage; returns the parameters that stage optimises."""
        if stage not in STAGE_PARTS:
            raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
        trained = STAGE_PARTS[stage] if self.cfg.prior else ("deblurrer",)
        self.train()
        for name, module in self.named_children():
            module.requires_grad_(name in trained)
            if name not in trained:
                module.eval()  # the frozen sharp encoder of stage 2 keeps its BatchNorm statistics
        return [p for p in self.parameters() if p.requires_grad]

    def start_noise(self, n, seed, device):
        """ε for x_T: one draw from `seed`, shared by the batch, so that a batch gives what one image
        at a time gives."""
        eps = torch.randn(self.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
        return eps.expand(n, -1).to(device)

    @torch.inference_mode()
    def prior_for(self, blurry, seed=INFERENCE_SEED):
        """
        The sharp prior for (B, 3, H, W) images in [0, 1] at inference (None without a prior). The
        blur encoder ends in a global average pool, so the prior describes the whole image; over
        PRIOR_MAX_PIXELS it sees an area-downscaled copy.
        """
        if not self.cfg.prior:
            return None
        H, W = blurry.shape[-2:]
        if H * W > PRIOR_MAX_PIXELS:
            scale = math.sqrt(PRIOR_MAX_PIXELS / (H * W))
            size = (max(8, int(H * scale)), max(8, int(W * scale)))
            blurry = F.interpolate(blurry, size=size, mode="area")
        x = pad_to_multiple(blurry, 8)
        return self.sharp_prior(x, self.start_noise(x.shape[0], seed, x.device))

    @torch.inference_mode()
    def deblur(self, blurry, seed=INFERENCE_SEED, prior=None):
        """
        Inference on whole images: (B, 3, H, W) or (3, H, W), floats in [0, 1] or uint8, any H and
        W, on any device -> the sharp estimate, of the same shape and device, floats in [0, 1]. All
        T steps run; `seed` fixes ε (official: 2023); a `prior` may be passed in instead.
        """
        x = image_batch(blurry, next(self.parameters()))
        with eval_mode(self):
            out = self.deblur_whole(x, self.prior_for(x, seed) if prior is None else prior)
        return (out if blurry.dim() == 4 else out[0]).to(blurry.device)

    def deblur_whole(self, blurry, prior):
        """The deblurrer on (B, 3, H, W) in [0, 1] of any size, with the given prior."""
        layout = memory_format(blurry.device)
        run = lambda x: self.run_deblurrer(x.contiguous(memory_format=layout), prior)[-1]
        return run_padded(run, blurry).clamp(0, 1).contiguous()


@contextmanager
def eval_mode(model):
    """The model in eval mode for a while; each module's own mode comes back after (SE stays frozen
    in stage 2)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def image_batch(images, like):
    """What deblur accepts -> (B, 3, H, W) in [0, 1] with the dtype and device of the tensor `like`;
    a one-line ValueError for anything else."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"deblur expects a torch tensor (B, 3, H, W) in [0, 1], not a "
                         f"{type(images).__name__}; for images of different sizes, call it per image")
    x = images[None] if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3 or x.numel() == 0:
        raise ValueError(f"deblur expects RGB images (B, 3, H, W) or (3, H, W), not shape "
                         f"{tuple(images.shape)}")
    if x.dtype == torch.uint8:
        x = x / 255
    elif not x.is_floating_point():
        raise ValueError(f"deblur expects floats in [0, 1] or uint8, not {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("deblur: the image holds NaN or infinite values")
    low, high = x.min().item(), x.max().item()
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"deblur expects floats in [0, 1] (or uint8), got values in "
                         f"[{low:g}, {high:g}]")
    if like.dtype == torch.float16 and like.device.type == "cpu" and TORCH_VERSION < (2, 3):
        raise ValueError(f"deblur: a float16 model on the CPU needs torch >= 2.3 (torch "
                         f"{torch.__version__} has no float16 convolutions there); use model.float()")
    return x.clamp(0, 1).to(like)


def memory_format(device):
    """The one layout decision: channels_last on the CPU (faster convolutions), else the default."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def edge_pad(x, pad):
    """F.pad of (..., H, W) by pad = (left, right, top, bottom): the border reflected, or replicated
    where the image is too small to reflect."""
    H, W = x.shape[-2:]
    mode = "reflect" if max(pad[:2]) < W and max(pad[2:]) < H else "replicate"
    return F.pad(x, pad, mode=mode)


def pad_to_multiple(x, multiple):
    """Pad (B, C, H, W) at the bottom and right to multiples of `multiple` (edge_pad). Written without
    a branch on the size (a pad of `multiple`, then a crop), so that torch.export keeps H, W symbolic."""
    H, W = x.shape[-2:]
    up = lambda n: multiple * ((n + multiple - 1) // multiple)
    return edge_pad(x, (0, multiple, 0, multiple))[..., :up(H), :up(W)]


def run_padded(fn, x, multiple=8):
    """fn on x padded to a multiple (MIMO-UNet needs multiples of 4, the blur encoder too, and 8 keeps
    tiles on its sampling grid), its output cropped back to x's size (by a negative pad, which
    torch.export keeps symbolic where a slice would not)."""
    H, W = x.shape[-2:]
    out = fn(pad_to_multiple(x, multiple))
    return F.pad(out, (0, W - out.shape[-1], 0, H - out.shape[-2]))


# ------------------------------------------------------------------------------------------------------
# Part II: the tools train.py and sample.py share; everything above this line runs without them
# ------------------------------------------------------------------------------------------------------

import argparse
import copy
import errno
import fnmatch
import functools
import numbers
import os
import pickle
import re
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset


# ------------------------------------------------------------------------------------------------------
# 7. Large images in tiles, all modulated by one prior computed on the whole image


@torch.inference_mode()
def deblur_tiled(model, blurry, tile=None, overlap=64, seed=INFERENCE_SEED):
    """
    deblur() for images larger than `tile` px: overlapping tiles blended with normalised weights, each
    modulated by the prior of the whole image (as the untiled run is). Tiles are as few as `tile`
    allows, all one size, neighbours sharing >= `overlap` pixels, every start a multiple of 8 so that
    the network's 1/2 and 1/4 sampling grids fall where they fall in the untiled run. tile=None: 1536 px
    on a CPU, on a GPU the largest square whose activations fit in half its free memory; 0: never tile.
    Takes and returns what deblur() does.
    """
    problem = tiling_problem(tile, overlap)
    if problem:
        raise ValueError(f"deblur_tiled(tile={tile!r}, overlap={overlap!r}): {problem}")
    x = image_batch(blurry, next(model.parameters()))
    if tile is None and x.device.type == "cuda":
        free = torch.cuda.mem_get_info(x.device)[0]
        side = (free / 2 / (ACTIVATION_FLOATS * 4 * model.cfg.width)) ** 0.5
        tile = max(64, 2 * overlap, 8 * int(side / 8))
    tile = 1536 if tile is None else int(tile)
    with eval_mode(model):
        prior = model.prior_for(x, seed)
        if tile and max(x.shape[-2:]) > tile:
            out = deblur_in_tiles(model, x, prior, 8 * (tile // 8), 8 * math.ceil(overlap / 8))
        else:
            out = model.deblur_whole(x, prior)
    return (out if blurry.dim() == 4 else out[0]).to(blurry.device)


ACTIVATION_FLOATS = 64  # a bound on the numbers MIMO-UNet keeps per pixel and channel of width


def tiling_problem(tile, overlap):
    """What is wrong with a tile size and overlap in px, in words that name neither parameter (the
    caller does), or None. tile None or 0: no tiling."""
    whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not whole(overlap) or overlap < 0:
        return "the overlap must be a whole number of pixels, 0 or more"
    if tile is None or (whole(tile) and tile == 0):
        return None
    least = max(64, 2 * overlap)
    if not whole(tile) or tile < least:
        return f"a tile must be a whole number of at least {least} px (64, and twice the overlap)"
    return None


def deblur_in_tiles(model, x, prior, tile, overlap):
    """deblur_whole on overlapping tiles of (B, 3, H, W) in [0, 1], tile and overlap multiples of 8,
    the image padded as deblur_whole pads it."""
    def blend(x):
        H, W = x.shape[-2:]
        (ys, th), (xs, tw) = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
        out, weight = torch.zeros_like(x), torch.zeros_like(x[:, :1])
        for top in ys:
            ramp_y = blend_ramp(th, overlap, top > 0, top + th < H, x.device)
            for left in xs:
                ramp_x = blend_ramp(tw, overlap, left > 0, left + tw < W, x.device)
                w = ramp_y[:, None] * ramp_x  # (th, tw)
                window = (..., slice(top, top + th), slice(left, left + tw))
                out[window] += model.deblur_whole(x[window], prior) * w
                weight[window] += w
        return out / weight

    return run_padded(blend, x)


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


# ------------------------------------------------------------------------------------------------------
# 8. Metrics (METHOD.md §6): on uint8-rounded RGB, full image, no border crop


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


@torch.inference_mode()
def evaluate(model, images, device, stage=3, tile=2048):
    """(PSNR, SSIM) of the model's output for each (name, blur, sharp) of uint8 (3, H, W) images, as the paper's
    tables score (METHOD.md §6); at stage 1 the prior is SE(blur, sharp), as that stage trains."""
    model.eval()
    for _, blur_u8, sharp_u8 in images:
        blur, sharp = (x.to(device)[None].float() / 255 for x in (blur_u8, sharp_u8))
        if model.cfg.prior and stage == 1:
            out = model.deblur(blur, prior=model.sharp_latent(pad_to_multiple(blur, 8), pad_to_multiple(sharp, 8)))
        else:
            out = deblur_tiled(model, blur, tile)
        out = to_uint8(out[0])
        yield psnr(out, sharp_u8.to(device)), ssim(out, sharp_u8.to(device))


# ------------------------------------------------------------------------------------------------------
# 9. Checkpoints: this project's format; MIMO-UNet's and the official code's files converted; export


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint; the message names the file and the problem."""


# a config read from a file is checked before anything is built from it
CONFIG_LIMITS = dict(
    width=(4, 1024), num_res=(1, 100), dropout=(0.0, 0.99), input_offset=(0.0, 0.5),
    latent_dim=(1, 4096), encoder_width=(1, 1024), encoder_blocks=(0, 100), estimator_layers=(1, 100),
    T=(1, 1000), alpha_start=(0.0, 1e6), alpha_end=(0.0, 1e6), beta_start=(0.0, 10.0),
    beta_end=(0.0, 10.0), fft_weight=(0.0, 1e3), charbonnier_eps=(1e-12, 1.0))
CONFIG_CHOICES = dict(beta_bar_rule=("paper", "official"), prior_distance=("l1", "charbonnier"))
CONFIG_RENAMED = {"prior_loss": "prior_distance"}  # names older files use
RECIPE_FIELDS = ("crop", "batch_size", "lr", "lr_min", "stage_epochs", "seed")  # older files: ignored


def check_config(stored):
    """A config dict read from a file -> BlurDMConfig; ValueError naming the first field that is
    unknown or bad."""
    known = {f.name: type(f.default) for f in fields(BlurDMConfig)}
    stored = {CONFIG_RENAMED.get(k, k): v for k, v in stored.items() if k not in RECIPE_FIELDS}
    unknown = sorted(set(stored) - set(known), key=str)
    if unknown:
        raise ValueError(f"unknown config fields {', '.join(map(str, unknown))}")
    for name, value in stored.items():
        kind = known[name]
        if kind is float:
            if type(value) not in (float, int) or not math.isfinite(value):
                raise ValueError(f"config field {name} must be a finite float, not {value!r}")
        elif type(value) is not kind:
            raise ValueError(f"config field {name} must be {kind.__name__}, not {value!r}")
        low, high = CONFIG_LIMITS.get(name, (value, value))
        if not low <= value <= high:
            raise ValueError(f"config field {name} must be in [{low}, {high}], not {value!r}")
        if name in CONFIG_CHOICES and value not in CONFIG_CHOICES[name]:
            raise ValueError(f"config field {name} must be one of {', '.join(CONFIG_CHOICES[name])}, "
                             f"not {value!r}")
    cfg = BlurDMConfig(**stored)
    if not 0 < cfg.alpha_start < cfg.alpha_end:
        raise ValueError("the exposure schedule needs 0 < alpha_start < alpha_end (the reverse step "
                         "divides by α)")
    return cfg


def save_checkpoint(path, model, **extra):
    """Write config + weights (+ `extra`: stage, step, optimiser state ...) atomically: a temp file,
    then a rename. A custom deblurrer's class name is stored, so that loading can say which module the
    file needs."""
    name = type(model.deblurrer).__name__
    checkpoint = {"format": "blurdm", "config": asdict(model.cfg), "model": model.state_dict(),
                  **({"deblurrer": name} if name != "MIMOUNet" else {}), **extra}
    path = Path(path)
    if not path.parent.is_dir():
        raise OSError(f"{path.parent}: no such folder")
    try:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    except (OSError, RuntimeError) as err:  # torch.save's zip writer reports a full disk in its words
        full = getattr(err, "errno", None) == errno.ENOSPC or (
            isinstance(err, RuntimeError) and shutil.disk_usage(path.parent).free < 2 ** 26)
        if full:
            raise OSError(f"{path.parent}: the disk is full; {path.name} was not written (an earlier one "
                          "is intact)") from None
        raise OSError(f"{path}: cannot write ({error_line(err)})") from None


def safe_load(path, *, allowed=()):
    """torch.load with weights_only=True (a checkpoint can never run code; `allowed`: classes it may
    rebuild, where this torch can allow them), and a one-line error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable or truncated)")
    allow = nullcontext()
    if allowed and hasattr(torch.serialization, "safe_globals"):  # torch 2.5 and newer
        allow = torch.serialization.safe_globals(list(allowed))
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage bytes surface as any of a dozen exception types
        # a class to import: "GLOBAL argparse.Namespace" since torch 2.4, "Unsupported class ..." before
        refused = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and refused:
            if refused[1] in {f"{c.__module__}.{c.__name__}" for c in allowed}:
                raise CheckpointError(f"{path}: holds a pickled {refused[1]}, which torch {torch.__version__} "
                                      "cannot load safely (torch >= 2.5 can)") from None
            raise CheckpointError(f"{path}: refused, it holds Python objects that could run code "
                                  "(only weights_only checkpoints are loaded)") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable or truncated)") from None


def check_tensors(path, state):
    """Every entry of a state dict must be a real tensor with its data, named by a string (the values'
    size is not read: shapes are compared before check_weights looks at any number)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its weights are a {type(state).__name__}, not a dict of tensors")
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: a weight named {name!r}; names are strings")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name} is a {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise CheckpointError(f"{path}: weight {name} holds no data (a meta tensor)")
        if value.is_complex():
            raise CheckpointError(f"{path}: weight {name} is complex ({value.dtype}); weights are real")
        stored = value.untyped_storage().nbytes()
        if value.numel() and stored < value.numel() * value.element_size():
            raise CheckpointError(f"{path}: weight {name} declares {tuple(value.shape)} but stores "
                                  f"{stored} bytes (an expanded tensor); save it with .contiguous()")


def read_checkpoint(path):
    """
    A checkpoint of any known kind -> (BlurDMConfig, state dict in this module's names, the file's
    dict). This project's files are read as they are; MIMO-UNet's and the official BlurDM code's are
    converted (convert_foreign). Every weight is checked to be a tensor (check_tensors).
    """
    checkpoint = safe_load(path, allowed=[argparse.Namespace])  # the official files pickle their args
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == "blurdm"):
        return (*convert_foreign(path, checkpoint), checkpoint)
    if not isinstance(checkpoint.get("model"), dict) or not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{path}: not a BlurDM checkpoint (no config and weights)")
    try:
        cfg = check_config(checkpoint["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config cannot be read ({err})") from None
    check_tensors(path, checkpoint["model"])
    return cfg, checkpoint["model"], checkpoint


# the weights a training stage may start without (they keep their initial values): stage 1, every prior
# network (a published backbone has none); stage 2, what it trains from scratch; stage 3, the sharp encoder
# it no longer uses. What a stage trains from must be in the file.
PRIOR_NETWORKS = tuple(f"{name}." for name in STAGE_PARTS[2])  # stage 2 trains them from scratch
NEW_AT_STAGE = {1: ("sharp_encoder.", *PRIOR_NETWORKS, "deblurrer.prior_fusion."), 2: PRIOR_NETWORKS,
                3: ("sharp_encoder.",)}


def load_weights(model, state, path, optional=()):
    """Copy a state dict into `model` after check_weights."""
    check_weights(model, state, path, optional)
    model.load_state_dict(state, strict=False)


def check_weights(model, state, path, optional=()):
    """Every stored key must have a place of its shape in `model`, every weight of the model must be
    stored but those whose names start with one of `optional` (they keep their initial values), and
    then every stored number must be finite; CheckpointError naming the first key that breaks this."""
    own = model.state_dict()
    for name, value in state.items():
        if name not in own:
            raise CheckpointError(f"{path}: weight {name} {tuple(value.shape)} has no place in the model")
        if own[name].shape != value.shape:
            raise CheckpointError(f"{path}: weight {name} is {tuple(value.shape)} in the file but "
                                  f"{tuple(own[name].shape)} in the model")
    missing = [name for name in own if name not in state and not name.startswith(tuple(optional))]
    if missing:
        raise CheckpointError(f"{path}: weight {missing[0]} {tuple(own[missing[0]].shape)} is missing "
                              "from the file")
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: weight {name} is not finite")


def mimo_unet_names(num_res):
    """{name in MIMO-UNet's state dict (chosj95/MIMO-UNet; the official BlurDM code's deblurrer too): ours}. Its
    BasicConv keeps the conv at .main.0; its SCM1/FAM1 serve the 1/4 scale, SCM2/FAM2 the 1/2 scale."""
    modules = {"feat_extract.0": "stem.0", "feat_extract.1": "down.0.0", "feat_extract.2": "down.1.0",
               "feat_extract.3": "up.0.0", "feat_extract.4": "up.1.0", "feat_extract.5": "to_image.2",
               "ConvsOut.0": "to_image.0", "ConvsOut.1": "to_image.1", "Convs.0": "squeeze.0.0",
               "Convs.1": "squeeze.1.0", "FAM2.merge": "attention.0.merge", "FAM1.merge": "attention.1.merge",
               "SCM2.conv": "shallow.0.out", "SCM1.conv": "shallow.1.out"}
    for i in range(2):
        modules |= {f"AFFs.{i}.conv.0": f"fusion.{i}.mix", f"AFFs.{i}.conv.1": f"fusion.{i}.out"}
        modules |= {f"SCM{2 - i}.main.{k}": f"shallow.{i}.body.{k}.0" for k in range(4)}
    for i in range(3):
        for theirs, ours in (("Encoder", "encoders"), ("Decoder", "decoders")):
            for j in range(num_res):
                modules |= {f"{theirs}.{i}.layers.{j}.main.0": f"{ours}.{i}.{j}.body.0.0",
                            f"{theirs}.{i}.layers.{j}.main.1": f"{ours}.{i}.{j}.body.1"}
    names = {f"{a}.main.0.{p}": f"deblurrer.{b}.{p}" for a, b in modules.items() for p in ("weight", "bias")}
    return names | {f"Decoder.{i}.kv.weight": f"deblurrer.prior_fusion.{i}.to_scale_shift.weight" for i in range(3)}


def official_prior_names(cfg):
    """{name in the official BlurDM code's diffusion (model_dm_state) and sharp encoder (model_le_state): ours}.
    Its LE_arch numbers the layers of one Sequential E (no placeholder where BatchNorm is left out); its estimators
    are resmlp.0, then resmlp.k.resmlp.0."""
    n, names = cfg.encoder_blocks, {}
    for theirs, ours, bn in (("condition_encoder.", "blur_encoder.", False), ("le.", "sharp_encoder.", True)):
        layers = {"E.0": "stem.0", f"E.{n + 2}": "head.0", f"E.{n + 4}": "head.2", f"E.{n + 6}": "head.4",
                  "mlp.0": "head.8", "mlp.2": "head.10"}
        for j in range(n):
            layers |= {f"E.{j + 2}.body.{a}": f"blocks.{j}.body.{b}" for a, b in
                       (((0, 0), (1, 1), (3, 3), (4, 4)) if bn else ((0, 0), (2, 3)))}
        for a, b in layers.items():
            batch_norm = a.endswith(("body.1", "body.4"))
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")[:5 if batch_norm else 2]:
                names[f"{theirs}{a}.{p}"] = f"{ours}{b}.{p}"
    for theirs, ours in (("lcr_model.", "blur_estimator."), ("noise_model.", "noise_estimator.")):
        layers = {"resmlp.0": "net.0"} | {f"resmlp.{k}.resmlp.0": f"net.{2 * (k - 1)}"
                                          for k in range(2, cfg.estimator_layers + 1)}
        names |= {f"{theirs}{a}.{p}": f"{ours}{b}.{p}" for a, b in layers.items() for p in ("weight", "bias")}
    return names


def convert_foreign(path, checkpoint):
    """
    MIMO-UNet's files ({'model': weights}, its model.pkl with optimizer state too) and the official
    BlurDM code's (last_*.pth with model_state and model_dm_state; or final_deblur_*.pth, whose
    final_dm_*.pth and final_le_*.pth beside it are read too) -> (config, state dict in our names).
    MIMO-UNet sees [0, 1] (input_offset 0), BlurDM [-0.5, 0.5]; the BlurDM files were trained with the
    official β̄ and the Charbonnier prior loss.
    """
    path, parts = Path(path), {}
    official_keys = {"model_state", "model_dm_state", "model_le_state"}
    if isinstance(checkpoint, dict) and official_keys & set(checkpoint):
        for key, part, prefix in (("model_state", "deblur", ""), ("model_dm_state", "dm", ""),
                                  ("model_le_state", "le", "le.")):
            sibling = path.with_name(re.sub(r"^(final|best)_(deblur|dm|le)_", rf"\1_{part}_", path.name))
            source, where = checkpoint, path
            if key not in checkpoint and sibling != path and sibling.is_file():  # final_deblur_X.pth
                source, where = safe_load(sibling, allowed=[argparse.Namespace]), sibling
            if not isinstance(source, dict) or key not in source:
                continue
            parts |= foreign_weights(where, source[key], prefix, key)
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("model", checkpoint), dict):
        parts = foreign_weights(path, checkpoint.get("model", checkpoint), "", "model")
    width = parts.get("feat_extract.0.main.0.weight")
    if not isinstance(width, torch.Tensor) and "lcr_model.resmlp.0.weight" in parts:
        raise CheckpointError(f"{path}: the official blur diffusion (model_dm_state) without a "
                              "deblurrer: pass the final_deblur_*.pth it was trained with (final_dm_*.pth "
                              "beside it is read too)")
    if not isinstance(width, torch.Tensor):
        raise CheckpointError(f"{path}: not a checkpoint of a known kind (this project's, MIMO-UNet's or "
                              "the official BlurDM code's)")
    check_tensors(path, parts)
    if width.dim() != 4:
        raise CheckpointError(f"{path}: weight feat_extract.0.main.0.weight is {tuple(width.shape)}, "
                              "not a convolution's (out, 3, 3, 3)")
    num_res = sum(k.startswith("Encoder.0.layers.") and k.endswith(".main.0.main.0.weight")
                  for k in parts)
    blurdm_file = "Decoder.0.kv.weight" in parts
    cfg = BlurDMConfig(width=width.shape[0], num_res=num_res, dropout=0.1 if num_res == 20 else 0.0)
    if blurdm_file:
        latent_dim = parts["Decoder.0.kv.weight"].shape[-1]
        cfg = replace(cfg, beta_bar_rule="official", prior_distance="charbonnier", latent_dim=latent_dim)
        diffusion = BlurDiffusion(cfg)
        for name, ours in (("alphas", diffusion.alpha), ("betas_bar", diffusion.beta_bar[1:])):
            stored = parts.pop(name, ours)
            same = stored.shape == ours.shape and stored.is_floating_point() and torch.allclose(
                stored.float(), ours.to(stored.dtype).float(), atol=1e-5)  # at the stored precision
            if not same:
                raise CheckpointError(f"{path}: schedule {name} {[round(v, 6) for v in stored.tolist()]} "
                                      f"is not the official one this loader maps "
                                      f"({[round(v, 6) for v in ours.tolist()]})")
        parts.pop("time_stamps_list", None)
    else:
        cfg = replace(cfg, prior=False, input_offset=0.0)
    try:
        check_config(asdict(cfg))
    except ValueError as err:
        raise CheckpointError(f"{path}: its weights describe no buildable network ({err})") from None
    names = mimo_unet_names(num_res) | (official_prior_names(cfg) if blurdm_file else {})
    unknown = next((k for k in parts if k not in names), None)
    if unknown:
        code = "BlurDM" if blurdm_file else "MIMO-UNet"
        raise CheckpointError(f"{path}: weight {unknown} is not one of the {code} code's")
    with torch.device("meta"):
        own = BlurDM(cfg).state_dict()
    for theirs, value in parts.items():  # shapes compared in the file's names, before any number is read
        if own[names[theirs]].shape != value.shape:
            raise CheckpointError(f"{path}: weight {theirs} is {value.shape}, not "
                                  f"{tuple(own[names[theirs]].shape)}")
    return cfg, {names[k]: v for k, v in parts.items()}


def foreign_weights(path, weights, prefix, key):
    """A foreign state dict with DataParallel's "module." dropped and `prefix` added; CheckpointError
    where a name is not a string, or is there both with and without "module."."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its {key} is a {type(weights).__name__}, not a dict of weights")
    names = {}
    for name, value in weights.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: a weight named {name!r}; names are strings")
        short = name.removeprefix("module.")
        if prefix + short in names:
            raise CheckpointError(f"{path}: weight {short} is there twice, with and without 'module.'")
        names[prefix + short] = value
    return names


def load_model(path, *, deblurrer=None):
    """
    Any checkpoint (this project's, MIMO-UNet's, the official BlurDM code's) -> a BlurDM in eval mode,
    on the CPU. The stored shapes are checked on a model without memory ("meta") before the real one is
    built. A file saved with a custom deblurrer needs that module passed as `deblurrer`.
    """
    cfg, state, checkpoint = read_checkpoint(path)
    needs = checkpoint.get("deblurrer") if isinstance(checkpoint, dict) else None
    if needs and deblurrer is None:
        raise CheckpointError(f"{path}: saved with the custom deblurrer {needs}; pass that module "
                              "(load_model(path, deblurrer=...))")
    if cfg.prior and checkpoint.get("stage") == 1:
        raise CheckpointError(f"{path}: a stage-1 checkpoint, its blur diffusion untrained; deblur with "
                              "one of stage 2 or 3 (training's stage 2 starts from this one)")
    if cfg.prior and not any(k.startswith("blur_estimator.") for k in state):
        raise CheckpointError(f"{path}: a stage-1 file, without the blur diffusion's weights (the "
                              "official code keeps them in final_dm_*.pth or a stage-3 last_*.pth); "
                              "training's stage 2 starts from it")
    optional = () if checkpoint.get("format") == "blurdm" else ("sharp_encoder.",)  # SE: training only
    with torch.device("meta"):
        meta_deblurrer = None if deblurrer is None else copy.deepcopy(deblurrer).to("meta")
        check_weights(BlurDM(cfg, meta_deblurrer), state, path, optional)
    model = BlurDM(cfg, deblurrer)
    model.load_state_dict(state, strict=False)
    return model.eval()


class InferenceProgram(nn.Module):
    """
    deblur() as one traceable module for torch.export: (B, 3, H, W) in [0, 1], H and W >= 9 -> the
    sharp estimate; the start noise ε of `seed` is a constant of the program. Unlike prior_for, it
    computes the prior at full size over PRIOR_MAX_PIXELS too.
    """

    def __init__(self, model, seed=INFERENCE_SEED):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("eps", model.start_noise(1, seed, "cpu")[0])

    def forward(self, blurry):
        def run(x):
            prior = None
            if self.model.cfg.prior:
                prior = self.model.sharp_prior(x, self.eps.expand(x.shape[0], -1))
            return self.model.run_deblurrer(x, prior)[-1]

        return run_padded(run, blurry).clamp(0, 1)


def export_program(model, path, seed=INFERENCE_SEED):
    """Save the whole inference path (blur encoder, reverse chain, deblurrer) as a torch.export program
    (.pt2), any batch and image size; it runs without this file: torch.export.load(path).module()(x)."""
    if TORCH_VERSION < (2, 6):  # 2.5 has Dim.AUTO but cannot solve this program's symbolic sizes
        raise RuntimeError(f"export_program needs torch >= 2.6; this is torch {torch.__version__}")
    example = torch.rand(2, 3, 70, 91)  # batch 2 and sizes off the multiple of 8: all stay symbolic
    auto = torch.export.Dim.AUTO
    with torch.no_grad():
        program = torch.export.export(InferenceProgram(copy.deepcopy(model).float().cpu(), seed),
                                      (example,), dynamic_shapes={"blurry": {0: auto, 2: auto, 3: auto}})
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)


# ------------------------------------------------------------------------------------------------------
# 10. Files: images, and data sets on disk


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # read_image's, in folders too
WRITE_SUFFIXES = IMAGE_SUFFIXES[:-1]  # write_image's (a GIF would lose colours to its palette)
NO_ALPHA_SUFFIXES = (".jpg", ".jpeg", ".bmp")  # formats that write_image saves without the alpha channel
DEBLURRED_TAG = "_deblurred"  # sample.py writes <stem>_deblurred.*: folder scans leave them out


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


def remove_stale_temps(folder):
    """Delete the temp files atomic_path left in `folder` when its process was killed (that PID no longer runs)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = re.fullmatch(r"\..+\.tmp(\d+)(\.\w+)?", tmp.name)
        if pid and int(pid[1]) != os.getpid():
            try:
                os.kill(int(pid[1]), 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except OSError:  # a process of another user: alive
                pass


def read_image(path, extras=False):
    """
    Read an image file as float RGB (3, H, W) in [0, 1], EXIF orientation applied; 8- and 16-bit,
    grayscale, palette, alpha and float grayscale modes are converted (Pillow reads 16-bit RGB files at
    8 bits; 16-bit grayscale keeps its precision; float images in 0..255 are scaled, negative ones
    refused). With extras, returns (rgb, {"alpha": (1, H, W) or None, "icc_profile": bytes or None,
    "grayscale": whether the file has no colour}). Raises ValueError naming the file for anything that
    is not a readable image.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS * 2
        raise ValueError(f"{path}: image too large (over Pillow's {limit:,}-pixel bomb limit)") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, SyntaxError, Image.UnidentifiedImageError) as err:
        with open(path, "rb") as f:
            tiff = f.read(4) in (b"II*\x00", b"MM\x00*")
        raise ValueError(f"{path}: " + ("a TIFF variant that Pillow cannot decode (float RGB, for one)" if tiff
                                        else f"not a readable image ({err})")) from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit (or float) grayscale
        gray = np.asarray(img, dtype=np.float64)
        if not np.isfinite(gray).all():
            raise ValueError(f"{path}: holds NaN or infinite pixel values")
        if gray.min() < 0:
            raise ValueError(f"{path}: pixel values down to {gray.min():g}; images hold 0 or more")
        scale = 65535.0
        if img.mode == "F":  # float pixels: in [0, 1], or in 0..255 as Pillow writes 8-bit data
            scale = 1.0 if gray.max() <= 1 else 255.0
            if gray.max() > 255:
                raise ValueError(f"{path}: float pixel values up to {gray.max():g}, neither in [0, 1] "
                                 "nor in 0..255")
        gray = torch.from_numpy(gray / scale).float().clamp(0, 1)
        rgb, alpha = gray.expand(3, *gray.shape).contiguous(), None
    else:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (C, H, W)
        rgb, alpha = tensor[:3], (tensor[3:] if has_alpha else None)
    if not extras:
        return rgb
    grayscale = img.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
    return rgb, {"alpha": alpha, "icc_profile": img.info.get("icc_profile"), "grayscale": grayscale}


def write_image(image, path, alpha=None, icc_profile=None):
    """Write (3, H, W) RGB or (1, H, W) grayscale in [0, 1], an optional alpha (1, H, W) and colour profile, as an
    8-bit image; the format follows the suffix (JPEG and BMP have no alpha; JPEG at quality 95)."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if alpha is not None and suffix not in NO_ALPHA_SUFFIXES:
        image = torch.cat([image, alpha.to(image)], 0)
    arr = to_uint8(image.float().cpu()).permute(1, 2, 0).numpy()
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    options = {"quality": 95} if suffix in (".jpg", ".jpeg", ".webp") else {}
    if icc_profile and suffix != ".bmp" and icc_profile[16:20] == (b"GRAY" if mode in ("L", "LA") else b"RGB "):
        options["icc_profile"] = icc_profile  # kept where its colour space (bytes 16-19 of its header) fits
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path, **options)


def walk(folder, recursive=True, depth=None):
    """
    The files under `folder`, sorted; with `recursive`, those of its sub-folders too (at most `depth` levels down).
    Folder links are followed, but never into a folder already walked: a link loop ends. Hidden files and folders
    are left out.
    """
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = os.stat(root)
        level = len(Path(root).relative_to(folder).parts)
        if (here.st_dev, here.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive and (depth is None or level < depth) else []
        found += [Path(root) / f for f in files if not f.startswith(".")]
    return sorted(found)


def glob_files(base, pattern, recursive=False):
    """
    The files under `base` whose path below it matches the glob `pattern` (a tuple of names, each with * ? [...]),
    and the files of the folders it matches (their direct files; all below them with `recursive`, which also lets
    ** match any number of folders). Walked as walk() walks, so a folder link loop ends.
    """
    def matches(parts, pattern):
        if not pattern:
            return not parts
        if pattern[0] == "**" and recursive:
            return any(matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and matches(parts[1:], pattern[1:])

    found = []
    for path in walk(base, recursive=True, depth=None if recursive else len(pattern)):
        parts = path.relative_to(base).parts
        folder = next((k for k in range(1, len(parts)) if matches(parts[:k], pattern)), None)  # a matching folder
        if matches(parts, pattern) or (folder and (recursive or folder == len(parts) - 1)):
            found.append(path)
    return found


def list_images(folder, recursive=True):
    """Image files in `folder` (and its sub-folders), sorted, as walk() finds them."""
    return [p for p in walk(folder, recursive) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


PAIRED_FOLDERS = {"blur": "sharp", "input": "target"}  # GoPro (not blur_gamma), its flat copy, blur/ + sharp/


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
    lists = []  # RealBlur's list files, train and test
    if root.suffix == ".txt":  # one list, and its partner if the name says train or test
        lists = [root]
        if re.search("_(train|test)_", root.name):
            lists = [root.with_name(re.sub("_(train|test)_", f"_{s}_", root.name)) for s in ("train", "test")]
    else:
        for kind in "JR":  # RealBlur-J preferred where both kinds are present
            candidates = [root / f"RealBlur_{kind}_{split}_list.txt" for split in ("train", "test")]
            if any(f.is_file() for f in candidates):
                lists = candidates
                break
    for split, list_file in zip(("train", "test"), lists):
        if list_file.is_file():
            try:
                rows = [line.split() for line in list_file.read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"{list_file}: not a RealBlur list file ({err})") from None
            pairs = [(list_file.parent / row[1], list_file.parent / row[0]) for row in rows if len(row) >= 2]
            splits[split] = [(str(b), str(s)) for b, s in pairs if b.is_file() and s.is_file()]
            absent = [str(p) for pair in pairs for p in pair if not p.is_file()]
            if absent:
                problems.append(f"{list_file}: {len(absent)} files it names do not exist ({', '.join(absent[:3])}"
                                f"{', ...' * (len(absent) > 3)})")
    found = [] if lists else list_images(root)
    outputs = [p for p in found if p.stem.endswith(DEBLURRED_TAG)]
    if outputs:
        problems.append(f"{root}: {len(outputs)} images named *{DEBLURRED_TAG}.* (sample.py's outputs) "
                        f"left out ({outputs[0]}, ...)")
    images = {p.relative_to(root).with_suffix("").as_posix(): p for p in found if p not in outputs}
    folders = lambda key: key.split("/")[:-1]
    split_of = lambda key: next((f for f in reversed(folders(key)) if f in ("train", "test")), "train")
    gt = {key.rsplit("/", 1)[-1]: p for key, p in images.items() if "GT" in folders(key)}
    used = set()
    for key, path in images.items():
        parts = key.split("/")
        i = max((i for i, part in enumerate(parts[:-1]) if part in PAIRED_FOLDERS), default=None)
        if i is not None:
            partner = images.get("/".join([*parts[:i], PAIRED_FOLDERS[parts[i]], *parts[i + 1:]]))
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


def fingerprint(root, splits):
    """A data set as a resumed run compares it: each file's path below `root`, size and mtime (cheap; names changes)."""
    files = sorted({p for pairs in splits.values() for pair in pairs for p in pair if p})
    return [[os.path.relpath(p, root), s.st_size, s.st_mtime_ns] for p, s in zip(files, map(os.stat, files))]


def fingerprint_changes(before, now):
    """What differs between two fingerprints, in one line."""
    if not isinstance(before, list):
        return "data: saved without a fingerprint of its files (by an older version)"
    before, now = ({f: rest for f, *rest in files} for files in (before, now))  # {file: [size, mtime]}
    changed = [f for f in sorted(before.keys() | now.keys()) if before.get(f) != now.get(f)]
    more = ", ..." * (len(changed) > 3)
    return f"data files added, removed or changed: {len(changed)} ({', '.join(changed[:3])}{more})"


# ------------------------------------------------------------------------------------------------------
# 11. Training samples: sharp photographs blurred as GoPro was made (METHOD.md §7), crops, recipes

# the training recipe of each preset: crop, global batch, Adam's lr with a cosine decay to lr_min,
# epochs per stage (train.py's defaults; bench.py times the same batch and crop)
PAPER_RECIPE = dict(crop=256, batch_size=20, lr=1e-4, lr_min=1e-6, stage_epochs=(3000, 500, 3000),
                    seed=2023)
TRAINING_RECIPES = {
    "paper": PAPER_RECIPE, "mimo-unet": PAPER_RECIPE,
    "demo": dict(crop=128, batch_size=8, lr=5e-4, lr_min=1e-5, stage_epochs=(1334, 334, 1000), seed=2023),
    "tiny": dict(crop=64, batch_size=4, lr=1e-3, lr_min=1e-6, stage_epochs=(2, 1, 2), seed=2023),
}
BLUR_LENGTH = (4.0, 30.0)  # camera path lengths in pixels: GoPro-like blurs, from slight to strong


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


def synthesize_blur(sharp, generator=None, length=BLUR_LENGTH, subframes=41, max_rotation=2.0, max_zoom=0.02,
                    noise=(0.0, 0.01), window=None):
    """
    A blurred copy of a sharp sRGB image (3, H, W) in [0, 1], made as GoPro was made: a random camera path
    (length drawn from `length` pixels, a random rotation and zoom on half the draws), averaged in linear light,
    re-gammed, Gaussian sensor noise (std drawn from `noise`) and 8-bit rounding. The sharp target is the input.
    subframes=None renders one sub-frame per pixel of path (an odd number, so the sharp image is one of them): bilinear
    sub-frames a pixel apart leave no gaps in the streak, and short paths cost fewer sub-frames than a fixed 41.
    window=(top, left, h, w) blurs that window of a larger image and returns (blurry, sharp) windows.
    """
    region, path, noise = draw_blur(sharp, generator, length, subframes, max_rotation, max_zoom, noise,
                                    window)
    blurry = blur_images(region[None], path[None], torch.tensor([len(path)]), noise[None])[0]
    return (blurry, centre(region, noise.shape[-2:])) if window else blurry


def draw_blur(sharp, generator=None, length=BLUR_LENGTH, subframes=41, max_rotation=2.0, max_zoom=0.02,
              noise=(0.0, 0.01), window=None):
    """
    The random part of synthesize_blur, to render elsewhere (blur_images: on a GPU, a batch at a time). sharp: sRGB
    (3, H, W), floats in [0, 1] or uint8 -> (region, path, noise). region: the image in [0, 1], or with a window its
    (h, w) part and a margin around it (half the longest path, the path being centred, plus room for rotation and
    zoom; reflected where it leaves the image), so that the resampling's reflected border stays outside the window;
    path (N, 4) (camera_shake); noise: the sensor noise of the image or window, (3, h, w).
    """
    if window is not None:
        top, left, h, w = window
        m = math.ceil(length[1] / 2) + 8
        sharp = crop_reflected(sharp, top - m, left - m, h + 2 * m, w + 2 * m)
    sharp = sharp / 255 if sharp.dtype == torch.uint8 else sharp  # an 8-bit photograph, converted once cropped

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()

    varying = torch.rand((), generator=generator).item() < 0.5
    path_length = uniform(*length)
    n = subframes or one_subframe_a_pixel(path_length)
    path = camera_shake(n, path_length, uniform(-max_rotation, max_rotation) * varying,
                        uniform(-max_zoom, max_zoom) * varying, generator=generator)
    std = uniform(*noise)
    noise = std * torch.randn(sharp.shape, generator=generator).to(sharp)  # drawn for the region, in its order
    return sharp, path, centre(noise, window[2:] if window else sharp.shape[-2:])


def one_subframe_a_pixel(path_length):
    return 2 * math.ceil(path_length / 2) + 1  # odd: the middle sub-frame is the sharp image


def blur_images(regions, paths, counts, noise):
    """
    The training renderer: a batch of blurred images, each along its own camera path. regions
    (n, 3, H, W) sRGB in [0, 1]; paths (n, N, 4) whose first counts[i] rows are image i's sub-frames
    -> (n, 3, h, w) sRGB: the mean of those sub-frames in linear light (the exposure integral of
    render_exposures over the whole path), its centre (h, w) = noise's, plus noise, in 8 bits.
    """
    k = torch.arange(paths.shape[1], device=counts.device)
    weights = (k < counts[:, None]) / counts[:, None]  # (n, N): a shorter path's extra rows weigh 0
    theta = affine_theta(paths, *regions.shape[-2:])  # (n, N, 2, 3)
    mean = integrate_light(srgb_to_linear(regions), theta, weights[None].to(regions))[0]
    blurry = centre(linear_to_srgb(mean), noise.shape[-2:]) + noise
    return (blurry.clamp(0, 1) * 255).round() / 255


def crop_reflected(image, top, left, h, w):
    """image[..., top:top + h, left:left + w] for a window that may leave the image: reflected there (replicated
    where the image is too small to reflect)."""
    H, W = image.shape[-2:]
    pad = (max(-left, 0), max(left + w - W, 0), max(-top, 0), max(top + h - H, 0))
    inside = image[..., max(top, 0):top + h, max(left, 0):left + w]
    return edge_pad(inside[None], pad)[0] if any(pad) else inside


def centre(image, size):
    """The central (h, w) part of (..., H, W)."""
    (H, W), (h, w) = image.shape[-2:], size
    return image[..., (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w]

# training samples: a random crop (blurred here for photographs), turned and flipped, both images alike


@functools.lru_cache(maxsize=64)  # per process: a small photo set is decoded once, not once a sample
def load_pair(blur_path, sharp_path, min_size=1):
    """(blur or None, sharp) uint8 (3, H, W); ValueError naming the file when they differ in size or are too small."""
    sharp = to_uint8(read_image(sharp_path))
    blur = to_uint8(read_image(blur_path)) if blur_path else None
    (h, w), name = sharp.shape[1:], blur_path or sharp_path
    if blur is not None and blur.shape != sharp.shape:
        raise ValueError(f"{blur_path}: {blur.shape[2]}x{blur.shape[1]} but its sharp image {sharp_path} is {w}x{h}")
    if min(h, w) < min_size:
        raise ValueError(f"{name}: {w}x{h} is smaller than the {min_size}px crop")
    return blur, sharp


class PairDataset(Dataset):
    """
    Item (stage, step, k): the k-th sample of a step, every random choice seeded by it, whatever process runs it:
    (blur, sharp), each (3, crop, crop) in [0, 1].
    Sample k of `reuse` steps in a row is one crop, rendered once (blurring photographs is a large part of a small
    model's step on a CPU) and turned or flipped its own way each time. With blur_on_device, a photograph's item is
    what blur_batch_on_device needs to blur a whole batch where the model trains (a GPU, which a CPU cannot
    keep fed).
    """

    def __init__(self, pairs, crop, blur_length, seed, reuse=1, blur_on_device=False):
        self.pairs, self.crop, self.blur_length, self.seed, self.reuse = pairs, crop, blur_length, seed, reuse
        self.blur_on_device = blur_on_device
        self.subframes = one_subframe_a_pixel(blur_length[1])  # the most a camera path can have
        self.warned, self.rendered = set(), {}

    def __getitem__(self, item):
        key = (item[0], item[1] // self.reuse, item[2])  # (stage, group of steps, k)
        if key not in self.rendered:  # kept while its steps last
            kept = {j: v for j, v in self.rendered.items() if j[:2] == key[:2]}
            self.rendered = kept | {key: self.draw_sample(*key)}
        g = torch.Generator().manual_seed(mix_seed(self.seed, *item, 1))
        flip, turns = torch.rand((), generator=g).item() < 0.5, torch.randint(4, (), generator=g).item()
        if isinstance(self.rendered[key], tuple):  # (region, path, sub-frames, noise): blur_batch_on_device
            return *self.rendered[key], flip, turns
        pair = torch.rot90(self.rendered[key].flip(-1) if flip else self.rendered[key], turns, (-2, -1))
        return pair[0].contiguous(), pair[1].contiguous()  # one of the square's 8 symmetries

    def draw_sample(self, stage, group, k):
        g, c = torch.Generator().manual_seed(mix_seed(self.seed, stage, group, k)), self.crop
        index = torch.randint(len(self.pairs), (), generator=g).item()
        for attempt in range(len(self.pairs)):  # a pair that cannot be used: a warning (once a process), the next
            try:
                blur, sharp = load_pair(*self.pairs[(index + attempt) % len(self.pairs)], self.crop)
                break
            except ValueError as err:
                if str(err) not in self.warned:
                    self.warned.add(str(err))
                    print(f"warning: {err}; skipped", flush=True)
        else:
            raise ValueError(f"none of the {len(self.pairs)} training pairs can be used")
        top, left = (torch.randint(n - c + 1, (), generator=g).item() for n in sharp.shape[1:])
        if blur is None:  # a photograph, blurred here or by blur_batch_on_device (a sub-frame a pixel of path)
            region, path, noise = draw_blur(sharp, g, self.blur_length, None, window=(top, left, c, c))
            if self.blur_on_device:
                return region, F.pad(path, (0, 0, 0, self.subframes - len(path))), len(path), noise
            blur = blur_images(region[None], path[None], torch.tensor([len(path)]), noise[None])[0]
            sharp = centre(region, (c, c))
        else:
            blur, sharp = (x[:, top:top + c, left:left + c] / 255 for x in (blur, sharp))
        return torch.stack([blur, sharp])  # (2, 3, c, c): one transform for both


def blur_batch_on_device(batch, device):
    """A collated batch of PairDataset(blur_on_device=True) items -> (blur, sharp), each (B, 3, c, c)
    in [0, 1] on `device`: the photographs blurred by one blur_images() of the batch, then turned and
    flipped as each item drew."""
    regions, paths, counts, noise, flips, turns = (x.to(device, non_blocking=True) for x in batch)
    pairs = torch.stack([blur_images(regions, paths, counts, noise), centre(regions, noise.shape[-2:])], 1)
    pairs = [torch.rot90(p.flip(-1) if f else p, t, (-2, -1)) for p, f, t in zip(pairs, flips.tolist(), turns.tolist())]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def validation_images(pairs, crop, seed, blur_length, say):
    """(name, blur, sharp) uint8 centre crops (crop 0: whole images); a photograph gets a fixed seeded blur."""
    for j, (blur_path, sharp_path) in enumerate(pairs):
        try:
            blur, sharp = load_pair(blur_path, sharp_path)
        except ValueError as err:
            say(f"warning: {err}; left out of evaluation")
            continue
        H, W = sharp.shape[-2:]
        margin = 0 if blur is not None or crop else min(math.ceil(blur_length[1] / 2) + 8, (min(H, W) - 8) // 4)
        h, w = (min(crop, H), min(crop, W)) if crop else (H - 2 * margin, W - 2 * margin)  # whole: away from edges
        top, left = (H - h) // 2, (W - w) // 2
        if blur is None:
            g = torch.Generator().manual_seed(mix_seed(seed, 0, j))
            blur, sharp = (to_uint8(x) for x in synthesize_blur(
                sharp.float() / 255, g, blur_length, subframes=None, window=(top, left, h, w)))
        else:
            blur, sharp = blur[:, top:top + h, left:left + w], sharp[:, top:top + h, left:left + w]
        yield blur_path or sharp_path, blur, sharp


def mix_seed(*numbers):  # one 32-bit seed from any non-negative integers (a seed, a stage, a step), well mixed
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------------
# 12. Device, precision, errors


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
        raise ValueError(f"device={name!r}: no CUDA device is available to this PyTorch build")
    return torch.device(name)


def autocast(device, amp="auto"):
    """
    The one mapping from a precision to what runs: (context manager, the precision that runs, a note
    or None). "auto": bf16 where the device computes it natively (CUDA GPUs with bf16; CPUs with
    AVX-512 BF16 or AMX), fp32 elsewhere. "fp32" or None: the exact path. "bf16", "fp16": autocast
    where native (fp16: CUDA), else fp32 with a note saying why.
    """
    device = torch.device(device)
    if device.type == "cuda":
        native = {"bf16": torch.cuda.is_bf16_supported(), "fp16": True}
    else:
        native = {"bf16": device.type == "cpu" and has_native_bf16(), "fp16": False}
    if amp == "auto":
        amp = "bf16" if native["bf16"] else "fp32"
    if amp in (None, "fp32"):
        return nullcontext(), "fp32", None
    if native[amp]:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        return torch.autocast(device.type, dtype=dtype), amp, None
    why = "fp16 is for CUDA" if amp == "fp16" else (f"this {device.type.upper()} has no native bf16 "
                                                    "(emulated, it is several times slower)")
    return nullcontext(), "fp32", f"{amp} runs in fp32 on {device}: {why}"


def out_of_memory(err):
    """Whether an exception is an allocation failure (of the CPU, CUDA, or Python itself)."""
    return isinstance(err, MemoryError) or any(s in str(err) for s in ("out of memory", "can't allocate memory"))


def error_line(err):
    """An exception's message as one line: the first, or where the message carries a traceback (a
    DataLoader worker's error) the original error's last line, without its "ValueError: "; the type's
    name if there is no message."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    if "Traceback (most recent call last)" in str(err):
        return re.sub(r"^\w*Error: ", "", lines[-1])
    return lines[0]
