"""Deblur photographs with a BlurDM checkpoint: files and folders in, <stem>_deblurred.png out.

    python sample.py blurry.png                           # -> blurry_deblurred.png beside it
    python sample.py photos/ -o out/                      # a folder, sub-folders mirrored in out/
    python sample.py blurry.png --ckpt MIMO-UNetPlus.pkl  # MIMO-UNet(+) or official BlurDM weights
    python sample.py huge.jpg --tile 1024                 # tiles sharing one prior; 0: never

The checkpoint defines the model (default: the demo weights). train.py --eval-only scores.
"""

import argparse
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import blurdm

DEMO = Path(__file__).resolve().parent / "weights" / "blurdm-demo.pt"

def name(text):  # an argparse type: a path, never empty (an unset variable)
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name")
    return text

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("inputs", nargs="+", type=name, metavar="INPUT", help="image files, folders")
parser.add_argument("-o", "--out", type=name, help="output file (one input) or folder")
parser.add_argument("--force", action="store_true", help="rewrite outputs that exist")
parser.add_argument("--ckpt", type=name, default=str(DEMO), help="the checkpoint (default: demo)")
parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
parser.add_argument("--amp", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="auto: bf16 where native, else fp32; fp32: the exact path")
parser.add_argument("--tile", type=int, default=1536, help="tile size in px (0: whole images)")
parser.add_argument("--overlap", type=int, default=64, help="pixels neighbouring tiles share")
parser.add_argument("--seed", type=int, default=blurdm.INFERENCE_SEED, help="of the start noise")

def jobs(inputs, out):
    """[(image, output path)] for the INPUT arguments, and a line for each that names no image."""
    found, problems = [], []
    for spec in map(Path, inputs):
        images = blurdm.list_images(spec) if spec.is_dir() else [spec] * spec.is_file()
        if not images:
            problems.append(f"{spec}: " + ("no images in it" if spec.is_dir() else "no such file"))
        for src in images:
            folder = src.parent if out is None else Path(out) / src.parent.relative_to(
                spec if spec.is_dir() else src.parent)
            found.append((src, folder / f"{src.stem}{blurdm.DEBLURRED_TAG}.png"))
    twice = [dst for dst, n in Counter(dst for _, dst in found).items() if n > 1]
    if twice:  # a.png and a.jpg, or a.png in two folders given one -o
        raise ValueError(f"{twice[0]}: the output of two inputs; rename one, or use -o folders")
    if out and Path(out).suffix.lower() in blurdm.IMAGE_SUFFIXES:  # -o FILE
        if len(found) != 1:
            raise ValueError(f"-o {out}: a file name, but {len(found)} inputs; give a folder")
        found = [(found[0][0], Path(out))]
    return found, problems

def main(args):
    try:
        todo, problems = jobs(args.inputs, args.out)
        device = blurdm.pick_device(args.device)
    except ValueError as err:  # -o or --device
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        model = blurdm.load_model(args.ckpt).to(device, memory_format=torch.channels_last)
    except Exception as err:
        print(f"error: {say_file(args.ckpt, err)}", file=sys.stderr)
        return 1
    amp, precision = blurdm.autocast(device, args.amp)
    print(f"{args.ckpt} on {device}, {precision} | {len(todo)} image{'s' * (len(todo) != 1)}")
    if args.amp not in ("auto", precision):
        print(f"note: --amp {args.amp} is not native on {device}: it runs in fp32")
    failed, written, seconds = len(problems), 0, 0.0
    for line in problems:
        tqdm.write(f"error: {line}", file=sys.stderr)
    for src, dst in tqdm(todo, unit="image", disable=len(todo) < 2, file=sys.stderr):
        try:
            if dst.resolve() == src.resolve():
                raise ValueError(f"its output {dst} is the input itself")
            if dst.exists() and not args.force:
                tqdm.write(f"{dst} exists; skipped (--force rewrites it)")
                continue
            rgb, info = blurdm.read_image(src, extras=True)
            start = time.time()
            with amp:
                out = blurdm.deblur_tiled(model, rgb.to(device), args.tile, args.overlap, args.seed)
            out = out.float().cpu()  # waits for the device: the time is the deblurring's
            if not out.isfinite().all():  # an overflow is never written as a white pixel
                raise ValueError("the model's output is not finite; nothing written")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with blurdm.atomic(dst) as tmp:  # SIGTERM and Ctrl-C leave no partial file
                blurdm.write_image(out.mean(0, keepdim=True) if info["grayscale"] else out, tmp,
                                   info["icc_profile"])
        except Exception as err:  # a bad file, or out of memory: say so, carry on
            failed += 1
            tqdm.write(f"error: {say_file(src, err)}", file=sys.stderr)
            continue
        written, seconds = written + 1, seconds + time.time() - start
        tqdm.write(f"{src} -> {dst} | {rgb.shape[2]}x{rgb.shape[1]} | {time.time() - start:.2f} s")
    print(f"done: {written} written, {failed} failed" + (
        f" | {seconds / written:.2f} s an image ({device}, {precision})" if written else ""))
    return 1 if failed else 0

def say_file(path, err):
    """The error as one line that names the file it is about."""
    line = blurdm.error_line(err)
    return line if str(path) in line else f"{path}: {line}"

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: no temp file stays
    try:
        sys.exit(main(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)
