"""argparse types shared by train.py, evaluate.py, plot.py and bench.py: a bad flag value is a one-line usage error
that names the flag (argparse adds it), not a traceback from deep inside torch or the data loader. And amp_dtype, what
their shared --amp flag means to torch.autocast; and run_script, their entry point."""
import argparse
import math
import os
import sys
import tempfile

import torch


def _number(text, kind, positive):
    """text as an int or a finite float (kind) above 0 (positive) or at least 0, else a one-line argparse error."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0):
        what = ("a positive " if positive else "a non-negative ") + ("integer" if kind is int else "number")
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text):
    return _number(text, int, positive=True)


def non_negative_int(text):
    return _number(text, int, positive=False)


def seed_value(text):
    """A seed numpy, torch and Python all take: an integer in [0, 2**32 - 1] (numpy's limit)."""
    value = non_negative_int(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**32 = {2 ** 32}, got {text!r}")
    return value


def at_most(limit, kind=int):
    """An argparse type: a positive int (or float) up to `limit`, e.g. an image side beyond which memory runs out."""
    def check(text):
        value = _number(text, kind, positive=True)
        if value > limit:
            raise argparse.ArgumentTypeError(f"expected at most {limit}, got {text!r}")
        return value
    check.__name__ = f"at_most_{limit}"
    return check


MAX_SIDE = 10_000  # image sides (--min-size, --max-size): no detector here needs more, and memory would run out


def fraction(text):
    """A number in [0, 1], e.g. a score threshold."""
    value = _number(text, float, positive=False)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def folder(text):
    """A folder to write into: a non-empty path that is not an existing file (made when the run starts)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def positive_float(text):
    return _number(text, float, positive=True)


def non_negative_float(text):
    return _number(text, float, positive=False)


def device_name(text):
    """--device "cpu", "cuda" or "cuda:1": one torch reads and this machine has, else a one-line argparse error.
    Other kinds torch knows (mps, xpu, meta, ...) are refused: this code is written and tested for CPU and CUDA."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch finds no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def scale_list(text):
    """--tta-scales "400,500" -> (400, 500); anything but positive integers is a one-line argparse error."""
    try:
        scales = tuple(int(x) for x in text.split(","))
    except ValueError:
        scales = ()
    if not scales or min(scales) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive shorter sides like 400,600,800, "
                                         f"got {text!r}")
    return scales


def scale_range(text):
    """--train-scales "640,800" -> (640, 800); anything but two sides LO <= HI is a one-line argparse error."""
    scales = scale_list(text)  # positive integers, as --tta-scales
    if len(scales) != 2 or scales[0] > scales[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI shorter sides with 0 < LO <= HI, got {text!r}")
    return scales


def schedule_name(text):
    """--schedule "6x": N x 90k iterations for any N > 0."""
    try:
        n = float(text.removesuffix("x"))
    except ValueError:
        n = 0.0
    if not (n > 0 and math.isfinite(n)) or not text.endswith("x"):
        raise argparse.ArgumentTypeError(f"expected Nx with N > 0, such as 1x, 3x or 6x; got {text!r}")
    return text


def output_file(text):
    """A file to write at the end of a run (--save-backbone, --results), checked at the start: not a folder, in an
    existing folder where a file can be created (tried: permission bits do not tell, e.g. for root)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it")
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(text) or "."):
            return text
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write a file in the folder of {text}: {e.strerror}") from None


def amp_dtype(name):
    """--amp "bf16" or "fp16" -> the autocast dtype (torch.bfloat16, torch.float16); "none" -> None (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def run_script(main):
    """Run a script's main(). In a course edition (assignment.py) a function left to write raises
    NotImplementedError("Part N: write ..."): that stops the script with this one line, not a traceback."""
    try:
        main()
    except NotImplementedError as e:
        if not str(e).startswith("Part "):
            raise
        sys.exit(f"error: {e}")
