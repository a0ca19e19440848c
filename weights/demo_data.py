r"""
The data behind the demo weights, rebuilt from Debian's wallpaper packages (no download beyond apt):

    apt-get install -y --no-install-recommends plasma-workspace-wallpapers mate-backgrounds lomiri-wallpapers-16.04 \
        lxqt-themes
    python weights/demo_data.py                      # -> data/photos/{train,test}, data/heldout*/{blur,sharp}
    python weights/demo_data.py --ship runs/demo/last.pt   # -> weights/blurdm-demo.pt: its weights in fp16
    python weights/demo_data.py --example            # -> assets/example_blurry.png from assets/example_sharp.png
    python weights/demo_data.py --figure             # -> assets/figure.jpg: blurry | deblurred | sharp
    python weights/demo_data.py --history            # -> weights/history.png from weights/history.csv

Each photograph (the largest copy of it) is halved, most to about 1280 px wide. Seven are held out (data/photos/test),
and each of those also gets one fixed synthetic blur (data/heldout: blur/ and sharp/) for the model card's scores;
data/heldout-sharp pairs each held-out photograph with itself, to score what the model does to a sharp input. The
blurry inputs' own PSNR / SSIM are printed at the end.
"""

import argparse
import csv
import math
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
sys.path.insert(0, str(ROOT))  # blurdm.py
import blurdm  # noqa: E402

HELD_OUT = ("EveningGlow", "ColorfulCups", "LadyBird", "Path", "PicosDeEuropa", "Spaniels", "FigBowl")
KDE_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
              "OneStandsOut", "Path", "summer_1am")  # the other KDE wallpapers are illustrations
MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")
LOMIRI, LXQT = Path("/usr/share/backgrounds"), Path("/usr/share/lxqt/wallpapers")  # lomiri-wallpapers-16.04, lxqt-themes
MORE_PHOTOS = {  # their other wallpapers are illustrations or mostly out of focus
    "Aitzgorri": LOMIRI / "aitzgorri_by_Aitzol_Berasategi.jpg",
    "AnalogPattern": LOMIRI / "analogpattern_by_Peter_Nerlich.jpg",
    "BridgeCables": LOMIRI / "Bridge_by_Sander_Klootwijk.jpg",
    "FigBowl": LOMIRI / "Picture_0B_by_freespace.jpg",
    "ForestStream": LOMIRI / "life_by_Aitzol_Berasategi.jpg",
    "HilltopSunset": LOMIRI / "sunset_by_Aitzol_Berasategi.jpg",
    "PaintBrushes": LOMIRI / "Picture_1A_by_freespace.jpg",
    "PicosDeEuropa": LOMIRI / "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "Spaniels": LOMIRI / "friends_by_Aitzol_Berasategi.jpg",
    "ToyBird": LOMIRI / "free_by_Peter_Nerlich.jpg",
    "AfterTheRain": LXQT / "after-the-rain.jpg",
    "FogField": LXQT / "fog.jpg",
    "RollingHills": LXQT / "this-is-not-windows.jpg",
    "SunBeam": LXQT / "beam.png",
    "Valendas": LXQT / "Valendas.png",
}


def sources():
    """{name: path} of every photograph; Storm.jpg is left out: it already has motion streaks."""
    found = {p.stem: p for p in sorted(MATE_NATURE.glob("*.jpg")) if p.stem != "Storm"}
    for name in KDE_PHOTOS:
        sizes = Path(f"/usr/share/wallpapers/{name}/contents/images").glob("*.jpg")
        found[name] = max(sizes, key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    return found | {name: path for name, path in MORE_PHOTOS.items() if path.exists()}


def scored(blurry, sharp):
    """The pair as the metrics see it: rounded 8-bit images."""
    return blurdm.to_uint8(blurry), blurdm.to_uint8(sharp)


def main(out=Path("data")):
    photos = sources()
    if len(photos) < 37:
        sys.exit(f"found {len(photos)} of 37 photographs; install plasma-workspace-wallpapers, mate-backgrounds, "
                 "lomiri-wallpapers-16.04 and lxqt-themes first")
    for name, path in photos.items():
        target = out / "photos" / ("test" if name in HELD_OUT else "train") / f"{name}.png"
        if target.exists():  # the same bytes again; rewriting would disturb a training run reading them
            continue
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    print(f"{out / 'photos'}: {len(photos) - len(HELD_OUT)} train, {len(HELD_OUT)} test photographs")

    psnrs, ssims = [], []
    for seed, name in enumerate(HELD_OUT):
        sharp = blurdm.read_image(out / "photos" / "test" / f"{name}.png")
        blurry = blurdm.synthesize_blur(sharp, generator=torch.Generator().manual_seed(seed))
        for folder, image in (("heldout/sharp", sharp), ("heldout/blur", blurry), ("heldout-sharp/sharp", sharp),
                              ("heldout-sharp/blur", sharp)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            blurdm.write_image(image, out / folder / f"{name}.png")
        psnrs.append(blurdm.psnr(*scored(blurry, sharp)))
        ssims.append(blurdm.ssim(*scored(blurry, sharp)))
        print(f"{name}: blurry input PSNR {psnrs[-1]:.2f} dB, SSIM {ssims[-1]:.4f}")
    print(f"blurry inputs, mean of {len(psnrs)}: PSNR {sum(psnrs) / len(psnrs):.2f} dB, SSIM {sum(ssims) / len(ssims):.4f}")


def example():
    """The README's example: a 12 px camera path over "Evening Glow" (held out), little rotation, zoom and noise."""
    sharp = blurdm.read_image(ASSETS / "example_sharp.png")
    blurry = blurdm.synthesize_blur(sharp, generator=torch.Generator().manual_seed(2023), length=(12.0, 12.0),
                                    max_rotation=0.5, max_zoom=0.005, noise=(0.005, 0.005))
    blurdm.write_image(blurry, ASSETS / "example_blurry.png")
    print(f"{ASSETS / 'example_blurry.png'}: PSNR {blurdm.psnr(*scored(blurry, sharp)):.2f} dB, "
          f"SSIM {blurdm.ssim(*scored(blurry, sharp)):.4f}")


def figure(weights=ROOT / "weights" / "blurdm-demo.pt"):
    """The README's figure: the example blurry | deblurred with the demo weights | sharp, each at half size."""
    model = blurdm.load_model(weights).float()
    blurry = blurdm.read_image(ASSETS / "example_blurry.png")
    sharp = blurdm.read_image(ASSETS / "example_sharp.png")
    with torch.inference_mode():
        deblurred = model.deblur(blurry[None])[0]
    w, h = sharp.shape[2] // 2, sharp.shape[1] // 2
    canvas = Image.new("RGB", (3 * w, h))
    for i, panel in enumerate((blurry, deblurred, sharp)):
        image = Image.fromarray(blurdm.to_uint8(panel).permute(1, 2, 0).numpy())
        canvas.paste(image.resize((w, h), Image.LANCZOS), (i * w, 0))
    canvas.save(ASSETS / "figure.jpg", quality=90)
    print(f"{ASSETS / 'figure.jpg'}: deblurred PSNR {blurdm.psnr(*scored(deblurred, sharp)):.2f} dB "
          f"(blurry {blurdm.psnr(*scored(blurry, sharp)):.2f} dB)")


def ship(state, weights=ROOT / "weights" / "blurdm-demo.pt"):
    """The shipped weights: a training checkpoint's config and weights, in fp16 (half the bytes, same scores)."""
    blurdm.save_checkpoint(weights, blurdm.load_model(state).half())
    print(f"{weights}: the weights of {state} in fp16")


def history(table=ROOT / "weights" / "history.csv", size=(720, 360), margin=50):
    """The model card's training history as a plot: PSNR gain on blurred and PSNR on sharp inputs, by iteration,
    for BlurDM and for the baseline without the prior."""
    from PIL import ImageDraw

    rows = list(csv.DictReader(open(table)))
    x = [float(r["iterations"]) for r in rows]
    measures = {"gain on blurred (dB)": lambda r: float(r["model_psnr"]) - float(r["blurry_psnr"]),
                "sharp in: PSNR - 35 dB": lambda r: float(r["sharp_psnr"]) - 35}
    colours = iter([(200, 40, 40), (40, 90, 200), (240, 160, 60), (110, 190, 230)])  # BlurDM dark, no prior light
    series = {f"{label}: {name}": ([(i, f(r)) for i, r in enumerate(rows) if r["model"] == model], next(colours))
              for model, label in (("blurdm", "BlurDM"), ("no-prior", "no prior")) for name, f in measures.items()}
    lo = min(0.0, *(v for points, _ in series.values() for _, v in points))
    hi = max(3.5, *(v for points, _ in series.values() for _, v in points))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    W, H = size[0] - 2 * margin, size[1] - 2 * margin
    point = lambda i, v: (margin + W * (x[i] - min(x)) / max(max(x) - min(x), 1), margin + H * (hi - v) / (hi - lo))
    for level in range(math.floor(lo), math.ceil(hi) + 1):  # a grid line a dB; +3 (both targets) darker
        y = point(0, level)[1]
        draw.line([(margin, y), (margin + W, y)], fill=(120, 120, 120) if level == 3 else (225, 225, 225))
        draw.text((8, y - 6), f"{level:+d}", fill="black")
    draw.text((margin + W - 200, point(0, 3)[1] - 14), "targets: +3 dB gain, 38 dB sharp", fill=(90, 90, 90))
    for k, (name, (values, colour)) in enumerate(series.items()):
        points = [point(i, v) for i, v in values]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x0, y0 in points:
            draw.ellipse((x0 - 4, y0 - 4, x0 + 4, y0 + 4), fill=colour)
        draw.text((margin + 10, 10 + 14 * k), name, fill=colour)
    draw.text((margin, size[1] - margin + 10), f"iterations {min(x):,.0f} .. {max(x):,.0f}", fill="black")
    canvas.save(table.with_suffix(".png"))
    print(f"{table.with_suffix('.png')}: {len(rows)} rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--ship", metavar="CKPT", help="write weights/blurdm-demo.pt from a training checkpoint")
    what.add_argument("--example", action="store_true", help="rebuild assets/example_blurry.png")
    what.add_argument("--figure", action="store_true", help="rebuild assets/figure.jpg with the demo weights")
    what.add_argument("--history", action="store_true", help="plot weights/history.csv as weights/history.png")
    args = parser.parse_args()
    if args.ship:
        ship(args.ship)
    elif args.example:
        example()
    elif args.figure:
        figure()
    elif args.history:
        history()
    else:
        main()
