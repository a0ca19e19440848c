"""
Tests of train.py: data layouts and pairing, the training samples, the three-stage recipe end to end, resuming,
two-process DistributedDataParallel (gloo), and the errors a user sees. Tiny preset, small generated PNGs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blurdm
import train

_TRAIN_REPO = Path(__file__).resolve().parent
_TRAIN_FAST = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--workers", "0", "--val-crop", "32", "--log-every", "1"]


@pytest.fixture(autouse=True)
def _train_one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads made a tiny step 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_png(path, seed, size=(40, 48)):
    """A smooth random RGB image (H, W) = size, written as PNG; returns its uint8 array."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = rng.random((size[0] // 8 + 1, size[1] // 8 + 1, 3))
    pixels = (np.kron(coarse, np.ones((8, 8, 1)))[:size[0], :size[1]] * 200 + rng.random((*size, 3)) * 55)
    pixels = pixels.astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _train_gopro(root, train_sequences=("GOPR0372_07_00", "GOPR0374_11_01"), per_sequence=3, test_per_sequence=1):
    """A fake GOPRO_Large tree: blurry frames are the sharp frame shifted by a pixel, plus a blur_gamma decoy."""
    root = Path(root)
    for split, count in (("train", per_sequence), ("test", test_per_sequence)):
        for s, sequence in enumerate(train_sequences):
            for k in range(count):
                sharp = _train_png(root / split / sequence / "sharp" / f"{k:06d}.png", seed=100 * s + k)
                Image.fromarray(np.roll(sharp, 1, axis=1)).save(_train_mkdir(root / split / sequence / "blur") / f"{k:06d}.png")
                Image.fromarray(255 - sharp).save(_train_mkdir(root / split / sequence / "blur_gamma") / f"{k:06d}.png")
    return root


def _train_mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train_main(argv, monkeypatch):
    """Run train.main() in this process (no interpreter start-up); signal handlers are restored afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    try:
        train.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _train_cli(argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(_TRAIN_REPO / "train.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=_TRAIN_REPO, env=env, timeout=120, **kwargs)


def _train_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _train_error_line(stderr):
    """The one error line of a failed run; the tqdm bar (carriage returns) is not part of it."""
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.startswith("train.py: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# layouts and pairing


def test_train_gopro_tree_pairs_blur_not_blur_gamma_per_sequence(tmp_path):
    _train_gopro(tmp_path / "GOPRO_Large")
    layout, splits, problems = train.find_pairs(tmp_path)  # the folder the archive was unpacked into
    assert layout == "gopro" and problems == []
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "test": 2}
    for blur, sharp in splits["train"] + splits["test"]:
        assert Path(blur).parent.name == "blur" and Path(sharp).parent.name == "sharp"
        assert Path(blur).name == Path(sharp).name and Path(blur).parents[1] == Path(sharp).parents[1]


def test_train_pairs_by_name_not_position_and_reports_unmatched(tmp_path):
    # sorted by position, blur a,b,c would meet sharp b,c,d: pairing by name must give b-b and c-c
    for name in "abc":
        _train_png(tmp_path / "blur" / f"{name}.png", seed=ord(name))
    for name in "bcd":
        _train_png(tmp_path / "sharp" / f"{name}.png", seed=ord(name))
    layout, splits, problems = train.find_pairs(tmp_path)
    assert layout == "paired"
    assert [(Path(b).name, Path(s).name) for b, s in splits["train"]] == [("b.png", "b.png"), ("c.png", "c.png")]
    assert len(problems) == 2
    assert "1 blurry images with no match" in problems[0] and "a" in problems[0]
    assert "1 sharp images with no match" in problems[1] and "d" in problems[1]


def test_train_flat_gopro_and_paired_split_folders(tmp_path):
    for split in ("train", "test"):
        for k in range(2):
            _train_png(tmp_path / "flat" / split / "input" / f"GOPR0001-{k:06d}.png", seed=k)
            _train_png(tmp_path / "flat" / split / "target" / f"GOPR0001-{k:06d}.png", seed=k)
            _train_png(tmp_path / "paired" / split / "blur" / "scene" / f"{k}.jpg", seed=k)  # suffixes may differ
            _train_png(tmp_path / "paired" / split / "sharp" / "scene" / f"{k}.png", seed=k)
    layout, splits, problems = train.find_pairs(tmp_path / "flat")
    assert layout == "gopro-flat" and problems == [] and {k: len(v) for k, v in splits.items()} == {"train": 2, "test": 2}
    layout, splits, problems = train.find_pairs(tmp_path / "paired")
    assert layout == "paired" and problems == [] and {k: len(v) for k, v in splits.items()} == {"train": 2, "test": 2}
    assert all(Path(b).stem == Path(s).stem and Path(b).parent.name == "scene" for b, s in splits["test"])


def test_train_realblur_lists_pair_gt_and_blur_columns_and_report_missing(tmp_path):
    root = tmp_path / "RealBlur"
    lines = {"train": [], "test": []}
    for split, scenes in (("train", (1, 2)), ("test", (3,))):
        for scene in scenes:
            gt, blur = f"RealBlur-R_ECC/scene{scene:03d}/gt/gt_1.png", f"RealBlur-R_ECC/scene{scene:03d}/blur/blur_1.png"
            _train_png(root / gt, seed=scene)
            _train_png(root / blur, seed=scene + 50)
            lines[split].append(f"{gt} {blur}")
    lines["train"].append("RealBlur-R_ECC/scene009/gt/gt_1.png RealBlur-R_ECC/scene009/blur/blur_1.png")  # missing
    for split in lines:
        (root / f"RealBlur_R_{split}_list.txt").write_text("\n".join(lines[split]) + "\n")
    layout, splits, problems = train.find_pairs(root)  # only the R lists: they are used
    assert layout == "realblur"
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "test": 1}
    for blur, sharp in splits["train"]:
        assert "/blur/blur_" in blur and "/gt/gt_" in sharp and Path(blur).parents[1] == Path(sharp).parents[1]
    assert len(problems) == 1 and "1 listed files missing" in problems[0] and "scene009" in problems[0]
    # a list file itself also names the data set
    layout, splits, _ = train.find_pairs(root / "RealBlur_R_test_list.txt")
    assert layout == "realblur" and len(splits["test"]) == 1


def test_train_hide_pairs_test_subsets_with_gt_by_file_name(tmp_path):
    root = tmp_path / "HIDE_dataset"
    for subset, names in (("test-close-ups", ("1fromGOPR0950.png",)), ("test-long-shot", ("2fromGOPR1096.png", "x.png"))):
        for name in names:
            _train_png(root / "test" / subset / name, seed=len(name))
    for name in ("1fromGOPR0950.png", "2fromGOPR1096.png", "9fromGOPR0001.png"):  # GT/ also holds train images
        _train_png(root / "GT" / name, seed=len(name) + 1)
    layout, splits, problems = train.find_pairs(root)
    assert layout == "hide" and list(splits) == ["test"]
    assert sorted((Path(b).name, Path(s).parent.name) for b, s in splits["test"]) == \
        [("1fromGOPR0950.png", "GT"), ("2fromGOPR1096.png", "GT")]
    assert len(problems) == 1 and "x" in problems[0]  # the blurry image with no GT


def test_train_sharp_photo_folder_is_recursive_and_unpaired(tmp_path):
    _train_png(tmp_path / "a.png", 1)
    _train_png(tmp_path / "trip" / "b.jpg", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    layout, splits, problems = train.find_pairs(tmp_path)
    assert layout == "sharp-photos" and problems == []
    assert sorted(Path(s).name for _, s in splits["train"]) == ["a.png", "b.jpg"]
    assert all(b is None for b, _ in splits["train"])


def test_train_sharp_photos_split_into_train_and_test_folders_validate_on_test(tmp_path):
    for split, names in (("train", ("a", "b", "c")), ("test", ("d",))):
        for k, name in enumerate(names):
            _train_png(tmp_path / split / f"{name}.png", k)
    layout, splits, _ = train.find_pairs(tmp_path)
    assert layout == "sharp-photos"
    assert {k: sorted(Path(s).stem for _, s in v) for k, v in splits.items()} == {"train": ["a", "b", "c"], "test": ["d"]}


def test_train_find_pairs_rejects_missing_empty_and_half_layouts(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        train.find_pairs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        train.find_pairs(tmp_path / "empty")
    _train_png(tmp_path / "half" / "blur" / "a.png", 1)  # blur/ without sharp/ is not a folder of photographs
    with pytest.raises(ValueError, match="unrecognised layout"):
        train.find_pairs(tmp_path / "half")


# ----------------------------------------------------------------------------------------------------------------
# training samples


def test_train_augmentation_moves_blur_and_sharp_together_and_is_seeded(tmp_path):
    sharp = _train_png(tmp_path / "s.png", 1, size=(48, 56))
    Image.fromarray(255 - sharp).save(tmp_path / "b.png")  # blur = 1 - sharp, a relation any shared transform keeps
    dataset = train.PairDataset([(str(tmp_path / "b.png"), str(tmp_path / "s.png"))], crop=32)
    seen = set()
    for seed in range(12):
        blur, sharp_crop, failed = dataset[(0, seed)]
        assert blur.shape == sharp_crop.shape == (3, 32, 32) and failed == -1
        torch.testing.assert_close(blur, 1 - sharp_crop, atol=1e-6, rtol=0)
        again = dataset[(0, seed)]
        assert torch.equal(again[0], blur) and torch.equal(again[1], sharp_crop)
        seen.add(sharp_crop.sum().item())
    assert len(seen) > 6  # crops, flips and turns vary with the seed


def test_train_photographs_get_a_synthetic_blur_of_the_same_crop(tmp_path):
    _train_png(tmp_path / "photo.png", 3, size=(96, 96))
    dataset = train.PairDataset([(None, str(tmp_path / "photo.png"))], crop=32)
    blur, sharp, _ = dataset[(0, 7)]
    assert blur.shape == sharp.shape == (3, 32, 32)
    assert not torch.equal(blur, sharp)
    assert torch.equal((blur * 255).round() / 255, blur)  # 8-bit rounding, as a saved blurry photo has
    assert (blur - sharp).abs().mean() < 0.25  # the same content, blurred; not another crop


def test_train_sampler_resumed_at_step_n_continues_the_same_stream():
    full = list(train.StepSampler(7, 4, 2, seed=5, stage=1, start_step=0, total_steps=6))
    resumed = list(train.StepSampler(7, 4, 2, seed=5, stage=1, start_step=3, total_steps=6))
    assert resumed == full[3 * 4:]
    epoch0 = [i for i, _ in full[:8]]
    assert sorted(epoch0[:7]) == list(range(7))  # an epoch visits every pair, then wraps
    ranks = [list(train.StepSampler(7, 4, 2, 5, 1, 0, 6, rank=r, world_size=2)) for r in range(2)]
    assert [x for step in range(6) for r in range(2) for x in ranks[r][2 * step:2 * step + 2]] == full


# ----------------------------------------------------------------------------------------------------------------
# the recipe end to end


def test_train_three_stages_end_to_end_give_a_checkpoint_sample_py_loads(tmp_path, monkeypatch, capsys):
    data, out = _train_gopro(tmp_path / "gopro"), tmp_path / "out"
    _train_main(["--data", data, "--out", out, *_TRAIN_FAST, "--workers", "1", "--iters", "2,1,2",
                 "--val-every", "1"], monkeypatch)
    stdout = capsys.readouterr().out
    assert "gopro layout, 6 train pairs, 2 test pairs" in stdout
    assert stdout.strip().splitlines()[-1] == f"done. deblur with: python sample.py blurry.png --ckpt {out / 'best.pt'}"
    for name in ("stage1.pt", "stage2.pt", "stage3.pt", "last.pt", "best.pt", "log.jsonl"):
        assert (out / name).exists(), name
    last = blurdm.load_checkpoint(out / "last.pt")
    assert (last["stage"], last["step"]) == (3, 2) and last["config"]["prior"] is True
    # each stage trains its own parts only (BLURDM.md §6); the frozen sharp encoder keeps its BatchNorm statistics
    weights = [blurdm.load_checkpoint(out / f"stage{s}.pt")["model"] for s in (1, 2, 3)]
    part = lambda w, name: torch.cat([v.flatten().float() for k, v in w.items() if k.startswith(name + ".")])
    assert torch.equal(part(weights[0], "deblurrer"), part(weights[1], "deblurrer"))
    assert torch.equal(part(weights[0], "sharp_encoder"), part(weights[1], "sharp_encoder"))
    assert not torch.equal(part(weights[0], "blur_encoder"), part(weights[1], "blur_encoder"))
    assert not torch.equal(part(weights[1], "deblurrer"), part(weights[2], "deblurrer"))
    assert torch.equal(part(weights[1], "sharp_encoder"), part(weights[2], "sharp_encoder"))
    log = _train_log(out)
    steps = [r for r in log if "loss" in r]
    assert [(r["stage"], r["step"]) for r in steps] == [(1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]
    assert all(r["step_ms"] >= r["data_ms"] >= 0 for r in steps)
    assert sum("val_psnr" in r for r in log) == 5
    model = blurdm.BlurDM.from_checkpoint(out / "best.pt")  # what sample.py does, with no other flag
    blurry = torch.rand(1, 3, 37, 53)
    restored = model.deblur(blurry)
    assert restored.shape == blurry.shape and torch.isfinite(restored).all()
    # rerunning a finished command has nothing left to do
    _train_main(["--data", data, "--out", out, *_TRAIN_FAST, "--workers", "1", "--iters", "2,1,2",
                 "--val-every", "1"], monkeypatch)
    assert "finished stage 3; nothing left to do" in capsys.readouterr().out


def test_train_stage_two_alone_starts_from_init_and_no_prior_trains_the_baseline(tmp_path, monkeypatch, capsys):
    data = _train_gopro(tmp_path / "gopro", per_sequence=2)
    with pytest.raises(SystemExit):  # stage 2 needs a stage 1 model
        _train_main(["--data", data, "--out", tmp_path / "b", *_TRAIN_FAST, "--stage", "2", "--iters", "1"], monkeypatch)
    assert "stage 2 starts from a stage 1 checkpoint: pass --init" in capsys.readouterr().err
    _train_main(["--data", data, "--out", tmp_path / "a", *_TRAIN_FAST, "--stage", "1", "--iters", "1"], monkeypatch)
    _train_main(["--data", data, "--out", tmp_path / "b", *_TRAIN_FAST, "--stage", "2", "--iters", "1",
                 "--init", tmp_path / "a" / "stage1.pt"], monkeypatch)
    assert f"starts from the weights of {tmp_path / 'a' / 'stage1.pt'}" in capsys.readouterr().out
    stage1 = blurdm.load_checkpoint(tmp_path / "a" / "stage1.pt")["model"]
    stage2 = blurdm.load_checkpoint(tmp_path / "b" / "stage2.pt")["model"]
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("deblurrer."))
    _train_main(["--data", data, "--out", tmp_path / "c", *_TRAIN_FAST, "--no-prior", "--iters", "1"], monkeypatch)
    baseline = blurdm.load_checkpoint(tmp_path / "c" / "last.pt")
    assert baseline["config"]["prior"] is False and (baseline["stage"], baseline["step"]) == (3, 1)
    assert not any(k.startswith(("sharp_encoder", "blur_encoder")) for k in baseline["model"])
    assert blurdm.BlurDM.from_checkpoint(tmp_path / "c" / "best.pt").deblur(torch.rand(1, 3, 20, 24)).shape == (1, 3, 20, 24)


def test_train_sigterm_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    data = _train_gopro(tmp_path / "gopro")
    args = ["--data", data, *_TRAIN_FAST, "--stage", "1", "--iters", "12", "--val-every", "0", "--save-every", "1000"]
    _train_main([*args, "--out", tmp_path / "straight"], monkeypatch)
    # the same command, stopped by SIGTERM after a few steps, then rerun
    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process: bit-identical results
    process = subprocess.Popen([sys.executable, str(_TRAIN_REPO / "train.py"), *map(str, args), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_TRAIN_REPO, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(_train_log(out)) >= 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    stopped = blurdm.load_checkpoint(out / "last.pt")
    n = stopped["step"]
    assert 2 <= n < 12 and f"stopped at stage 1 step {n}" in stdout
    _train_main([*args, "--out", out], monkeypatch)
    assert f"resuming stage 1 at step {n}" in capsys.readouterr().out
    straight, resumed = (blurdm.load_checkpoint(p / "last.pt") for p in (tmp_path / "straight", out))
    assert resumed["step"] == straight["step"] == 12
    for k in straight["model"]:
        torch.testing.assert_close(resumed["model"][k], straight["model"][k], rtol=0, atol=0)
    moments = lambda ckpt: [t for state in ckpt["optimizer"]["state"].values() for t in state.values()]
    assert len(moments(straight)) > 0
    for a, b in zip(moments(resumed), moments(straight), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # Adam's step count and moments carried over the restart
    assert resumed["scheduler"] == straight["scheduler"]
    # a rerun with other settings refuses to resume (12 steps done of 20 would otherwise resume)
    with pytest.raises(SystemExit):
        _train_main([*args, "--iters", "20", "--out", out], monkeypatch)
    assert "saved by a run with other settings (stage_steps [12, 12, 12] vs [20, 20, 20])" in capsys.readouterr().err


def test_train_two_gloo_processes_agree_and_match_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    data = _train_gopro(tmp_path / "gopro", per_sequence=2)
    args = ["--data", data, *_TRAIN_FAST, "--batch", "4", "--iters", "2,1,2", "--val-every", "0", "--save-every", "1"]
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", str(_TRAIN_REPO / "train.py"), *map(str, args),
                             "--out", str(tmp_path / "ddp")], capture_output=True, text=True, cwd=_TRAIN_REPO,
                            timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    ddp_log = _train_log(tmp_path / "ddp")
    agreed = [(r["stage"], r["step"]) for r in ddp_log if r.get("ranks_agree") == 2]
    assert agreed == [(1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]  # every save compared the weights of both ranks
    assert blurdm.load_checkpoint(tmp_path / "ddp" / "last.pt")["stage"] == 3
    # stage 1 draws no noise: two ranks of batch 2 must follow one process of batch 4 (gradients averaged)
    _train_main(["--data", data, *_TRAIN_FAST, "--batch", "4", "--stage", "1", "--iters", "2", "--val-every", "0",
                 "--out", tmp_path / "single"], monkeypatch)
    losses = lambda log: [r["loss"] for r in log if "loss" in r and r["stage"] == 1]
    assert len(losses(ddp_log)) == 2
    np.testing.assert_allclose(losses(ddp_log), losses(_train_log(tmp_path / "single")), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# faults and bad input


def test_train_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    data, out = _train_gopro(tmp_path / "gopro", per_sequence=2), tmp_path / "out"
    _train_main(["--data", data, "--out", out, *_TRAIN_FAST, "--stage", "1", "--iters", "1"], monkeypatch)
    good = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # an absurd learning rate blows the weights up within a step
        _train_main(["--data", data, "--out", out, *_TRAIN_FAST, "--stage", "2", "--iters", "5", "--lr", "1e30",
                     "--save-every", "1000"], monkeypatch)
    assert exit_info.value.code == 1
    line = _train_error_line(capsys.readouterr().err)
    assert "at stage 2 step 1; stopped" in line and f"{out / 'last.pt'} is kept" in line
    assert (out / "last.pt").read_bytes() == good


def test_train_bad_data_gives_one_line_errors_naming_the_file(tmp_path, monkeypatch, capsys):
    def fails(data, match):
        with pytest.raises(SystemExit) as exit_info:
            _train_main(["--data", data, "--out", tmp_path / "out", *_TRAIN_FAST, "--iters", "1"], monkeypatch)
        assert exit_info.value.code == 1
        line = _train_error_line(capsys.readouterr().err)
        assert match in line, line

    fails(tmp_path / "missing", f"{tmp_path / 'missing'}: no such folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", f"{tmp_path / 'empty'}: no images found")
    _train_png(tmp_path / "mismatch" / "blur" / "a.png", 1, size=(40, 48))
    _train_png(tmp_path / "mismatch" / "sharp" / "a.png", 1, size=(40, 40))
    fails(tmp_path / "mismatch", f"{tmp_path / 'mismatch' / 'blur' / 'a.png'}: 48x40 but its sharp image")
    _train_png(tmp_path / "small" / "tiny.png", 1, size=(16, 16))
    fails(tmp_path / "small", "16x16 is smaller than the 32px crop")
    assert not (tmp_path / "out" / "last.pt").exists()


def test_train_truncated_image_cli_error_has_no_traceback(tmp_path):
    _train_png(tmp_path / "data" / "blur" / "a.png", 1)
    _train_png(tmp_path / "data" / "sharp" / "a.png", 2)
    png = (tmp_path / "data" / "blur" / "a.png").read_bytes()
    (tmp_path / "data" / "blur" / "a.png").write_bytes(png[:len(png) // 2])
    result = _train_cli(["--data", tmp_path / "data", "--out", tmp_path / "out", *_TRAIN_FAST, "--iters", "1"])
    assert result.returncode == 1
    line = _train_error_line(result.stderr)
    assert f"{tmp_path / 'data' / 'blur' / 'a.png'}: not a readable image" in line and "no usable training pairs" in line


def test_train_bad_files_inside_a_set_are_skipped_counted_and_reported(tmp_path, monkeypatch, capsys):
    data = _train_gopro(tmp_path / "gopro")
    truncated_png = data / "train" / "GOPR0372_07_00" / "blur" / "000001.png"
    truncated_png.write_bytes(truncated_png.read_bytes()[:100])  # caught by the header and checksum scan
    # a truncated JPEG passes the scan and only fails to decode in the loader: skipped there
    jpeg = data / "train" / "GOPR0374_11_01" / "blur" / "000002"
    Image.open(jpeg.with_suffix(".png")).save(jpeg.with_suffix(".jpg"), quality=95)
    jpeg.with_suffix(".png").unlink()
    jpeg_bytes = jpeg.with_suffix(".jpg").read_bytes()
    jpeg.with_suffix(".jpg").write_bytes(jpeg_bytes[:len(jpeg_bytes) * 2 // 3])
    _train_main(["--data", data, "--out", tmp_path / "out", *_TRAIN_FAST, "--stage", "1", "--iters", "3"], monkeypatch)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert f"warning: {truncated_png}: not a readable image" in text
    assert f"warning: {jpeg.with_suffix('.jpg')}: not a readable image" in text
    assert "skipped 1 training pairs that could not be decoded" in text
    assert blurdm.load_checkpoint(tmp_path / "out" / "last.pt")["step"] == 3
