"""What train.py shows: its plan before the first iteration (with warnings for a plan that is likely not meant),
smoothed losses, the LR and the time left while it trains, on a bar or in plain lines, and at the end the files it
wrote and the commands that look at them.

- Losses: each term's median over the last 20 iterations, as detectron2's console (SmoothedValue, window 20); a
  single iteration's loss jumps with the images it drew. metrics.jsonl keeps every logged iteration's raw values.
- Time left: the median time of the last 100 training iterations x the iterations left. The clock runs from the
  start of an iteration to its optimizer step, so evaluations and checkpoints, which tqdm's own ETA counts as
  iterations, are left out.
- A terminal gets a tqdm bar; anything else (a log file, a pipe, a notebook's captured output) gets one plain line
  every --log-period iterations, without the bar's carriage returns and escape codes.
"""
import collections
import os
import shlex
import statistics
import sys
import time

from tqdm import tqdm

import checkpoint
from model import PRESETS

LOSS_WINDOW = 20    # iterations; detectron2's console smooths over 20
TIME_WINDOW = 100   # iterations whose median time gives the ETA


class TrainingClock:
    """Seconds per training iteration, timed from start() to stop(): what happens between stop() and the next
    start() (evaluation, checkpoints) is not training time. clock: a function giving seconds (tests pass fake times)."""

    def __init__(self, window=TIME_WINDOW, clock=time.perf_counter):
        self.times = collections.deque(maxlen=window)
        self.clock = clock
        self.started = None

    def start(self):
        self.started = self.clock()

    def stop(self):
        self.times.append(self.clock() - self.started)

    def eta(self, iterations_left):
        """Seconds for iterations_left more iterations, or None before the first one was timed."""
        return statistics.median(self.times) * iterations_left if self.times else None


def duration(seconds):
    """'45s', '1m20s', '3h05m', '2d04h'; '?' for None (nothing timed yet)."""
    if seconds is None:
        return "?"
    s = round(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{s % size // sub_size:02d}{sub}"
    return f"{s}s"


def progress_text(losses, lr, eta):
    """'loss 1.234 (rpn_cls 0.052 rpn_box 0.031 cls 0.31 box 0.42 mask 0.41)  lr 0.02  eta 1m20s' from the smoothed
    loss terms {"loss_rpn_cls": ...}, the LR and the seconds left (None: not known yet)."""
    terms = " ".join(f"{name.removeprefix('loss_')} {value:.2g}" for name, value in losses.items())
    return f"loss {sum(losses.values()):.3f} ({terms})  lr {lr:.2g}  eta {duration(eta)}"


class Progress:
    """train.py's console from iteration start_iter to total: a bar on a terminal, else a plain line every
    log_period iterations (and at the last). enabled=False (ranks > 0 of a distributed run): silent.
    terminal: whether stdout and stderr are terminals (default: ask them)."""

    def __init__(self, start_iter, total, log_period, enabled=True, terminal=None, clock=time.perf_counter):
        self.total, self.log_period, self.enabled = total, log_period, enabled
        self.clock = TrainingClock(clock=clock)
        self.losses = collections.defaultdict(lambda: collections.deque(maxlen=LOSS_WINDOW))
        terminal = sys.stdout.isatty() and sys.stderr.isatty() if terminal is None else terminal
        if enabled and start_iter < total:
            print(f"progress: losses are medians of the last {LOSS_WINDOW} iterations (metrics.jsonl keeps each "
                  f"logged iteration's); eta counts training iterations only", flush=True)
        self.bar = None
        if enabled and terminal and start_iter < total:  # tqdm's ETA counts evaluations: ours replaces it
            self.bar = tqdm(total=total, initial=start_iter, dynamic_ncols=True,
                            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def start(self):
        """At the start of an iteration."""
        if self.enabled:
            self.clock.start()

    def step(self, done, losses, lr):
        """After the optimizer step of iteration `done` (1-based) with the loss terms {name: float} and its LR."""
        if not self.enabled:
            return
        self.clock.stop()
        for name, value in losses.items():
            self.losses[name].append(value)
        smoothed = {name: statistics.median(values) for name, values in self.losses.items()}
        text = progress_text(smoothed, lr, self.clock.eta(self.total - done))
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif done % self.log_period == 0 or done == self.total:
            print(f"iter {done}/{self.total}  {text}", flush=True)

    def write(self, line):
        """A line of its own (an evaluation's summary), above the bar when there is one."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


MAX_EPOCHS = 150  # a plan beyond this warns: the paper's longest COCO run (VGG-16, 11x) is 134 epochs


def print_plan(args, model, train_set, val_set, resume=None, start_iter=0, log=print):
    """The resolved model, data, schedule and output folder in a few lines (args.json keeps every flag), then one
    line per warning of plan_warnings. resume: the checkpoint the run continues from, at iteration start_iter."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    epochs = args.max_iters * args.batch_size * args.world_size / len(train_set)
    scales = f"{args.train_scales[0]}..{args.train_scales[1]} in training, " if args.train_scales else ""
    evaluations = (f"every {args.eval_period} iterations" + (" and at the end" if not args.no_eval else "")
                   if args.eval_period else "never" if args.no_eval else "at the end")
    start = f"resumes {resume} at iteration {start_iter}" if resume else "a new run"
    extras = [f"--{k.replace('_', '-')}" + ("" if getattr(args, k) is True else f" {getattr(args, k)}")
              for k, off in checkpoint.RELATED_WORK_FLAGS.items() if getattr(args, k) != off]  # not the paper's
    log(f"plan: {args.preset}{' + cascade' if args.cascade else ''} ({n_params / 1e6:.2f}M trainable parameters), "
        f"norm {args.norm or PRESETS[args.preset]['norm']}, init {args.init}"
        f"{', related work: ' + ' '.join(extras) if extras else ''}\n"
        f"      data {args.data if not args.train_ann else args.train_ann}: {len(train_set)} training images, "
        f"{len(val_set)} validation images, {train_set.num_classes - 1} class{'es' * (train_set.num_classes != 2)}; "
        f"shorter side {scales}{args.min_size}, longer side at most {args.max_size}\n"
        f"      batch {args.batch_size * args.world_size} ({args.world_size} process(es) x {args.batch_size}), "
        f"LR {args.lr:g}, {args.max_iters} iterations ({epochs:.1f} epochs), "
        f"LR x{args.lr_gamma:g} at {args.lr_steps}, warm-up {args.warmup_iters} from x{args.warmup_factor:.3g}\n"
        f"      evaluates {evaluations}, checkpoints every {args.ckpt_period} iterations\n"
        f"      output {args.output_dir}: {start}")
    for warning in plan_warnings(args, len(train_set)):
        log(f"warning: {warning}")


def plan_warnings(args, num_train_images):
    """What in a resolved plan is likely not meant, one line each naming the flag to set: a run of more than
    MAX_EPOCHS epochs, a warm-up as long as the run, an LR drop beyond the run or before the warm-up ends."""
    warnings = []
    epochs = args.max_iters * args.batch_size * args.world_size / num_train_images
    if epochs > MAX_EPOCHS:
        warnings.append(f"{args.max_iters} iterations are {epochs:,.0f} epochs of the {num_train_images} training "
                        f"images (the paper's longest COCO run: 134); set --max-iters or --schedule")
    if args.warmup_iters >= args.max_iters:
        warnings.append(f"the warm-up ({args.warmup_iters} iterations) is as long as the run: the LR never reaches "
                        f"{args.lr:g}; see --warmup-iters")
    beyond = [step for step in args.lr_steps if step >= args.max_iters]
    if beyond:
        warnings.append(f"the LR drop(s) at {beyond} come at or after the run's end ({args.max_iters} iterations): "
                        f"the LR never drops there; set --lr-steps")
    early = [step for step in args.lr_steps if step < min(args.warmup_iters, args.max_iters)]
    if early:
        warnings.append(f"the LR drop(s) at {early} come before the warm-up ends ({args.warmup_iters} iterations); "
                        f"set --lr-steps or --warmup-iters")
    return warnings


def evaluates(args):
    """Whether the run evaluates at all (evaluation_due says when)."""
    return bool(args.eval_period) or not args.no_eval


def eval_log_path(args):
    """Where the run appends its COCOeval tables: OUTPUT_DIR/eval_log.txt; None when they go to the console
    (--coco-tables) or the run never evaluates."""
    return os.path.join(args.output_dir, "eval_log.txt") if evaluates(args) and not args.coco_tables else None


def open_eval_log(args, resumed):
    """Where the evaluations' COCOeval tables go: OUTPUT_DIR/eval_log.txt, appended to when the run resumes (started
    anew with metrics.jsonl otherwise), or the console (--coco-tables, or a run that never evaluates)."""
    path = eval_log_path(args)
    return open(path, "a" if resumed else "w") if path else sys.stdout


def close_eval_log(tables):
    if tables is not sys.stdout:
        tables.close()


def print_outputs(args, log=print):
    """At the end of a run: the files it wrote and the commands that look at them."""
    last = checkpoint.latest(args.output_dir)
    written = [f"{last} (the last checkpoint)" if last else None,
               f"{os.path.join(args.output_dir, 'metrics.jsonl')} (losses and AP)",
               f"{os.path.join(args.output_dir, 'args.json')} (the flags)",
               f"{eval_log_path(args)} (the COCOeval tables)" if eval_log_path(args) else None,
               f"{args.save_backbone} (the backbone, --save-backbone)" if args.save_backbone else None]
    log("wrote " + "\n      ".join(w for w in written if w))
    run = shlex.quote(args.output_dir)
    commands = [f"python plot.py curves {run}    # AP against iterations"] if evaluates(args) else []
    commands.append(f"python plot.py losses {run}    # the losses and the LR against iterations")
    if last:
        commands += [f"python predict.py --checkpoint {shlex.quote(last)} --input IMAGE_OR_DIR",
                     f"python evaluate.py --checkpoint {shlex.quote(last)}"]
    log("next: " + "\n      ".join(commands))
