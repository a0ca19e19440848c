"""
Benchmark BlurDM: deblurring (and the prior's share) and a stage-3 training step at the preset's
recipe with train.py's photograph data: time, FLOPs, FLOP/s as a share of this machine's matmul
FLOP/s in that precision, peak memory (CUDA: max allocated; CPU: the process's max RSS so far).

    python bench.py                                   # demo on a CPU, paper on CUDA; fp32 and auto
    python bench.py --preset tiny --amp fp32 --no-train
    python bench.py --preset paper --amp bf16 --compile --json bench.json
"""
import argparse
import json
import resource
import time
from pathlib import Path
from statistics import mean

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
p.add_argument("--compile", action="store_true", help="torch.compile the deblurrer")
p.add_argument("--json", help="write the rows to this file")
args = p.parse_args()
device = blurdm.pick_device(args.device)
cuda = device.type == "cuda"
preset = args.preset or ("paper" if cuda else "demo")
batch = args.batch or blurdm.TRAINING_RECIPES[preset]["batch_size"]
crop = args.crop or blurdm.TRAINING_RECIPES[preset]["crop"]
W, H = map(int, args.size.split("x"))

def clock():  # seconds, once the device is done
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()

def measure(fn, n, reduce=min):
    """(reduce of the seconds of n runs of fn after a warm-up run, the FLOPs of one run)"""
    fn()
    with FlopCounterMode(display=False) as counter:  # where compiled, fn runs eagerly here
        fn()
    if cuda:  # the peak of the timed runs
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return reduce(times), counter.get_total_flops()

def report(precision, what, seconds, flops, note, **extra):
    peak = (torch.cuda.max_memory_allocated() if cuda else  # max RSS on Linux: KiB
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    rows.append(dict(preset=preset, precision=precision, what=what, seconds=seconds, flops=flops,
                     of_matmul=flops / seconds / matmul[precision], peak_MiB=peak, **extra))
    print(f"{preset} {precision} | {what} {seconds:.3g} s{note} | {flops / 1e12:.3g} TFLOP | "
          f"{flops / seconds / 1e12:.3g} TFLOP/s = {100 * rows[-1]['of_matmul']:.0f} % of matmul"
          f" | peak {peak:.0f} MiB", flush=True)

n = 4096 if cuda else 1024  # this machine's own rate: an n x n matmul in each precision that runs
matmul = dict.fromkeys(blurdm.autocast(device, amp)[1] for amp in args.amp)
for precision in matmul:
    a = torch.randn(n, n, device=device, dtype=DTYPES[precision])
    matmul[precision] = 2 * n ** 3 / measure(lambda: a @ a, 10)[0]
name = torch.cuda.get_device_name(device) if cuda else next(
    (line.split(":")[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
print(f"{name} | torch {torch.__version__}, {torch.get_num_threads()} threads | matmul {n}² " +
      ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in matmul.items()) +
      f" | peak memory: {'max allocated' if cuda else 'max RSS'}", flush=True)
rows = []
for precision in matmul:
    ctx = blurdm.autocast(device, precision)[0]
    torch.manual_seed(0)
    model = blurdm.BlurDM(blurdm.BlurDMConfig.preset(preset)).to(device)
    model.deblurrer = torch.compile(model.deblurrer) if args.compile else model.deblurrer
    x = torch.rand(1, 3, H, W, device=device)
    with ctx, torch.inference_mode():
        noise, padded = model.start_noise(1, blurdm.INFERENCE_SEED), blurdm.pad_to(x, 8)
        prior = measure(lambda: model.sharp_prior(padded, noise), args.repeat)[0]
        seconds, flops = measure(lambda: model.deblur(x), args.repeat)  # last: the peak's its own
    report(precision, f"deblur {W}x{H}", seconds, flops, f" | prior {100 * prior / seconds:.0f} %",
           prior_share=prior / seconds)
    if args.no_train:
        continue
    optimizer = torch.optim.Adam(model.set_stage(3), lr=1e-4)
    dataset, data_s = blurdm.PairDataset([(None, PHOTO)], crop, blurdm.BLUR_LENGTH, 0), []

    def train_step():  # the data as train.py makes it: step i's crops, blurred on the device
        t0 = time.perf_counter()
        items = [dataset[(3, len(data_s), k)] for k in range(batch)]  # i = len(data_s)
        blur, sharp = blurdm.training_batch(torch.utils.data.default_collate(items), device)
        data_s.append(clock() - t0)
        with ctx:
            loss = model(blur, sharp, stage=3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, flops = measure(train_step, args.steps, mean)  # FLOPs: the model's (data: none)
    report(precision, f"train step {batch}x{crop}²", seconds, flops,
           f" (data {mean(data_s[2:]):.2f} s)", data_seconds=mean(data_s[2:]))
if args.json:
    with open(args.json, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, threads=torch.get_num_threads(),
                       compile=args.compile, matmul=matmul, rows=rows), f, indent=1)
