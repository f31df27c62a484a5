"""Shared test set-up: the repository root on sys.path, where the real data lives, and the learning tests' loop."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Real data sets (PennFudanPed, COCO subsets) are never copied into the repository; CI has them beside it.
SHARED_DATA = os.environ.get("SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def train_briefly(model, dataset, iters, lr_step, base_lr=0.02, batch_size=4, warmup_iters=50):
    """train.py's recipe in a few lines for the learning tests (SGD with momentum, warm-up, one LR drop at lr_step),
    on CPU, in this process. Returns the last iteration's losses."""
    import torch  # here, so that importing conftest stays cheap

    import data
    import schedule
    import train
    optimizer = torch.optim.SGD(train.param_groups(model, 1e-4), lr=base_lr, momentum=0.9)
    batches = data.make_train_loader(dataset, batch_size=batch_size, seed=0, workers=0)
    model.train()
    for it in range(iters):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(it, base_lr, steps=(lr_step,), warmup_iters=warmup_iters)
        images, image_sizes, targets = next(batches)
        losses = model(images, image_sizes, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return losses
