"""What train.py shows while it trains: smoothed losses, the LR and the time left, on a bar or in plain lines.

- Losses: each term's median over the last 20 iterations, as detectron2's console (SmoothedValue, window 20); a
  single iteration's loss jumps with the images it drew. metrics.jsonl keeps every logged iteration's raw values.
- Time left: the median time of the last 100 training iterations x the iterations left. The clock runs from the
  start of an iteration to its optimizer step, so evaluations and checkpoints, which tqdm's own ETA counts as
  iterations, are left out.
- A terminal gets a tqdm bar; anything else (a log file, a pipe, a notebook's captured output) gets one plain line
  every --log-period iterations, without the bar's carriage returns and escape codes.
"""
import collections
import statistics
import sys
import time

from tqdm import tqdm

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
