"""
Train BlurDM in three stages (METHOD.md §5), each from the weights the one before ends with: stage 1 the sharp
encoder and the deblurrer, stage 2 the blur encoder and the residual estimators, stage 3 all but the sharp encoder.

    python train.py --data GOPRO_Large/                       # the paper's recipe (MIMO-UNet+, 3000/500/3000 epochs)
    python train.py --data photos/ --preset demo --iters 2000,300,1700   # sharp photographs, blurred on the fly
    torchrun --nproc_per_node=4 train.py --data GOPRO_Large/  # DistributedDataParallel, one process a GPU
    python train.py --data GOPRO_Large/ --eval-only --init out/best.pt   # PSNR / SSIM of the whole test split

Rerun the same command to resume from out/last.pt (Ctrl-C and SIGTERM save first): on a CPU, bit-identically.
"""

import argparse
import csv
import functools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

import blurdm


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="GoPro (original or flat), RealBlur, HIDE, blur/ + sharp/, or photos")
    p.add_argument("--out", default="out", help="checkpoints, log.jsonl and scores.csv (default: out)")
    p.add_argument("--preset", default="paper", choices=list(blurdm.PRESETS))
    p.add_argument("--no-prior", action="store_true", help="the baseline backbone alone (ablation)")
    p.add_argument("--init", help="weights the first stage starts from (or that --eval-only scores)")
    p.add_argument("--eval-only", action="store_true", help="score --init on the whole test split; writes scores.csv")
    p.add_argument("--iters", type=numbers(int, 3, 0), help="iterations per stage a,b,c (default: the preset's "
                   "epochs); 0 skips a stage: 0,0,N --init CKPT trains stage 3 on")
    p.add_argument("--batch", type=int, help="global batch, split over the processes (paper: 20)")
    p.add_argument("--crop", type=int, help="training crop, a multiple of 4 (paper: 256)")
    p.add_argument("--lr", type=float, help="Adam's learning rate at the start of each stage, cosine decay to --lr-min")
    p.add_argument("--lr-min", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--blur-length", type=numbers(float, 2, 0), default=blurdm.BLUR_LENGTH, metavar="LO,HI",
                   help="camera paths in px for photographs blurred on the fly (default %g,%g; 0,30: sharp inputs "
                   "too)" % blurdm.BLUR_LENGTH)
    p.add_argument("--reuse", type=int, default=1, help="steps a rendered crop serves, turned or flipped each time")
    p.add_argument("--workers", type=int, help="data processes (default: 4 on CUDA, 0 on CPUs: it slows the training)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast on CUDA, bf16 on CPUs with native bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (pays off on CUDA)")
    p.add_argument("--val-every", type=int, default=5000, help="validate every N steps (0: at stage ends only)")
    p.add_argument("--val-count", type=int, default=100, help="at most this many validation images")
    p.add_argument("--val-crop", type=int, default=512, help="validation centre crop (0: whole images)")
    p.add_argument("--save-every", type=int, default=1000, help="write out/last.pt every N steps")
    p.add_argument("--log-every", type=int, default=50, help="print and log a line every N steps")
    args = p.parse_args(argv)
    lo, hi = args.blur_length
    if (args.eval_only and not args.init) or (args.iters and not any(args.iters)) or lo > hi:
        p.error("--eval-only needs --init CKPT, --iters at least one stage, and --blur-length LO <= HI")
    for name, value in vars(args).items():  # whole numbers: sizes and periods >= 1 (True), others >= 0
        if type(value) is int and not (name in ("batch", "crop", "reuse", "save_every", "log_every")) <= value < 2**63:
            p.error(f"--{name.replace('_', '-')} {value}: out of range")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                                             ("WORLD_SIZE", 1)))
    device = blurdm.pick_device(args.device)
    use_cuda = device.type == "cuda"
    if "RANK" in os.environ:  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT's pattern)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    say = print if rank == 0 else (lambda *a, **k: None)
    given = dict(batch_size=args.batch, crop=args.crop, lr=args.lr, lr_min=args.lr_min, seed=args.seed).items()
    cfg = blurdm.BlurDMConfig.preset(args.preset, prior=not args.no_prior, **{k: v for k, v in given if v is not None})
    if cfg.crop % 4 or cfg.batch_size % world_size:
        raise ValueError(f"--crop must be a multiple of 4, and --batch divide over the {world_size} processes")
    if device.type == "cpu" and args.preset in ("paper", "mimo-unet") and not args.eval_only:
        say(f"note: --preset {args.preset} is sized for GPUs (hours an epoch here, and more memory than most "
            "machines have); --preset demo is sized for CPUs")
    autocast, _, note = blurdm.autocast(device, args.amp)
    if note:
        say(f"note: {note}")
    splits, problems = blurdm.find_pairs(args.data)
    load_pair.cache_clear()  # files may have changed since an earlier run in this process
    say(f"data: {args.data}: " + ", ".join(f"{len(p)} {s} pairs" for s, p in splits.items())
        + (" of sharp photographs, blurred on the fly" if next(iter(splits.values()))[0][0] is None else ""))
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    for line in problems:
        say(f"warning: {line}")
    if args.eval_only:
        return evaluate_test_split(args, splits, device, autocast, say)
    if "train" not in splits:
        raise ValueError(f"{args.data}: no training split, only {', '.join(splits)} (--eval-only scores a model)")
    pairs, val_pairs = splits["train"], splits.get("test", [])
    if not val_pairs and args.val_count:  # no test split: hold out evenly spaced pairs, about a tenth
        val_pairs = pairs[::math.ceil(len(pairs) / max(1, min(args.val_count, len(pairs) // 10)))]
        pairs = [p for p in pairs if p not in val_pairs] or pairs  # a single pair is trained on and validated
    val_pairs = val_pairs[::math.ceil(len(val_pairs) / args.val_count)] if args.val_count else []  # evenly spaced
    val_images = list(validation_images(val_pairs, args.val_crop, cfg.seed, args.blur_length, say))
    if val_images:
        say(f"validation: {len(val_images)} images, the blurry input scores PSNR "
            f"{np.mean([blurdm.psnr(b, s) for _, b, s in val_images]):.2f} dB")
    stage_steps = args.iters or [math.ceil(e * len(pairs) / cfg.batch_size) for e in cfg.stage_epochs]
    run = dict(crop=cfg.crop, batch_size=cfg.batch_size, lr=cfg.lr, lr_min=cfg.lr_min, seed=cfg.seed,
               stage_steps=stage_steps, data=str(Path(args.data)), blur_length=list(args.blur_length), reuse=args.reuse)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format  # 1.16x on the CPU
    torch.manual_seed(cfg.seed)  # the same initial weights in every process and every run of a command
    model = blurdm.BlurDM(cfg).to(device, memory_format=memory_format)
    stages, state, best = where_to_start(model, args, out, run, say)  # best: of stages 2-3, kept in best.pt
    if world_size > 1 and device.type == "cuda":  # SE's BatchNorm sees the global batch, as on one GPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    stop = {}  # Ctrl-C / SIGTERM: finish the step, save, exit; a second Ctrl-C aborts at once

    def request_stop(signum, frame):
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        say(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to abort)", flush=True)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    dataset = PairDataset(pairs, cfg.crop, args.blur_length, cfg.seed, args.reuse)
    per_rank = cfg.batch_size // world_size
    for stage in stages:  # sample k of step s is a function of (seed, stage, s, k): a resumed run sees the same crops
        samples = ((stage, s, k) for s in range(state["step"] if state else 0, stage_steps[stage - 1])
                   for k in range(rank * per_rank, (rank + 1) * per_rank))
        loader = DataLoader(dataset, per_rank, sampler=samples, pin_memory=use_cuda, worker_init_fn=ignore_stop_signals,
                            num_workers=args.workers if args.workers is not None else 4 * (device.type == "cuda"))
        if train_stage(model, stage, loader, state, args, run, out, device, memory_format, autocast, rank,
                       world_size, stop, val_images, best, say):
            return 128 + stop.get("signal", signal.SIGTERM)  # ranks told by the all-reduce have no signal of their own
        state = None
    say(f"done. deblur with: python sample.py YOUR_IMAGE --ckpt {out / 'best.pt' if best['psnr'] else out / 'last.pt'}")
    return 0


def train_stage(model, stage, loader, state, args, run, out, device, memory_format, autocast, rank, world_size,
                stop, val_images, best, say):
    """One stage, from `state` (a checkpoint to resume) or from step 0; returns True when stopped by a signal."""
    cfg, total = model.cfg, run["stage_steps"][stage - 1]
    parameters = model.set_stage(stage)
    optimizer = torch.optim.Adam(parameters, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=cfg.lr_min)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    step = state["step"] if state else 0
    for part, name in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")) if state else ():
        part.load_state_dict(state[name])
    forward = torch.compile(model) if args.compile else model
    forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else forward
    parts = ["sharp encoder + deblurrer", "blur encoder + estimators", "all but the sharp encoder"][stage - 1]
    say(f"stage {stage} ({parts if cfg.prior else 'no prior'}): steps {step}..{total}, batch {cfg.batch_size} of "
        f"{cfg.crop}px crops, lr {cfg.lr:g} -> {cfg.lr_min:g}")
    log = open(out / "log.jsonl", "a") if rank == 0 else None  # closed when the process ends

    def save(name):
        if rank == 0:
            model.save(out / name, stage=stage, step=step, run=run, optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), best_psnr=best["psnr"])

    batches = iter(loader)
    while step < total:
        t0 = time.perf_counter()
        blur, sharp = next(batches)
        blur, sharp = (x.to(device, non_blocking=True, memory_format=memory_format) for x in (blur, sharp))
        t1 = time.perf_counter()
        torch.manual_seed(mix_seed(cfg.seed, stage, step, rank))  # the chain's ε and the dropout masks: replayable
        with autocast:
            loss = model.loss(blur, sharp, stage, outputs=forward(blur, sharp, stage))  # DDP syncs through forward
        stats = torch.stack([loss.detach().float(), torch.tensor(float(bool(stop)), device=device)])
        if world_size > 1:  # one small all-reduce a step: every rank sees the same loss and the same stop request
            dist.all_reduce(stats)
        loss_value, stopping = stats[0].item() / world_size, stats[1].item() > 0
        if not math.isfinite(loss_value):  # the NaN guard: stop before a bad step reaches a checkpoint
            raise ValueError(f"loss is {loss_value} at stage {stage} step {step}; stopped, the last checkpoint is kept "
                             "(lower --lr, or use --amp bf16 instead of fp16)")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        ms, data_ms = 1000 * (time.perf_counter() - t0), 1000 * (t1 - t0)
        if rank == 0 and (step % args.log_every == 0 or step == total):
            say(f"stage {stage} step {step} | loss {loss_value:.4f} | lr {lr:.1e} | {ms:.0f} ms (data {data_ms:.0f})")
            print(json.dumps(dict(stage=stage, step=step, loss=loss_value, lr=lr, step_ms=round(ms, 2),
                                  data_ms=round(data_ms, 2), time=time.time())), file=log, flush=True)
        if rank == 0 and val_images and ((args.val_every and step % args.val_every == 0) or step == total):
            psnr, ssim = (float(v) for v in np.mean(list(evaluate(model, val_images, device, stage)), axis=0))
            model.set_stage(stage)  # back to this stage's training modes
            counts = not (cfg.prior and stage == 1)  # stage 1 validates with SE(blur, sharp): not what sample.py runs
            improved = counts and (best["psnr"] is None or psnr > best["psnr"])
            best["psnr"] = psnr if improved else best["psnr"]
            say(f"val stage {stage} step {step} | PSNR {psnr:.2f} dB | SSIM {ssim:.4f} | {len(val_images)} images"
                + ("" if counts else " | prior SE(blur, sharp)") + (" | best, saved best.pt" if improved else ""))
            print(json.dumps(dict(stage=stage, step=step, val_psnr=psnr, val_ssim=ssim)), file=log, flush=True)
            if improved:
                save("best.pt")
        if step % args.save_every == 0 or step == total or stopping:
            if not all(torch.isfinite(p).all() for p in parameters):
                raise ValueError(f"weights not finite at stage {stage} step {step}; stopped, last checkpoint kept")
            save("last.pt")
            if step == total:
                save(f"stage{stage}.pt")
        if stopping:
            say(f"stopped at stage {stage} step {step}; saved {out / 'last.pt'}; rerun the same command to resume")
            return True
    if world_size > 1:
        dist.barrier()  # the next stage starts from the same weights on every rank
    return False


def where_to_start(model, args, out, run, say):
    """The stages to run, the state to resume (or None) and the best validation so far: out/last.pt if this run
    wrote it, else --init."""
    stages, last = [s for s in (1, 2, 3) if run["stage_steps"][s - 1]], out / "last.pt"
    if last.exists():
        state = blurdm.load_checkpoint(last)
        differing = [k for k in run if state.get("run", {}).get(k) != run[k]]
        if differing:
            detail = ", ".join(f"{k} {state.get('run', {}).get(k)} vs {run[k]}" for k in differing)
            raise ValueError(f"{last}: saved by a run with other settings ({detail}); rerun its command to resume, "
                             "or pass another --out")
        model.load_weights(state, last)
        finished = state["step"] >= run["stage_steps"][state["stage"] - 1]
        stages = [s for s in stages if s > state["stage"] or (s == state["stage"] and not finished)]
        say(f"{last}: " + (f"stage {state['stage']} finished" if finished else
                           f"resuming stage {state['stage']} at step {state['step']}"))
        return stages, None if finished else state, {"psnr": state.get("best_psnr")}
    if stages and stages[0] > 1 and not args.init:
        raise ValueError(f"stage {stages[0]} starts from a stage {stages[0] - 1} model: pass --init")
    if args.init:
        model.load_weights(blurdm.load_checkpoint(args.init), args.init)
        say(f"stage {stages[0]} starts from the weights of {args.init}")
    return stages, None, {"psnr": None}


def evaluate(model, images, device, stage=3, tile=2048):
    """(PSNR, SSIM) of each (name, blur, sharp) uint8 image (METHOD.md §6); stage 1 uses SE(blur, sharp) as prior."""
    model.eval()
    for _, blur_u8, sharp_u8 in images:
        blur, sharp = (x.to(device)[None].float() / 255 for x in (blur_u8, sharp_u8))
        prior = model.sharp_prior(blur, sharp) if model.cfg.prior and stage == 1 else None
        out = blurdm.to_uint8(model.deblur(blur, prior=prior, tile=tile)[0])
        yield blurdm.psnr(out, sharp_u8.to(device)), blurdm.ssim(out, sharp_u8.to(device))


def evaluate_test_split(args, splits, device, autocast, say):
    """--eval-only: score --init on every pair of the test split (or of the only split), whole images."""
    model = blurdm.BlurDM.from_checkpoint(args.init).float().to(device)
    split, rows = "test" if "test" in splits else next(iter(splits)), []  # the only split, when there is no test/
    with autocast:
        for name, blur, sharp in validation_images(splits[split], 0, model.cfg.seed, args.blur_length, say):
            (psnr, ssim), = evaluate(model, [(name, blur, sharp)], device)
            rows.append((name, f"{psnr:.4f}", f"{ssim:.6f}"))
            say(f"{name} | PSNR {psnr:.2f} dB | SSIM {ssim:.4f}")
    if not rows:
        raise ValueError(f"{args.data}: no {split} pair could be read")
    with blurdm.atomic_path(Path(args.out) / "scores.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("input", "psnr_db", "ssim"), *rows])
    say(f"mean of {len(rows)}: PSNR {np.mean([float(r[1]) for r in rows]):.2f} dB (uint8 RGB, whole image) | SSIM "
        f"{np.mean([float(r[2]) for r in rows]):.4f} ({blurdm.SSIM_RECIPE}) | {Path(args.out) / 'scores.csv'}")
    return 1 if len(rows) < len(splits[split]) else 0  # a test image could not be read


# ----------------------------------------------------------------------------------------------------------------
# Samples: a random crop (blurred here for photographs), flips and quarter turns, the same for both images


@functools.lru_cache(maxsize=64)  # per process: a small photo set is decoded once, not once a sample
def load_pair(blur_path, sharp_path, min_size=1):
    sharp = blurdm.to_uint8(blurdm.read_image(sharp_path))
    blur = blurdm.to_uint8(blurdm.read_image(blur_path)) if blur_path else None
    (h, w), name = sharp.shape[1:], blur_path or sharp_path
    if blur is not None and blur.shape != sharp.shape:
        raise ValueError(f"{blur_path}: {blur.shape[2]}x{blur.shape[1]} but its sharp image {sharp_path} is {w}x{h}")
    if min(h, w) < min_size:
        raise ValueError(f"{name}: {w}x{h} is smaller than the {min_size}px crop")
    return blur, sharp


class PairDataset(Dataset):
    """Item (stage, step, k): the k-th sample of a step, every random choice seeded by it, whatever process runs it.
    Sample k of `reuse` steps in a row is one crop, rendered once (blurring photographs is a fifth to a third of a
    demo step on a CPU) and turned or flipped its own way each time."""

    def __init__(self, pairs, crop, blur_length, seed, reuse=1):
        self.pairs, self.crop, self.blur_length, self.seed, self.reuse = pairs, crop, blur_length, seed, reuse
        self.warned, self.rendered = set(), {}

    def __getitem__(self, item):
        key = (item[0], item[1] // self.reuse, item[2])  # (stage, group of steps, k)
        if key not in self.rendered:  # kept while its steps last
            self.rendered = {j: v for j, v in self.rendered.items() if j[:2] == key[:2]} | {key: self.render(*key)}
        g = torch.Generator().manual_seed(mix_seed(self.seed, *item, 1))
        flip, turns = torch.rand((), generator=g).item() < 0.5, torch.randint(4, (), generator=g).item()
        pair = torch.rot90(self.rendered[key].flip(-1) if flip else self.rendered[key], turns, (-2, -1))
        return pair[0].contiguous(), pair[1].contiguous()  # one of the square's 8 symmetries

    def render(self, stage, group, k):
        g, c = torch.Generator().manual_seed(mix_seed(self.seed, stage, group, k)), self.crop
        index = torch.randint(len(self.pairs), (), generator=g).item()
        for attempt in range(len(self.pairs)):  # a pair that cannot be used: a warning (once a process), the next
            try:
                blur, sharp = load_pair(*self.pairs[(index + attempt) % len(self.pairs)], self.crop)
                break
            except ValueError as err:
                if str(err) not in self.warned:
                    self.warned.add(str(err))
                    print(f"warning: {err}; skipped", flush=True)
        else:
            raise ValueError(f"none of the {len(self.pairs)} training pairs can be used")
        top, left = (torch.randint(n - c + 1, (), generator=g).item() for n in sharp.shape[1:])
        if blur is None:  # a photograph: blurred here (subframes None: one a pixel of camera path)
            blur, sharp = blurdm.synthesize_blur(sharp / 255, g, self.blur_length, None, window=(top, left, c, c))
        else:
            blur, sharp = (x[:, top:top + c, left:left + c] / 255 for x in (blur, sharp))
        return torch.stack([blur, sharp])  # (2, 3, c, c): one transform for both


def validation_images(pairs, crop, seed, blur_length, say):
    """(name, blur, sharp) uint8 centre crops (crop 0: whole images); a photograph gets a fixed seeded blur."""
    for j, (blur_path, sharp_path) in enumerate(pairs):
        try:
            blur, sharp = load_pair(blur_path, sharp_path)
        except ValueError as err:
            say(f"warning: {err}; left out of evaluation")
            continue
        H, W = sharp.shape[-2:]
        margin = 0 if blur is not None or crop else min(math.ceil(blur_length[1] / 2) + 8, (min(H, W) - 8) // 4)
        h, w = (min(crop, H), min(crop, W)) if crop else (H - 2 * margin, W - 2 * margin)  # whole: away from edges
        top, left = (H - h) // 2, (W - w) // 2
        if blur is None:
            g = torch.Generator().manual_seed(mix_seed(seed, 0, j))
            blur, sharp = (blurdm.to_uint8(x) for x in blurdm.synthesize_blur(
                sharp.float() / 255, g, blur_length, subframes=None, window=(top, left, h, w)))
        else:
            blur, sharp = blur[:, top:top + h, left:left + w], sharp[:, top:top + h, left:left + w]
        yield blur_path or sharp_path, blur, sharp


def mix_seed(*numbers):  # one 32-bit seed from any non-negative integers (a seed, a stage, a step), well mixed
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def ignore_stop_signals(worker_id):  # Ctrl-C, or a SIGTERM to the process group: the main process alone decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def numbers(kind, count, least):
    """An argparse type: `count` numbers separated by commas (or one, for all), each in [least, 1e9)."""
    def comma_separated(text):
        values = [kind(v) for v in text.split(",")]  # not numbers: argparse says "invalid comma_separated value"
        values = values * count if len(values) == 1 else values
        if len(values) != count or not all(least <= v < 1e9 for v in values):
            raise argparse.ArgumentTypeError(f"takes {count} numbers >= {least} separated by commas, got {text!r}")
        return values
    return comma_separated


def cli(argv=None):
    """The entry point: one `error:` line and exit code 1 for what a user can fix; worker processes never outlive it."""
    try:
        return main(argv)
    except BaseException as err:  # clearing the frames frees a DataLoader they hold: its workers stop cleanly now
        traceback.clear_frames(err.__traceback__)
        if isinstance(err, KeyboardInterrupt):
            return 130
        if isinstance(err, (ValueError, OSError)):  # data, checkpoints, settings, files: the message names the file
            message = str(err).strip().splitlines()[-1].removeprefix("ValueError: ")  # a worker's: its last line
        elif isinstance(err, (MemoryError, RuntimeError)) and blurdm.out_of_memory(err):
            first = (str(err).splitlines() or ["MemoryError"])[0][:100]
            message = f"out of memory ({first}); a smaller --batch or --crop needs less"
        else:
            raise
    finally:  # a worker still busy ignores SIGTERM, which would hang the exit handler: kill it (and its end is
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # expected, not an error to report)
        for child in multiprocessing.active_children():
            child.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
