"""BlurDM: a blur diffusion model for image deblurring, in one file.

Paper: J.-T. He, F.-J. Tsai, Y.-T. Peng, M.-H. Chen, C.-W. Lin, Y.-Y. Lin, "BlurDM: A Blur
Diffusion Model for Image Deblurring", NeurIPS 2025, arXiv:2512.03979. Official code:
github.com/Jin-Ting-He/BlurDM. Equation numbers (2.1) ... refer to METHOD.md beside this file.

Motion blur is light gathered over a growing exposure. BlurDM's forward process adds that light
(a blur residual) and Gaussian noise step by step, so a sharp image diffuses into "blurred +
noise"; the reverse process removes both. It runs on one latent vector per image, and its output,
the sharp prior, scales and shifts the decoder features of a MIMO-UNet deblurrer.

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

Part I is the method in the paper's order and needs only torch: config, blur formation, blur
diffusion, the latent prior networks, MIMO-UNet, BlurDM with its three training stages, losses
and deblur(). To use BlurDM elsewhere, copy everything above the line "# Part II". Part II holds
what train.py and sample.py share: tiles, metrics, checkpoints (this project's, MIMO-UNet's and
the official code's), image files and data sets, the synthetic training blur, device and precision.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Part I: the method ===============================================================================
# 1. Config ----------------------------------------------------------------------------------------

@dataclass
class BlurDMConfig:
    """What shapes the weights and the method; the defaults are the paper's (MIMO-UNet+, BlurDM).
    The training recipe (crop, batch, learning rate, stage lengths) is train.py's."""
    # deblurring network
    width: int = 32  # channels at full resolution; 2x and 4x at the 1/2 and 1/4 scales
    num_res: int = 20  # residual blocks a stage (MIMO-UNet+: 20, MIMO-UNet: 8)
    dropout: float = 0.1  # Dropout2d on the two feature-fusion outputs (MIMO-UNet+ only)
    prior: bool = True  # False: the backbone alone, the paper's baseline
    fusion_residual: bool = False  # fusion as features·(1 + k) + v: see PriorFusion
    input_offset: float = 0.5  # networks see image - offset; 0 for MIMO-UNet's own weights
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
    beta_bar_rule: str = "paper"  # "paper": Eq. (2.2) (official: "official", see blur_schedule)
    # losses
    fft_weight: float = 0.1
    charbonnier_eps: float = 1e-3
    prior_distance: str = "l1"  # stage 2's loss: the paper's L1 (official: "charbonnier")

    def __post_init__(self):  # what no network or schedule can be built from
        sizes = self.width, self.num_res, self.latent_dim, self.encoder_width, self.estimator_layers
        if not (self.T >= 1 and min(sizes) >= 1 and min(self.beta_start, self.beta_end) >= 0
                and 0 < self.alpha_start < self.alpha_end  # the reverse step divides by α
                and self.beta_bar_rule in ("paper", "official")
                and self.prior_distance in ("l1", "charbonnier")):
            raise ValueError(f"{self} is impossible: it needs T and sizes >= 1, betas >= 0, 0 < "
                             "alpha_start < alpha_end, beta_bar_rule 'paper' or 'official', "
                             "prior_distance 'l1' or 'charbonnier'")

    @classmethod
    def preset(cls, name, **overrides):
        return cls(**{**PRESETS[name], **overrides})

PRESETS = {
    "paper": {},  # MIMO-UNet+ with BlurDM: the row the paper's Table 1 calls "MIMO-UNet"
    "mimo-unet": dict(num_res=8, dropout=0.0),  # Cho et al.'s MIMO-UNet: in no row of Table 1
    "demo": dict(width=16, num_res=2, dropout=0.0, latent_dim=64, encoder_width=16,
                 encoder_blocks=2),  # the shipped weights, sized for CPUs
    "tiny": dict(width=8, num_res=1, dropout=0.0, latent_dim=32, encoder_width=16,
                 encoder_blocks=1),  # for tests
}

# 2. Blur formation (METHOD.md §1) ----------------------------------------------------------------
# A camera integrates light while its shutter is open. This pixel renderer is the physics the
# diffusion copies: the tests check Eq. (1.1) and (2.1) on its images, and the training blur of
# photographs (Part II) is its exposure integral along a random camera path.

def srgb_to_linear(x):
    """sRGB values in [0, 1] -> linear light in [0, 1] (IEC 61966-2-1); see linear_to_srgb."""
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)

def linear_to_srgb(x):
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)

def affine_theta(path, height, width):
    """Camera path rows (..., 4): shift dx, dy in pixels, rotation in radians, log zoom -> the
    affine matrices (..., 2, 3) of grid_sample: shift, rotation and zoom about the centre."""
    dx, dy, angle, log_zoom = path.unbind(-1)
    cos, sin = log_zoom.exp() * angle.cos(), log_zoom.exp() * angle.sin()
    aspect = height / width
    return torch.stack([torch.stack([cos, -sin * aspect, 2 * dx / width], -1),
                        torch.stack([sin / aspect, cos, 2 * dy / height], -1)], -2)

def warp(image, theta):
    """Resample (n, C, h, w) by affine matrices (n, 2, 3), bilinear, reflected at the border. The
    grid is built in float64: on a GPU, affine_grid is a matrix product that TF32 would round."""
    grid = F.affine_grid(theta.double(), list(image.shape), align_corners=False).to(image.dtype)
    return F.grid_sample(image, grid, "bilinear", "reflection", align_corners=False)

def integrate_light(radiance, theta, weights):
    """The exposure integral over a camera path of N sub-frames, radiance constant on each: for each
    of R integrals, Σ_k weights[r, :, k] · (radiance moved by theta[:, k]). radiance (n, 3, h, w)
    in linear light; theta (n, N, 2, 3), one path per image; weights (R, n, N) -> (R, n, 3, h, w).
    """
    total = radiance.new_zeros(weights.shape[0], *radiance.shape)
    for k in range(theta.shape[1]):
        total += weights[:, :, k, None, None, None] * warp(radiance, theta[:, k])
    return total

def render_exposures(sharp, path, alpha):
    """Blur formation (METHOD.md §1): every exposure B_t and blur residual e_t of sharp sRGB images
    (n, 3, h, w) in [0, 1], moved along a camera path (N, 4) whose sub-frame k lights the time
    [k, k + 1) · α_T / N. Returns B and e, each (T + 1, n, 3, h, w), in linear light:
        B[t] = (1/α_t) ∫_0^{α_t} H(τ) dτ,  e[t] = ∫_{α_{t-1}}^{α_t} H(τ) dτ  (e[0] = 0)
    exact for the piecewise-constant radiance H: a sub-frame cut by a window weighs its overlap."""
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
    B, e = integrate_light(srgb_to_linear(sharp), theta, weights).split(len(alpha))
    return B / alpha.to(sharp).view(-1, 1, 1, 1, 1), e

# 3. Blur diffusion (METHOD.md §2-3), on tensors of any shape -------------------------------------

def blur_schedule(T, alpha_start, alpha_end, beta_start, beta_end, rule="paper"):
    """α_0..α_T, β_0..β_T (β_0 = 0) and β̄_0..β̄_T, in float64."""
    alpha = torch.linspace(alpha_start, alpha_end, T + 1, dtype=torch.float64)
    beta = torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.linspace(beta_start, beta_end, T, dtype=torch.float64)])
    beta_bar = torch.zeros(T + 1, dtype=torch.float64)
    for t in range(1, T + 1):
        i = torch.arange(1, t + 1)
        if rule == "paper":  # Eq. (2.2): β̄_t² = Σ_{i≤t} (α_i/α_t)² β_i²
            beta_bar[t] = ((alpha[i] / alpha[t]) ** 2 * beta[i] ** 2).sum().sqrt()
        else:  # (official: α shifted by one index and β not squared)
            beta_bar[t] = ((alpha[i - 1] / alpha[t]) ** 2 * beta[i]).sum().sqrt()
    return alpha, beta, beta_bar

class BlurDiffusion(nn.Module):
    """Dual noise and blur diffusion (forward, q_*), dual denoising and deblurring (reverse, p_*).

    The latent model uses q_sample at t = T for its start point x_T = Z^B + β̄_T ε and
    p_sample_loop for the chain. Latent vectors have no exposures, so nothing calls q_step on them
    and the estimators never see a true e_t or ε: they learn from the chain's result (stage 2).
    Where the abstract says the reverse process starts from "pure Gaussian noise conditioned on the
    blurred image", the code starts where the forward chain ends, Eq. (2.2) at t = T: the blurred
    latent plus β̄_T ε (β̄_T = 0.026 with the paper's schedule), conditioned on c = Z^B."""

    def __init__(self, cfg):
        super().__init__()
        self.T = cfg.T
        alpha, beta, beta_bar = blur_schedule(cfg.T, cfg.alpha_start, cfg.alpha_end,
                                              cfg.beta_start, cfg.beta_end, cfg.beta_bar_rule)
        # derived from the config, so kept out of the checkpoint
        self.register_buffer("alpha", alpha.float(), persistent=False)
        self.register_buffer("beta", beta.float(), persistent=False)
        self.register_buffer("beta_bar", beta_bar.float(), persistent=False)

    def q_step(self, x_prev, t, e_t, eps):
        """One forward step, q(I_t | I_{t-1}): the exposure grows by e_t, and noise β_t ε."""
        a = self.alpha
        return a[t - 1] / a[t] * x_prev + e_t / a[t] + self.beta[t] * eps  # Eq. (2.1)

    def q_sample(self, B_t, t, eps):
        """q(I_t | I_0) in closed form, conditioned on the exposures: given the image B_t exposed
        for α_t (the blur residuals e_1..e_t already summed into it), only the noise is random."""
        return B_t + self.beta_bar[t] * eps  # Eq. (2.2)

    def p_sample(self, x_t, t, e_hat, eps_hat):
        """One reverse step, deterministic (no fresh noise), in two terms: deblur,
        (α_t I_t - ê_t) / α_{t-1} takes the step's blur residual out of the exposure; denoise,
        the second term takes out the noise that β̄ shed between t and t - 1. The official code
        special-cases t = 1 as (α_1 I_1 - ê_1)/α_0: that is this line, since β_1 = 0 makes
        β̄_1 = 0 under either β̄ rule."""
        a, bb = self.alpha, self.beta_bar
        noise_coefficient = a[t] * bb[t] / a[t - 1] - bb[t - 1]
        return (a[t] * x_t - e_hat) / a[t - 1] - noise_coefficient * eps_hat  # Eq. (3.1)

    def p_sample_loop(self, x_T, c, blur_estimator, noise_estimator):
        """The reverse chain t = T..1 -> x_0; each estimator is called as est(x_t, t / T, c)."""
        x_t = x_T
        for t in range(self.T, 0, -1):
            t_frac = torch.full((len(x_t), 1), t / self.T, dtype=x_t.dtype, device=x_t.device)
            e_hat, eps_hat = blur_estimator(x_t, t_frac, c), noise_estimator(x_t, t_frac, c)
            x_t = self.p_sample(x_t, t, e_hat, eps_hat)
        return x_t

# 4. Latent prior networks (METHOD.md §4) ---------------------------------------------------------

class EncoderBlock(nn.Module):
    def __init__(self, channels, batch_norm):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batch_norm else nn.Identity
        conv = lambda: nn.Conv2d(channels, channels, 3, padding=1)
        self.body = nn.Sequential(conv(), norm(), nn.LeakyReLU(0.1), conv(), norm())

    def forward(self, x):
        return x + self.body(x)

class LatentEncoder(nn.Module):
    """Two images -> one latent vector (the official code's LE_arch). Used twice: as the sharp
    encoder SE(blur, sharp), with BatchNorm, and as the blur encoder BE(blur, blur), without.
    Inputs: images minus cfg.input_offset (in [-0.5, 0.5]), H and W divisible by 4."""

    def __init__(self, cfg, batch_norm):
        super().__init__()
        w, d = cfg.encoder_width, cfg.latent_dim
        lrelu = lambda: nn.LeakyReLU(0.1)
        self.stem = nn.Sequential(nn.Conv2d(2 * 48, w, 3, padding=1), lrelu())
        self.blocks = nn.Sequential(*[EncoderBlock(w, batch_norm)
                                      for _ in range(cfg.encoder_blocks)])
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
    """The blur residual estimator (ê_t) and the noise residual estimator (ε̂_t) share this form:
    an MLP on concat[c, t/T, x_t], LeakyReLU after every layer (the last included), t/T the only
    embedding of time (as the official code)."""

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
    """The prior fusion module: features · k + v, (k, v) a bias-free linear map of the prior (no
    "+1" on k, as the official code). With residual=True it is features · (1 + k) + v with the map
    starting at zero: the identity at first, so that a prior added to a trained backbone starts at
    the backbone's own output (ours, for fine-tuning published weights; the same parameters)."""

    def __init__(self, latent_dim, channels, residual=False):
        super().__init__()
        self.residual = residual
        self.to_scale_shift = nn.Linear(latent_dim, 2 * channels, bias=False)
        if residual:
            nn.init.zeros_(self.to_scale_shift.weight)

    def forward(self, x, prior):
        k, v = self.to_scale_shift(prior)[:, :, None, None].chunk(2, 1)  # (B, C, 1, 1) each
        return x * (1 + k) + v if self.residual else x * k + v

# 5. Deblurring network: MIMO-UNet (Cho et al., ICCV 2021), the prior fused per decoder level ------

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
    """FAM: x + conv(x ⊙ z), encoder features x merged with the scaled input's features z."""

    def __init__(self, channels):
        super().__init__()
        self.merge = basic_conv(channels, channels, 3, relu=False)

    def forward(self, x, z):
        return x + self.merge(x * z)

class FeatureFusion(nn.Module):
    """AFF: conv3x3(ReLU(conv1x1(concat[f1, f2, f3]))), the encoder features of all three scales
    resampled (nearest) to the size of one skip connection: `plain`, MIMO-UNet's form. forward
    gives the same numbers without 7c channels at full size: nearest resampling commutes with a
    1x1 conv, so each scale is mixed at the smaller of its own size and the skip's."""

    def __init__(self, channels, c_out):
        super().__init__()
        self.channels = channels  # of each scale: (c, 2c, 4c)
        self.mix = nn.Conv2d(sum(channels), c_out, 1)
        self.out = basic_conv(c_out, c_out, 3, relu=False)

    def plain(self, features, size):
        h = torch.cat([F.interpolate(f, size=size) for f in features], 1)  # (B, 7c, *size)
        return self.out(F.relu(self.mix(h)))

    def forward(self, features, size):
        h = self.mix.bias.view(1, -1, 1, 1)
        for f, w in zip(features, self.mix.weight.split(self.channels, 1)):
            f = F.conv2d(F.interpolate(f, size=size) if f.shape[-1] > size[-1] else f, w)
            h = h + (F.interpolate(f, size=size) if f.shape[-1] < size[-1] else f)
        return self.out(F.relu(h))

class MIMOUNet(nn.Module):
    """MIMO-UNet (num_res 8) / MIMO-UNet+ (num_res 20, dropout 0.1): multi-input, multi-output,
    three scales. Input (B, 3, H, W): the image minus cfg.input_offset, H and W divisible by 4.
    Returns the restored image (in the input's range) at 1/4, 1/2 and full scale, each the
    network's residual added to the equally scaled input. With cfg.prior a prior fusion module
    modulates the input of each decoder stage; without, this is the plain backbone."""

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
        self.fusion = nn.ModuleList([FeatureFusion((c, 2 * c, 4 * c), ch) for ch in (c, 2 * c)])
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.decoders = nn.ModuleList([stage(4 * c), stage(2 * c), stage(c)])
        self.up = nn.ModuleList([basic_conv(4 * c, 2 * c, 4, stride=2, transpose=True),
                                 basic_conv(2 * c, c, 4, stride=2, transpose=True)])
        self.squeeze = nn.ModuleList([basic_conv(4 * c, 2 * c, 1), basic_conv(2 * c, c, 1)])
        self.to_image = nn.ModuleList([basic_conv(ch, 3, 3, relu=False)
                                       for ch in (4 * c, 2 * c, c)])
        for layer in self.to_image:  # start as the identity (out = input) (official: random)
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
        f2 = self.encoders[1](self.attention[0](self.down[0](f1), self.shallow[0](x2)))  # 2c, H/2
        f3 = self.encoders[2](self.attention[1](self.down[1](f2), self.shallow[1](x4)))  # 4c, H/4
        skip2 = self.dropout(self.fusion[1]((f1, f2, f3), f2.shape[-2:]))
        skip1 = self.dropout(self.fusion[0]((f1, f2, f3), f1.shape[-2:]))

        z = self.decode(0, f3, prior)
        out4 = self.to_image[0](z) + x4
        z = self.decode(1, self.squeeze[0](torch.cat([self.up[0](z), skip2], 1)), prior)
        out2 = self.to_image[1](z) + x2
        z = self.decode(2, self.squeeze[1](torch.cat([self.up[1](z), skip1], 1)), prior)
        out1 = self.to_image[2](z) + x
        return [out4, out2, out1]

# 6. BlurDM: the prior on a deblurrer, three training stages, losses (METHOD.md §4-5) -------------

def charbonnier(x, y, eps):
    return torch.sqrt((x - y) ** 2 + eps ** 2).mean()

def spectrum(x):
    return torch.view_as_real(torch.fft.rfft2(x))  # 2-D real FFT, real and imaginary parts stacked

def deblur_loss(outputs, sharp, cfg):
    """The deblurring loss, Eq. (5.2): Σ_s C(out_s, sharp_s) + 0.1 Σ_s C(FFT out_s, FFT sharp_s),
    C the Charbonnier distance, sharp_s the bilinear downscale of the target to each output's size,
    FFT the 2-D real FFT (official: a 1-D FFT along the height; MIMO-UNet: L1 on the 2-D FFT).
    outputs: a list of scales; sharp in [0, 1]."""
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
    """Stage 2's L_prior, Eq. (5.1): the mean absolute difference between Z_0^B and Z^S, the
    paper's L1 (official: its Charbonnier form, cfg.prior_distance="charbonnier")."""
    if cfg.prior_distance == "l1":
        return F.l1_loss(prior, target)
    return charbonnier(prior, target, cfg.charbonnier_eps)

def pad_to(x, multiple):
    """Pad (B, C, H, W) at the bottom and right to multiples of `multiple`, the border reflected
    (replicated where the image is too small to reflect)."""
    H, W = x.shape[-2:]
    mode = "reflect" if min(H, W) > multiple else "replicate"  # (official: reflect, or an error)
    return F.pad(x, (0, -W % multiple, 0, -H % multiple), mode=mode)

STAGE_PARTS = {  # what each training stage optimises; the rest is frozen (METHOD.md §5)
    1: ("sharp_encoder", "deblurrer"),
    2: ("blur_encoder", "blur_estimator", "noise_estimator"),
    3: ("blur_encoder", "blur_estimator", "noise_estimator", "deblurrer"),
}
INFERENCE_SEED = 2023  # the official code's seed for the start noise of the reverse chain

class BlurDM(nn.Module):
    """
    Latent BlurDM on a deblurring network: MIMO-UNet(+) by default, or any `deblurrer` module whose
    forward is deblurrer(x, prior) -> image or list of scales (full resolution last), prior (B, d)
    or None, with PriorFusion modules where its decoder takes the prior. Images enter and leave in
    [0, 1]. Training (METHOD.md §5): forward(blur, sharp, stage) returns the stage's loss.
        1. prior Z^S = SE(blur, sharp); SE and the deblurrer learn the deblurring loss;
        2. prior Z_0^B = chain(BE(blur)), target Z^S, SE frozen; BE, estimators learn L_prior;
        3. prior Z_0^B = chain(BE(blur)); BE, estimators and deblurrer learn the deblurring loss.
    Inference: deblur(blurry)."""

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

    def run_deblurrer(self, blur, prior):
        """The deblurrer on blur in [0, 1] (H, W multiples of 4) -> its outputs, full resolution
        last, in [0, 1] once trained (the networks see image - cfg.input_offset)."""
        out = self.deblurrer(blur - self.cfg.input_offset, prior)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [o + self.cfg.input_offset for o in out]

    def sharp_latent(self, blur, sharp):
        """Z^S = SE(blur, sharp) for images in [0, 1]: the stage-1 prior and the stage-2 target."""
        return self.sharp_encoder(blur - self.cfg.input_offset, sharp - self.cfg.input_offset)

    def sharp_prior(self, blur, eps=None):
        """The sharp prior Z_0^B for blur in [0, 1] (H, W multiples of 4): the reverse chain from
        x_T = Z^B + β̄_T ε, conditioned on c = Z^B; eps (B, d), drawn if None."""
        x = blur - self.cfg.input_offset
        z_blur = self.blur_encoder(x, x)  # (B, d)
        # the chain in fp32 or wider: under bf16 autocast, Z^B would round away β̄_T ε
        z_blur = z_blur.to(torch.promote_types(z_blur.dtype, torch.float32))
        eps = torch.randn_like(z_blur) if eps is None else eps.to(z_blur)
        x_T = self.diffusion.q_sample(z_blur, self.cfg.T, eps)
        return self.diffusion.p_sample_loop(x_T, z_blur, self.blur_estimator, self.noise_estimator)

    def forward(self, blur, sharp, stage=3):
        """The training loss of a stage. blur, sharp: (B, 3, H, W) in [0, 1], H and W divisible by
        4. Without a prior there is one loss, the deblurring loss, whatever the stage."""
        if not self.cfg.prior:
            return deblur_loss(self.run_deblurrer(blur, None), sharp, self.cfg)
        if stage == 1:
            prior = self.sharp_latent(blur, sharp)
            return deblur_loss(self.run_deblurrer(blur, prior), sharp, self.cfg)
        prior = self.sharp_prior(blur)
        if stage == 2:
            with torch.no_grad():
                target = self.sharp_latent(blur, sharp)
            return prior_loss(prior, target, self.cfg)
        return deblur_loss(self.run_deblurrer(blur, prior), sharp, self.cfg)

    def set_stage(self, stage):
        """The model in training mode for a stage; returns the parameters that stage optimises."""
        trained = STAGE_PARTS[stage] if self.cfg.prior else ("deblurrer",)
        self.train()
        for name, module in self.named_children():
            module.requires_grad_(name in trained)
            if name not in trained:
                module.eval()  # the frozen sharp encoder of stage 2 keeps its BatchNorm statistics
        return [p for p in self.parameters() if p.requires_grad]

    def start_noise(self, n, seed):
        """ε for x_T: one CPU draw from `seed`, shared by the batch, so that a batch gives what one
        image at a time gives, on any device (official: the global generator)."""
        eps = torch.randn(self.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
        return eps.expand(n, -1)

    @torch.inference_mode()
    def deblur(self, blurry, seed=INFERENCE_SEED, prior=None):
        """Inference (puts the model in eval mode): blurry (B, 3, H, W) or (3, H, W), floats in
        [0, 1], any size -> the sharp estimate, of the same shape, dtype and device, in [0, 1] (NaN
        where the network's output is not finite). All T steps run; `seed` fixes ε (official:
        2023); a `prior` (B, d) may be given instead."""
        x = blurry[None] if blurry.dim() == 3 else blurry
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point() or not x.numel() or not (
                0 <= x.min() and x.max() <= 1):
            raise ValueError(f"deblur takes floats in [0, 1], (B, 3, H, W) or (3, H, W), not "
                             f"{x.dtype} {tuple(blurry.shape)} (or NaN, or outside [0, 1])")
        self.eval()
        H, W = x.shape[-2:]
        x = pad_to(x.to(next(self.parameters())), 8)  # MIMO-UNet and BE need 4 (official: 8)
        if prior is None and self.cfg.prior:
            prior = self.sharp_prior(x, self.start_noise(len(x), seed))
        out = self.run_deblurrer(x, prior)[-1][..., :H, :W]
        out = out.clamp(0, 1).where(out.isfinite(), math.nan)  # never a white pixel for an overflow
        return out.reshape(blurry.shape).to(blurry)

# Part II: the tools train.py and sample.py share; everything above runs without them ==============

import argparse
import functools
import os
import pickle
import re
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

# 7. Large images in tiles, all modulated by one prior computed on the whole image -----------------

PRIOR_MAX_PIXELS = 16_000_000  # larger: the blur encoder sees a downscaled copy (official: none)

@torch.inference_mode()
def deblur_tiled(model, blurry, tile=1536, overlap=64, seed=INFERENCE_SEED):
    """model.deblur in tiles of `tile` px (0: whole) sharing the whole image's prior; neighbours
    share `overlap` px, each keeping the half away from its edge; tiles start on multiples of 8."""
    if tile and (tile < max(64, 2 * overlap) or overlap < 0):
        raise ValueError(f"tile={tile} must be 0, or at least 64 and twice overlap={overlap} >= 0")
    x = blurry[None] if blurry.dim() == 3 else blurry
    (H, W), prior = x.shape[-2:], None
    if model.cfg.prior:  # the blur encoder pools globally: the prior describes the whole image
        small = x if H * W <= PRIOR_MAX_PIXELS else F.interpolate(
            x, scale_factor=math.sqrt(PRIOR_MAX_PIXELS / (H * W)), mode="area")
        model.eval()
        small = pad_to(small.to(next(model.parameters())), 8)
        prior = model.sharp_prior(small, model.start_noise(len(x), seed))
    if not tile or max(H, W) <= tile:
        return model.deblur(blurry, prior=prior)
    x, tile, overlap = pad_to(x, 8), 8 * (tile // 8), 8 * math.ceil(overlap / 8)
    out = torch.empty_like(x)

    def spans(length):  # (start, keep from, keep to) of each tile along one axis
        starts = sorted({min(s, length - tile) for s in range(0, length - overlap, tile - overlap)})
        cuts = [0, *(s + overlap // 2 for s in starts[1:]), length]
        return zip(starts, cuts, cuts[1:]) if length > tile else [(0, 0, length)]

    for top, y0, y1 in spans(x.shape[-2]):
        for left, x0, x1 in spans(x.shape[-1]):
            window = x[..., top:top + tile, left:left + tile]
            out[..., y0:y1, x0:x1] = model.deblur(window, prior=prior)[
                ..., y0 - top:y1 - top, x0 - left:x1 - left]
    return out[..., :H, :W].reshape(blurry.shape)

# 8. Metrics (METHOD.md §6): on uint8-rounded RGB, full image, no border crop ---------------------

def to_uint8(x):
    """[0, 1] float -> uint8, rounded: what a saved PNG holds and what the paper's metrics see."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)

def psnr(x, y):
    """PSNR in dB between two uint8 RGB images (C, H, W), peak 255; inf when identical."""
    mse = (x.double() - y.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)

def ssim(x, y):
    """The 3-D SSIM of the BlurDM tables (MATLAB's ssim of an RGB array; METHOD.md §6) of two uint8
    RGB images (C, H, W): one H x W x C volume, an 11x11x11 Gaussian, replicate padding."""
    g = torch.exp(-(torch.arange(11, dtype=torch.float64, device=x.device) - 5) ** 2 / 4.5)
    g = g / g.sum()  # σ 1.5, separable

    def blur3d(v):  # (1, 1, C, H, W) -> same shape, one axis at a time
        v = F.pad(v, (5,) * 6, mode="replicate")
        for shape in ((11, 1, 1), (1, 11, 1), (1, 1, 11)):
            v = F.conv3d(v, g.view(1, 1, *shape))
        return v

    x, y = x.double()[None, None], y.double()[None, None]
    mu_x, mu_y = blur3d(x), blur3d(y)
    var_x, var_y = blur3d(x * x) - mu_x ** 2, blur3d(y * y) - mu_y ** 2
    cov = blur3d(x * y) - mu_x * mu_y
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)
                / ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2)))
    return ssim_map.mean().item()

@torch.inference_mode()
def evaluate(model, images, device, stage=3):
    """(PSNR, SSIM) of each (name, blur, sharp) uint8 image; stage 1's prior is SE(blur, sharp)."""
    for _, blur, sharp in images:
        blur, sharp = blur.to(device), sharp.to(device)
        prior = None
        if model.cfg.prior and stage == 1:
            model.eval()
            prior = model.sharp_latent(*(pad_to(v[None] / 255, 8) for v in (blur, sharp)))
        out = to_uint8(deblur_tiled(model, blur / 255, 2048) if prior is None
                       else model.deblur(blur / 255, prior=prior))
        yield psnr(out, sharp), ssim(out, sharp)

# 9. Checkpoints: this project's; MIMO-UNet's and the official BlurDM code's converted -------------

@contextmanager
def atomic(path):
    """A temporary name beside `path` to write to, renamed over `path` on success: no half file."""
    tmp = Path(path).with_name(f".tmp.{Path(path).name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def save_checkpoint(path, model, **extra):
    """Config + weights (+ `extra`: stage, step, optimizer state ...), written atomically."""
    with atomic(path) as tmp:
        torch.save(dict(format="blurdm", config=asdict(model.cfg), model=model.state_dict(),
                        **extra), tmp)

def safe_load(path):
    """torch.load(weights_only=True): a checkpoint cannot run code. The official BlurDM files
    pickle an argparse.Namespace, the one class let through (torch >= 2.5 can)."""
    allow = getattr(torch.serialization, "safe_globals", lambda classes: nullcontext())
    try:
        with allow([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message would advise weights_only=False
        cls = re.search(r"(?i)unsupported (?:global: )?(?:GLOBAL|class) ([\w.]+)", str(err))
        why = "" if not cls else f" ({cls[1]}, which could run code)"
        if cls and cls[1] == "argparse.Namespace":  # an official file on torch < 2.5
            why = " (its argparse.Namespace loads safely with torch >= 2.5)"
        raise ValueError(f"{path}: not a weights-only PyTorch checkpoint{why}") from None

def read_checkpoint(path):
    """A checkpoint of any known kind -> (BlurDMConfig, weights in our names, the file's dict)."""
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") == "blurdm" and not {
            "config", "model"} <= checkpoint.keys():
        raise ValueError(f"{path}: not a checkpoint (no dict of config and weights)")
    if checkpoint.get("format") != "blurdm":
        return (*convert_foreign(Path(path), checkpoint), checkpoint)
    stored = dict(checkpoint["config"])
    old = stored.pop("prior_loss", None)  # the field's name in older files
    if old is not None and stored.setdefault("prior_distance", old) != old:
        raise ValueError(f"{path}: its config's prior_loss and prior_distance disagree")
    config = {f.name: stored[f.name] for f in fields(BlurDMConfig) if f.name in stored}
    return BlurDMConfig(**config), checkpoint["model"], checkpoint

def load_weights(model, state, path, optional=()):
    """`state` into `model`: all of it must fit, all of the model be in it but `optional` names."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(optional))]
    if missing or unexpected:
        raise ValueError(f"{path}: weights {', '.join((missing + unexpected)[:3])} ... "
                         + ("missing from the file" if missing else "not in the model"))

def load_model(path, *, deblurrer=None):
    """Any checkpoint -> a BlurDM in eval mode on the CPU (a custom deblurrer passed as such)."""
    cfg, state, checkpoint = read_checkpoint(path)
    if cfg.prior and checkpoint.get("stage") == 1:
        raise ValueError(f"{path}: a stage-1 checkpoint, its blur diffusion untrained; deblur with "
                         "stage 2 or 3")
    model = BlurDM(cfg, deblurrer)
    load_weights(model, state, path, () if "format" in checkpoint else ("sharp_encoder.",))
    return model.eval()

def mimo_unet_names(num_res):
    """{MIMO-UNet's name (the official BlurDM deblurrer's too): ours}; SCM1, FAM1: the 1/4 scale."""
    modules = {"feat_extract.0": "stem.0", "feat_extract.1": "down.0.0",
               "feat_extract.2": "down.1.0", "feat_extract.3": "up.0.0", "feat_extract.4": "up.1.0",
               "feat_extract.5": "to_image.2", "ConvsOut.0": "to_image.0",
               "ConvsOut.1": "to_image.1", "Convs.0": "squeeze.0.0", "Convs.1": "squeeze.1.0",
               "FAM2.merge": "attention.0.merge", "FAM1.merge": "attention.1.merge",
               "SCM2.conv": "shallow.0.out", "SCM1.conv": "shallow.1.out"}
    for i in range(2):
        modules |= {f"AFFs.{i}.conv.0": f"fusion.{i}.mix", f"AFFs.{i}.conv.1": f"fusion.{i}.out"}
        modules |= {f"SCM{2 - i}.main.{k}": f"shallow.{i}.body.{k}.0" for k in range(4)}
    for i, j, k in ((i, j, k) for i in range(3) for j in range(num_res) for k in range(2)):
        modules[f"Encoder.{i}.layers.{j}.main.{k}"] = f"encoders.{i}.{j}.body.{k}" + ".0" * (1 - k)
        modules[f"Decoder.{i}.layers.{j}.main.{k}"] = f"decoders.{i}.{j}.body.{k}" + ".0" * (1 - k)
    names = {f"{a}.main.0.{p}": f"deblurrer.{b}.{p}" for a, b in modules.items()
             for p in ("weight", "bias")}
    return names | {f"Decoder.{i}.kv.weight": f"deblurrer.prior_fusion.{i}.to_scale_shift.weight"
                    for i in range(3)}

def official_prior_names(cfg):
    """{official name in model_dm_state and model_le_state: ours}. LE_arch numbers the layers of one
    Sequential E, BatchNorm only where there is one; the estimators: resmlp.0, resmlp.k.resmlp.0."""
    n, names = cfg.encoder_blocks, {}
    for theirs, ours, bn in (("condition_encoder.", "blur_encoder.", False),
                             ("le.", "sharp_encoder.", True)):
        layers = {"E.0": "stem.0", f"E.{n + 2}": "head.0", f"E.{n + 4}": "head.2",
                  f"E.{n + 6}": "head.4", "mlp.0": "head.8", "mlp.2": "head.10"}
        pairs = ((0, 0), (1, 1), (3, 3), (4, 4)) if bn else ((0, 0), (2, 3))
        layers |= {f"E.{j + 2}.body.{a}": f"blocks.{j}.body.{b}"
                   for j in range(n) for a, b in pairs}
        for a, b in layers.items():
            norm = ("running_mean", "running_var", "num_batches_tracked") * bn * (b[-1] in "14")
            names |= {f"{theirs}{a}.{p}": f"{ours}{b}.{p}" for p in ("weight", "bias", *norm)}
    for theirs, ours in (("lcr_model.", "blur_estimator."), ("noise_model.", "noise_estimator.")):
        layers = {"resmlp.0": "net.0"} | {f"resmlp.{k}.resmlp.0": f"net.{2 * (k - 1)}"
                                          for k in range(2, cfg.estimator_layers + 1)}
        names |= {f"{theirs}{a}.{p}": f"{ours}{b}.{p}" for a, b in layers.items()
                  for p in ("weight", "bias")}
    return names

def convert_foreign(path, checkpoint):
    """MIMO-UNet's {'model': weights}; the official last_*.pth (model_state, model_dm_state) or
    final_deblur_*.pth (with final_dm_*.pth, final_le_*.pth beside it) -> (config, our weights)."""
    parts = {}
    for key, part, prefix in (("model_state", "deblur", ""), ("model_dm_state", "dm", ""),
                              ("model_le_state", "le", "le.")):
        sibling = path.parent / re.sub(r"^(final|best)_(deblur|dm|le)_", rf"\1_{part}_", path.name)
        source = checkpoint
        if key not in checkpoint and sibling != path and sibling.is_file():
            source = safe_load(sibling)
        parts |= {prefix + k.removeprefix("module."): v for k, v in source.get(key, {}).items()}
    parts = parts or {k.removeprefix("module."): v
                      for k, v in checkpoint.get("model", checkpoint).items()}
    if "feat_extract.0.main.0.weight" not in parts:
        raise ValueError(f"{path}: not a checkpoint of this project, MIMO-UNet or official BlurDM")
    num_res = sum(bool(re.fullmatch(r"Encoder\.0\.layers\.\d+\.main\.0\.main\.0\.weight", k))
                  for k in parts)
    cfg = BlurDMConfig(width=len(parts["feat_extract.0.main.0.weight"]), num_res=num_res,
                       dropout=0.1 if num_res == 20 else 0.0)
    if "Decoder.0.kv.weight" not in parts:
        cfg = replace(cfg, prior=False, input_offset=0.0)
        return cfg, {mimo_unet_names(num_res).get(k, k): v for k, v in parts.items()}
    cfg = replace(cfg, beta_bar_rule="official", prior_distance="charbonnier",
                  latent_dim=parts["Decoder.0.kv.weight"].shape[-1])
    diffusion = BlurDiffusion(cfg)
    for name, ours in (("alphas", diffusion.alpha), ("betas_bar", diffusion.beta_bar[1:])):
        stored = parts.pop(name, ours).float()
        if stored.shape != ours.shape or not torch.allclose(stored, ours, atol=1e-3):
            raise ValueError(f"{path}: its schedule {name} is not the official one")
    parts.pop("time_stamps_list", None)
    names = mimo_unet_names(num_res) | official_prior_names(cfg)
    return cfg, {names.get(k, k): v for k, v in parts.items()}

# 10. Files: images, and data sets on disk ---------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEBLURRED_TAG = "_deblurred"  # sample.py writes <stem>_deblurred.png: folder scans leave them out

def read_image(path, extras=False):
    """An image file -> RGB (3, H, W) in [0, 1] at its full range, other ranges refused; EXIF turns
    applied. With extras: (rgb, {"icc_profile": bytes or None, "grayscale": bool})."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16- or 32-bit integers, or floats
        gray = np.asarray(img, dtype=np.float64)
        low, high = gray.min(), gray.max()  # NaN fails every test below
        if img.mode == "F":  # floats in [0, 1], or 8-bit values stored as floats
            scale = 1 if high <= 1 else 255 if high <= 255 and (gray == gray.round()).all() else 0
        else:
            scale = 65535 if high <= 65535 else 0
        if not (low >= 0 and scale):
            raise ValueError(f"{path}: pixel values in [{low:g}, {high:g}] fit neither [0, 1], "
                             "8 nor 16 bits")
        rgb = torch.from_numpy(gray / scale).float().expand(3, *gray.shape)
    else:
        rgb = torch.from_numpy(np.asarray(img.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    gray = img.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
    extra = {"icc_profile": img.info.get("icc_profile"), "grayscale": gray}
    return (rgb.contiguous(), extra) if extras else rgb.contiguous()

def write_image(image, path, icc_profile=None):
    """(3 or 1, H, W) in [0, 1] -> an 8-bit file of the suffix's format (the profile if it fits)."""
    from PIL import Image

    arr = to_uint8(image.float().cpu()).permute(1, 2, 0).numpy()
    mode = "L" if arr.shape[-1] == 1 else "RGB"
    options = {"quality": 95} if Path(path).suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    if icc_profile and icc_profile[16:20] == (b"GRAY" if mode == "L" else b"RGB "):  # its header
        options["icc_profile"] = icc_profile
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path, **options)

def list_images(folder):
    """Image files under `folder`, sorted, hidden ones and outputs left out; links not followed."""
    found = (Path(root) / f for root, _, files in os.walk(folder) for f in files)
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.stem.endswith(DEBLURRED_TAG)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))

PARTNER = {"blur": "sharp", "input": "target"}  # GoPro (blur_gamma unused), its flat copy

def find_pairs(root):
    """A data set -> ({split: [(blurry path or None, sharp path)]}, [problems]), paired by name:
    blur/ (input/) with the same path under sharp/ (target/), any suffix; HIDE with GT/; RealBlur as
    its RealBlur_*_{train,test}_list.txt say; else sharp photographs (None). The split: the nearest
    train/ or test/ folder above a file (train if none)."""
    root, splits, left, used = Path(root), {}, [], set()
    add = lambda folders, pair: splits.setdefault(next(
        (f for f in reversed(folders) if f in ("train", "test")), "train"), []).append(pair)
    lists = sorted(root.glob("RealBlur_*_*_list.txt"))[:2]  # RealBlur-J where both are
    for list_file in lists:
        split = ["test" if "_test_" in list_file.name else "train"]
        for line in filter(str.strip, list_file.read_text().splitlines()):
            gt, blur = (root / name for name in line.split()[:2])
            if blur.is_file() and gt.is_file():
                add(split, (str(blur), str(gt)))
            else:
                left.append(blur)
    images = {} if lists else {p.relative_to(root).with_suffix("").as_posix(): p
                               for p in list_images(root)}
    gt = {key.split("/")[-1]: p for key, p in images.items() if "/GT/" in f"/{key}"}
    for key, path in images.items():
        *folders, stem = key.split("/")
        i = max((i for i, f in enumerate(folders) if f in PARTNER), default=None)
        if i is not None:
            partner = images.get("/".join([*folders[:i], PARTNER[folders[i]], *folders[i + 1:],
                                           stem]))
        elif gt and "GT" not in folders and {"train", "test"} & set(folders):
            partner = gt.get(stem)  # HIDE
        else:
            continue
        used |= {path, partner}
        if partner is None:
            left.append(path)
        else:
            add(folders, (str(path), str(partner)))
    if used:  # pairs: say what is left out (GoPro's blur_gamma/ and HIDE's GT/ apart)
        left += [p for key, p in images.items()
                 if p not in used and not {"blur_gamma", "GT"} & set(key.split("/"))]
    else:  # photographs, blurred on the fly
        for key, path in images.items():
            add(key.split("/")[:-1], (None, str(path)))
    problems = [f"{root}: {len(left)} images in no pair, left out ({left[0]}, ...)"] if left else []
    if not splits:
        raise ValueError(f"{root}: no images, nor blurry/sharp pairs" + "".join(f"; {p}"
                                                                         for p in problems))
    return splits, problems

# 11. Training samples: photographs blurred as GoPro was made (METHOD.md §7), crops, recipes ------

# the training recipe of each preset (train.py's defaults; bench.py times the same batch and crop):
# crop, global batch, Adam's lr with a cosine decay to lr_min, epochs per stage
PAPER_RECIPE = dict(crop=256, batch_size=20, lr=1e-4, lr_min=1e-6, stage_epochs=(3000, 500, 3000))
TRAINING_RECIPES = {
    "paper": PAPER_RECIPE, "mimo-unet": PAPER_RECIPE,
    "demo": dict(crop=128, batch_size=8, lr=5e-4, lr_min=1e-5, stage_epochs=(1334, 334, 1000)),
    "tiny": dict(crop=64, batch_size=4, lr=1e-3, lr_min=1e-6, stage_epochs=(2, 1, 2)),
}
BLUR_LENGTH = (4.0, 30.0)  # camera path lengths in pixels: GoPro-like blurs, slight to strong

def camera_shake(num_subframes=41, length=20.0, rotation=0.0, zoom=0.0, turn=120.0, generator=None):
    """A camera path (N, 4) float64, a row a sub-frame (dx, dy px, rotation rad, log zoom): `length`
    px at constant speed, the heading's rate of turn a random walk (METHOD.md §7); `rotation`
    degrees and `zoom` over the exposure make the blur vary across the image."""
    n, f64 = num_subframes, dict(generator=generator, dtype=torch.float64)
    rate = torch.randn((), **f64) + torch.cumsum(torch.randn(n, **f64), 0) / math.sqrt(n)
    heading = 2 * math.pi * torch.rand((), **f64) + torch.cumsum(rate, 0) * math.radians(turn) / n
    steps = torch.stack([heading.cos(), heading.sin()], 1) * (length / max(n - 1, 1))
    position = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.cumsum(steps[:-1], 0)])
    ramp = torch.linspace(-0.5, 0.5, n, dtype=torch.float64)[:, None]
    path = torch.cat([position, math.radians(rotation) * ramp, math.log1p(zoom) * ramp], 1)
    return path - (path[(n - 1) // 2] + path[n // 2]) / 2

def draw_blur(sharp, generator=None, length=BLUR_LENGTH, subframes=41, max_rotation=2.0,
              max_zoom=0.02, noise=(0.0, 0.01), window=None):
    """The random draws of a synthetic blur of sRGB (3, H, W), uint8 or in [0, 1] -> (region in
    [0, 1], path, noise (3, h, w)); window=(top, left, h, w): that window and a margin (half the
    longest path + 8 px) that keeps the resampling's border out; subframes=None: one a path px."""
    if window is not None:
        top, left, h, w = window
        m = math.ceil(length[1] / 2) + 8
        rows = torch.arange(top - m, top + h + m).clamp(0, sharp.shape[-2] - 1)
        cols = torch.arange(left - m, left + w + m).clamp(0, sharp.shape[-1] - 1)
        sharp = sharp[..., rows[:, None], cols]  # the border replicated where the margin leaves
    sharp = sharp / 255 if sharp.dtype == torch.uint8 else sharp

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()

    varying = torch.rand((), generator=generator).item() < 0.5
    path_length = uniform(*length)
    n = subframes or 2 * math.ceil(path_length / 2) + 1  # odd: the middle one is the sharp image
    path = camera_shake(n, path_length, uniform(-max_rotation, max_rotation) * varying,
                        uniform(-max_zoom, max_zoom) * varying, generator=generator)
    noise = uniform(*noise) * torch.randn(sharp.shape, generator=generator).to(sharp)
    return sharp, path, centre(noise, window[2:] if window else sharp.shape[-2:])

def blur_images(regions, paths, counts, noise):
    """regions (n, 3, H, W) moved along paths (n, N, 4) of counts[i] sub-frames -> the exposures'
    integral B_T, its centre of noise's size, plus noise, in 8 bits (n, 3, h, w)."""
    k = torch.arange(paths.shape[1], device=counts.device)
    weights = (k < counts[:, None]) / counts[:, None]  # (n, N): a shorter path's extra rows weigh 0
    theta = affine_theta(paths, *regions.shape[-2:])  # (n, N, 2, 3)
    mean = integrate_light(srgb_to_linear(regions), theta, weights[None].to(regions))[0]
    blurry = centre(linear_to_srgb(mean), noise.shape[-2:]) + noise
    return (blurry.clamp(0, 1) * 255).round() / 255

def synthesize_blur(sharp, generator=None, **options):
    """A blurred copy of a sharp sRGB image (3, H, W), made as GoPro was made (draw_blur's options);
    with window=(top, left, h, w), the (blurry, sharp) windows of a larger image."""
    region, path, noise = draw_blur(sharp, generator, **options)
    blurry = blur_images(region[None], path[None], torch.tensor([len(path)]), noise[None])[0]
    return (blurry, centre(region, noise.shape[-2:])) if "window" in options else blurry

def centre(image, size):
    """The central (h, w) part of (..., H, W)."""
    (H, W), (h, w) = image.shape[-2:], size
    return image[..., (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w]

@functools.lru_cache(maxsize=64)  # per process: a small photo set is decoded once, not per sample
def load_pair(blur_path, sharp_path, min_size=1):
    """(blur or None, sharp) as uint8 (3, H, W) of one size, min_size at least."""
    sharp = to_uint8(read_image(sharp_path))
    blur = to_uint8(read_image(blur_path)) if blur_path else None
    if blur is not None and blur.shape != sharp.shape:
        raise ValueError(f"{blur_path}: {tuple(blur.shape)}, its sharp image {tuple(sharp.shape)}")
    if min(sharp.shape[1:]) < min_size:
        raise ValueError(f"{sharp_path}: smaller than the {min_size} px crop")
    return blur, sharp

@functools.lru_cache(maxsize=None)
def warn(message):  # once a process
    print(f"warning: {message}", flush=True)

class PairDataset(Dataset):
    """Item (stage, step, k) -> that sample, seeded by the item: a random crop of a pair, turned
    and flipped, (blur, sharp) in [0, 1]; of a photograph, what training_batch blurs where the model
    trains. A pair that cannot be used is skipped with a warning."""

    def __init__(self, pairs, crop, blur_length, seed):
        self.pairs, self.crop, self.blur_length, self.seed = pairs, crop, blur_length, seed
        self.subframes = 2 * math.ceil(blur_length[1] / 2) + 1  # the most a path can have

    def __getitem__(self, item):
        g, c = torch.Generator().manual_seed(hash((self.seed, *item))), self.crop
        start, n = torch.randint(len(self.pairs), (), generator=g).item(), len(self.pairs)
        for i in range(start, start + n):  # a pair that cannot be used: the next one
            try:
                blur, sharp = load_pair(*self.pairs[i % n], min_size=c)
                break
            except (ValueError, OSError) as err:
                warn(f"{err}; skipped")
        else:
            raise ValueError(f"none of the {len(self.pairs)} training pairs can be used")
        top, left = (torch.randint(n - c + 1, (), generator=g).item() for n in sharp.shape[1:])
        turns, flip = torch.randint(4, (), generator=g).item(), torch.rand((), generator=g) < 0.5
        turn = lambda x: torch.rot90(x.flip(-1) if flip else x, turns, (-2, -1))  # 8 symmetries
        if blur is None:  # turned before it is blurred: the random path has no direction
            region, path, noise = draw_blur(sharp, g, self.blur_length, None,
                                            window=(top, left, c, c))
            path_rows = F.pad(path, (0, 0, 0, self.subframes - len(path)))  # one size to collate
            return turn(region), path_rows, len(path), noise
        pair = turn(torch.stack([blur, sharp])[..., top:top + c, left:left + c] / 255)
        return pair[0], pair[1]

def training_batch(batch, device):
    """PairDataset items, collated -> (blur, sharp) on `device`, photographs blurred there."""
    batch = [x.to(device, non_blocking=True) for x in batch]
    if len(batch) == 4:
        batch = blur_images(*batch), centre(batch[0], batch[3].shape[-2:])
    return batch

def validation_images(pairs, crop, seed, blur_length):
    """(name, blur, sharp) uint8 centre crops (crop 0: whole), photographs blurred from `seed`."""
    for j, (blur_path, sharp_path) in enumerate(pairs):
        try:
            blur, sharp = load_pair(blur_path, sharp_path)
        except (ValueError, OSError) as err:
            warn(f"{err}; left out of evaluation")
            continue
        H, W = sharp.shape[-2:]
        m = 0 if blur is not None or crop else math.ceil(blur_length[1] / 2) + 8  # photo's edges
        h, w = (min(crop, H), min(crop, W)) if crop else (max(H - 2 * m, 8), max(W - 2 * m, 8))
        if blur is None:
            window = ((H - h) // 2, (W - w) // 2, h, w)
            g = torch.Generator().manual_seed(hash((seed, j)))
            blur, sharp = (to_uint8(x) for x in synthesize_blur(
                sharp, g, length=blur_length, subframes=None, window=window))
        yield blur_path or sharp_path, *(centre(x, (h, w)) for x in (blur, sharp))

# 12. Device, precision, errors --------------------------------------------------------------------

def pick_device(name="auto"):
    """'auto' (CUDA when there is one), 'cpu' or 'cuda' -> torch.device; the one CUDA check."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: this PyTorch build sees no CUDA device")
    return torch.device(name)

def autocast(device, amp="auto"):
    """A precision -> (autocast context, what runs): auto is bf16 where native, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        native = {"bf16": torch.cuda.is_bf16_supported(), "fp16": True}
    else:
        cpu = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
        native = {"bf16": bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpu)), "fp16": False}
    amp = ("bf16" if native["bf16"] else "fp32") if amp == "auto" else amp
    if amp == "fp32" or not native[amp]:
        return nullcontext(), "fp32"
    return torch.autocast(device.type, {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]), amp

def error_line(err):
    """An exception as one short line (a DataLoader worker's: its traceback's last line)."""
    text = str(err).strip() or type(err).__name__
    text = text.splitlines()[-1] if "Traceback (most recent call last)" in text else text
    return " ".join(text.split())[:300]
