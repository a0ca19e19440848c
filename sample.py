"""
Deblur photographs with a BlurDM checkpoint, and score the results against ground truth.

    python sample.py blurry.png                                  # -> blurry_deblurred.png beside it
    python sample.py photos/ --recursive -o out/ --compare       # a folder; sub-folders mirrored under out/
    python sample.py "GOPRO_Large/test/*/blur" -o out/gopro --gt GOPRO_Large      # PSNR / SSIM, out/gopro/scores.csv
    python sample.py huge.jpg --tile 1024 --tile-overlap 64      # tiled by hand (automatic over --max-pixels)

The checkpoint alone defines the model (weights/blurdm-demo.pt unless --ckpt). Large images are deblurred in
overlapping tiles blended with linear ramps; all tiles share one sharp prior computed on the whole image, as the
untiled run does, so tiling changes nothing but the context seen near tile borders.
"""

import argparse
import csv
import glob
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import blurdm

DEFAULT_CKPT = Path(__file__).resolve().parent / "weights" / "blurdm-demo.pt"
OUTPUT_TAGS = ("_deblurred", "_compare")
BLUR_TO_SHARP = {"blur": "sharp", "input": "target", "blurry": "sharp"}  # folder names of a pair, for --gt  # files named <stem>_deblurred.* and <stem>_compare.* are our outputs

# Memory, measured on CPU as the peak RSS of BlurDM.deblur (fp32, inference_mode): the deblurrer needs 1.5 KB a pixel at
# width 32 (the paper and mimo-unet presets, whatever the depth), 0.6-0.8 KB at width 16 (demo), 0.4 KB at width 8
# (tiny): at most ~48 bytes a pixel per channel of width; the budget counts 60 to leave room for a GPU allocator's
# fragmentation. The blur encoder needs 80-300 bytes a pixel (latent_dim 64-256). A 6 GiB budget fits an 8 GB GPU
# beside the CUDA context and leaves a 24 GiB CPU machine most of its memory: width 32 tiles above 3.4 megapixels
# (1920x1080 runs whole, a 4000x3000 photo as 3x2 tiles of 1376x1536), width 16 above 6.7 megapixels.
MEMORY_BUDGET = 6 * 2 ** 30
BYTES_PER_PIXEL_PER_WIDTH = 60
PRIOR_MAX_PIXELS = 16_000_000  # <= 4.8 GB for the blur encoder; larger images: prior from a downscaled copy


class InputError(Exception):
    """A problem with the command line as a whole: reported in one line, nothing is processed."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or glob patterns (quote them)")
    p.add_argument("-o", "--out", metavar="PATH",
                   help="output file (one input) or folder (sub-folders mirrored); default: <stem>_deblurred.png "
                        "beside each input")
    p.add_argument("-r", "--recursive", action="store_true", help="look into sub-folders (and let ** match them)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (an input is never overwritten)")
    p.add_argument("--compare", action="store_true", help="also write <stem>_compare.png: blurry | deblurred")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), metavar="PATH",
                   help="BlurDM checkpoint; it defines the model (default: weights/blurdm-demo.pt)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--seed", type=int, default=blurdm.INFERENCE_SEED, metavar="N",
                   help="seed of the prior's start noise (default 2023, as the official code)")
    p.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"),
                   help="autocast: fp16 or bf16 on CUDA, bf16 on the CPU (2-3x faster where it has AVX-512 BF16 or AMX)")
    p.add_argument("--tile", type=int, default=0, metavar="SIZE",
                   help="tile size in pixels (default 0: tile only images over --max-pixels, in the largest tiles "
                        "that fit)")
    p.add_argument("--tile-overlap", type=int, default=64, metavar="PX",
                   help="pixels neighbouring tiles share (default 64)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="tile images with more pixels than this; 0 never tiles (default: a 6 GiB budget for the "
                        "model's width: 3.4 M at width 32)")
    p.add_argument("--gt", metavar="PATH",
                   help="ground truth: a folder (paired by relative path, then by file stem) or a data-set root "
                        "train.py recognises (GoPro, HIDE, RealBlur, ...): prints and saves PSNR / SSIM")
    p.add_argument("--csv", metavar="PATH", help="where --gt writes its scores (default: scores.csv in the output "
                                                 "folder)")
    args = p.parse_args(argv)
    if args.tile < 0 or args.tile_overlap < 0 or (args.max_pixels or 0) < 0:
        p.error("--tile, --tile-overlap and --max-pixels cannot be negative")
    if args.tile and args.tile < 2 * args.tile_overlap + 8:
        p.error(f"--tile {args.tile} must be at least twice --tile-overlap, plus 8 (= {2 * args.tile_overlap + 8})")
    if args.gt and not Path(args.gt).exists():
        p.error(f"--gt {args.gt}: no such file or folder")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs


def is_output_name(path):
    return path.stem.endswith(OUTPUT_TAGS)


def is_image_name(path):
    return path.suffix.lower() in blurdm.IMAGE_SUFFIXES and not path.name.startswith(".")


def images_in(folder, recursive):
    files = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(f for f in files if is_image_name(f) and not is_output_name(f) and f.is_file())


def find_inputs(specs, recursive):
    """
    Expand the INPUT arguments into [(image path, base folder)] and one-line notes on what was left out. Outputs are
    mirrored relative to the base folder: the folder given, the fixed part of a glob pattern, or a file's own folder.
    Images we wrote ourselves (*_deblurred.*, *_compare.*) are left out, so a second run does not deblur them again.
    """
    found, problems, notes = [], [], []
    for spec in specs:
        path = Path(spec)
        if path.is_file() and is_output_name(path):
            notes.append(f"{spec}: named like an output of sample.py (*_deblurred, *_compare); skipped "
                         "(rename it to deblur it)")
        elif path.is_file():
            found.append((path, path.parent))
        elif path.is_dir():
            files = images_in(path, recursive)
            if not files:
                problems.append(f"{spec}: no images in this folder" + ("" if recursive else " (--recursive looks "
                                                                                            "into sub-folders)"))
            found += [(f, path) for f in files]
        elif any(c in spec for c in "*?["):
            fixed = Path(*iter_until_magic(path.parts))
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=recursive))]
            files = [(m, fixed) for m in matches if m.is_file() and is_image_name(m) and not is_output_name(m)]
            files += [(f, fixed) for m in matches if m.is_dir() for f in images_in(m, recursive)]
            if not files:
                problems.append(f"{spec}: no images match this pattern")
            found += files
        else:
            problems.append(f"{spec}: no such file or folder")
    unique = {}
    for path, base in found:
        unique.setdefault(path.resolve(), (path, base))  # the same image named twice is deblurred once
    return list(unique.values()), problems, notes


def iter_until_magic(parts):
    for part in parts:
        if any(c in part for c in "*?["):
            return
        yield part


def plan_outputs(inputs, out):
    """[(input, base folder, output)] for every input, and the folder the scores go to by default."""
    if out is None:
        return [(p, base, p.with_name(f"{p.stem}_deblurred.png")) for p, base in inputs], None
    out_path = Path(out)
    as_file = out_path.suffix.lower() in blurdm.IMAGE_SUFFIXES and not out_path.is_dir() and not out.endswith(("/", os.sep))
    if as_file:
        if len(inputs) > 1:
            raise InputError(f"-o {out}: a file name, but there are {len(inputs)} inputs; give a folder instead")
        return [(*inputs[0], out_path)], out_path.parent
    return [(p, base, out_path / os.path.relpath(p.parent, base) / f"{p.stem}_deblurred.png") for p, base in inputs], \
        out_path


def compare_path(output):
    stem = output.stem[:-len("_deblurred")] if output.stem.endswith("_deblurred") else output.stem
    return output.with_name(f"{stem}_compare.png")


def reserve(path):
    """Create the output's folder and a temporary file beside it before any work, so an unwritable place fails fast."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"{path.parent}: cannot create the output folder ({err.strerror or err})") from None
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # same suffix: Pillow picks the format by it
    try:
        open(tmp, "wb").close()
    except OSError as err:
        raise OSError(f"{path}: cannot write here ({err.strerror or err})") from None
    return tmp


def save(rgb, path, alpha=None):
    """Write through a temporary file and a rename, so an interrupted run never leaves half an image."""
    if alpha is not None and path.suffix.lower() in (".jpg", ".jpeg", ".bmp"):
        alpha = None  # these formats have no alpha channel
    tmp = reserve(path)
    try:
        blurdm.write_image(rgb, tmp, alpha)
        os.replace(tmp, path)
    except (OSError, ValueError) as err:
        raise OSError(f"{path}: cannot write ({err})") from None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Deblurring, whole or in tiles


def image_prior(model, x, seed):
    """
    One sharp prior for the whole image, shared by all its tiles. The blur encoder ends in a global average pool, so
    the prior describes the whole image's blur; one prior per tile would modulate neighbouring tiles differently and
    show seams. Over PRIOR_MAX_PIXELS the encoder sees an area-downscaled copy (its blur is shorter in pixels).
    """
    H, W = x.shape[-2:]
    if H * W > PRIOR_MAX_PIXELS:
        scale = math.sqrt(PRIOR_MAX_PIXELS / (H * W))
        x = F.interpolate(x, size=(max(8, int(H * scale)), max(8, int(W * scale))), mode="area")
    return model.prior_for(x, seed)


def tile_layout(length, tile, overlap):
    """
    Starts and size of the tiles covering [0, length) (a multiple of 8): as few tiles as --tile allows, all the same
    size, neighbours sharing at least `overlap` pixels, every start a multiple of 8 so that the network's 1/2 and 1/4
    sampling grids fall where they fall in the untiled run.
    """
    if length <= tile:
        return [0], length
    n = math.ceil((length - overlap) / (tile - overlap))
    size = 8 * math.ceil((length + (n - 1) * overlap) / n / 8)  # n * size - (n - 1) * overlap >= length
    step = size - overlap
    return [min(i * step, length - size) for i in range(n)], size


def ramp(size, overlap, rise, fall, device):
    """
    Blend weights along one axis of a tile. On a side with a neighbour the weight rises linearly across the middle
    half of the overlap and is ~0 in its outer quarter: a tile's output is worst at its own edge (zero padding where
    the untiled run sees image), so each tile gives way to its neighbour before its edge error matters.
    """
    w = torch.ones(size, device=device)
    d = torch.arange(overlap, device=device) + 0.5  # distance from the tile's edge
    edge = ((d - overlap / 4) / (overlap / 2)).clamp(1e-4, 1)  # never exactly 0: weights are divided by their sum
    if rise and overlap:
        w[:overlap] = torch.minimum(w[:overlap], edge)
    if fall and overlap:
        w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w


def deblur_tiled(model, x, prior, tile, overlap, seed):
    """(1, 3, H, W) -> deblurred, one tile at a time; overlapping tiles are blended with normalised weights."""
    H, W = x.shape[-2:]
    overlap = 8 * math.ceil(overlap / 8)
    tile = max(8 * (tile // 8), overlap + 8)
    x = blurdm.pad_to_multiple(x, 8)  # as deblur() pads the untiled image
    Hp, Wp = x.shape[-2:]
    ys, th = tile_layout(Hp, tile, overlap)
    xs, tw = tile_layout(Wp, tile, overlap)
    out = torch.zeros_like(x)
    weight = torch.zeros_like(x[:, :1])
    corners = [(top, left) for top in ys for left in xs]
    for top, left in tqdm(corners, desc="tiles", unit="tile", leave=False, file=sys.stderr, dynamic_ncols=True):
        wy = ramp(th, overlap, top > 0, top + th < Hp, x.device)
        wx = ramp(tw, overlap, left > 0, left + tw < Wp, x.device)
        w = wy[:, None] * wx[None, :]  # (th, tw)
        piece = model.deblur(x[..., top:top + th, left:left + tw], seed, prior).float()
        out[..., top:top + th, left:left + tw] += piece * w
        weight[..., top:top + th, left:left + tw] += w
    return (out / weight)[..., :H, :W], f"{len(xs)}x{len(ys)} tiles of {tw}x{th}"  # columns x rows, as W x H


def deblur(model, x, args, max_pixels, device):
    """(1, 3, H, W) in [0, 1] on `device` -> (deblurred, a note on tiling), timed by the caller."""
    H, W = x.shape[-2:]
    tile = args.tile or (max(8 * (math.isqrt(max_pixels) // 8), 2 * args.tile_overlap + 8)
                         if max_pixels and H * W > max_pixels else 0)  # tiles mostly of overlap cost too much
    precision = precision_on(device, args.amp)
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[precision]) if precision != "fp32" else nullcontext()
    with autocast:
        prior = image_prior(model, x, args.seed)
        if tile and (H > tile or W > tile):
            return deblur_tiled(model, x, prior, tile, args.tile_overlap, args.seed)
        return model.deblur(x, args.seed, prior).float(), ""


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def precision_on(device, amp):
    """The precision --amp gives on `device`: fp16 and bf16 on CUDA, bf16 on the CPU too, fp32 otherwise."""
    return amp if (device.type == "cuda" and amp != "none") or (device.type == "cpu" and amp == "bf16") else "fp32"


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to this PyTorch build")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: Apple's MPS backend is not available here")
    return torch.device(name)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def load_model(ckpt, device):
    if Path(ckpt) == DEFAULT_CKPT and not DEFAULT_CKPT.exists():
        raise InputError(f"{ckpt}: the default demo weights are not in this checkout; "
                         "pass --ckpt PATH to a BlurDM checkpoint (train.py writes one)")
    try:
        model = blurdm.BlurDM.from_checkpoint(ckpt, map_location="cpu")
    except OSError as err:
        raise InputError(f"{ckpt}: cannot read ({err.strerror or err})") from None
    except blurdm.CheckpointError as err:
        raise InputError(str(err)) from None
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Ground truth and scores (BLURDM.md §8)


def ground_truth_index(gt):
    """
    A function input path -> (ground-truth path or None, why not), and one line saying what was found. A data-set root
    that train.find_pairs recognises maps blurry images to their sharp partners; any other folder pairs by relative
    path (suffix ignored), then by file stem when that stem is unique.
    """
    root = Path(gt)
    try:
        import train  # lazily: only --gt needs it, and train.py keeps its script under main()
        layout, splits, problems = train.find_pairs(root)
    except ModuleNotFoundError as err:
        if err.name != "train":
            raise
        layout = None
    except (ValueError, OSError):
        layout = None  # not a data set: a plain folder of ground-truth images
    if layout and layout != "sharp-photos":
        pairs = {Path(b).resolve(): Path(s) for split in splits.values() for b, s in split}
        counts = ", ".join(f"{len(v)} {k} pairs" for k, v in splits.items())

        def lookup(path, base):
            sharp = pairs.get(path.resolve())
            return (sharp, None) if sharp else (None, f"not paired with a sharp image in the {layout} data set {gt}")
        shown = "".join(f"; {p}" for p in problems[:3]) + ("; ..." if len(problems) > 3 else "")
        return lookup, f"{gt}: {layout} layout ({counts}){shown}"

    files = sorted(f for f in root.rglob("*") if is_image_name(f) and f.is_file()) if root.is_dir() else []
    by_relative = {f.relative_to(root).with_suffix("").as_posix(): f for f in files}
    by_stem = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)

    def lookup(path, base):
        relative = Path(os.path.relpath(path, base)).with_suffix("").as_posix()
        partner = "/".join(BLUR_TO_SHARP.get(part, part) for part in relative.split("/"))  # S1/blur/1 -> S1/sharp/1
        for key in (partner, relative):
            if key in by_relative and by_relative[key].resolve() != path.resolve():  # never the input itself
                return by_relative[key], None
        same_stem = [f for f in by_stem.get(path.stem, []) if f.resolve() != path.resolve()]
        if len(same_stem) == 1:
            return same_stem[0], None
        return None, (f"{len(same_stem)} files named {path.stem}.* in {gt}" if same_stem else f"no {relative}.* "
                      f"or {path.stem}.* in {gt}")
    return lookup, f"{gt}: a folder of {len(files)} ground-truth images, paired by name"


def score(output_uint8, gt_path, device):
    """(PSNR, SSIM) of a uint8 output against a ground-truth image file, as the paper's tables compute them."""
    sharp = blurdm.to_uint8(blurdm.read_image(gt_path))
    if sharp.shape != output_uint8.shape:
        raise ValueError(f"{gt_path}: ground truth is {sharp.shape[2]}x{sharp.shape[1]}, "
                         f"the output {output_uint8.shape[2]}x{output_uint8.shape[1]}")
    metric_device = device if device.type == "cuda" else torch.device("cpu")  # SSIM is float64: not on MPS
    a, b = output_uint8.to(metric_device), sharp.to(metric_device)
    return blurdm.psnr(a, b), blurdm.ssim(a, b)


def write_scores(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input", "output", "ground_truth", "psnr_db", "ssim", "seconds"])
        writer.writerows(rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Image size .* exceeds limit")  # under 2x Pillow's limit: we tile

    def say(message, error=False):
        tqdm.write(("error: " if error else "") + message, file=sys.stderr if error else sys.stdout)

    try:
        inputs, problems, notes = find_inputs(args.inputs, args.recursive)
        jobs, score_folder = plan_outputs(inputs, args.out)
        device = pick_device(args.device)
        model = load_model(args.ckpt, device)
        find_gt, gt_summary = ground_truth_index(args.gt) if args.gt else (None, None)
    except InputError as err:
        say(str(err), error=True)
        return 1
    cfg = model.cfg
    max_pixels = args.max_pixels if args.max_pixels is not None else \
        MEMORY_BUDGET // (BYTES_PER_PIXEL_PER_WIDTH * cfg.width)
    precision = precision_on(device, args.amp)
    say(f"model: {args.ckpt} (width {cfg.width}, {cfg.num_res} blocks a stage, {'with' if cfg.prior else 'no'} prior)"
        f" on {device}, {precision} | {len(jobs)} image{'s' * (len(jobs) != 1)}"
        + (f" | tiles over {max_pixels:,} pixels" if max_pixels else ""))
    if args.amp != "none" and precision == "fp32":
        say(f"--amp {args.amp} does not apply on {device} (fp16: CUDA only; bf16: CUDA and CPU); running in fp32")
    if gt_summary:
        say(f"ground truth: {gt_summary}")
    for note in notes:
        say(note)
    for problem in problems:
        say(problem, error=True)

    input_paths = {p.resolve() for p, _, _ in jobs}
    claimed = {}  # output -> the input that writes it
    written, skipped, failed = 0, len(notes), len(problems)
    seconds, rows, unscored = [], [], []
    bar = tqdm(jobs, unit="image", disable=len(jobs) < 2, file=sys.stderr, dynamic_ncols=True)
    for i, (src, base, dst) in enumerate(bar, 1):
        tag = f"[{i}/{len(jobs)}] {src}"
        targets = [dst, compare_path(dst)] if args.compare else [dst]
        try:
            if any(p.resolve() in input_paths for p in targets):
                raise ValueError(f"{src}: its output {dst} is an input; refusing to overwrite it")
            if dst.resolve() in claimed:
                raise ValueError(f"{src}: would write the same output as {claimed[dst.resolve()]} ({dst}); "
                                 "deblur it separately with its own -o")
            claimed[dst.resolve()] = src
            if dst.exists() and not args.force:
                skipped += 1
                line = f"{tag}: {dst} exists; skipped (--force overwrites it)"
                out, took = None, ""
            else:
                rgb, alpha = blurdm.read_image(src, with_alpha=True)
                reserve(dst).unlink()  # an unwritable output fails here, before the image costs any time
                x = rgb[None].to(device)
                synchronize(device)
                start = time.perf_counter()
                out, tiling = deblur(model, x, args, max_pixels, device)
                synchronize(device)
                seconds.append(time.perf_counter() - start)
                out = out[0].cpu()
                save(out, dst, alpha)
                if args.compare:
                    save(torch.cat([rgb, out], dim=2), targets[1])
                written += 1
                took = f"{seconds[-1]:.3f}"
                line = f"{tag} -> {dst} | {x.shape[-1]}x{x.shape[-2]} | {seconds[-1]:.2f} s" + \
                       (f" | {tiling}" if tiling else "")
        except (ValueError, OSError) as err:
            failed += 1
            say(str(err), error=True)
            continue
        except (RuntimeError, MemoryError) as err:  # out of memory, mostly: say what to change
            failed += 1
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next image starts from a clean allocator
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = " (a smaller --max-pixels or --tile needs less memory)" if isinstance(err, MemoryError) or \
                "memory" in first.lower() or "alloc" in first.lower() else ""
            say(f"{src}: {first}{hint}", error=True)
            continue
        if find_gt:  # an existing output is scored from its file: re-scoring needs no second deblurring
            gt_path, why = find_gt(src, base)
            if gt_path is None:
                unscored.append(f"{src}: {why}")
            else:
                try:
                    result = blurdm.to_uint8(out if out is not None else blurdm.read_image(dst))
                    p, s = score(result, gt_path, device)
                    rows.append([str(src), str(dst), str(gt_path), f"{p:.4f}", f"{s:.6f}", took])
                    line += f" | PSNR {p:.2f} dB | SSIM {s:.4f}"
                except ValueError as err:
                    failed += 1
                    say(f"cannot score {src}: {err}", error=True)
        say(line)
    bar.close()

    summary = f"done: {written} written, {skipped} skipped, {failed} failed"
    if seconds:
        summary += f" | {sum(seconds) / len(seconds):.2f} s an image on average ({device}, {precision})"
    say(summary)
    if args.gt:
        for line in unscored:
            say(f"no ground truth: {line}")
        if rows:
            psnrs, ssims = [float(r[3]) for r in rows], [float(r[4]) for r in rows]
            say(f"mean over {len(rows)} images: PSNR {sum(psnrs) / len(rows):.2f} dB | "
                f"SSIM {sum(ssims) / len(rows):.4f} "
                f"(PSNR: RGB uint8, full image, peak 255; SSIM: {blurdm.SSIM_RECIPE})")
            csv_path = Path(args.csv) if args.csv else (score_folder or jobs[0][2].parent) / "scores.csv"
            try:
                write_scores(csv_path, rows)
                say(f"scores: {csv_path}")
            except OSError as err:
                failed += 1
                say(f"{csv_path}: cannot write the scores ({err.strerror or err})", error=True)
        elif unscored:
            failed += 1
            say(f"{args.gt}: no output could be paired with a ground-truth image", error=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
