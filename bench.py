"""
Benchmark BlurDM presets: inference time and throughput, the share of time spent in the prior (blur encoder + the
T reverse steps) against the deblurrer, peak memory, and training throughput: pixels a second of stage-3 training
at the preset's batch and crop, data included (crops of the shipped example photograph, blurred on the fly as
train.py does for photographs, in the training process as train.py does on the CPU; with --reuse, the mean of
whole cycles of a render and its reuses).

    python bench.py                                  # every preset at 256x256 and 1280x720, on the best device
    python bench.py --presets demo tiny --sizes 1280x720 --device cpu --json bench.json
    python bench.py --presets demo --sizes 256x256 --amp bf16 --reuse 4   # the demo weights' training recipe
    python bench.py --presets demo paper --sizes 2560x1440 --no-train       # fp32 vs the default precision

Each case runs in a fresh process so that its peak memory (max RSS on CPU, max allocated on CUDA) is its own.
It is a benchmark, not a test: numbers depend on the machine and on whatever else runs on it.
"""

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

import blurdm

PHOTO = Path(__file__).resolve().parent / "assets" / "example_sharp.png"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    """Best of `repeat` runs after one warm-up, in seconds (the minimum is the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def run_case(preset, size, device, repeat, train_step, compile_model, amp, reuse):
    """Measure one (preset, size) in this process; returns a dict."""
    device = torch.device(device)
    H, W = size
    torch.manual_seed(0)
    model = blurdm.BlurDM(blurdm.BlurDMConfig.preset(preset)).to(device).eval()
    x = torch.rand(1, 3, H, W, device=device)
    model = model.to(memory_format=blurdm.memory_format(device))  # as train.py; deblur() converts its input
    if compile_model:
        model.deblurrer = torch.compile(model.deblurrer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    autocast, precision, note = blurdm.autocast(device, amp)  # fp32 where --amp cannot run natively
    if note:
        print(f"note: {note}", file=sys.stderr)

    with autocast:
        total = timed(lambda: model.deblur(x), device, repeat)
        prior = timed(lambda: model.prior_for(x), device, repeat) if model.cfg.prior else 0.0
    row = dict(preset=preset, size=f"{W}x{H}", device=str(device), precision=precision,
               params_M=sum(p.numel() for p in model.parameters()) / 1e6,
               seconds=total, megapixels_per_s=H * W / 1e6 / total, prior_share=prior / total)
    if device.type == "cuda":
        row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        row["peak_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if train_step:
        recipe, memory_format = blurdm.TRAINING_RECIPES[preset], blurdm.memory_format(device)
        batch, crop = recipe["batch_size"], recipe["crop"]  # train.py's defaults
        on_gpu = device.type == "cuda"  # as train.py: photographs blurred on the GPU, a batch at once
        dataset = blurdm.PairDataset([(None, str(PHOTO))], crop, (0.0, 30.0), 0, reuse, blur_on_device=on_gpu)
        optimizer = torch.optim.Adam(model.set_stage(3), lr=1e-4, fused=on_gpu)
        steps, data_time = itertools.count(), []

        def step():
            t0 = time.perf_counter()
            s = next(steps)
            items = default_collate([dataset[(3, s, k)] for k in range(batch)])
            items = blurdm.blur_batch_on_device(items, device) if on_gpu else items
            blur, sharp = (x.to(device, memory_format=memory_format) for x in items)
            sync(device)
            data_time.append(time.perf_counter() - t0)
            with autocast:
                loss = model(blur, sharp, stage=3)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(reuse):  # warm-up: one cycle, then the mean of whole cycles (a render every `reuse` steps)
            step()
        data_time.clear()
        n = max(2, repeat) * reuse
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        row["train_step_s"] = (time.perf_counter() - t0) / n
        row["train_data_s"] = sum(data_time) / n
        row["train_megapixels_per_s"] = batch * crop ** 2 / 1e6 / row["train_step_s"]
        row["train_batch"] = f"{batch}x{crop}x{crop}" + (f" reuse {reuse}" if reuse > 1 else "")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(blurdm.PRESETS))
    parser.add_argument("--sizes", nargs="+", default=["256x256", "1280x720"], help="WxH")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile the deblurrer (compile time excluded)")
    parser.add_argument("--amp", nargs="+", default=["fp32", "auto"], choices=("fp32", "auto", "bf16", "fp16"),
                        help="precisions to time, each for inference and the training step (default: fp32 and "
                             "auto, sample.py's default: bf16 where native)")
    parser.add_argument("--reuse", type=int, default=1, help="train.py --reuse: steps a rendered crop serves")
    parser.add_argument("--json", default="bench.json", help="where to write the table")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, printed as JSON
    args = parser.parse_args()
    device = str(blurdm.pick_device(args.device))
    if args.case:
        preset, size, train = args.case.split(":")
        W, H = map(int, size.split("x"))
        row = run_case(preset, (H, W), device, args.repeat, train == "1", args.compile, args.amp[0], args.reuse)
        print(json.dumps(row))
        return

    rows = []
    for preset, (i, size), amp in itertools.product(args.presets, enumerate(args.sizes), args.amp):
        train = "1" if i == 0 and not args.no_train else "0"  # one training step per preset is enough
        cmd = [sys.executable, __file__, "--case", f"{preset}:{size}:{train}", "--device", device, "--repeat",
               str(args.repeat), "--amp", amp, "--reuse", str(args.reuse)] + ["--compile"] * args.compile
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # a case killed for memory leaves no message: say so
            lines = done.stderr.strip().splitlines()
            why = (lines or [f"exit code {done.returncode} (killed: out of memory?)"])[-1]
            print(f"{preset} {size}: failed: {why}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        train_text = f"{r['train_megapixels_per_s']:.3f} MP/s, {r['train_step_s']:.2f} s a step of " \
            f"{r['train_batch']} (data {r['train_data_s']:.2f} s)" if "train_step_s" in r else "-"
        print(f"{r['preset']:10s} {r['size']:>10s} {r['device']:5s} {r['precision']:4s} {r['params_M']:7.2f} M "
              f"params | {r['seconds']:7.3f} s | {r['megapixels_per_s']:6.2f} MP/s | prior "
              f"{100 * r['prior_share']:4.1f} % | peak {r['peak_MiB']:7.0f} MiB | training {train_text}",
              flush=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "compile": args.compile,
                   "reuse": args.reuse, "rows": rows}, f,
                  indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
