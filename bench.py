"""Speed and memory of a training step and of inference, ours against torchvision's Mask R-CNN built the same way.

Rethinking ImageNet Pre-training (arXiv:1811.08883) trains from scratch for up to 6x longer, so the time per
iteration decides what the paper's schedules cost. Synthetic inputs are built once on the device, so the data
pipeline is not timed. Training: one SGD step (momentum 0.9) per iteration; inference: batch 1, no gradients.
Times are medians over --iters iterations after --warmup untimed ones, synchronized on the GPU.

    python bench.py                                     # CPU: tiny preset, 128x160, batch 4
    python bench.py --preset r50_fpn_gn --batch-size 2 --size 800 1216 --device cuda --amp bf16 --torchvision
    python bench.py --preset tiny --device cpu --profile        # where the time goes: top 20 ops by self time
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

from data import IMAGE_MEAN, IMAGE_STD
from model import PRESETS, build_model
from flags import amp_dtype, device_name, positive_int, run_script

TORCHVISION_TWINS = ("r50_fpn_gn", "r101_fpn_gn", "r50_fpn_syncbn", "r50_fpn_frozenbn", "tv_maskrcnn_v1")
GIB = 2 ** 30
PROFILE_ITERS = 3


def synthetic_batch(batch_size, size, num_classes, device, boxes_per_image=3, seed=0):
    """Normalized random images (N, 3, H, W), zero-padded to multiples of 32 as data.collate does, their sizes
    [(h, w)], and per image boxes_per_image random GT boxes (G, 4), box-shaped masks (G, h, w) and labels (G,)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    H, W = -(-h // 32) * 32, -(-w // 32) * 32  # ceil to a multiple of 32, the largest FPN stride
    images = torch.zeros(batch_size, 3, H, W)
    images[:, :, :h, :w] = torch.randn(batch_size, 3, h, w, generator=g)
    targets = []
    for _ in range(batch_size):
        x1y1 = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w, h]) * 0.6  # (G, 2)
        wh = (torch.rand(boxes_per_image, 2, generator=g) * 0.3 + 0.1) * torch.tensor([w, h])  # 10-40% of the side
        boxes = torch.cat([x1y1, x1y1 + wh], dim=1).round()  # (G, 4) xyxy, inside the image
        masks = torch.zeros(boxes_per_image, h, w, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images.to(device), [(h, w)] * batch_size, targets


def unnormalized(images, image_sizes):
    """Our normalized padded batch -> torchvision's input: a list of (3, h, w) images in [0, 1]-like pixel values,
    which its GeneralizedRCNNTransform normalizes with the same mean and std."""
    mean = images.new_tensor(IMAGE_MEAN)[:, None, None]  # (3, 1, 1)
    std = images.new_tensor(IMAGE_STD)[:, None, None]
    return [image[:, :h, :w] * std + mean for image, (h, w) in zip(images, image_sizes)]


def build_torchvision_twin(preset, num_classes, size):
    """torchvision's MaskRCNN built like our preset, or (None, why not). torchvision is imported here only.

    GN presets give the "GN-all" model, the paper's architecture from torchvision's parts: GroupNorm(32) in the ResNet
    (all 5 stages trainable), in the FPN, in a 4conv1fc box head and in the 4-conv mask head; r50_fpn_syncbn the same
    with nn.BatchNorm2d (our SyncBatchNorm in one process). FrozenBN presets:
    FrozenBatchNorm2d in the ResNet, stem and res2 frozen (trainable_layers=3), no norm elsewhere, the 2fc box head;
    tv_maskrcnn_v1 is exactly maskrcnn_resnet50_fpn.
    rpn_post_nms_top_n_train follows the preset: 1000 proposals per image, as Detectron2 (torchvision's default
    2000 only for tv_maskrcnn_v1).
    min_size and max_size are the given size, so its internal resize keeps the image as it is (it still
    interpolates once, at scale 1: that cost is in its timing, as is its normalization).
    """
    try:
        import torchvision
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:
        return None, "torchvision is not installed"
    if preset not in TORCHVISION_TWINS:
        return None, f"preset {preset!r} has no torchvision twin (twins: {', '.join(TORCHVISION_TWINS)})"
    cfg = PRESETS[preset]

    def group_norm(channels):
        return nn.GroupNorm(cfg["num_groups"], channels)

    norm_layers = {"gn": group_norm, "syncbn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "none": None}
    trained_backbone = cfg["norm"] != "frozen_bn"
    resnet = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[cfg["depth"]]
    body = resnet(weights=None, norm_layer=norm_layers[cfg["norm"]])
    backbone = _resnet_fpn_extractor(body, trainable_layers=5 if trained_backbone else 3,
                                     norm_layer=norm_layers[cfg["fpn_norm"]])
    head_norm = norm_layers[cfg["head_norm"]]
    channels = cfg["fpn_channels"]
    if cfg["box_num_convs"]:
        box_head = FastRCNNConvFCHead((channels, 7, 7), [cfg["box_conv_dim"]] * cfg["box_num_convs"],
                                      [cfg["box_fc_dim"]] * cfg["box_num_fcs"], norm_layer=head_norm)
    else:
        box_head = TwoMLPHead(channels * 7 * 7, cfg["box_fc_dim"])
    mask_head = MaskRCNNHeads(channels, [cfg["mask_conv_dim"]] * cfg["mask_num_convs"], 1, norm_layer=head_norm)
    h, w = size
    model = MaskRCNN(backbone, num_classes=None, min_size=min(h, w), max_size=max(h, w),
                     box_head=box_head, box_predictor=FastRCNNPredictor(cfg["box_fc_dim"], num_classes),
                     mask_head=mask_head,
                     mask_predictor=MaskRCNNPredictor(cfg["mask_conv_dim"], cfg["mask_conv_dim"], num_classes),
                     rpn_post_nms_top_n_train=cfg["rpn_post_nms_top_n_train"])
    return model, "resize at scale 1 and normalization inside its forward are timed"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step, iters, warmup, device):
    """step() warmup times untimed, then iters times -> (seconds per call, peak GiB of the timed part or None,
    the last call's result). The peak counts everything allocated on the GPU: weights, optimizer state, inputs."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, result = [], None
    for _ in range(iters):
        tic = time.perf_counter()
        result = step()
        synchronize(device)
        seconds.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return seconds, peak, result


def make_train_step(model, inputs, amp, lr=1e-4):
    """One SGD step (momentum 0.9) on the losses model(*inputs) returns; autocast for amp "bf16" or "fp16"
    (fp16 with a GradScaler). The LR is small: the step costs the same and the weights stay finite."""
    device_type = next(model.parameters()).device.type
    dtype = amp_dtype(amp)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            losses = model(*inputs)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach()

    return step


def bench_model(model, train_inputs, infer_inputs, batch_size, device, amp="none", iters=20, warmup=5):
    """Training steps on model(*train_inputs) -> losses and inference model(*infer_inputs) -> detections (one image)
    -> a dict of numbers: parameters, seconds per iteration, images/s, peak GiB, seconds per image, detections."""
    dtype = amp_dtype(amp)
    model.train()
    seconds, peak, loss = time_calls(make_train_step(model, train_inputs, amp), iters, warmup, device)
    assert torch.isfinite(loss), f"non-finite training loss {loss.item()}"
    train_s = statistics.median(seconds)
    model.eval()

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(*infer_inputs)

    seconds, _, detections = time_calls(infer, iters, warmup, device)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "train_s_per_iter": train_s,
            "train_images_per_s": batch_size / train_s, "train_peak_gib": peak,
            "infer_s_per_image": statistics.median(seconds), "detections_per_image": len(detections[0]["boxes"])}


# Ops whose result decides what the host does next: each waits for the GPU to finish all work queued before it.
HOST_SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::equal", "aten::_unique2", "aten::masked_select")


def profile_training(step, device, row_limit=20):
    """torch.profiler over PROFILE_ITERS training steps -> a table of the top ops by self time (CUDA time on GPU),
    then per step: operator calls, host synchronizations (HOST_SYNC_OPS) and, on a GPU, kernel launches.
    A step that launches many small kernels or waits for the GPU often is bound by the CPU, not by the GPU.
    One step runs first, unprofiled, so the optimizer's momentum buffers already exist."""
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILE_ITERS):
            step()
        synchronize(device)
    averages = prof.key_averages()
    calls = {e.key: e.count / PROFILE_ITERS for e in averages}
    aten_calls = sum(n for k, n in calls.items() if k.startswith("aten::"))  # nested ones too (conv2d -> convolution)
    # top-level: called by Python or by the autograd engine, not by another aten op; each costs the CPU a dispatch
    top_level = sum(1 for e in prof.events() if e.name.startswith("aten::")
                    and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))) / PROFILE_ITERS
    summary = (f"per step: {top_level:.0f} top-level aten calls ({aten_calls:.0f} with nested ones), "
               f"{sum(calls.get(k, 0) for k in HOST_SYNC_OPS):.0f} host syncs ({', '.join(HOST_SYNC_OPS)})")
    if device.type == "cuda":
        summary += f", {calls.get('cudaLaunchKernel', 0):.0f} kernel launches"
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return averages.table(sort_by=sort_by, row_limit=row_limit) + "\n" + summary


def report(results, ratios):
    """A compact table: one column per model, the ratios ours / torchvision last."""
    rows = [("params (M)", "params_m", "{:.2f}"), ("train s/iter", "train_s_per_iter", "{:.4g}"),
            ("train images/s", "train_images_per_s", "{:.4g}"), ("train peak GiB", "train_peak_gib", "{:.3g}"),
            ("infer s/image", "infer_s_per_image", "{:.4g}"), ("detections/image", "detections_per_image", "{}")]
    names = list(results) + (["ours/torchvision"] if ratios else [])
    lines = [f"{'':18}" + "".join(f"{name:>18}" for name in names)]
    for label, key, fmt in rows:
        cells = [results[name][key] for name in results] + ([ratios.get(key)] if ratios else [])
        lines.append(f"{label:18}" + "".join(f"{'n/a' if v is None else fmt.format(v):>18}" for v in cells))
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), help="architecture (default: tiny on CPU, r50_fpn_gn on GPU)")
    p.add_argument("--num-classes", type=int, default=81, help="classes with background (COCO: 81)")
    p.add_argument("--batch-size", type=positive_int,
                   help="training images per iteration (default: 4 on CPU, 2 on GPU)")
    p.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="image height and width (default: 128 160 on CPU, 800 1216 on GPU)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision autocast")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC weights (both models) and images (ours; torchvision batches its own inputs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and FPN (both models; the warm-up iterations absorb compilation)")
    p.add_argument("--plain-ops", action="store_true",
                   help="run the paper's plain versions of GroupNorm, NMS, proposal selection, RoIAlign, mask targets "
                        "and mask pasting instead of the fast equivalents of fast_ops.py (equal up to float rounding, "
                        "slower; ours only)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's, one per core)")
    p.add_argument("--iters", type=positive_int, default=20, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing")
    p.add_argument("--torchvision", action="store_true", help="also benchmark torchvision's twin of the preset")
    p.add_argument("--profile", action="store_true", help="profile a few training steps, print the top 20 ops")
    p.add_argument("--json", help="write the numbers to this file")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.preset = args.preset or ("tiny" if cpu else "r50_fpn_gn")
    args.batch_size = args.batch_size or (4 if cpu else 2)
    args.size = tuple(args.size or ((128, 160) if cpu else (800, 1216)))
    if cpu and args.amp == "fp16":
        p.error("--amp fp16 needs --device cuda; use --amp bf16 on CPU")
    if args.num_classes < 2 or args.warmup < 0:
        p.error("--num-classes counts the background, so it is at least 2; --warmup is at least 0")
    return args


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("flags: " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in sorted(vars(args).items())))
    torch.manual_seed(0)
    images, image_sizes, targets = synthetic_batch(args.batch_size, args.size, args.num_classes, device)

    results = {}
    for name in ["ours"] + (["torchvision"] if args.torchvision else []):
        if name == "ours":
            model, note = build_model(args.preset, num_classes=args.num_classes, plain_ops=args.plain_ops), None
            train_inputs, infer_inputs = (images, image_sizes, targets), (images[:1], image_sizes[:1])
        else:
            model, note = build_torchvision_twin(args.preset, args.num_classes, args.size)
            tv_images = unnormalized(images, image_sizes)
            train_inputs, infer_inputs = (tv_images, targets), (tv_images[:1],)
        if model is None:
            print(f"{name}: skipped, {note}")
            continue
        if note:
            print(f"{name}: {note}")
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
            if name == "ours":  # torchvision's inputs are a list of (3, h, w) images that its transform batches
                train_inputs = (train_inputs[0].contiguous(memory_format=torch.channels_last), *train_inputs[1:])
                infer_inputs = (infer_inputs[0].contiguous(memory_format=torch.channels_last), *infer_inputs[1:])
        if args.compile:  # ours: backbone and FPN; torchvision's backbone module holds both
            for module in (model.backbone, model.fpn) if name == "ours" else (model.backbone,):
                module.compile()
        results[name] = bench_model(model, train_inputs, infer_inputs, args.batch_size, device, amp=args.amp,
                                    iters=args.iters, warmup=args.warmup)
        if args.profile:
            model.train()
            print(f"\n{name}: top ops by self time over {PROFILE_ITERS} training steps\n"
                  + profile_training(make_train_step(model, train_inputs, args.amp), device))
        del model  # free its weights, so the next model's peak memory is its own
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ratios = None
    if "torchvision" in results:
        ours, theirs = results["ours"], results["torchvision"]
        ratios = {k: ours[k] / theirs[k] for k in ("params_m", "train_s_per_iter", "train_images_per_s",
                                                   "train_peak_gib", "infer_s_per_image")
                  if ours[k] is not None and theirs[k]}
    print(f"\n{args.preset}, {args.num_classes} classes, batch {args.batch_size}, {args.size[0]}x{args.size[1]}, "
          f"{args.device}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
          + f", amp {args.amp}, median of {args.iters} after {args.warmup} warm-up iterations")
    print(report(results, ratios))
    print("detections/image: what random weights leave above the 0.05 score threshold; with few, inference "
          "skips most of the mask head and the mask pasting")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    run_script(main)
