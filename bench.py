"""
Benchmark BlurDM: deblurring one image (and the prior's share of it), and one stage-3 training
step at the preset's recipe, its data made as train.py makes it from photographs. For each: time,
FLOPs of the model, FLOP/s as a share of this machine's own large-matmul rate in the same precision
(an MFU against the machine it runs on), peak memory (CUDA: max allocated; CPU: max RSS of the
process so far, so it never goes down from one row to the next).

    python bench.py                                  # demo on a CPU, paper on CUDA; fp32 and auto
    python bench.py --preset tiny --amp fp32 --no-train
    python bench.py --amp bf16 --compile --json bench.json  # compile time excluded: in the warm-up
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

import blurdm

PHOTO = str(Path(__file__).resolve().parent / "assets" / "example_sharp.png")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

def timed(fn, device, n, reduce=min):
    """Seconds: reduce (the best, or the mean) of n runs of fn after one warm-up run."""
    fn()
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return reduce(times)

def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

def bench(args, device, precision, rate):
    """Yields the rows of one precision (deblur, training step), each printed as it is measured."""
    ctx = blurdm.autocast(device, precision)[0]
    torch.manual_seed(0)
    model = blurdm.BlurDM(blurdm.BlurDMConfig.preset(args.preset)).to(device)
    W, H = map(int, args.size.split("x"))
    x = torch.rand(1, 3, H, W, device=device)
    recipe = blurdm.TRAINING_RECIPES[args.preset]
    batch, crop = args.batch or recipe["batch_size"], args.crop or recipe["crop"]
    ds = blurdm.PairDataset([(None, PHOTO)], crop, blurdm.BLUR_LENGTH, 0)
    optimizer = torch.optim.Adam(model.set_stage(3), lr=1e-4)
    data_s = []

    def train_step(step, flops=False):  # as train.py: a step's crops, blurred on `device`, learnt
        t0 = time.perf_counter()
        items = default_collate([ds[(3, step, k)] for k in range(batch)])
        blur, sharp = blurdm.training_batch(items, device)
        sync(device)
        data_s.append(time.perf_counter() - t0)
        with FlopCounterMode(display=False) if flops else ctx  # the model part only
        with ctx:
            loss = model(blur, sharp, stage=3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def report(what, seconds, flops, note="", **extra):
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(f"{args.preset} {precision} | {what} {seconds:.3g} s{note} | {flops / 1e12:.3g} TFLOP"
              f" | {flops / seconds / 1e12:.3g} TFLOP/s = {100 * flops / seconds / rate:.0f} % of "
              f"matmul | peak {peak / 2 ** 20:.0f} MiB {MEMORY[device.type]}", flush=True)
        return dict(preset=args.preset, precision=precision, what=what, seconds=seconds, flops=flops,
                    of_matmul=flops / seconds / rate, peak_MiB=peak / 2 ** 20, **extra)
