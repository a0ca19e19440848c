"""
assets/oracle.pt: the original code's outputs on fixed weights, which the tests pin blurdm.py to.
Run by hand, once: python assets/make_oracle.py MIMO_UNET_DIR BLURDM_SRC_DIR, the checkouts of
chosj95/MIMO-UNet at commit 5c58013 (models/MIMOUNet.py: MIMOUNetPlus) and src/ of suxh19/BlurDM at
commit a198412, the official upload (MIMO_UNet/models: MIMOUNetPlusPrior, LatentExposureDiffusion);
their unused imports `thop` and `einops` are stubbed here. The tests draw the same weights with
oracle_weights: from the entries of assets/official_keys.json, seed 0 for MIMO-UNet+, 1 for the
BlurDM deblurrer (model_state), 2 for its diffusion (model_dm_state); u = 2 * rand - 1 from one
generator, names sorted: u / sqrt(prod(shape[1:])) for 2+ dims, 0.1 * u for 1-D and running_mean,
0.5 + rand running_var, 0 num_batches_tracked; alphas, betas_bar, time_stamps_list: the module's.
BlurDM runs as its deblur_predict.py: image - 0.5, reflect-padded bottom and right to multiples of
8; prior = dm(x), x_T = Z^B + betas_bar[T - 1] * randn_like after torch.manual_seed(2023).
"""

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCHEDULE = ("alphas", "betas_bar", "time_stamps_list")  # dm buffers taken from the module

def oracle_weights(entries, seed):
    g, out = torch.Generator().manual_seed(seed), {}
    for name, shape in sorted(entries):
        u = lambda: 2 * torch.rand(shape, generator=g) - 1
        if name in SCHEDULE:
            continue
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean") or len(shape) < 2:
            out[name] = 0.1 * u()
        else:
            out[name] = u() / math.sqrt(math.prod(shape[1:]))
    return out

class Fn(torch.nn.Module):  # stands in for a submodule
    def __init__(self, fn):
        super().__init__()
        self.forward = fn

def step_coefficients(dm):
    """Per t: the official step's coefficients on x_t, ê_t, ε̂_t, by running its forward from t
    alone (time_stamps_list = [t]) on three unit inputs (a batch of three 1-vectors)."""
    eye, dm = torch.eye(3), type(dm)()  # a fresh module: the same schedule, stubs for the rest
    dm.lcr_model, dm.noise_model = Fn(lambda *a: eye[:, 1:2]), Fn(lambda *a: eye[:, 2:3])
    dm.condition_encoder, dm.q_sample_d = Fn(lambda blur, gt: blur), lambda img: (img, None)
    ts = range(1, dm.total_timestamps + 1)
    one = lambda t: setattr(dm, "time_stamps_list", torch.tensor([t])) or dm(eye[:, :1])[:, 0]
    return torch.stack([one(t) for t in ts])  # (T, 3): row t - 1 for step t

@torch.no_grad()
def main(mimo_dir, blurdm_src):
    stub = types.SimpleNamespace  # for the unused imports
    sys.modules.update(thop=stub(profile=0), einops=stub(rearrange=0))
    sys.path[:0] = [mimo_dir, blurdm_src]
    from models.MIMOUNet import MIMOUNetPlus
    from MIMO_UNet.models.MIMOUNetBlurDM import MIMOUNetPlusPrior
    from MIMO_UNet.models.LatentBlurDM import LatentExposureDiffusion
    here = Path(__file__).parent
    keys = json.loads((here / "official_keys.json").read_text())
    photo = np.asarray(Image.open(here / "photo_crop.png").convert("RGB"), dtype=np.float32)
    photo = torch.from_numpy(photo / 255).permute(2, 0, 1)[None]
    o = {"mimo_input": photo[..., :48, :64].clone()}  # MIMO-UNet sees [0, 1], no offset

    net = MIMOUNetPlus().eval()
    net.load_state_dict(oracle_weights(keys["mimo_unet_plus"], 0), strict=True)
    o |= {f"mimo_out{s}": y for s, y in enumerate(net(o["mimo_input"]))}

    deblur, dm = MIMOUNetPlusPrior().eval(), LatentExposureDiffusion().eval()
    deblur.load_state_dict(oracle_weights(keys["blurdm_deblur"], 1), strict=True)
    o |= (schedule := {k: getattr(dm, k) for k in SCHEDULE})  # the module's own
    dm.load_state_dict(oracle_weights(keys["blurdm_dm"], 2) | schedule, strict=True)
    h, w = 44, 60
    o["blurdm_input"] = photo[..., 8:8 + h, 16:16 + w].clone()  # in [0, 1]
    x = F.pad(o["blurdm_input"] - 0.5, (0, (8 - w % 8) % 8, 0, (8 - h % 8) % 8), mode="reflect")
    dm.spvised_mid_out = True  # forward then returns the start noise it drew too
    torch.manual_seed(2023)  # deblur_predict.py: same_seed(2023); randn_like(Z^B) in q_sample_d
    o["blurdm_prior"], _, _, o["eps"] = dm(x)
    assert torch.equal(o["eps"], torch.randn(1, 256, generator=torch.Generator().manual_seed(2023)))
    outs = deblur(x, o["blurdm_prior"])  # in [-0.5, 0.5]; stored + 0.5, unclamped
    o |= {f"blurdm_out{s}": y + 0.5 for s, y in enumerate(outs)}  # on the padded image
    o["blurdm_output"] = outs[2][..., :h, :w] + 0.5  # cropped back; the official code then clamps
    o["blurdm_pad_mode"], o["blurdm_pad_multiple"] = "reflect", 8  # bottom and right
    o["step_coef"] = step_coefficients(dm)  # (T, 3): on x_t, ê_t, ε̂_t; row t - 1 for step t
    torch.save(o, path := here / "oracle.pt")
    for k, v in o.items():
        std = f"std {v.float().std():.4f}" if torch.is_tensor(v) and v.numel() > 1 else ""
        print(f"{k:18s} {tuple(v.shape) if torch.is_tensor(v) else v!s:18s} {std}")
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")

if __name__ == "__main__":
    main(*sys.argv[1:3])
