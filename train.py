"""
Train BlurDM (BLURDM.md §6): stage 1 (sharp encoder + deblurrer), stage 2 (blur encoder + residual estimators),
stage 3 (all but the sharp encoder), each stage starting from the previous one's weights.

    python train.py --data GOPRO_Large/                    # the paper's recipe (MIMO-UNet+, 3000/500/3000 epochs)
    python train.py --data photos/ --preset tiny --iters 2000,500,2000
    torchrun --nproc_per_node=4 train.py --data GOPRO_Large/   # DistributedDataParallel, one process a GPU
    python train.py --data GOPRO_Large/ --no-prior         # the baseline backbone, same loss and budget

Rerunning the same command resumes from out/last.pt. Ctrl-C or SIGTERM saves and exits. The last line printed
names the checkpoint to pass to sample.py. Data layouts recognised: see find_pairs (BLURDM.md §9).
"""

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import blurdm

BLUR_MARGIN = 32  # synthetic blur is rendered this much beyond the crop, so grid_sample's reflected border stays out

# ----------------------------------------------------------------------------------------------------------------
# Data sets on disk (BLURDM.md §9): find the layout, pair blurry and sharp images by relative path


def list_images(folder):
    """Images under `folder`, recursively: {relative path without suffix: path}. Hidden files are left out."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.suffix.lower() in blurdm.IMAGE_SUFFIXES and not any(p.startswith(".") for p in relative.parts) \
                and path.is_file():
            found[relative.with_suffix("").as_posix()] = str(path)
    return found


def report_unmatched(folder, names, what, problems):
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        problems.append(f"{folder}: {len(names)} {what} ({shown})")


def pair_folders(blur_dir, sharp_dir, problems):
    """Pairs (blur, sharp) with the same relative path in both folders (the suffix may differ)."""
    blur, sharp = list_images(blur_dir), list_images(sharp_dir)
    report_unmatched(blur_dir, sorted(blur.keys() - sharp.keys()), f"blurry images with no match in {sharp_dir}",
                     problems)
    report_unmatched(sharp_dir, sorted(sharp.keys() - blur.keys()), f"sharp images with no match in {blur_dir}",
                     problems)
    return [(blur[k], sharp[k]) for k in sorted(blur.keys() & sharp.keys())]


def realblur_lists(root):
    """RealBlur list files in `root` (or `root` itself if it is one): {split: path}, the J lists preferred."""
    root = Path(root)
    if root.is_file():
        name = root.name.replace("_train_", "_{}_").replace("_test_", "_{}_")
        candidates = [[root.parent / name.format(split) for split in ("train", "test")]]
    else:
        candidates = [[root / f"RealBlur_{kind}_{split}_list.txt" for split in ("train", "test")] for kind in "JR"]
    for train_list, test_list in candidates:
        lists = {split: p for split, p in (("train", train_list), ("test", test_list)) if p.is_file()}
        if lists:
            return lists
    return {}


def read_realblur_list(list_file, problems):
    """One "gt_path blur_path" pair a line, relative to the list file's folder."""
    base, pairs, missing = list_file.parent, [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) < 2:
            problems.append(f"{list_file}:{number}: expected 'gt_path blur_path', got {line.strip()!r}")
            continue
        sharp, blur = base / words[0], base / words[1]
        if blur.is_file() and sharp.is_file():
            pairs.append((str(blur), str(sharp)))
        else:
            missing.append(words[1] if sharp.is_file() else words[0])
    report_unmatched(list_file, missing, "listed files missing", problems)
    return pairs


def detect_layout(root):
    """The layout name of a folder, or None."""
    has = lambda *parts: root.joinpath(*parts).is_dir()
    if realblur_lists(root):
        return "realblur"
    if any(any(root.glob(f"{split}/*/sharp")) or any(root.glob(f"{split}/*/blur")) for split in ("train", "test")):
        return "gopro"
    if any(has(split, "input") and has(split, "target") for split in ("train", "test")):
        return "gopro-flat"
    if has("GT") and has("test"):
        return "hide"
    if (has("blur") and has("sharp")) or any(has(split, "blur") and has(split, "sharp") for split in ("train", "test")):
        return "paired"
    return None


def find_pairs(root):
    """
    Recognise the data set under `root` and pair its images by relative path and file name.
    Returns (layout, splits, problems): layout is one of "gopro", "gopro-flat", "realblur", "hide", "paired",
    "sharp-photos"; splits maps "train"/"test" to a list of (blur_path, sharp_path), blur_path None for sharp
    photographs (blurred on the fly); problems lists one line per unmatched or missing file.
    Raises ValueError (one line) for a missing or empty folder or one whose layout cannot be recognised.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: no such folder")
    if root.is_file() and not realblur_lists(root):
        raise ValueError(f"{root}: not a folder (nor a RealBlur list file)")
    layout = detect_layout(root)
    if layout is None and root.is_dir():  # the folder the archive was unpacked into: GoPro/GOPRO_Large/...
        children = [c for c in sorted(root.iterdir()) if c.is_dir() and detect_layout(c)]
        if len(children) == 1:
            root, layout = children[0], detect_layout(children[0])
    problems, splits = [], {}

    if layout == "gopro":  # GOPRO_Large/{train,test}/<sequence>/{blur,blur_gamma,sharp}; blur_gamma is not used
        for split in ("train", "test"):
            for sequence in sorted(root.glob(f"{split}/*/")):
                if not (sequence / "blur").is_dir() or not (sequence / "sharp").is_dir():
                    problems.append(f"{sequence}: no blur/ or no sharp/ folder, sequence skipped")
                    continue
                splits.setdefault(split, []).extend(pair_folders(sequence / "blur", sequence / "sharp", problems))
    elif layout == "gopro-flat":  # {train,test}/{input,target}/<sequence>-NNNNNN.png
        for split in ("train", "test"):
            if (root / split / "input").is_dir():
                splits[split] = pair_folders(root / split / "input", root / split / "target", problems)
    elif layout == "paired":  # blur/ and sharp/ at the top, or under train/ and test/
        if (root / "blur").is_dir():
            splits["train"] = pair_folders(root / "blur", root / "sharp", problems)
        for split in ("train", "test"):
            if (root / split / "blur").is_dir():
                splits[split] = pair_folders(root / split / "blur", root / split / "sharp", problems)
    elif layout == "realblur":
        for split, list_file in realblur_lists(root).items():
            splits[split] = read_realblur_list(list_file, problems)
    elif layout == "hide":  # blurry test/<subset>/NAME.png and train/NAME.png share file names with GT/NAME.png
        gt = {Path(k).name: v for k, v in list_images(root / "GT").items()}
        matched = set()
        for split in ("train", "test"):
            blurry = list_images(root / split) if (root / split).is_dir() else {}
            pairs = [(path, gt[Path(k).name]) for k, path in blurry.items() if Path(k).name in gt]
            matched |= {Path(k).name for k, _ in blurry.items() if Path(k).name in gt}
            report_unmatched(root / split, sorted(k for k in blurry if Path(k).name not in gt),
                             f"blurry images with no match in {root / 'GT'}", problems)
            if pairs:
                splits[split] = pairs
        if (root / "train").is_dir():  # GT/ holds the ground truth of both splits
            report_unmatched(root / "GT", sorted(gt.keys() - matched), "sharp images with no blurry image", problems)
    else:  # a plain folder of sharp photographs: pairs are rendered on the fly
        special = [p for p in root.rglob("*") if p.is_dir() and p.name.lower() in ("blur", "sharp", "input", "target", "gt")]
        if special:
            raise ValueError(f"{root}: unrecognised layout (found {special[0]}/ but not its partner folder); expected "
                             "GoPro, its flat copy, RealBlur, HIDE, blur/ + sharp/, or a folder of sharp photographs")
        photos = list_images(root)
        if not photos:
            raise ValueError(f"{root}: no images found (looked for {', '.join(blurdm.IMAGE_SUFFIXES)})")
        layout, splits = "sharp-photos", {"train": [(None, path) for path in photos.values()]}
        if (root / "train").is_dir() and (root / "test").is_dir():  # photographs already split: test/ validates
            splits = {split: [(None, path) for path in list_images(root / split).values()] for split in ("train", "test")}

    splits = {split: pairs for split, pairs in splits.items() if pairs}
    if not splits:
        detail = f" ({problems[0]})" if problems else ""
        raise ValueError(f"{root}: {layout} layout but no blurry/sharp pairs matched{detail}")
    return layout, splits, problems


def image_size(path):
    """(W, H) as read_image will see it, from the header; PNG checksums verified. ValueError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()  # must come straight after open; the image is unusable afterwards
        with Image.open(path) as img:
            swapped = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
            return img.size[::-1] if swapped else img.size
    except Exception as err:  # Pillow raises many types for a bad file: the message is what matters
        raise ValueError(f"{path}: not a readable image ({err})") from None


def check_pairs(pairs, min_size, problems):
    """Drop pairs with an unreadable image, a blur/sharp size mismatch, or smaller than min_size; one line each."""
    good = []
    for blur, sharp in pairs:
        try:
            sizes = {p: image_size(p) for p in (blur, sharp) if p is not None}
        except ValueError as err:
            problems.append(f"{err}; skipped")
            continue
        (w, h) = sizes[sharp]
        if blur is not None and sizes[blur] != sizes[sharp]:
            problems.append(f"{blur}: {sizes[blur][0]}x{sizes[blur][1]} but its sharp image {sharp} is {w}x{h}; skipped")
        elif min(w, h) < min_size:
            problems.append(f"{sharp}: {w}x{h} is smaller than the {min_size}px crop; skipped")
        else:
            good.append((blur, sharp))
    return good


# ----------------------------------------------------------------------------------------------------------------
# Training samples: random crops, flips and 90° rotations, identical for both images


def render_window(sharp, top, left, h, w, generator, blur_length):
    """
    A synthetic blurry/sharp pair for the (h, w) window of `sharp` at (top, left), rendered with a margin; the camera
    path's length is drawn from `blur_length` (lo, hi) pixels.
    """
    H, W = sharp.shape[-2:]
    m_top, m_left = min(BLUR_MARGIN, top), min(BLUR_MARGIN, left)
    m_bottom, m_right = min(BLUR_MARGIN, H - top - h), min(BLUR_MARGIN, W - left - w)
    window = sharp[:, top - m_top:top + h + m_bottom, left - m_left:left + w + m_right]
    blurry = blurdm.synthesize_blur(window, generator=generator, length=blur_length)
    inner = lambda x: x[:, m_top:m_top + h, m_left:m_left + w]
    return inner(blurry), inner(window)


def load_pair(blur_path, sharp_path):
    sharp = blurdm.read_image(sharp_path)
    if blur_path is None:
        return None, sharp
    blur = blurdm.read_image(blur_path)
    if blur.shape != sharp.shape:
        raise ValueError(f"{blur_path}: {blur.shape[2]}x{blur.shape[1]} but its sharp image {sharp_path} is "
                         f"{sharp.shape[2]}x{sharp.shape[1]}")
    return blur, sharp


class PairDataset(Dataset):
    """
    Items are (pair index, sample seed): every random choice comes from the seed, whatever worker runs it.
    Each worker keeps the pairs it decodes while they fit in `cache_mb`: a small set of photographs is then decoded
    once per worker, not once per sample (decoding is half of a sample's CPU time on the demo recipe).
    """

    def __init__(self, pairs, crop, cache_mb=0, blur_length=blurdm.BLUR_LENGTH):
        self.pairs, self.crop, self.blur_length = pairs, crop, blur_length
        self.cache, self.cache_room = {}, cache_mb * 2 ** 20  # filled separately in each worker process

    def __len__(self):
        return len(self.pairs)

    def load(self, i):
        if i in self.cache:
            return self.cache[i]
        pair = load_pair(*self.pairs[i])
        size = sum(x.numel() * x.element_size() for x in pair if x is not None)
        if size <= self.cache_room:  # first come, kept: no eviction, so a large data set costs nothing extra
            self.cache[i], self.cache_room = pair, self.cache_room - size
        return pair

    def __getitem__(self, item):
        index, sample_seed = item
        failed = -1  # a pair that cannot be decoded is replaced by the next one and reported to the main process
        for attempt in range(len(self.pairs)):
            i = (index + attempt) % len(self.pairs)
            try:
                blur, sharp = self.load(i)
                break
            except ValueError:
                failed = i if failed < 0 else failed
        else:
            raise RuntimeError("none of the training pairs could be decoded")
        return (*self.augment(blur, sharp, torch.Generator().manual_seed(sample_seed)), failed)

    def augment(self, blur, sharp, g):
        """A random crop (blurred here for photographs), h/v flips and quarter turns, the same for both images."""
        c = self.crop
        top = torch.randint(sharp.shape[1] - c + 1, (), generator=g).item()
        left = torch.randint(sharp.shape[2] - c + 1, (), generator=g).item()
        if blur is None:
            blur, sharp = render_window(sharp, top, left, c, c, g, self.blur_length)
        else:
            blur, sharp = blur[:, top:top + c, left:left + c], sharp[:, top:top + c, left:left + c]
        (flip_h, flip_v), quarter_turns = (torch.rand(2, generator=g) < 0.5).tolist(), torch.randint(4, (), generator=g).item()
        pair = torch.stack([blur, sharp])  # (2, 3, c, c): one transform for both
        if flip_h:
            pair = pair.flip(-1)
        if flip_v:
            pair = pair.flip(-2)
        pair = torch.rot90(pair, quarter_turns, (-2, -1))
        return pair[0].contiguous(), pair[1].contiguous()


class StepSampler(Sampler):
    """
    The samples of one stage from `start_step` on. Epoch e visits a permutation seeded by (seed, stage, e); the
    global batch at step s is positions [s·B, (s+1)·B) of it (wrapping at the end), split evenly over the ranks.
    Each sample carries its own seed, so a resumed run or another number of workers sees the same crops.
    """

    def __init__(self, n, batch_size, steps_per_epoch, seed, stage, start_step, total_steps, rank=0, world_size=1):
        self.n, self.batch_size, self.steps_per_epoch = n, batch_size, steps_per_epoch
        self.seed, self.stage, self.start_step, self.total_steps = seed, stage, start_step, total_steps
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return (self.total_steps - self.start_step) * self.batch_size // self.world_size

    def __iter__(self):
        per_rank = self.batch_size // self.world_size
        permutation_epoch, permutation = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != permutation_epoch:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.stage, epoch))
                permutation_epoch, permutation = epoch, torch.randperm(self.n, generator=g).tolist()
            for b in range(per_rank):
                k = position * self.batch_size + self.rank * per_rank + b
                yield permutation[k % self.n], mix_seed(self.seed, self.stage, epoch, k)


def mix_seed(*numbers):
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def ignore_stop_signals(worker_id):  # Ctrl-C, or a SIGTERM to the process group: the main process alone decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def load_validation(pairs, val_crop, seed, problems, blur_length=blurdm.BLUR_LENGTH):
    """Fixed centre crops (val_crop 0: full images) as uint8; photographs get a fixed seeded blur each."""
    images = []
    for j, (blur_path, sharp_path) in enumerate(pairs):
        try:
            blur, sharp = load_pair(blur_path, sharp_path)
        except ValueError as err:
            problems.append(f"{err}; left out of validation")
            continue
        H, W = sharp.shape[-2:]
        margin = 0 if blur is not None or val_crop else min(BLUR_MARGIN, (min(H, W) - 8) // 4)
        h, w = (min(val_crop, H), min(val_crop, W)) if val_crop else (H - 2 * margin, W - 2 * margin)
        top, left = (H - h) // 2, (W - w) // 2
        if blur is None:
            g = torch.Generator().manual_seed(mix_seed(seed, 0, j))
            blur, sharp = render_window(sharp, top, left, h, w, g, blur_length)
        else:
            blur, sharp = blur[:, top:top + h, left:left + w], sharp[:, top:top + h, left:left + w]
        images.append((blurdm.to_uint8(blur), blurdm.to_uint8(sharp)))
    return images


def evenly_spaced(items, count):
    if count >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------
# Model pieces the loop needs


class TrainingLoss(nn.Module):
    """DDP synchronises gradients through forward(), so the stage's loss is computed inside one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, blur, sharp, stage):
        return self.model.loss(blur, sharp, stage)


@torch.inference_mode()
def validate(model, images, stage, device):
    """Mean PSNR and SSIM (BLURDM.md §8) of deblur() on uint8-rounded outputs. Stage 1 of a model with a prior
    uses the sharp encoder's prior SE(blur, sharp), since the blur encoder is not trained yet (an upper bound)."""
    psnrs, ssims = [], []
    for blur_u8, sharp_u8 in images:
        blur, sharp = blur_u8.to(device)[None].float() / 255, sharp_u8.to(device)[None].float() / 255
        prior = None
        if model.cfg.prior and stage == 1:
            model.eval()
            prior = model.sharp_prior(blur, sharp)
        out = blurdm.to_uint8(model.deblur(blur, prior=prior)[0])
        psnrs.append(blurdm.psnr(out, sharp_u8.to(device)))
        ssims.append(blurdm.ssim(out, sharp_u8.to(device)))
    model.set_stage(stage)  # back to this stage's training modes (the stage-1 branch switched to eval)
    return sum(psnrs) / len(psnrs), sum(ssims) / len(ssims)


def rng_state():
    """Every generator the loop draws from, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def parse_lengths(text, name, kind):
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} takes one or three positive numbers (stage 1, 2, 3), got {text!r}")
    return values


def blur_range(text):
    """--blur-length LO,HI: the range of camera path lengths, in pixels, for photographs blurred on the fly."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes LO,HI in pixels, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"needs 0 <= LO <= HI, got {text!r}")
    return lo, hi


def fail(message):
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="GoPro, its flat copy, RealBlur, HIDE, blur/+sharp/, or photos")
    parser.add_argument("--out", default="out", help="checkpoints and log.jsonl (default: out)")
    parser.add_argument("--preset", default="paper", choices=list(blurdm.PRESETS))
    parser.add_argument("--no-prior", action="store_true", help="the baseline backbone alone (ablation)")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), help="run this stage only (default: 1, 2, 3)")
    parser.add_argument("--init", help="checkpoint whose weights the first stage starts from")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--iters", help="iterations per stage: a,b,c (or one number for every stage)")
    length.add_argument("--epochs", help="epochs per stage: a,b,c (default: the preset's stage_epochs)")
    parser.add_argument("--batch", type=int, help="global batch size, split over the processes (preset: 20)")
    parser.add_argument("--crop", type=int, help="training crop size, a multiple of 4 (preset: 256)")
    parser.add_argument("--lr", type=float, help="Adam learning rate at the start of each stage (preset: 1e-4)")
    parser.add_argument("--lr-min", type=float, help="end of the cosine decay (preset: 1e-6)")
    parser.add_argument("--seed", type=int, help="(preset: 2023)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (0: load in the loop)")
    parser.add_argument("--blur-length", type=blur_range, default=blurdm.BLUR_LENGTH,
                        help="camera path lengths in pixels for sharp photographs blurred on the fly "
                             "(default: %g,%g; 0,30 also shows the network sharp inputs)" % blurdm.BLUR_LENGTH)
    parser.add_argument("--cache-mb", type=int, default=1024,
                        help="decoded images each worker keeps in memory, in MiB (default: 1024; 0: decode every time)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision on CUDA (ignored on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA)")
    parser.add_argument("--val-every", type=int, default=5000, help="validate every N steps and at each stage end")
    parser.add_argument("--val-count", type=int, default=100, help="at most this many validation images")
    parser.add_argument("--val-crop", type=int, default=512, help="centre crop for validation (0: full images)")
    parser.add_argument("--save-every", type=int, default=1000, help="write out/last.pt every N steps")
    parser.add_argument("--log-every", type=int, default=50, help="write a log.jsonl line every N steps")
    args = parser.parse_args()

    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT's pattern)
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available")
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    try:
        train(args, rank, world_size, device, master, say)
    finally:
        if distributed:
            dist.destroy_process_group()


def train(args, rank, world_size, device, master, say):
    try:
        overrides = {k: v for k, v in dict(batch_size=args.batch, crop=args.crop, lr=args.lr, lr_min=args.lr_min,
                                           seed=args.seed).items() if v is not None}
        cfg = blurdm.BlurDMConfig.preset(args.preset, prior=not args.no_prior, **overrides)
        if cfg.crop % 4 or cfg.crop <= 0:
            raise ValueError(f"--crop must be a positive multiple of 4, got {cfg.crop}")
        for name in ("save_every", "log_every"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if min(args.workers, args.val_every, args.val_count, args.val_crop) < 0:
            raise ValueError("--workers, --val-every, --val-count and --val-crop cannot be negative")
        if cfg.batch_size % world_size:
            raise ValueError(f"--batch {cfg.batch_size} does not split evenly over {world_size} processes")
        layout, splits, problems = find_pairs(args.data)
    except ValueError as err:
        fail(err)
    amp = args.amp if device.type == "cuda" else None
    if args.amp and not amp:
        say(f"note: --amp {args.amp} ignored on CPU (fp32)")
    if args.compile and device.type != "cuda":
        say("note: --compile ignored on CPU")
    out = Path(args.out)
    if master:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            fail(f"{out}: cannot create the output folder ({err.strerror})")

    # data: the test split validates when there is one, else a fixed held-out subset
    say(f"data: {args.data}: {layout} layout, " + ", ".join(f"{len(p)} {s} pairs" for s, p in splits.items())
        + (" (blurred on the fly)" if layout == "sharp-photos" else ""))
    if "train" not in splits:
        fail(f"{args.data}: the {layout} layout holds no training split (only {', '.join(splits)}); "
             "HIDE and test-only folders are for evaluation (sample.py)")
    train_pairs = check_pairs(splits["train"], cfg.crop, problems)
    if "test" in splits:
        val_pairs = evenly_spaced(splits["test"], args.val_count)
    else:
        order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held_out = set(order[:min(args.val_count, len(train_pairs) // 10 or 1)]) if len(train_pairs) > 1 else set()
        val_pairs = [p for i, p in enumerate(train_pairs) if i in held_out] or train_pairs[:min(1, args.val_count)]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held_out]
        say(f"validation: {len(val_pairs)} held-out {'photographs (fixed blur)' if layout == 'sharp-photos' else 'pairs'}"
            + ("" if held_out else " (the only image, also trained on)"))
    val_pairs = check_pairs(val_pairs, 8, problems)
    for line in problems[:10]:
        say(f"warning: {line}")
    if len(problems) > 10:
        say(f"warning: ... and {len(problems) - 10} more problems")
    if not train_pairs:
        fail(f"{problems[0].removesuffix('; skipped')}; no usable training pairs left" if problems
             else f"{args.data}: no usable training pairs")
    val_images = load_validation(val_pairs, args.val_crop, cfg.seed, problems, args.blur_length)
    if val_images:
        input_psnr = sum(blurdm.psnr(b, s) for b, s in val_images) / len(val_images)
        say(f"validation: {len(val_images)} images, " + (f"centre crops of at most {args.val_crop}px" if args.val_crop else
            "full size") + f", the blurry input scores PSNR {input_psnr:.2f} dB; SSIM: {blurdm.SSIM_RECIPE}")

    # how long each stage runs
    steps_per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    try:
        if args.iters:
            stage_steps = parse_lengths(args.iters, "--iters", int)
            cfg.stage_epochs = tuple(round(s / steps_per_epoch, 4) for s in stage_steps)
        else:
            epochs = parse_lengths(args.epochs, "--epochs", float) if args.epochs else list(cfg.stage_epochs)
            cfg.stage_epochs = tuple(epochs)
            stage_steps = [math.ceil(e * steps_per_epoch) for e in epochs]
    except ValueError as err:
        fail(err)
    run = {**{k: getattr(cfg, k) for k in ("crop", "batch_size", "lr", "lr_min", "seed")}, "stage_steps": stage_steps}

    # where to start: resume out/last.pt, else go on from it, else --init, else the previous stage's checkpoint
    seed_everything(cfg.seed + rank)
    model = blurdm.BlurDM(cfg).to(device)
    if world_size > 1 and device.type == "cuda":  # SE's BatchNorm sees the global batch, as on one GPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    stages, start_step, resume, best_psnr = ([args.stage] if args.stage else [1, 2, 3]), 0, None, None
    last = out / "last.pt"
    try:
        state = blurdm.load_checkpoint(last, map_location="cpu") if last.exists() else None  # RNG states stay CPU tensors
        last_stage = state["stage"] if state else None
        last_finished = state is not None and state["step"] >= stage_steps[last_stage - 1]
        if state and last_stage in stages and not last_finished:
            differing = [k for k in run if state.get("run", {}).get(k) != run[k]]
            if differing:
                raise ValueError(f"{last}: saved by a run with other settings ("
                                 + ", ".join(f"{k} {state['run'].get(k)} vs {run[k]}" for k in differing)
                                 + "); rerun the same command to resume, or pass another --out")
            model.load_weights(state, last)
            resume, start_step, best_psnr = state, state["step"], state.get("best_psnr")
            stages = [s for s in stages if s >= last_stage]
            say(f"resuming stage {last_stage} at step {start_step} from {last}")
        elif last_finished and (last_stage in stages or (last_stage == stages[0] - 1 and args.init is None)):
            model.load_weights(state, last)
            best_psnr = state.get("best_psnr")
            stages = [s for s in stages if s > last_stage]
            say(f"{last} finished stage {last_stage}; "
                + (f"stage {stages[0]} starts from it" if stages else "nothing left to do"))
        else:
            if state:
                say(f"note: {last} (stage {last_stage}) will be overwritten by this run")
            init = args.init
            if init is None and stages[0] > 1:
                init = out / f"stage{stages[0] - 1}.pt"
                if not init.exists():
                    raise ValueError(f"stage {stages[0]} starts from a stage {stages[0] - 1} checkpoint: "
                                     f"pass --init (for instance --init {init})")
            if init is not None:
                model.load_weights(blurdm.load_checkpoint(init, map_location="cpu"), init)
                say(f"stage {stages[0]} starts from the weights of {init}")
    except ValueError as err:
        fail(err)
    if resume is not None and master:
        set_rng_state(resume["rng"])

    # Ctrl-C / SIGTERM: finish the step, save, exit; a second Ctrl-C aborts at once
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        say(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to abort)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    dataset = PairDataset(train_pairs, cfg.crop, args.cache_mb, args.blur_length)
    log = open(out / "log.jsonl", "a") if master else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16) if amp else nullcontext()
    bad_files = set()
    stage_descriptions = {1: "sharp encoder + deblurrer", 2: "blur encoder + estimators (prior loss)",
                          3: "blur encoder + estimators + deblurrer"}

    for stage in stages:
        total = stage_steps[stage - 1]
        parameters = model.set_stage(stage)
        optimizer = torch.optim.Adam(parameters, lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=cfg.lr_min)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        step = start_step
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            resume = None
        elif rank > 0:
            seed_everything(mix_seed(cfg.seed, rank, stage, step))
        start_step = 0
        train_module = TrainingLoss(model)
        if args.compile and device.type == "cuda":
            train_module = torch.compile(train_module)
        if world_size > 1:
            train_module = DDP(train_module, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = StepSampler(len(train_pairs), cfg.batch_size, steps_per_epoch, cfg.seed, stage, step, total,
                              rank, world_size)
        loader = DataLoader(dataset, batch_size=cfg.batch_size // world_size, sampler=sampler,
                            num_workers=args.workers, worker_init_fn=ignore_stop_signals, pin_memory=device.type == "cuda")
        batches = iter(loader)
        what = stage_descriptions[stage] if cfg.prior else "backbone, no prior"
        say(f"stage {stage} ({what}): steps {step}..{total} of batch {cfg.batch_size} at {cfg.crop}px"
            f" ({total / steps_per_epoch:.4g} epochs of {len(train_pairs)} pairs), lr {cfg.lr:g} -> {cfg.lr_min:g}")
        interactive = sys.stderr.isatty()  # a bar for people; one line a log step for log files (nohup, sbatch)
        bar = tqdm(total=total, initial=step, desc=f"stage {stage}", disable=not (master and interactive),
                   dynamic_ncols=True)

        def save(path):
            model.save(path, stage=stage, step=step, run=run, optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rng_state(),
                       best_psnr=best_psnr, data=str(args.data), layout=layout)

        while step < total:
            t0 = time.perf_counter()
            blur, sharp, failed = next(batches)
            for i in failed[failed >= 0].tolist():
                if master and i not in bad_files:
                    bad_files.add(i)
                    try:
                        load_pair(*train_pairs[i])
                    except ValueError as err:
                        bar.write(f"warning: {err}; skipped")
            blur, sharp = blur.to(device, non_blocking=True), sharp.to(device, non_blocking=True)
            t1 = time.perf_counter()
            with autocast:
                loss = train_module(blur, sharp, stage)
            # one small all-reduce a step: every rank sees the same loss and the same stop request
            stats = torch.stack([loss.detach().float(), torch.tensor(float(stop["signal"] is not None), device=device)])
            if world_size > 1:
                dist.all_reduce(stats)
                stats[0] /= world_size
            loss_value, stopping = stats[0].item(), stats[1].item() > 0
            if not math.isfinite(loss_value):
                bar.close()
                kept = f"{out / 'last.pt'} is kept" if (out / "last.pt").exists() else "no checkpoint was written"
                fail(f"loss is {loss_value} at stage {stage} step {step}; stopped, {kept} "
                     "(lower --lr, or use --amp bf16 instead of fp16)")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            t2 = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}", refresh=False)
            if master and (step % args.log_every == 0 or step == total):
                if not interactive:
                    say(f"stage {stage} step {step} | loss {loss_value:.4f} | lr {lr:.1e} | "
                        f"{1000 * (t2 - t0):.0f} ms (data {1000 * (t1 - t0):.0f} ms)", flush=True)
                log.write(json.dumps({"stage": stage, "step": step, "loss": loss_value, "lr": lr,
                                      "step_ms": round(1000 * (t2 - t0), 2), "data_ms": round(1000 * (t1 - t0), 2),
                                      "time": time.time()}) + "\n")
                log.flush()
            finished = step == total
            if master and val_images and ((args.val_every and step % args.val_every == 0) or finished):
                psnr, ssim = validate(model, val_images, stage, device)
                counts = not (cfg.prior and stage == 1)  # stage 1 validates with SE's prior: not what sample.py runs
                improved = counts and (best_psnr is None or psnr > best_psnr)
                if improved:
                    best_psnr = psnr
                bar.write(f"val stage {stage} step {step} | PSNR {psnr:.2f} dB | SSIM {ssim:.4f} | "
                          f"{len(val_images)} images" + (" | prior SE(blur, sharp)" if not counts else "")
                          + (" | best, saved best.pt" if improved else ""))
                log.write(json.dumps({"stage": stage, "step": step, "val_psnr": psnr, "val_ssim": ssim}) + "\n")
                log.flush()
                if improved:
                    save(out / "best.pt")
            if step % args.save_every == 0 or finished or stopping:
                if not all(torch.isfinite(p).all() for p in parameters):
                    bar.close()
                    fail(f"non-finite weights at stage {stage} step {step}; stopped, the last good checkpoint is kept")
                if world_size > 1:  # gradients are averaged, so every rank must hold the same weights
                    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()])
                    gathered = [torch.empty_like(fingerprint) for _ in range(world_size)]
                    dist.all_gather(gathered, fingerprint)
                    if not all(torch.equal(g, gathered[0]) for g in gathered):
                        fail(f"the weights differ between ranks at stage {stage} step {step}")
                    if master:
                        log.write(json.dumps({"stage": stage, "step": step, "ranks_agree": world_size}) + "\n")
                if master:
                    save(out / "last.pt")
                    if finished:
                        save(out / f"stage{stage}.pt")
            if stopping:
                bar.close()
                say(f"stopped at stage {stage} step {step}; saved {out / 'last.pt'}; rerun the same command to resume")
                if world_size > 1:
                    dist.barrier()
                sys.exit(128 + (stop["signal"] or signal.SIGTERM))
        bar.close()
        del batches
        if world_size > 1:
            dist.barrier()  # the next stage starts from rank 0's saved state on every rank alike

    if bad_files:
        say(f"skipped {len(bad_files)} training pairs that could not be decoded (listed above)")
    if problems:
        say(f"{len(problems)} data problems (unmatched or unreadable files) were reported above")
    best = out / "best.pt"
    final = best if best.exists() else out / "last.pt"
    if not best.exists():
        say(f"note: no best.pt (it is chosen from stage 2-3 validation); {final} is the latest model")
    say(f"done. deblur with: python sample.py blurry.png --ckpt {final}")


if __name__ == "__main__":
    main()
