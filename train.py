"""Train Mask R-CNN from random initialization (or from ImageNet weights): one explicit loop, top to bottom.

Rethinking ImageNet Pre-training (arXiv:1811.08883), Sec. 4 "Experimental Settings": SGD with momentum 0.9,
weight decay 1e-4, LR 0.02 at batch 16 with linear warm-up (Goyal et al. 2017), the LR divided by 10 at the last
60k and the last 20k iterations of an N x 90k-iteration schedule (its 2x..6x; up to 2x, schedule.py keeps
Detectron's 1x proportions), horizontal flip only, shorter side 800.

    python train.py                                   # synthetic shapes, tiny model, CPU-sized (the demo)
    python train.py --data PennFudanPed --preset r50_fpn_gn --device cuda --amp bf16
    python train.py --data /datasets/coco --preset r50_fpn_gn --schedule 3x --batch-size 16   # Table 1
    torchrun --nproc_per_node=8 train.py --data /datasets/coco --schedule 3x --batch-size 2 --amp bf16  # 8 GPUs x 2
"""
import argparse
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import augment
import checkpoint
import console
import data
import distributed
import evaluate
import related_work
import schedule
from flags import (MAX_SIDE, amp_dtype, at_most, device_name, folder, non_negative_float, non_negative_int,
                   positive_float, positive_int, run_script, scale_range, seed_value, output_file, schedule_name)
from model import IMAGE_SIZE_KEYS, PAPER_MAX_SIZE, PRESETS, build_for_data
from norm import NORM_KINDS, GroupNorm, SyncBatchNorm


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes",
                   help="'shapes' (generated synthetic COCO set, the default), a PennFudanPed folder, a VOCdevkit "
                        "(Sec. 5.2: VOC2007 trainval + VOC2012 train / VOC2012 val), or a COCO root "
                        "with annotations/instances_{train,val}*.json (paper: COCO train2017 / val2017)")
    g.add_argument("--train-ann", help="COCO json for training (overrides --data)")
    g.add_argument("--train-images", help="image folder for --train-ann")
    g.add_argument("--val-ann", help="COCO json for evaluation (overrides --data)")
    g.add_argument("--val-images", help="image folder for --val-ann")
    g.add_argument("--min-size", type=at_most(MAX_SIDE),
                   help="shorter image side (paper: 800; default: the preset's, 800, or 320 for tiny; the synthetic "
                        "shapes keep their native 128)")
    g.add_argument("--max-size", type=at_most(MAX_SIDE),
                   help="cap on the longer side (Detectron: 1333; default: the preset's, 1333, or 533 for tiny, "
                        "raised in the same proportion when --min-size or --train-scales ask for larger images)")
    g.add_argument("--train-scales", type=scale_range,
                   help="LO,HI: training shorter side drawn from [LO, HI] (Sec. 5: 640,800 enhanced baselines; "
                        "512,800 for 35k images); default: --min-size only")
    g.add_argument("--train-subset", type=positive_int, help="train on a random subset of N images (Sec. 5.2: 1k..35k)")
    g.add_argument("--subset-seed", type=seed_value, default=0, help="seed that picks the subset")
    g.add_argument("--keypoint-sigmas", type=lambda text: [positive_float(x) for x in text.split(",")],
                   help="comma-separated OKS sigma per keypoint, for a keypoints json that is not COCO's 17 person "
                        "keypoints (default: COCO's)")

    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="architecture (paper: r50_fpn_gn; default: tiny on CPU, r50_fpn_gn on GPU)")
    g.add_argument("--norm", choices=NORM_KINDS,
                   help="normalization in backbone, FPN and heads, overriding the preset (paper: gn or syncbn; "
                        "gn_ws: related work, see below)")
    g.add_argument("--cascade", action="store_true",
                   help="Cascade R-CNN box heads, 3 stages at IoU 0.5/0.6/0.7, mask head on the last (Sec. 5)")
    g.add_argument("--plain-ops", action="store_true",
                   help="run the paper's plain versions of GroupNorm, NMS, proposal selection, RoIAlign, mask targets "
                        "and mask pasting instead of the fast equivalents of fast_ops.py (equal up to float rounding, "
                        "slower)")
    g.add_argument("--weights", help="initialize the model from a train.py checkpoint or state dict (non-strict; a "
                                     "Mask R-CNN's box head becomes cascade stage 1); training starts at iteration 0")
    g.add_argument("--init", choices=["scratch", "imagenet"], default="scratch",
                   help="random (MSRA) init, the paper's subject, or ImageNet weights from --pretrained")
    g.add_argument("--pretrained", help="torchvision-format ImageNet checkpoint of the backbone, for --init imagenet")
    g.add_argument("--save-backbone", type=output_file,
                   help="at the end, save the backbone alone in torchvision format (a stand-in pre-trained backbone "
                        "for --pretrained)")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=positive_int,
                   help="images per process and iteration; the effective batch is this x the number of processes "
                        "(paper: 2 x 8 GPUs = 16; default: 4 on CPU, 16 / processes on GPU)")
    g.add_argument("--lr", type=positive_float,
                   help="base LR (paper: 0.02 at batch 16; default 0.02 x effective batch / 16, 0.02 for the short "
                        "shapes demo)")
    g.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                   help="weight decay (paper: 1e-4), not applied to normalization parameters (Detectron)")
    g.add_argument("--schedule", type=schedule_name,
                   help="Nx = N x 90k iterations at batch 16, scaled to the effective batch, with the LR drops at "
                        "the last 60k and 20k (paper: 2x..6x from scratch); at N <= 2 at 2/3 and 8/9 of the run, "
                        "as Detectron's 1x (default 1x, or --max-iters)")
    g.add_argument("--max-iters", type=positive_int,
                   help="training iterations instead of a schedule (default: 1x, or 400 on shapes)")
    g.add_argument("--lr-steps", type=lambda text: [positive_int(x) for x in text.split(",")],
                   help="comma-separated iterations where the LR drops (default: the schedule's; with --max-iters "
                        "none; at 80%% on shapes)")
    g.add_argument("--lr-gamma", type=positive_float, default=0.1, help="LR factor at each drop (paper: 0.1)")
    g.add_argument("--warmup-iters", type=non_negative_int,
                   help="linear warm-up iterations (Detectron: 500 at batch 16; default: that, scaled to the effective "
                        "batch as the schedule is; 50 on shapes)")
    g.add_argument("--warmup-factor", type=non_negative_float, default=1 / 3,
                   help="warm-up starting LR factor (Detectron: 1/3)")

    g = p.add_argument_group("run control")
    g.add_argument("--eval-period", type=non_negative_int, default=0,
                   help="evaluate every N iterations (0: only at the end)")
    g.add_argument("--ckpt-period", type=positive_int, default=500, help="checkpoint every N iterations")
    g.add_argument("--log-period", type=positive_int, default=20,
                   help="write a metrics row every N iterations, and a progress line when the output is not a "
                        "terminal (a terminal gets a progress bar)")
    g.add_argument("--coco-tables", action="store_true",
                   help="print each evaluation's COCOeval tables on the console (default: append them to "
                        "OUTPUT_DIR/eval_log.txt; the console gets one line of AP)")
    g.add_argument("--output-dir", type=folder,
                   help="where checkpoints, metrics.jsonl, args.json and eval_log.txt go; a folder holding another "
                        "run is refused (default: runs/demo for the shapes demo, else runs/PRESET-DATA)")
    g.add_argument("--resume", help="checkpoint path, or 'auto' for the latest one in --output-dir")
    g.add_argument("--seed", type=seed_value, default=0, help="seed for init, sampling and augmentation")
    g.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision autocast (fp16 adds a GradScaler); GN statistics and losses stay fp32")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for images and conv weights")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and FPN (a new padded image size triggers a recompile, after which "
                        "dynamo treats sizes as dynamic)")
    g.add_argument("--workers", type=non_negative_int, default=2, help="data loader worker processes")
    g.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")

    g = p.add_argument_group("related work (off by default; not the paper's recipe)",
                             "--norm gn_ws: Weight Standardization (Qiao et al. 2019) in every conv before a "
                             "GroupNorm, eps 1e-5 (related_work.py)")
    g.add_argument("--random-erasing", choices=["image", "object", "both"],
                   help="Random Erasing (Zhong et al. 2017, Sec. 3.3): erase a random rectangle with random values in "
                        "the image, inside each object's box, or both; the paper's p 0.5, area 0.02..0.4 of the "
                        "region, aspect ratio 0.3..1/0.3 (augment.py)")
    g.add_argument("--cutmix", action="store_true",
                   help="CutMix for detection (Yun et al. 2019): paste a rectangle of another training image with "
                        "the instances it shows, area 1 - lambda, lambda ~ U(0, 1) (the paper's alpha 1); an instance "
                        "more than 70%% hidden is dropped (augment.py; needs masks)")
    g.add_argument("--yoco", action="store_true",
                   help="YOCO (Han et al. 2022): cut each image into two halves (left/right or top/bottom), flip and "
                        "jitter brightness and contrast (0.4) each on its own; objects on the seam are split in two "
                        "(augment.py; needs masks)")
    g.add_argument("--attention", choices=["cbam"],
                   help="CBAM (Woo et al. 2018) in every ResNet bottleneck before the residual addition: channel "
                        "attention (reduction 16), then spatial attention (7x7 conv), the paper's (related_work.py)")
    g.add_argument("--slim", type=non_negative_float, default=0.0, metavar="L",
                   help="network slimming (Liu et al. 2017, Eq. 1): add L x sum |gamma| over the norm layers to the "
                        "loss as loss_slim (the paper: 1e-4 for VGGNet, 1e-5 for ResNet; default 0, off); "
                        "evaluate.py --slim-report counts the prunable channels")
    return p.parse_args(argv)


def resolve(args, world_size=1):
    """Fill the defaults that depend on the device, data and batch, and refuse combinations that make no sense.
    world_size processes each take --batch-size images: the LR and schedule follow the effective batch."""
    cpu = not args.device.startswith("cuda")
    args.preset = args.preset or ("tiny" if cpu else "r50_fpn_gn")
    args.batch_size = args.batch_size or (4 if cpu else max(1, schedule.BATCH_1X // world_size))
    args.world_size = world_size
    batch = args.batch_size * world_size  # the effective batch of one synchronized SGD step
    # The shapes demo departs from the recipe to finish in minutes on a CPU: 400 iterations, a 4x larger LR than
    # the linear scaling rule gives at batch 4, a short warm-up, one LR drop at 80%, images at their native 128 px.
    demo = args.data == "shapes" and not args.train_ann
    args.lr = args.lr or (0.02 if demo else 0.02 * batch / schedule.BATCH_1X)   # linear scaling rule (Goyal et al.)
    if args.schedule and (args.max_iters or args.lr_steps):
        sys.exit("error: --schedule sets the iterations and the LR drops; give it or --max-iters/--lr-steps")
    if args.schedule or not (args.max_iters or demo):  # Detectron's 1x unless told otherwise
        args.max_iters, steps = schedule.schedule(float((args.schedule or "1x").removesuffix("x")), batch)
        if args.max_iters < 1:
            sys.exit(f"error: --schedule {args.schedule}: less than one iteration at batch {batch}")
        args.lr_steps = args.lr_steps or steps
    args.max_iters = args.max_iters or 400  # the demo
    args.lr_steps = args.lr_steps or ([args.max_iters * 4 // 5] if demo else [])
    # Detectron's 500 warm-up iterations are at batch 16: scaled like the schedule, they cover the same images
    args.warmup_iters = args.warmup_iters if args.warmup_iters is not None else (
        50 if demo else round(schedule.WARMUP_1X * schedule.BATCH_1X / batch))
    # The preset's image size (tiny: smaller on real data). With --train-scales the test side is the top of the
    # training range (the paper: 640..800 in training, 800 at test). A larger side than the preset's raises tiny's cap
    # on the longer side in its proportion, up to the paper's 1333 (tiny with --min-size 800 gets 1333); the paper's
    # presets keep Detectron's 1333 whatever the side. The demo's 128x160 images never reach a cap.
    preset_min, preset_max = (PRESETS[args.preset][k] for k in IMAGE_SIZE_KEYS)
    args.min_size = args.min_size or (128 if demo else args.train_scales[1] if args.train_scales else preset_min)
    largest = max([args.min_size, *(args.train_scales or ())])
    raised = min(math.ceil(largest * preset_max / preset_min), PAPER_MAX_SIZE)  # tiny at 800: 533 / 320 x 800
    args.max_size = args.max_size or (PAPER_MAX_SIZE if demo else max(preset_max, raised))
    data_name = os.path.splitext(os.path.basename(os.path.normpath(args.train_ann or args.data)))[0]
    args.output_dir = args.output_dir or ("runs/demo" if demo else os.path.join("runs", f"{args.preset}-{data_name}"))
    if bool(args.train_ann) != bool(args.val_ann):
        sys.exit("error: --train-ann and --val-ann go together (with --train-images and --val-images)")
    for ann, images in (("train_ann", "train_images"), ("val_ann", "val_images")):
        if getattr(args, images) and not getattr(args, ann):
            sys.exit(f"error: --{images.replace('_', '-')} needs --{ann.replace('_', '-')}")
    norm = args.norm or PRESETS[args.preset]["norm"]
    if args.init == "scratch" and norm == "frozen_bn":
        sys.exit("error: --init scratch with frozen_bn: frozen BN keeps the random init's statistics and never "
                 "normalizes (Rethinking Sec. 3.1); use --norm gn or --norm syncbn, or --init imagenet")
    if args.init == "imagenet" and not args.pretrained:
        sys.exit("error: --init imagenet needs --pretrained PATH (a torchvision ImageNet checkpoint; nothing is "
                 "downloaded)")
    if args.pretrained and args.init != "imagenet":
        sys.exit("error: --pretrained is read only with --init imagenet")
    if args.cascade and PRESETS[args.preset]["num_keypoints"]:
        sys.exit(f"error: --cascade with preset {args.preset}: the cascade has box and mask heads only, no keypoints")
    if norm == "gn_ws" and args.init == "imagenet":
        sys.exit("error: --norm gn_ws with --init imagenet: torchvision's ImageNet weights were trained without Weight "
                 "Standardization, and standardizing them changes the function they compute; use --norm gn")
    if args.attention and PRESETS[args.preset]["backbone"] == "vgg16":
        sys.exit(f"error: --attention {args.attention} sits in ResNet bottlenecks; preset {args.preset} has none")
    if cpu and args.amp == "fp16":
        sys.exit("error: --amp fp16 needs --device cuda; use --amp bf16 on CPU")
    return args


def param_groups(model, weight_decay):
    """No weight decay on normalization parameters (Detectron WEIGHT_DECAY_GN = 0, detectron2 WEIGHT_DECAY_NORM).
    Departure: biases get the base LR and weight decay, as in Detectron2 (Detectron: twice the LR, no decay)."""
    norm_types = (GroupNorm, SyncBatchNorm, torch.nn.BatchNorm2d)
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norm_types) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_data(args):
    """The training set (augmented: flip, --train-scales) and the validation set of --data or --train-ann/--val-ann;
    a data set that cannot be read is a one-line error."""
    try:
        with distributed.rank_zero_first():  # rank 0 writes the synthetic set once; the others then read it
            train_set = data.build_dataset(args.data, "train", train=True,
                                           min_size=args.train_scales or args.min_size, max_size=args.max_size,
                                           subset=args.train_subset, subset_seed=args.subset_seed,
                                           ann=args.train_ann, images=args.train_images,
                                           keypoint_sigmas=args.keypoint_sigmas)
            val_set = data.build_dataset(args.data, "val", train=False, min_size=args.min_size,
                                         max_size=args.max_size, ann=args.val_ann, images=args.val_images,
                                         keypoint_sigmas=args.keypoint_sigmas)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if train_set.classes != val_set.classes:  # the labels would mix up
        sys.exit(f"error: the validation json {val_set.source} has other categories than the training json "
                 f"{train_set.source}: {val_set.classes} against {train_set.classes}")
    for split, dataset in (("train", train_set), ("val", val_set)):  # COCOeval's keypoint AP needs them in val too
        if PRESETS[args.preset]["num_keypoints"] and not dataset.num_keypoints:
            sys.exit(f"error: preset {args.preset} predicts keypoints, but the {split} json {dataset.source} names "
                     f"none; train it on COCO person-keypoints jsons")
    if (args.cutmix or args.yoco) and (not train_set.has_masks or train_set.num_keypoints):
        sys.exit(f"error: --cutmix and --yoco recompute boxes from instance masks and do not move keypoints; "
                 f"{train_set.source} has {'keypoints' if train_set.num_keypoints else 'no masks'}")
    return train_set, val_set


def augmented(args, train_set):
    """The training set as the loader reads it: wrapped by augment.py for --random-erasing, --cutmix and --yoco
    (related work), else train_set itself, so that a default run reads data.py's items as they are."""
    if not (args.random_erasing or args.cutmix or args.yoco):
        return train_set
    return augment.RelatedWorkAugment(train_set, random_erasing=args.random_erasing, cutmix=args.cutmix,
                                      yoco=args.yoco)


def make_model(args, train_set, device, log=print):
    """The run's model on the device: random (MSRA) init, or ImageNet weights in the backbone (--init imagenet), or
    --weights; then the speed flags, which change how it computes, not what."""
    model = build_for_data(args.preset, train_set, norm=args.norm, cascade=args.cascade, plain_ops=args.plain_ops,
                           attention=args.attention).to(device)
    if args.slim and not any(p.requires_grad for p in related_work.scale_factors(model).values()):
        sys.exit(f"error: --slim: preset {args.preset} with norm {args.norm or PRESETS[args.preset]['norm']} has no "
                 f"trainable norm scales (gamma) to penalize; use a GN or SyncBN preset")
    if args.init == "imagenet":
        checkpoint.load_pretrained(model.backbone, args.pretrained, log)
    if args.weights:
        checkpoint.load_weights(model, args.weights, log)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:  # in place, so parameter names (and checkpoints) stay those of the plain model
        model.backbone.compile()
        if model.fpn is not None:
            model.fpn.compile()
    return model


def next_batch(batches, device, channels_last=False):
    """The next training batch (images (N, 3, H, W), [(h, w)], [target]) on the device."""
    try:
        images, image_sizes, targets = next(batches)
    except data.DataError as e:  # raised in a loader worker: the one line that names the culprit
        sys.exit(f"error: {e.line()}")
    images = images.to(device, non_blocking=True,
                       memory_format=torch.channels_last if channels_last else torch.preserve_format)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, image_sizes, targets


def stop_if_not_finite(total, terms, it, output_dir):
    """A non-finite loss (total, the sum of the named terms) ends the run with a message naming the iteration, the
    loss term and the last good checkpoint: the newest written before iteration `it` (model_<it> holds the weights
    that gave this loss; every earlier one gave a finite loss)."""
    if not torch.isfinite(total):
        bad = ", ".join(f"{k} = {v.item():.4g}" for k, v in terms.items() if not torch.isfinite(v))
        good = [path for iteration, path in checkpoint.checkpoints(output_dir) if iteration < it]
        sys.exit(f"error: non-finite loss at iteration {it}: {bad}; " +
                 (f"the last good checkpoint is {good[0]}" if good else "no checkpoint was written before it"))


def evaluation_due(args, done):
    """Evaluate after `done` iterations: every --eval-period iterations, and at the end unless --no-eval."""
    return (args.eval_period and done % args.eval_period == 0) or (done == args.max_iters and not args.no_eval)


def count_seen(seen, targets, image_sizes, device):
    """Rethinking Sec. 3.2 / Fig. 2: add the images, instances and pixels (resized, unpadded) of this iteration's joint
    batch, all processes', to the counts in seen."""
    counts = [len(targets), sum(len(t["boxes"]) for t in targets), sum(h * w for h, w in image_sizes)]
    for key, count in zip(("images", "instances", "pixels"), distributed.sum_over_processes(counts, device)):
        seen[key] += count


def training_row(done, lr, loss, terms, sec_per_iter, seen, device):
    """metrics.jsonl's row after iteration `done`: the LR, the total loss and its terms, the seconds per iteration,
    the samples seen so far, and on a GPU the peak memory."""
    row = {"iter": done, "lr": lr, "loss": loss, **terms, "sec_per_iter": sec_per_iter,
           **{f"seen_{k}": v for k, v in seen.items()}}
    if device.type == "cuda":
        row["max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None):
    args = get_args(argv)
    # One process per GPU under torchrun (see distributed.py); rank 0 alone prints and writes files.
    rank, world_size, device = distributed.init(args.device)
    args = resolve(args, world_size)
    main_process = rank == 0
    log = print if main_process else (lambda *_: None)
    checkpoint.seed(args.seed)  # the same seed everywhere: every process builds the same initial model
    resume, ckpt = checkpoint.find_resume(args)  # refuses another run's flags, and a folder holding another run
    train_set, val_set = load_data(args)  # resizing, flipping and normalization happen in data.py, in plain view
    data_identity = checkpoint.data_identity(train_set)  # its classes and images, kept in every checkpoint
    checkpoint.refuse_other_data(resume, ckpt, data_identity)  # a resumed run must read the same data
    model = make_model(args, train_set, device, log)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start_iter = ckpt["iteration"] if ckpt else 0
    console.print_plan(args, model, train_set, val_set, resume, start_iter, log)  # the flags: in args.json (start_run)
    if args.dry_run:
        distributed.cleanup()
        return
    # Rank r reads items r, r + W, ... of one global stream: the shards of iteration k form the joint batch k.
    batches = data.make_train_loader(augmented(args, train_set), args.batch_size, seed=args.seed,
                                     start_iter=start_iter, workers=args.workers, rank=rank, world_size=world_size)
    # args.json, the checkpoint's model, optimizer and RNG states, metrics.jsonl (None on ranks > 0), and whether the
    # evaluation at start_iter is missing (a run killed while evaluating): evaluate it first
    metrics, catch_up = checkpoint.start_run(args, resume, ckpt, model, optimizer, scaler,
                                             evaluation_due(args, start_iter), rank, device, log)
    tables = console.open_eval_log(args, resumed=bool(ckpt)) if main_process else None  # COCOeval's tables
    progress = console.Progress(start_iter, args.max_iters, args.log_period, enabled=main_process)
    if catch_up:
        evaluate.evaluate_and_log(model, val_set, device, start_iter, metrics, amp=args.amp, workers=args.workers,
                                  tables=tables, log=progress.write)
    # DDP averages the gradients over the processes during backward (after the identical init above)
    net = model if world_size == 1 else DistributedDataParallel(model, device_ids=[device.index] if device.index
                                                                 is not None else None)

    seen = dict(ckpt["seen"]) if ckpt else {"images": 0, "instances": 0, "pixels": 0}
    tic, tic_iter = time.perf_counter(), start_iter  # sec_per_iter: the time since tic over the iterations since
    for it in range(start_iter, args.max_iters):
        progress.start()  # the ETA's clock: from here to the optimizer step (not evaluations, not checkpoints)
        lr = schedule.lr_at(it, args.lr, args.lr_steps, args.lr_gamma, args.warmup_iters, args.warmup_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr

        images, image_sizes, targets = next_batch(batches, device, channels_last=args.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype(args.amp), enabled=args.amp != "none"):
            losses = net(images, image_sizes, targets)
        if args.slim:  # network slimming (related work): Liu et al. Eq. 1, lambda sum |gamma|
            losses["loss_slim"] = related_work.slimming_penalty(model, args.slim)
        loss = sum(losses.values())
        # the joint batch's losses (their mean over processes), so every process takes the same decisions below
        terms = distributed.mean_over_processes(losses)
        total = sum(terms.values())
        stop_if_not_finite(total, terms, it, args.output_dir)

        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        count_seen(seen, targets, image_sizes, device)  # Rethinking Sec. 3.2 / Fig. 2
        terms = {k: v.item() for k, v in terms.items()}
        done = it + 1
        progress.step(done, terms, lr)  # smoothed losses, LR and ETA on the bar, or a plain line every --log-period
        if main_process and (done % args.log_period == 0 or done == args.max_iters):
            sec_per_iter = (time.perf_counter() - tic) / (done - tic_iter)
            checkpoint.write_row(metrics, training_row(done, lr, total.item(), terms, sec_per_iter, seen, device))
            tic, tic_iter = time.perf_counter(), done
        if done % args.ckpt_period == 0 or done == args.max_iters:  # every process: each one's RNG state is saved
            checkpoint.save(args.output_dir, done, model, optimizer, scaler, args, seen, data_identity)
        if evaluation_due(args, done):
            evaluate.evaluate_and_log(model, val_set, device, done, metrics, amp=args.amp, workers=args.workers,
                                      tables=tables, log=progress.write)
            tic, tic_iter = time.perf_counter(), done  # the evaluation is not training time
    progress.close()
    if main_process:
        metrics.close()
        console.close_eval_log(tables)
        if args.save_backbone:  # torchvision key names: conv1, bn1, layer1..4
            checkpoint.atomic_save(model.backbone.state_dict(), args.save_backbone, "--save-backbone")
        console.print_outputs(args, log)
    distributed.cleanup()


if __name__ == "__main__":
    run_script(main)
