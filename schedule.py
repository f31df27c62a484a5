"""The paper's training recipe in numbers: Nx schedules, linear warm-up, LR drops.

Rethinking ImageNet Pre-training (arXiv:1811.08883), Sec. 4 "Experimental Settings": LR 0.02 at batch 16 with linear
warm-up (Goyal et al. 2017), divided by 10 at the last 60k and the last 20k iterations of an N x 90k-iteration
schedule (its 2x..6x runs). Shorter schedules keep Detectron's 1x proportions. At another batch, every iteration count
scales by 16 / batch (Goyal et al.'s linear scaling rule), so that a schedule covers the same number of images.
"""
ITERS_1X, BATCH_1X = 90_000, 16     # Detectron's "1x": 90k iterations at 16 images (~12 COCO epochs)
WARMUP_1X = 500                     # Detectron's linear warm-up, in iterations at batch 16


def schedule(n, batch_size):
    """An Nx schedule: N x 90k iterations at batch 16; at another batch, every count scales by 16 / batch (Goyal et
    al.). The LR drops 10x twice. Rethinking Sec. 4: at the last 60k and the last 20k iterations "no matter how long
    the total iterations are", for its 2x..6x runs. Shorter schedules keep Detectron's 1x proportions (drops at 60k
    and 80k of 90k, i.e. at 2/3 and 8/9), where the last-60k rule would drop at 30k and 70k; detectron2's
    default_X_scheduler does the same for N <= 2, where both rules meet at 2x (120k, 160k).
    Returns (total iterations, [iterations of the LR drops])."""
    scale = BATCH_1X / batch_size
    total = n * ITERS_1X
    steps = [total * 2 / 3, total * 8 / 9] if n <= 2 else [total - 60_000, total - 20_000]
    return round(total * scale), [round(step * scale) for step in steps]


def lr_at(it, base_lr, steps=(), gamma=0.1, warmup_iters=500, warmup_factor=1 / 3):
    """The LR at iteration it: linear warm-up from base_lr * warmup_factor, then x gamma (paper: 0.1) at each step."""
    lr = base_lr * gamma ** sum(it >= s for s in steps)
    if it < warmup_iters:
        alpha = it / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr
