"""
Deblur photographs with a BlurDM checkpoint: files, folders or glob patterns in, <stem>_deblurred.png out.

    python sample.py blurry.png                             # -> blurry_deblurred.png beside it
    python sample.py photos/ -r -o out/                     # a folder and its sub-folders, mirrored under out/
    python sample.py "shots/**/*.jpg" -r -o out/            # a quoted pattern, expanded here
    python sample.py blurry.png --amp fp32                  # the exact path (default: bf16 where native)
    python sample.py blurry.png --ckpt MIMO-UNetPlus.pkl    # published MIMO-UNet(+) or official BlurDM weights
    python sample.py huge.jpg --tile 1024                   # tiles of 1024 px sharing one prior; 0 never tiles

The checkpoint alone defines the model (weights/blurdm-demo.pt unless --ckpt). To score results against ground
truth (PSNR / SSIM), use train.py --eval-only.
"""

import argparse
import collections
import itertools
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import blurdm

DEFAULT_CKPT = Path(__file__).resolve().parent / "weights" / "blurdm-demo.pt"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns (quote them)")
parser.add_argument("-o", "--out", metavar="PATH", help="output file (one input) or folder (sub-folders mirrored); "
                                                         "default: <stem>_deblurred.png beside each input")
parser.add_argument("-r", "--recursive", action="store_true", help="look into sub-folders, and let ** match them")
parser.add_argument("--force", action="store_true", help="overwrite existing outputs (an input is never overwritten)")
parser.add_argument("--ckpt", metavar="PATH", help="the checkpoint; it defines the model (default: the demo weights)")
parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
parser.add_argument("--amp", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="auto (default): bf16 where computed natively (CUDA GPUs with bf16, CPUs with AVX-512 "
                         "BF16 or AMX), else fp32; fp32: the exact path; bf16, fp16: autocast where native")
parser.add_argument("--tile", type=int, metavar="PX", help="larger images in overlapping tiles of this size sharing "
                    "one prior (default: 1536 on a CPU, what free memory allows on a GPU; 0 never tiles)")
parser.add_argument("--overlap", type=int, default=64, metavar="PX", help="pixels that neighbouring tiles share")
parser.add_argument("--seed", type=int, default=blurdm.INFERENCE_SEED, metavar="N",
                    help="seed of the prior's start noise (default 2023, as the official code)")


def is_pattern(text):
    return any(c in text for c in "*?[")


def is_input_image(path):
    return path.suffix.lower() in blurdm.IMAGE_SUFFIXES and not path.stem.endswith(blurdm.DEBLURRED_TAG)


def find_inputs(specs, recursive):
    """The INPUT arguments as [(image, base folder)], and one line for each argument that names no image. Outputs
    under -o mirror the image's path below its base: the folder given, a pattern's fixed part, or a file's folder."""
    found, problems = [], []
    for spec in specs:
        path, files, why = Path(spec), [], "no such file or folder"
        if not spec.strip():
            why = "an empty input name (an unset variable?)"
        elif path.is_file():
            files = [(path, path.parent)]
        elif path.is_dir():
            files = [(f, path) for f in blurdm.list_images(path, recursive) if is_input_image(f)]
            why = "no images in this folder" + ("" if recursive else " (-r looks into sub-folders)")
        elif is_pattern(spec):
            base = Path(*itertools.takewhile(lambda part: not is_pattern(part), path.parts))
            matched = blurdm.glob_files(base, path.parts[len(base.parts):], recursive)
            files = [(f, base) for f in matched if is_input_image(f)]
            why = "no images match this pattern"
        if not files:
            problems.append(f"{spec}: {why}")
        found += files
    unique = {}
    for path, base in found:
        unique.setdefault(path.resolve(), (path, base))  # the same image named twice runs once
    return list(unique.values()), problems


def output_paths(inputs, out):
    """Where each input's result goes: beside it, the file -o names (one input only), or mirrored under -o. Inputs
    that differ only in their suffix (a.png, a.jpg) keep it in their output's name (a_png_deblurred.png)."""
    if out is not None and Path(out).suffix and not Path(out).is_dir() and not out.endswith(("/", os.sep)):
        if Path(out).suffix.lower() not in blurdm.WRITE_SUFFIXES:
            raise ValueError(f"-o {out}: cannot write {Path(out).suffix} images (only "
                             f"{', '.join(blurdm.WRITE_SUFFIXES)}; a folder name ends with /)")
        if len(inputs) != 1:
            raise ValueError(f"-o {out}: a file name, but there are {len(inputs)} inputs; give a folder instead")
        return [Path(out)]
    folder = lambda src, base: src.parent if out is None else Path(out) / os.path.relpath(src.parent, base)
    stems = [folder(src, base) / src.stem for src, base in inputs]
    shared = {stem for stem, n in collections.Counter(stems).items() if n > 1}
    outputs, first = [], {}
    for stem, (src, _) in zip(stems, inputs):
        suffix = f"_{src.suffix[1:]}" if stem in shared else ""
        outputs.append(dst := stem.with_name(f"{stem.name}{suffix}{blurdm.DEBLURRED_TAG}.png"))
        if first.setdefault(dst, src) != src:  # a.png in two folders given to one -o folder
            raise ValueError(f"{first[dst]} and {src} would both write {dst}; give them separate -o folders")
    return outputs


def deblur_file(model, rgb, extras, dst, args, device, amp):
    """Deblur one image (3, H, W) in [0, 1] into the file `dst`, atomically; returns the seconds the model took."""
    gray = extras.pop("grayscale")  # a grayscale file stays grayscale
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with blurdm.atomic_path(dst) as tmp:
            open(tmp, "wb").close()  # an unwritable place fails here, before the image costs any time
            start = time.perf_counter()
            with amp:
                out = blurdm.deblur_tiled(model, rgb.to(device), args.tile, args.overlap, args.seed)
            out = out.float().cpu()  # waits for the device, so the time is the deblurring's
            seconds = time.perf_counter() - start
            if not torch.isfinite(out).all():
                raise ValueError(f"{dst}: the model's output is not finite (NaN or inf); nothing written")
            blurdm.write_image(out.mean(0, keepdim=True) if gray else out, tmp, **extras)  # no tint on gray
    except OSError as err:
        raise OSError(f"{dst}: cannot write here ({err.strerror or err})") from None
    return seconds


def say(message, error=False):
    tqdm.write(f"error: {message}" if error else message, file=sys.stderr if error else sys.stdout)


def main(argv=None):
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2 ** 63:
        parser.error("--seed takes 0 to 2^63 - 1")
    warnings.filterwarnings("ignore", message="Image size .* exceeds limit")  # up to 2x Pillow's limit: --tile copes
    try:
        tiling = blurdm.tiling_problem(args.tile, args.overlap)
        if tiling:
            raise ValueError(f"--tile {args.tile} --overlap {args.overlap}: {tiling}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to this PyTorch build")
        inputs, problems = find_inputs(args.inputs, args.recursive)
        if not inputs:  # nothing to do
            raise ValueError("; ".join(problems))
        outputs = output_paths(inputs, args.out)
        if args.ckpt is None and not DEFAULT_CKPT.exists():
            raise ValueError(f"{DEFAULT_CKPT}: the default demo weights are not in this checkout; "
                             "pass --ckpt PATH to a BlurDM checkpoint (train.py writes one)")
        device = blurdm.pick_device(args.device)
        model = blurdm.load_model(args.ckpt or DEFAULT_CKPT).to(device)
    except (ValueError, OSError) as err:
        say(str(err), error=True)
        return 1
    amp, precision, note = blurdm.autocast(device, args.amp)
    say(f"{args.ckpt or DEFAULT_CKPT} on {device}, {precision} | {len(inputs)} image{'s' * (len(inputs) != 1)}")
    if note:
        say(f"note: --amp {note}")
    for problem in problems:
        say(problem, error=True)
    input_paths = {src.resolve() for src, _ in inputs}
    skipped, failed, seconds = 0, len(problems), []  # seconds: one entry per image written
    bar = tqdm(list(zip(inputs, outputs)), unit="image", disable=len(inputs) < 2, file=sys.stderr, dynamic_ncols=True)
    for i, ((src, _), dst) in enumerate(bar, 1):
        tag = f"[{i}/{len(inputs)}] {src}"
        try:
            if dst.resolve() in input_paths:
                raise ValueError(f"{src}: its output {dst} is an input; refusing to overwrite it")
            if dst.exists() and not args.force:
                skipped += 1
                say(f"{tag}: {dst} exists; skipped (--force overwrites it)")
                continue
            rgb, extras = blurdm.read_image(src, extras=True)
            if extras["alpha"] is not None and dst.suffix.lower() in blurdm.NO_ALPHA_SUFFIXES:
                say(f"{tag}: {dst.suffix} has no alpha channel; the transparency is dropped")
            took = deblur_file(model, rgb, extras, dst, args, device, amp)
        except (ValueError, OSError, RuntimeError, MemoryError) as err:  # a bad file, or out of memory: carry on
            failed += 1
            torch.cuda.empty_cache()  # the next image starts from a clean allocator (a no-op without CUDA)
            line = blurdm.error_line(err)  # ours name the file; torch's do not
            hint = " (a smaller --tile needs less memory)" if blurdm.out_of_memory(err) else ""
            say(line if isinstance(err, (ValueError, OSError)) else f"{src}: {line}{hint}", error=True)
            continue
        seconds.append(took)
        say(f"{tag} -> {dst} | {rgb.shape[2]}x{rgb.shape[1]} | {took:.2f} s")

    average = f" | {sum(seconds) / len(seconds):.2f} s an image on average ({device}, {precision})" if seconds else ""
    say(f"done: {len(seconds)} written, {skipped} skipped, {failed} failed{average}")
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the temp file in progress is removed
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
