"""
Train BlurDM in three stages (METHOD.md §5), each from the weights the one before ends with: stage 1 the sharp
encoder and the deblurrer, stage 2 the blur encoder and the residual estimators, stage 3 all but the sharp encoder.

    python train.py --data GOPRO_Large/                       # the paper's recipe (MIMO-UNet+, 3000/500/3000 epochs)
    python train.py --data photos/ --preset demo --iters 2000,300,1700   # sharp photographs, blurred on the fly
    python train.py --data GOPRO_Large/ --init MIMO-UNetPlus.pkl --iters 31800,5300,31800  # from published weights
    torchrun --nproc_per_node=4 train.py --data GOPRO_Large/  # DistributedDataParallel, one process a GPU
    python train.py --data GOPRO_Large/ --eval-only --init out/stage3.pt # PSNR / SSIM of the whole test split

Rerun the same command to resume from out/last.pt (Ctrl-C and SIGTERM save first): on a CPU, bit-identically.
"""

import argparse
import collections
import contextlib
import csv
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import blurdm


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="GoPro (original or flat), RealBlur, HIDE, blur/ + sharp/, or photos")
    p.add_argument("--out", default="out", help="checkpoints, log.jsonl and scores.csv (default: out)")
    p.add_argument("--preset", default="paper", choices=list(blurdm.PRESETS), help="model and recipe (--init: the "
                   "recipe): paper = MIMO-UNet+ with BlurDM, the row the paper's Table 1 calls MIMO-UNet; mimo-unet = "
                   "Cho et al.'s MIMO-UNet (8 blocks a stage); demo = the shipped weights; tiny = tests")
    p.add_argument("--no-prior", action="store_true", help="the baseline backbone alone (ablation)")
    p.add_argument("--init", help="weights to start from (ours, MIMO-UNet's, official BlurDM's), or to --eval-only")
    p.add_argument("--eval-only", action="store_true", help="score --init on the whole test split; writes scores.csv")
    p.add_argument("--iters", type=comma_numbers(int, 3), help="iterations per stage a,b,c (default: the recipe's "
                   "epochs); 0 skips a stage: 0,0,N --init CKPT trains stage 3 on")
    p.add_argument("--batch", type=int, help="global batch, split over the processes (paper: 20)")
    p.add_argument("--crop", type=int, help="training crop, a multiple of 4 (paper: 256)")
    p.add_argument("--lr", type=float, help="Adam's learning rate at the start of each stage, cosine decay to --lr-min")
    p.add_argument("--lr-min", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--blur-length", type=comma_numbers(float, 2), default=blurdm.BLUR_LENGTH, metavar="LO,HI",
                   help="camera paths in px for photographs blurred on the fly (0,30: sharp inputs too)")
    p.add_argument("--reuse", type=int, default=1, help="steps a rendered crop serves, turned or flipped each time")
    p.add_argument("--workers", type=int, help="data processes (default: 4 on CUDA, 0 on CPUs: it slows the training)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast on CUDA; bf16 on CPUs that have it natively")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (pays off on CUDA)")
    p.add_argument("--val-every", type=int, default=5000, help="validate every N steps (0: at stage ends only)")
    p.add_argument("--val-count", type=int, default=100, help="at most this many validation images")
    p.add_argument("--val-crop", type=int, default=512, help="validation centre crop (0: whole images)")
    p.add_argument("--save-every", type=int, default=1000, help="write out/last.pt every N steps")
    p.add_argument("--log-every", type=int, default=50, help="print and log a line every N steps")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # "--iters -1,1,1": a value that argparse would take for an option
        if argv[i] in ("--iters", "--blur-length"):
            argv[i:i + 2] = [f"{argv[i]}={argv[i + 1]}", ""]
    args = p.parse_args([a for a in argv if a])
    given = dict(batch_size=args.batch, crop=args.crop, lr=args.lr, lr_min=args.lr_min, seed=args.seed)
    recipe = {**blurdm.TRAINING_RECIPES[args.preset], **{k: v for k, v in given.items() if v is not None}}
    checks = [(args.eval_only and not args.init, "--eval-only needs --init CKPT"),
              (args.iters and not any(args.iters), "--iters: at least one stage needs iterations"),
              (args.blur_length[0] > args.blur_length[1], "--blur-length LO,HI needs LO <= HI"),
              (args.blur_length[1] > recipe["crop"], f"--blur-length: paths longer than the {recipe['crop']}px crop"),
              (recipe["crop"] % 4, "--crop must be a multiple of 4"),
              (not 0 <= recipe["lr_min"] <= recipe["lr"] <= 1e30, "--lr-min must be between 0 and --lr"),
              (args.device == "cuda" and not torch.cuda.is_available(),
               "--device cuda: no CUDA device is available to this PyTorch build")]
    for failed, message in checks:
        if failed:
            p.error(message)
    for name, value in vars(args).items():  # whole numbers: sizes and periods >= 1, others >= 0
        least = 1 if name in ("batch", "crop", "reuse", "save_every", "log_every") else 0
        if type(value) is int and not least <= value < 2**63:
            p.error(f"--{name.replace('_', '-')} {value}: out of range")
    return args, recipe


def main(argv=None):
    args, recipe = parse_args(argv)
    ctx = setup(args, recipe)
    splits, problems = blurdm.find_pairs(args.data)
    blurdm.load_pair.cache_clear()  # files may have changed since an earlier run in this process
    ctx.say(f"data: {args.data}: " + ", ".join(f"{len(p)} {s} pairs" for s, p in splits.items())
            + (" of sharp photographs, blurred on the fly" if next(iter(splits.values()))[0][0] is None else ""))
    for line in problems:
        ctx.say(f"warning: {line}")
    if args.eval_only:
        return evaluate_test_split(ctx, splits)
    for signum in (signal.SIGINT, signal.SIGTERM):  # training: Ctrl-C and SIGTERM save first
        signal.signal(signum, functools.partial(request_stop, ctx))
    if "train" not in splits:
        raise ValueError(f"{args.data}: no training split, only {', '.join(splits)} (--eval-only scores a model)")
    pairs, val_pairs = splits["train"], splits.get("test", [])
    if not val_pairs and args.val_count:  # no test split: hold out evenly spaced pairs, about a tenth
        val_pairs = pairs[::math.ceil(len(pairs) / max(1, min(args.val_count, len(pairs) // 10)))]
        pairs = [p for p in pairs if p not in val_pairs] or pairs  # a single pair is trained on and validated
    val_pairs = val_pairs[::math.ceil(len(val_pairs) / args.val_count)] if args.val_count else []  # evenly spaced
    ctx.val_images = list(blurdm.validation_images(val_pairs, args.val_crop, recipe["seed"], args.blur_length, ctx.say))
    if ctx.val_images:
        ctx.say(f"validation: {len(ctx.val_images)} images, the blurry input scores PSNR "
                f"{np.mean([blurdm.psnr(b, s) for _, b, s in ctx.val_images]):.2f} dB")
    stage_steps = args.iters or [math.ceil(e * len(pairs) / recipe["batch_size"]) for e in recipe["stage_epochs"]]
    ctx.settings = dict(**{k: recipe[k] for k in ("crop", "batch_size", "lr", "lr_min", "seed")}, preset=args.preset,
                        no_prior=args.no_prior, init=args.init and str(Path(args.init).resolve()), amp=args.amp,
                        stage_steps=stage_steps, blur_length=list(args.blur_length), reuse=args.reuse,
                        val_count=args.val_count, data=blurdm.fingerprint(args.data, splits))
    model, stages, state = where_to_start(ctx)
    model = model.to(ctx.device, memory_format=blurdm.memory_format(ctx.device))
    if ctx.world_size > 1 and ctx.device.type == "cuda":  # SE's BatchNorm sees the global batch, as on one GPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    on_gpu = ctx.device.type == "cuda" and pairs[0][0] is None  # photographs: blurred on the GPU, a batch at once
    dataset = blurdm.PairDataset(pairs, recipe["crop"], args.blur_length, recipe["seed"], args.reuse, on_gpu)
    per_rank = recipe["batch_size"] // ctx.world_size
    workers = args.workers if args.workers is not None else 4 * (ctx.device.type == "cuda")
    with open(ctx.out / "log.jsonl", "a") if ctx.rank == 0 else contextlib.nullcontext() as ctx.log:
        for stage in stages:  # sample k of step s is a function of (seed, stage, s, k): a resumed run sees its crops
            samples = ((stage, s, k) for s in range(state["step"] if state else 0, stage_steps[stage - 1])
                       for k in range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank))
            loader = DataLoader(dataset, per_rank, sampler=samples, num_workers=workers,
                                worker_init_fn=ignore_stop_signals, pin_memory=ctx.device.type == "cuda")
            if train_stage(model, stage, loader, state, ctx):
                return 128 + ctx.stop.get("signal", signal.SIGTERM)  # ranks told by the all-reduce have no signal
            state = None
    best = ctx.out / ("best.pt" if ctx.best["psnr"] is not None else "last.pt")
    then = ("stage 2 starts from it: --iters 0,B,C --init" if model.cfg.prior and not any(stage_steps[1:])
            else "deblur with: python sample.py YOUR_IMAGE --ckpt")
    ctx.say(f"done in {timedelta(seconds=round(time.perf_counter() - ctx.started))}. {then} {best}")
    return 0


def setup(args, recipe):
    """This process (rank, device, precision, output folder) as the context every step reads; among it settings
    (what a resumed run must share with the one that saved), say (print on rank 0), log (log.jsonl on rank 0), best
    (best validation PSNR of stages 2-3), stop (the signal that asked to stop), saved (what out/last.pt holds)."""
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                                             ("WORLD_SIZE", 1)))
    say = print if rank == 0 else (lambda *a, **k: None)
    device = blurdm.pick_device(args.device)
    if recipe["batch_size"] % world_size:
        raise ValueError(f"--batch {recipe['batch_size']} does not divide over the {world_size} processes")
    if device.type == "cuda":
        gpus, processes = torch.cuda.device_count(), max(local_rank + 1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if processes > gpus:
            raise ValueError(f"{processes} processes on this machine but {gpus} GPU{'s' * (gpus != 1)}: one process a "
                             f"GPU (torchrun --nproc_per_node={gpus})")
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every training crop has one size
    if "RANK" in os.environ:  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT's pattern)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and args.preset in ("paper", "mimo-unet") and not args.eval_only:
        say(f"note: --preset {args.preset} is sized for GPUs (hours an epoch here, and more memory than most "
            "machines have); --preset demo is sized for CPUs")
    autocast, _, note = blurdm.autocast(device, args.amp)
    if note:
        say(f"note: --amp {note}")
    (out := Path(args.out)).mkdir(parents=True, exist_ok=True)
    blurdm.remove_stale_temps(out)
    return SimpleNamespace(args=args, recipe=recipe, settings={}, device=device, rank=rank, world_size=world_size,
                           autocast=autocast, out=out, say=say, log=None, val_images=[], best={"psnr": None},
                           stop={}, saved="", started=time.perf_counter())


def train_stage(model, stage, loader, state, ctx):
    """One stage, from `state` (a checkpoint to resume) or from step 0; returns True when stopped by a signal."""
    total, parameters = ctx.settings["stage_steps"][stage - 1], model.set_stage(stage)
    optimizer = torch.optim.Adam(parameters, lr=ctx.recipe["lr"], fused=ctx.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1), eta_min=ctx.recipe["lr_min"])
    fp16 = ctx.args.amp == "fp16" and ctx.device.type == "cuda"  # torch.amp.GradScaler is torch 2.3's
    scaler = (torch.amp.GradScaler("cuda", enabled=fp16) if hasattr(torch.amp, "GradScaler")
              else torch.cuda.amp.GradScaler(enabled=fp16))
    parts = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    for name, part in parts.items() if state else ():
        part.load_state_dict(state[name])
    step = state["step"] if state else 0
    forward = torch.compile(model) if ctx.args.compile else model
    if ctx.world_size > 1:
        forward = DDP(forward, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    what, r = " + ".join(blurdm.STAGE_PARTS[stage]) if model.cfg.prior else "deblurrer, no prior", ctx.recipe
    ctx.say(f"stage {stage} ({what}): steps {step}..{total}, batch {r['batch_size']} of {r['crop']}px crops, "
            f"lr {r['lr']:g} -> {r['lr_min']:g}")
    batches, starts = iter(loader), collections.deque(maxlen=100)  # starts of the recent steps: the pace

    while step < total:
        t0 = time.perf_counter()
        starts.append(t0)  # a step lasts until the next starts: validation and saving included
        batch = next(batches)
        if loader.dataset.blur_on_device:  # photographs, blurred here a batch at a time
            batch = blurdm.blur_batch_on_device(batch, ctx.device)
        blur, sharp = (x.to(ctx.device, non_blocking=True, memory_format=blurdm.memory_format(ctx.device))
                       for x in batch)
        t1 = time.perf_counter()
        torch.manual_seed(blurdm.mix_seed(ctx.recipe["seed"], stage, step, ctx.rank))  # ε and dropout, replayable
        with ctx.autocast:
            loss = forward(blur, sharp, stage)  # the stage's loss; DDP syncs the gradients through forward
        stats = torch.stack([loss.detach().float(), torch.tensor(float(bool(ctx.stop)), device=ctx.device)])
        if ctx.world_size > 1:  # one small all-reduce a step: every rank sees the same loss and the same stop request
            dist.all_reduce(stats)
        loss_value, stopping = stats[0].item() / ctx.world_size, stats[1].item() > 0
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
        if ctx.log and (step % ctx.args.log_every == 0 or step == total):
            pace = (time.perf_counter() - starts[0]) / len(starts)  # seconds a step, lately
            stage_left = round(pace * (total - step))
            run_left = stage_left + round(pace * sum(ctx.settings["stage_steps"][stage:]))  # at this pace
            ctx.say(f"stage {stage} step {step}/{total} | loss {loss_value:.4f} | lr {lr:.1e} | {ms:.0f} ms "
                    f"(data {data_ms:.0f}) | left: stage {timedelta(seconds=stage_left)}, "
                    f"run {timedelta(seconds=run_left)}")
            print(json.dumps(dict(stage=stage, step=step, loss=loss_value, lr=lr, step_ms=round(ms, 2),
                                  data_ms=round(data_ms, 2), time=time.time())), file=ctx.log, flush=True)
        checkpoint = functools.partial(save, model, ctx, stage=stage, step=step, **parts)
        if ctx.log and ctx.val_images and ((ctx.args.val_every and step % ctx.args.val_every == 0) or step == total):
            validate(model, stage, step, ctx, checkpoint)
        if step % ctx.args.save_every == 0 or step == total or stopping:
            if not all(torch.isfinite(p).all() for p in parameters):
                raise ValueError(f"weights not finite at stage {stage} step {step}; stopped, last checkpoint kept")
            checkpoint("last.pt", *([f"stage{stage}.pt"] if step == total else []))
        if stopping:
            ctx.say(f"stopped at stage {stage} step {step}; saved {ctx.out / 'last.pt'}; rerun the command to resume")
            return True
    if ctx.world_size > 1:
        dist.barrier()  # the next stage starts from the same weights on every rank
    return False


def save(model, ctx, *names, stage, step, **parts):
    """Write the training state (parts: optimizer, scheduler, scaler) under each name in out/ (rank 0)."""
    for name in names if ctx.rank == 0 else ():
        blurdm.save_checkpoint(ctx.out / name, model, stage=stage, step=step, settings=ctx.settings,
                               best_psnr=ctx.best["psnr"], **{k: part.state_dict() for k, part in parts.items()})
        ctx.saved = f"{ctx.out / name} holds stage {stage} step {step}" if name == "last.pt" else ctx.saved


def validate(model, stage, step, ctx, checkpoint):
    """PSNR / SSIM on the validation images; a new best (stages 2-3: what sample.py runs) is saved as best.pt."""
    psnr, ssim = (float(v) for v in np.mean(list(blurdm.evaluate(model, ctx.val_images, ctx.device, stage)), axis=0))
    model.set_stage(stage)  # back to this stage's training modes
    competes = not (model.cfg.prior and stage == 1)  # stage 1 validates with SE(blur, sharp): not for best.pt
    improved = competes and (ctx.best["psnr"] is None or psnr > ctx.best["psnr"])
    ctx.best["psnr"] = psnr if improved else ctx.best["psnr"]
    ctx.say(f"val stage {stage} step {step} | PSNR {psnr:.2f} dB | SSIM {ssim:.4f} | {len(ctx.val_images)} images"
            + ("" if competes else " | prior SE(blur, sharp)") + (" | best, saved best.pt" if improved else ""))
    print(json.dumps(dict(stage=stage, step=step, val_psnr=psnr, val_ssim=ssim)), file=ctx.log, flush=True)
    if improved:
        checkpoint("best.pt")


def where_to_start(ctx):
    """(model, stages to run, state to resume or None): out/last.pt if this run wrote it, else --init, else fresh."""
    args, stages, last = ctx.args, [s for s in (1, 2, 3) if ctx.settings["stage_steps"][s - 1]], ctx.out / "last.pt"
    torch.manual_seed(ctx.recipe["seed"])  # the same initial weights in every process and every run of a command
    if last.exists():
        cfg, weights, state = blurdm.read_checkpoint(last)
        if "settings" not in state:
            raise ValueError(f"{last}: saved by an older train.py; --init {last} starts from its weights (another --out)")
        saved = state["settings"]
        if differing := [k for k in ctx.settings if saved.get(k) != ctx.settings[k]]:
            detail = ", ".join(blurdm.fingerprint_changes(saved.get(k), ctx.settings[k]) if k == "data" else
                               f"{k} {saved.get(k)} vs {ctx.settings[k]}" for k in differing)
            raise ValueError(f"{last}: saved by a run with other settings ({detail}); rerun its command to resume, "
                             "or pass another --out")
        model = blurdm.BlurDM(cfg)
        blurdm.load_weights(model, weights, last)
        finished = state["step"] >= ctx.settings["stage_steps"][state["stage"] - 1]
        stages = [s for s in stages if s > state["stage"] or (s == state["stage"] and not finished)]
        ctx.say(f"{last}: " + (f"stage {state['stage']} finished" if finished else
                               f"resuming stage {state['stage']} at step {state['step']}"))
        ctx.best["psnr"] = state.get("best_psnr")
        return model, stages, None if finished else state
    if stages and stages[0] > 1 and not args.init:
        raise ValueError(f"stage {stages[0]} starts from a stage {stages[0] - 1} model: pass --init")
    if not args.init:
        return blurdm.BlurDM(blurdm.BlurDMConfig.preset(args.preset, prior=not args.no_prior)), stages, None
    cfg, weights, _ = blurdm.read_checkpoint(args.init)
    if args.no_prior and cfg.prior:
        raise ValueError(f"{args.init}: its deblurrer was trained with a prior; --no-prior needs a backbone alone")
    new_prior = not cfg.prior and not args.no_prior  # a published backbone gains a prior, its fusion the identity
    if new_prior and stages[0] > 1:
        raise ValueError(f"{args.init}: a backbone without a prior; its prior networks train from stage 1 on")
    model = blurdm.BlurDM(dataclasses.replace(cfg, prior=True, fusion_residual=True) if new_prior else cfg)
    blurdm.load_weights(model, weights, args.init, blurdm.NEW_AT_STAGE[stages[0]])
    ctx.say(f"stage {stages[0]} starts from the weights of {args.init}" + (
        " (a backbone: the prior networks are new, their fusion starts as the identity)" if new_prior else ""))
    return model, stages, None


def evaluate_test_split(ctx, splits):
    """--eval-only: score --init on every pair of the test split (or of the only split), whole images."""
    model = blurdm.load_model(ctx.args.init).float().to(ctx.device)
    split, rows = "test" if "test" in splits else next(iter(splits)), []
    if split != "test":
        ctx.say(f"note: {ctx.args.data} has no test split: scoring its {split} pairs")
    with ctx.autocast:
        for image in blurdm.validation_images(splits[split], 0, ctx.recipe["seed"], ctx.args.blur_length, ctx.say):
            psnr, ssim = next(blurdm.evaluate(model, [image], ctx.device))
            rows.append((image[0], f"{psnr:.4f}", f"{ssim:.6f}"))
            ctx.say(f"{image[0]} | PSNR {psnr:.2f} dB | SSIM {ssim:.4f}")
    if not rows:
        raise ValueError(f"{ctx.args.data}: no {split} pair could be read")
    with blurdm.atomic_path(ctx.out / "scores.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("input", "psnr_db", "ssim"), *rows])
    ctx.say(f"mean of {len(rows)}: PSNR {np.mean([float(r[1]) for r in rows]):.2f} dB (uint8 RGB, whole image) | SSIM "
            f"{np.mean([float(r[2]) for r in rows]):.4f} ({blurdm.SSIM_RECIPE}) | {ctx.out / 'scores.csv'}")
    return 1 if len(rows) < len(splits[split]) else 0  # a test image could not be read


def comma_numbers(kind, count):
    """An argparse type: `count` numbers separated by commas (or one, for all), each in [0, 1e9)."""
    def comma_separated(text):
        values = [kind(v) for v in text.split(",")]  # not numbers: argparse says "invalid comma_separated value"
        values = values * count if len(values) == 1 else values
        if len(values) != count or not all(0 <= v < 1e9 for v in values):
            raise argparse.ArgumentTypeError(f"takes {count} numbers >= 0 separated by commas, got {text!r}")
        return values
    return comma_separated


# Stops and crashes: Ctrl-C and SIGTERM save first; an error is one line; no process outlives the run


def request_stop(ctx, signum, frame):
    """Ctrl-C or SIGTERM: finish the step, save, exit. A second Ctrl-C aborts at once, saying what out/last.pt holds
    (a repeated SIGTERM, as schedulers and torchrun send, changes nothing). os.write, as a print could interrupt one."""
    aborting = bool(ctx.stop) and signum == signal.SIGINT
    ctx.stop.setdefault("signal", signum)
    message = f"aborted; {ctx.saved or 'nothing saved yet in this run'}" if aborting else \
        f"{signal.Signals(signum).name}: saving after this step (Ctrl-C again to abort)"
    if ctx.rank == 0:
        os.write(1, f"\n{message}\n".encode())
    if aborting:
        raise KeyboardInterrupt


def ignore_stop_signals(worker_id):  # Ctrl-C, or a SIGTERM to the process group: the main process alone decides
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def cli(argv=None):
    """The entry point: one `error:` line (from rank 0) and exit code 1 for what a user can fix; worker processes
    never outlive it."""
    try:
        return main(argv)
    except BaseException as err:  # clearing the frames frees a DataLoader they hold: its workers stop cleanly now
        traceback.clear_frames(err.__traceback__)
        if isinstance(err, KeyboardInterrupt):
            return 130
        if isinstance(err, (ValueError, OSError)):  # data, checkpoints, settings, files: the message names the file
            message = blurdm.error_line(err)
        elif isinstance(err, (MemoryError, RuntimeError)) and blurdm.out_of_memory(err):
            message = f"out of memory ({blurdm.error_line(err)[:100]}); a smaller --batch or --crop needs less"
        else:
            raise
    finally:  # a worker still busy ignores SIGTERM, which would hang the exit handler: kill it, expecting its end
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ignore_stop_signals(None)  # nothing interrupts this cleanup
        for child in multiprocessing.active_children():
            child.kill()
        if distributed := dist.is_initialized():
            dist.destroy_process_group()
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 or distributed:  # before the process group exists every rank meets the same error: one line
        print(f"train.py: error: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
