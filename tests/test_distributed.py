"""Distributed data parallel on CPU (gloo, 2 processes): the same training as one process on the joint batch, the same
COCO metrics as one process, and `torchrun train.py` end to end (rank 0 alone writes, resume is exact)."""
import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import data
import distributed
import evaluate
import model
import schedule
import train
from conftest import ROOT
from shapes import make_shapes

# Every anchor and RoI enters the losses: without random sub-sampling the result does not depend on how the random
# draws are split between processes, so one process and two can be compared number for number.
ALL_SAMPLES = dict(rpn_batch_size_per_image=10**6, roi_batch_size_per_image=10**6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """A folder whose data_cache/shapes holds the synthetic set, written once for this module."""
    root = tmp_path_factory.mktemp("dist")
    make_shapes(os.path.join(root, "data_cache", "shapes"))
    return root


@contextlib.contextmanager
def _one_thread():
    """One CPU thread in this process, as every spawned or torchrun process has: convolutions then round alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _join(rank, world_size, port, cwd):
    """The environment torchrun would set for this process, then the process group (world_size > 1: a spawned
    process, which takes one CPU thread so that the two share the cores)."""
    os.chdir(cwd)
    if world_size > 1:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world_size))
        distributed.init("cpu")


@pytest.mark.parametrize("device, current", [("cuda", []), ("cuda:1", [1]), ("cpu", []), ("cpu:0", [])])
def test_one_process_on_cuda_n_makes_it_the_current_device(monkeypatch, device, current):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)  # no GPU needed: record what init asks for
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init(device) == (0, 1, torch.device(device)) and calls == current


def _collectives_worker(rank, port, cwd, out):
    _join(rank, 2, port, cwd)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(rank + 1.0)  # the processes' BN statistics have drifted apart
    distributed.broadcast_buffers(bn)
    result = {"mean": bn.running_mean.tolist(), "gathered": distributed.gather({"rank": rank}),
              "sums": distributed.sum_over_processes([rank + 1, 0.5], device=torch.device("cpu"))}
    torch.save(result, f"{out}.{rank}")
    distributed.cleanup()


def test_gather_broadcast_and_sum_over_two_processes(shapes_dir, tmp_path):
    mp.spawn(_collectives_worker, args=(_free_port(), shapes_dir, tmp_path / "out"), nprocs=2)
    zero, one = (torch.load(f"{tmp_path / 'out'}.{rank}") for rank in (0, 1))
    assert zero["mean"] == one["mean"] == [1.0] * 3                      # rank 0's statistics everywhere
    assert zero["gathered"] == [{"rank": 0}, {"rank": 1}] and one["gathered"] is None   # on rank 0 only
    assert zero["sums"] == one["sums"] == [3, 1.0] and isinstance(zero["sums"][0], int)


def _sgd_worker(rank, world_size, port, cwd, norm, out):
    """Two SGD steps of train.py's recipe in float64, on a batch of 4 images split over world_size processes."""
    _join(rank, world_size, port, cwd)
    torch.manual_seed(0)
    net = detector = model.build_model("tiny", num_classes=4, norm=norm, fpn_norm=norm, head_norm=norm,
                                       **ALL_SAMPLES).double()
    if world_size > 1:
        net = DistributedDataParallel(detector)
    optimizer = torch.optim.SGD(train.param_groups(detector, 1e-4), lr=0.02, momentum=0.9)
    dataset = data.build_dataset("shapes", "train", train=True, min_size=128)
    batches = data.make_train_loader(dataset, 4 // world_size, seed=0, workers=0, rank=rank, world_size=world_size)
    for _ in range(2):
        images, image_sizes, targets = next(batches)
        targets = [dict(t, boxes=t["boxes"].double()) for t in targets]
        loss = sum(net(images.double(), image_sizes, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if rank == 0:
        torch.save(detector.state_dict(), out)
    distributed.cleanup()


@pytest.mark.parametrize("norm", ["gn", "syncbn"])
def test_two_processes_step_exactly_as_one_process_on_the_joint_batch(shapes_dir, tmp_path, norm):
    """Float64 leaves only rounding: DDP's gradient average, the joint-batch loss normalization
    (distributed.loss_denominator) and SyncBN's merged statistics make 2 x 2 images one batch of 4."""
    with _one_thread():
        _sgd_worker(0, 1, 0, shapes_dir, norm, tmp_path / "one.pt")
    mp.spawn(_sgd_worker, args=(2, _free_port(), shapes_dir, norm, tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.manual_seed(0)
    initial = model.build_model("tiny", num_classes=4, norm=norm, fpn_norm=norm, head_norm=norm, **ALL_SAMPLES)
    moved = 0.0
    for name, start in initial.state_dict().items():
        torch.testing.assert_close(two[name], one[name], rtol=1e-9, atol=1e-12, msg=name)
        if start.is_floating_point():
            moved = max(moved, (one[name] - start.double()).abs().max().item())
    assert moved > 1e-3  # two steps moved the weights far more than the tolerance


def _train_worker(rank, world_size, port, cwd, argv):
    _join(rank, world_size, port, cwd)
    model.PRESETS["tiny_all_samples"] = dict(model.PRESETS["tiny"], **ALL_SAMPLES)
    train.main(argv)


def test_train_py_in_two_processes_equals_one_process(shapes_dir, tmp_path, monkeypatch):
    """train.py itself, float32, GN: 3 iterations of 2 processes x 2 images == 1 process x 4 images. (With SyncBN the
    float32 rounding of the statistics grows by ~1e-4 per step through BN's backward; the float64 test is exact.)"""
    monkeypatch.chdir(shapes_dir)
    monkeypatch.setitem(model.PRESETS, "tiny_all_samples", dict(model.PRESETS["tiny"], **ALL_SAMPLES))
    runs = {}
    for world_size in (1, 2):
        out = tmp_path / str(world_size)
        argv = ["--device", "cpu", "--preset", "tiny_all_samples", "--max-iters", "3", "--lr", "0.02",
                "--warmup-iters", "0", "--batch-size", str(4 // world_size), "--workers", "0", "--log-period", "1",
                "--no-eval", "--output-dir", str(out)]
        if world_size == 1:
            with _one_thread():
                train.main(argv)
        else:
            mp.spawn(_train_worker, args=(world_size, _free_port(), shapes_dir, argv), nprocs=world_size)
        runs[world_size] = ([json.loads(line) for line in open(out / "metrics.jsonl")],
                            torch.load(out / "model_0000003.pth", weights_only=False))
    (one_rows, one), (two_rows, two) = runs[1], runs[2]
    # The logged losses are the joint batch's: the mean over processes of the per-process losses.
    for a, b in zip(one_rows, two_rows, strict=True):
        for key in ("loss", "loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["iter"], key)
        assert a["seen_images"] == b["seen_images"] == 4 * a["iter"]
        assert a["seen_instances"] == b["seen_instances"] and a["seen_pixels"] == b["seen_pixels"]
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=2e-6, msg=name)
    assert len(two["rng"]) == 2 and len(one["rng"]) == 1  # each process's RNG state, for exact resume


def _torchrun(script, *args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_torchrun_train_evaluate_and_resume(shapes_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--device", "cpu", "--batch-size", "2", "--workers", "0", "--log-period", "2", "--ckpt-period", "2"]
    stdout = _torchrun("train.py", *common, "--max-iters", "4", "--output-dir", str(out), cwd=shapes_dir)
    assert stdout.count("plan:") == 1  # rank 0 alone prints
    assert stdout.count("iter 4: box AP") == 1 and stdout.count("iter 4/4  loss") == 1  # off a terminal: plain lines
    assert (out / "eval_log.txt").read_text().count("=== iteration 4 ===") == 1  # and rank 0 alone writes the tables
    assert "batch 4 (2 process(es) x 2)" in stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in rows] == [2, 4, 4]  # two training rows and one evaluation row, written once
    assert rows[1]["seen_images"] == 4 * 4 and rows[0]["lr"] == pytest.approx(schedule.lr_at(1, 0.02, [3], 0.1, 50))
    assert "bbox/AP" in rows[2] and "segm/AP" in rows[2]
    assert json.load(open(out / "args.json"))["world_size"] == 2

    # Distributed evaluation (each process half the images, gathered on rank 0) == one process.
    ckpt = str(out / "model_0000004.pth")
    stdout = _torchrun("evaluate.py", "--checkpoint", ckpt, "--device", "cpu", "--workers", "0",
                       "--results", str(tmp_path / "two.json"), cwd=shapes_dir)
    monkeypatch.chdir(shapes_dir)
    capsys.readouterr()
    with _one_thread():
        single = evaluate.main(["--checkpoint", ckpt, "--device", "cpu", "--workers", "0",
                                "--results", str(tmp_path / "one.json")])
    one_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" Average")]
    two_lines = [line for line in stdout.splitlines() if line.startswith(" Average")]
    assert len(one_lines) == 24 and two_lines == one_lines  # 12 bbox + 12 segm summary lines
    one_results, two_results = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert len(one_results) > 100 and two_results == one_results
    assert single == {k: rows[2][k] for k in single}  # and the evaluation inside distributed training agrees

    # Resume from iteration 2 with two processes: iterations 3-4 give bit-identical weights.
    resumed = tmp_path / "resumed"
    _torchrun("train.py", *common, "--max-iters", "4", "--no-eval", "--output-dir", str(resumed),
              "--resume", str(out / "model_0000002.pth"), cwd=shapes_dir)
    a = torch.load(out / "model_0000004.pth", weights_only=False)["model"]
    b = torch.load(resumed / "model_0000004.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
