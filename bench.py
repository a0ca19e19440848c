"""Benchmark BlurDM: deblurring (and the prior's share) and a stage-3 training step at the preset's
recipe with train.py's data: time, FLOPs, FLOP/s as a share of this machine's matmul FLOP/s in that
precision, peak memory (CUDA: max allocated; CPU: the process's max RSS so far).

    python bench.py                               # demo on a CPU, paper on CUDA; fp32 and auto
    python bench.py --amp bf16 --compile          # compile time excluded: in the warm-ups
"""

import argparse
import itertools
import resource
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import blurdm

PHOTO = str(Path(__file__).resolve().parent / "assets" / "example_sharp.png")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--preset", choices=list(blurdm.PRESETS), help="default: demo; on CUDA: paper")
p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
p.add_argument("--amp", nargs="+", default=["fp32", "auto"], choices=["auto", *DTYPES])
p.add_argument("--size", default="1280x720", help="WxH of the image to deblur")
p.add_argument("--repeat", type=int, default=3, help="deblur: the best of this many runs")
p.add_argument("--steps", type=int, default=3, help="training: the mean of this many steps")
p.add_argument("--batch", type=int, help="default: the preset's training recipe")
p.add_argument("--crop", type=int, help="default: the preset's training recipe")
p.add_argument("--no-train", action="store_true", help="skip the training step")
p.add_argument("--compile", action="store_true", help="torch.compile the networks")
args = p.parse_args()
cuda = (device := blurdm.pick_device(args.device)).type == "cuda"
sync = torch.cuda.synchronize if cuda else lambda: None
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
preset = args.preset or ("paper" if cuda else "demo")
recipe = blurdm.TRAINING_RECIPES[preset]
batch, crop = args.batch or recipe["batch_size"], args.crop or recipe["crop"]

def measure(fn, n, mean=False):  # -> the best (or mean) seconds of n runs, the FLOPs of a run
    fn()  # warm-up: compiles, where --compile
    with FlopCounterMode(display=False) as counter:  # compiled code runs eagerly in it
        fn()
    if cuda:  # the peak of the timed runs
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sum(times) / n if mean else min(times), counter.get_total_flops()

def report(precision, what, seconds, flops, note):
    peak = (torch.cuda.max_memory_allocated() if cuda else  # max RSS on Linux: KiB
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    print(f"{preset} {precision} | {what} {seconds:.3g} s{note} | {flops / 1e12:.3g} TFLOP | "
          f"{flops / seconds / 1e12:.3g} TFLOP/s = {flops / seconds / matmul[precision]:.0%}"
          f" of matmul | peak {'allocated' if cuda else 'RSS'} {peak:.0f} MiB", flush=True)

n = 4096 if cuda else 1024  # this machine's own rate: an n x n matmul in each precision that runs
matmul = dict.fromkeys(blurdm.autocast(device, amp)[1] for amp in args.amp)
for precision in matmul:
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    matmul[precision] = 2 * n ** 3 / measure(lambda: a @ a, 50)[0]
name = torch.cuda.get_device_name(device) if cuda else next(
    (line.split(":")[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
print(f"{name} | torch {torch.__version__}, {torch.get_num_threads()} threads | --amp "
      f"{' '.join(args.amp)} = {' '.join(matmul)} | matmul {n}²: " + ", ".join(
          f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in matmul.items()), flush=True)
for precision in matmul:
    ctx = blurdm.autocast(device, precision)[0]
    model = blurdm.BlurDM(blurdm.BlurDMConfig.preset(preset))
    model = model.to(device, memory_format=torch.channels_last)  # as train.py and sample.py
    for network in model.children() if args.compile else ():  # as train.py --compile
        network.compile(dynamic=False)
    x = torch.rand(1, 3, *map(int, args.size.split("x")[::-1]), device=device)
    with ctx, torch.inference_mode():
        eps, padded = model.start_noise(1, blurdm.INFERENCE_SEED), blurdm.pad_to(x, 8)
        prior = measure(lambda: model.sharp_prior(padded, eps), args.repeat)[0]
        seconds, flops = measure(lambda: model.deblur(x), args.repeat)  # last: the peak's its own
    report(precision, f"deblur {args.size}", seconds, flops, f" | prior {prior / seconds:.0%}")
    if not args.no_train:
        optimizer, steps = torch.optim.Adam(model.set_stage(3), lr=1e-4), itertools.count()
        dataset = blurdm.PairDataset([(None, PHOTO)], crop, blurdm.BLUR_LENGTH, 0)
        load = lambda: blurdm.training_batch(torch.utils.data.default_collate(  # as train.py does
            [dataset[(3, next(steps), k)] for k in range(batch)]), device)

        def train_step():
            with ctx:
                loss = model(*load(), stage=3)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        data = measure(load, args.steps, mean=True)[0]
        seconds, flops = measure(train_step, args.steps, mean=True)  # the data has no FLOPs
        report(precision, f"train step {batch}x{crop}²", seconds, flops, f" (data {data:.2f} s)")
