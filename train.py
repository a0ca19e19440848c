"""Train BlurDM in three stages (METHOD.md §5): 1. the sharp encoder and the deblurrer, 2. the
blur encoder and the residual estimators, 3. all but the sharp encoder. Rerun a command to resume
it from out/last.pt (Ctrl-C and SIGTERM save first).

    python train.py --data GOPRO_Large/                     # the paper's recipe, MIMO-UNet+
    python train.py --data photos/ --preset demo --iters 2000 300 1700   # photographs, blurred here
    python train.py --data GOPRO_Large/ --init MIMO-UNetPlus.pkl --iters 31800 5300 31800
    torchrun --nproc_per_node=4 train.py --data GOPRO_Large/      # one process a GPU
    python train.py --data GOPRO_Large/ --eval-only --init out/stage3.pt   # PSNR / SSIM, test split
"""

import argparse
import csv
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import blurdm

def name(text):  # an argparse type: a path, never empty (an unset variable)
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name")
    return text

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", type=name, required=True, help="GoPro, RealBlur, HIDE, pairs or photos")
p.add_argument("--out", type=name, default="out", help="checkpoints and scores.csv")
p.add_argument("--preset", default="paper", choices=list(blurdm.PRESETS), help="demo: for CPUs")
p.add_argument("--no-prior", action="store_true", help="the backbone alone, the paper's baseline")
p.add_argument("--init", type=name, help="weights to start from (any kind), or to --eval-only")
p.add_argument("--eval-only", action="store_true", help="score --init on the test split")
p.add_argument("--iters", type=int, nargs=3, help="steps a stage (default: the paper's epochs)")
p.add_argument("--batch", type=int, help="global batch, split over the processes (paper: 20)")
p.add_argument("--crop", type=int, help="training crop, a multiple of 4 (paper: 256)")
p.add_argument("--lr", type=float, help="Adam's lr, a cosine decay to --lr-min in each stage")
p.add_argument("--lr-min", type=float)
p.add_argument("--seed", type=int, default=2023)
p.add_argument("--blur-length", type=float, nargs=2, default=blurdm.BLUR_LENGTH, metavar="PX")
p.add_argument("--workers", type=int, help="data processes (default: the cores, 8 at most, on "
               "CUDA; 0 on a CPU)")
p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
p.add_argument("--amp", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
p.add_argument("--compile", action="store_true", help="torch.compile the networks (torch >= 2.2)")
p.add_argument("--val-every", type=int, default=5000, help="validate every N steps, stage ends")
p.add_argument("--val-count", type=int, default=100, help="at most this many validation images")
p.add_argument("--val-crop", type=int, default=512, help="validation centre crop (0: whole)")
p.add_argument("--save-every", type=int, default=1000, help="write out/last.pt every N steps")
p.add_argument("--log-every", type=int, default=50, help="a log line every N steps (and minute)")

def main(args):
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    say = print if rank == 0 else (lambda *a, **k: None)
    device = blurdm.pick_device(args.device)
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")  # torchrun: one process a GPU
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every training crop has one size
    if world > 1:  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    given = dict(batch_size=args.batch, crop=args.crop, lr=args.lr, lr_min=args.lr_min)
    recipe = blurdm.TRAINING_RECIPES[args.preset] | {k: v for k, v in given.items()
                                                      if v is not None}
    autocast, precision = blurdm.autocast(device, args.amp)
    if device.type == "cpu" and args.preset in ("paper", "mimo-unet") and not args.eval_only:
        say(f"note: --preset {args.preset} is sized for GPUs (a minute a step here); demo for CPUs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits, problems = blurdm.find_pairs(args.data)
    photos = next(iter(splits.values()))[0][0] is None  # no blurry image: sharp photographs
    say(f"data: {args.data}: " + ", ".join(f"{len(v)} {k} pairs" for k, v in splits.items())
        + " of sharp photographs, blurred on the fly" * photos)
    for line in problems:
        say(f"warning: {line}")
    if args.eval_only:
        return evaluate_test_split(args, splits, device, out, say)
    if "train" not in splits:
        raise ValueError(f"{args.data}: no training split, only {', '.join(splits)}")
    pairs = splits["train"]
    val_pairs = splits.get("test") or pairs[::10]  # no test split: held out from the training
    val_pairs = val_pairs[::math.ceil(len(val_pairs) / args.val_count)] if args.val_count else []
    pairs = [p for p in pairs if p not in set(val_pairs)] or pairs
    val_images = [*blurdm.validation_images(val_pairs, args.val_crop, args.seed, args.blur_length)]
    if val_images:
        say(f"validation: {len(val_images)} images, the blurry input scores "
            f"{np.mean([blurdm.psnr(b, s) for _, b, s in val_images]):.2f} dB")
    epoch = len(pairs) / recipe["batch_size"]  # steps an epoch
    steps = args.iters or [math.ceil(e * epoch) for e in recipe["stage_epochs"]]
    if not any(steps):
        raise ValueError("--iters: no stage has a step")
    files = {os.path.relpath(f, args.data): os.stat(f) for pair in pairs + val_pairs for f in pair
             if f}  # a resumed run compares each file's size and time
    settings = dict(recipe, preset=args.preset, no_prior=args.no_prior, amp=precision, steps=steps,
                    init=args.init and str(Path(args.init).resolve()), seed=args.seed,
                    blur_length=list(args.blur_length), val_count=args.val_count,
                    data=sorted((f, s.st_size, s.st_mtime_ns) for f, s in files.items()))
    run = SimpleNamespace(args=args, recipe=recipe, settings=settings, device=device, rank=rank,
                          world=world, autocast=autocast, out=out, say=say, val_images=val_images,
                          stop=[], started=time.time())  # what every step reads
    for signum in (signal.SIGINT, signal.SIGTERM):  # training: Ctrl-C and SIGTERM save first
        signal.signal(signum, lambda signum, frame: request_stop(run, signum))
    model, stages, state = where_to_start(run)
    model = model.to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions
    if args.compile:  # the networks, not the loss (Inductor leaves complex FFTs to eager)
        say("note: --compile: each stage's first step compiles (minutes for the paper preset)")
        for network in model.children():
            network.compile(dynamic=False)  # in place: the same weights' names
    if world > 1 and device.type == "cuda":  # SE's BatchNorm sees the global batch, as on one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dataset = blurdm.PairDataset(pairs, recipe["crop"], args.blur_length, args.seed)
    per_rank = recipe["batch_size"] // world
    if per_rank * world != recipe["batch_size"]:
        raise ValueError(f"--batch {recipe['batch_size']} does not divide over {world} processes")
    cores = os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # this process's share
    workers = args.workers if args.workers is not None else min(8, cores) * (device.type == "cuda")
    for stage in stages:  # sample k of step s is a function of (seed, stage, s, k)
        first = state["step"] if state else 0
        items = ((stage, s, k) for s in range(first, steps[stage - 1])
                 for k in range(rank * per_rank, (rank + 1) * per_rank))
        loader = DataLoader(dataset, per_rank, sampler=items, num_workers=workers,
                            worker_init_fn=ignore_signals, pin_memory=device.type == "cuda")
        if train_stage(model, stage, loader, state, run):
            return 128 + (run.stop or [signal.SIGTERM])[0]  # a rank told by the others: SIGTERM
        state = None
    last = max(s for s in (1, 2, 3) if steps[s - 1])
    say(f"done in {timedelta(seconds=round(time.time() - run.started))}: {out}/stage{last}.pt")
    return 0

def train_stage(model, stage, loader, state, run):
    """One stage, from `state` (a checkpoint to resume) or from step 0; True when stopped."""
    total, parameters = run.settings["steps"][stage - 1], model.set_stage(stage)
    optimizer = torch.optim.Adam(parameters, lr=run.recipe["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, run.recipe["lr_min"])
    fp16 = run.settings["amp"] == "fp16"  # torch.amp.GradScaler is torch 2.3's
    scaler = (torch.amp.GradScaler("cuda", enabled=fp16) if hasattr(torch.amp, "GradScaler")
              else torch.cuda.amp.GradScaler(enabled=fp16))
    parts = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    if state:
        for key, part in parts.items():
            part.load_state_dict(state[key])
    step = state["step"] if state else 0
    forward = model
    if run.world > 1:
        forward = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    what = " + ".join(blurdm.STAGE_PARTS[stage]) if model.cfg.prior else "deblurrer, no prior"
    run.say(f"stage {stage} ({what}): steps {step}..{total}, " + ", ".join(
        f"{k} {v}" for k, v in run.recipe.items() if k != "stage_epochs"))
    batches, first, started = iter(loader), step, time.time()
    logged, loss_sum, n = started, 0.0, 0
    while step < total:
        t0 = time.time()
        blur, sharp = blurdm.training_batch(next(batches), run.device)
        t1 = time.time()
        torch.manual_seed(hash((run.settings["seed"], stage, step, run.rank)))  # ε and dropout
        with run.autocast:
            loss = forward(blur, sharp, stage)  # DDP syncs the gradients through forward
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step, n, loss_sum = step + 1, n + 1, loss_sum + loss.detach().float()
        stopping = bool(run.stop) and run.world == 1
        if run.world > 1 and (step % 10 == 0 or step % run.args.save_every == 0 or step == total):
            stats = torch.stack([loss_sum, torch.tensor(float(bool(run.stop)), device=run.device)])
            dist.all_reduce(stats)  # every 10 steps (torchrun waits 30 s after a SIGTERM): the
            loss_sum, stopping = stats[0] / run.world, bool(stats[1] > 0)  # same loss and stop
        save = step % run.args.save_every == 0 or step == total or stopping
        log = run.rank == 0 and (step in (1, total) or step % run.args.log_every == 0
                                 or time.time() - logged > 60)
        validate = run.rank == 0 and run.val_images and (step % run.args.val_every == 0
                                                         or step == total)
        if not (save or log or validate):
            continue  # no host sync: the loss is read at log, validation and save steps
        loss_value, loss_sum, n = float(loss_sum) / n, 0.0, 0
        if not math.isfinite(loss_value):  # before the bad step reaches a checkpoint
            raise ValueError(f"loss is {loss_value} at stage {stage} step {step}; stopped, the "
                             "last checkpoint is kept (a lower --lr, or --amp bf16 for fp16)")
        if log:
            ms, pace = 1000 * (time.time() - t0), (time.time() - started) / (step - first)
            left = [round(pace * (total - step)), round(pace * sum(run.settings["steps"][stage:]))]
            run.say(f"stage {stage} step {step}/{total} | loss {loss_value:.4f} | lr {lr:.1e} | "
                    f"{ms:.0f} ms (data {1000 * (t1 - t0):.0f}) | left: stage "
                    f"{timedelta(seconds=left[0])}, run {timedelta(seconds=sum(left))}", flush=True)
            logged = time.time()
        if validate:
            psnr, ssim = np.mean(list(blurdm.evaluate(model, run.val_images, run.device, stage)), 0)
            model.set_stage(stage)  # back to this stage's training modes
            run.say(f"val stage {stage} step {step} | PSNR {psnr:.2f} dB | SSIM {ssim:.4f}"
                    + " | prior SE(blur, sharp)" * (model.cfg.prior and stage == 1), flush=True)
        if save and run.rank == 0:
            for name in ["last.pt", *[f"stage{stage}.pt"] * (step == total)]:
                blurdm.save_checkpoint(run.out / name, model, settings=run.settings, stage=stage,
                                       step=step, **{k: v.state_dict() for k, v in parts.items()})
        if stopping:
            run.say(f"stopped at stage {stage} step {step}; saved {run.out / 'last.pt'}; rerun the "
                    "command to resume")
            return True
    if run.world > 1:
        dist.barrier()  # the next stage starts from the same weights on every rank
    return False

def where_to_start(run):
    """(model, stages to run, state to resume or None): out/last.pt, else --init, else fresh."""
    args, last = run.args, run.out / "last.pt"
    stages = [s for s in (1, 2, 3) if run.settings["steps"][s - 1]]
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if last.exists():
        try:
            cfg, weights, state = blurdm.read_checkpoint(last)
            changed = [k for k in run.settings if state["settings"].get(k) != run.settings[k]]
            finished = state["step"] >= run.settings["steps"][state["stage"] - 1]
        except Exception as err:
            raise ValueError(f"{last}: cannot resume from it ({blurdm.error_line(err)})") from None
        if changed:
            raise ValueError(f"{last}: saved by a run with other settings ({', '.join(changed)}); "
                             "rerun its command to resume, or pass another --out")
        model = blurdm.BlurDM(cfg)
        blurdm.load_weights(model, weights, last)
        stages = [s for s in stages if s > state["stage"] or s == state["stage"] and not finished]
        run.say(f"{last}: stage {state['stage']} " + (
            "finished" if finished else f"resumes at step {state['step']}"))
        return model, stages, None if finished else state
    if stages[0] > 1 and not args.init:
        raise ValueError(f"stage {stages[0]} starts from a stage-{stages[0] - 1} model: --init")
    if not args.init:
        cfg = blurdm.BlurDMConfig.preset(args.preset, prior=not args.no_prior)
        return blurdm.BlurDM(cfg), stages, None
    cfg, weights, checkpoint = blurdm.read_checkpoint(args.init)
    if cfg.prior and checkpoint.get("stage", 3) < stages[0] - 1:  # its later networks untrained
        raise ValueError(f"{args.init}: a stage-{checkpoint['stage']} checkpoint; stage "
                         f"{stages[0]} starts from stage {stages[0] - 1}'s")
    new_prior = not cfg.prior and not args.no_prior  # a published backbone gains a prior
    if args.no_prior and cfg.prior or new_prior and stages[0] > 1:
        raise ValueError(f"{args.init}: " + ("trained with a prior, not for --no-prior" if cfg.prior
                                             else "a backbone: its prior trains from stage 1"))
    model = blurdm.BlurDM(dataclasses.replace(cfg, prior=True, fusion_residual=True)
                          if new_prior else cfg)
    prior_networks = ("blur_encoder.", "blur_estimator.", "noise_estimator.")  # stage 2 trains them
    new = {1: ("sharp_encoder.", "deblurrer.prior_fusion.", *prior_networks), 2: prior_networks,
           3: ("sharp_encoder.",)}[stages[0]]  # what a stage may start without
    blurdm.load_weights(model, weights, args.init, new)
    run.say(f"stage {stages[0]} starts from {args.init}" + (
        " (a backbone: its new prior's fusion starts as the identity)" if new_prior else ""))
    return model, stages, None

def evaluate_test_split(args, splits, device, out, say):
    """--eval-only: score --init on each pair of the test split (else the only one), in fp32."""
    if not args.init:
        raise ValueError("--eval-only scores --init CKPT")
    model, pairs, rows = blurdm.load_model(args.init).to(device), splits.get("test"), []
    pairs = pairs or [*splits.values()][0]
    for image in blurdm.validation_images(pairs, 0, args.seed, args.blur_length):
        psnr, ssim = next(blurdm.evaluate(model, [image], device))
        rows.append((image[0], round(psnr, 4), round(ssim, 6)))
        say(f"{image[0]} | PSNR {rows[-1][1]:.2f} dB | SSIM {rows[-1][2]:.4f}")
    with blurdm.atomic(out / "scores.csv") as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("input", "psnr_db", "ssim"), *rows])
    mean = np.mean([r[1:] for r in rows], 0) if rows else [math.nan] * 2
    say(f"mean of {len(rows)}: PSNR {mean[0]:.2f} dB (uint8 RGB, whole image) | 3-D SSIM "
        f"{mean[1]:.4f} | {out / 'scores.csv'}")
    if len(rows) < len(pairs):
        raise ValueError(f"{len(pairs) - len(rows)} test images could not be read (warnings above)")
    return 0

def request_stop(run, signum):
    """Ctrl-C or SIGTERM: finish the step, save, exit; a second Ctrl-C aborts at once."""
    if run.stop and signum == signal.SIGINT:
        raise KeyboardInterrupt
    run.stop.append(signum)
    if run.rank == 0:  # os.write: a print could interrupt the print it interrupted
        os.write(1, b"\nsaving after this step (Ctrl-C again to abort)\n")

def ignore_signals(worker_id=None):  # data workers: the main process alone decides
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)

def cli(argv=None):
    """The entry point: one `error:` line and exit code 1 for any failure."""
    args = p.parse_args(argv)
    crop, every = args.crop or 4, min(args.val_every, args.save_every, args.log_every)
    ok = {"--iters": min(args.iters or [0]) >= 0, "--crop": crop > 0 and crop % 4 == 0,
          "--blur-length": 0 <= args.blur_length[0] <= args.blur_length[1],
          "--batch": (args.batch or 1) > 0, "--val-count": args.val_count >= 0,
          "--val-every, --save-every, --log-every": every > 0}
    for flag, fine in ok.items():
        if not fine:
            p.error(f"{flag}: out of range (the sizes and periods >= 1, the crop a multiple of 4)")
    try:
        try:
            return main(args)
        finally:  # before a data loader's cleanup would wait on its workers: none outlives the run
            ignore_signals()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill
            for child in multiprocessing.active_children():
                child.kill()
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # data, checkpoints, settings, files: the message names the file
        rank = int(os.environ.get("RANK", 0))  # before the processes meet, all would say the same
        if rank == 0 or dist.is_initialized():
            print(f"train.py: error: {f'rank {rank}: ' * bool(rank)}{blurdm.error_line(err)}",
                  file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(cli())
