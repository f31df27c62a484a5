"""Checkpoints: written atomically, resumed exactly, and read with a one-line error when a file is not one.

Rethinking ImageNet Pre-training (arXiv:1811.08883) trains from scratch for up to 6x90k iterations (Table 1), so a
run is stopped and resumed many times; `--resume` must continue it as if it had not stopped. A checkpoint holds
the model, the optimizer (momentum buffers), the GradScaler, the iteration, the run's flags, the samples seen
(Sec. 3.2) and every process's RNG state (data sampling, augmentation, RoI sampling).
A run's folder (--output-dir) holds its checkpoints, args.json (the resolved flags) and metrics.jsonl (one JSON row
per line: training rows with a "loss", evaluation rows without); the functions below keep it whole across resumes.
ImageNet weights (--init imagenet) are torchvision ResNet/VGG state dicts, whose key names backbone.py keeps.
"""
import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import torch

import cascade
import distributed
from norm import GroupNorm

# Flags that shape the training trajectory: --resume refuses a checkpoint whose run had other values.
TRAJECTORY_FLAGS = ("data", "train_ann", "train_images", "train_subset", "subset_seed", "min_size", "max_size",
                    "train_scales", "batch_size", "lr", "momentum", "weight_decay", "lr_steps", "lr_gamma",
                    "warmup_iters", "warmup_factor", "seed", "norm", "init", "amp")
# train.py's related-work flags shape the trajectory too; a run recorded before they existed had them off: these
# values stand in for a missing key of its args.
RELATED_WORK_FLAGS = {"random_erasing": None, "cutmix": False, "yoco": False, "attention": None, "slim": 0.0}


class Unreadable(Exception):
    """Why a file is not a checkpoint this code can read, in one line that names it."""


def read(path, what="checkpoint", keys=(), weights_only=False):
    """torch.load(path) on the CPU, or a one-line error naming `what` and the path: missing, not written by
    torch.save, or (keys) not a dict with these entries; "args.preset" is the "preset" entry of the "args" dict.
    weights_only for third-party files (--pretrained): tensors and plain containers only, no code is unpickled."""
    try:
        return _load(path, what, keys, weights_only)
    except Unreadable as e:
        sys.exit(f"error: {e}")


def _load(path, what, keys, weights_only=False):
    """read() that raises Unreadable instead of exiting."""
    if not os.path.isfile(path):
        raise Unreadable(f"{what} {path} " + ("is a folder, not a file" if os.path.isdir(path) else "does not exist"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # unpickling fails in many ways; all mean "not a checkpoint this code can read"
        if weights_only and isinstance(e, pickle.UnpicklingError):  # e.g. a train.py checkpoint's numpy RNG state
            raise Unreadable(f"{what} {path} is not a plain state dict of tensors "
                             f"(a train.py checkpoint? use --weights for those)") from None
        raise Unreadable(f"{what} {path} is not a PyTorch checkpoint ({type(e).__name__})") from None
    missing = [k for k in keys if not _has(state, k)]
    if missing:
        raise Unreadable(f"{what} {path} has no {', '.join(missing)}: not a model_*.pth written by train.py")
    if "iteration" in keys and not (isinstance(state["iteration"], int) and state["iteration"] >= 0):
        raise Unreadable(f"{what} {path} has iteration {state['iteration']!r}: not a model_*.pth written by train.py")
    if "rng" in keys and not (isinstance(state["rng"], list) and all(
            isinstance(r, dict) and {"torch", "numpy", "python"} <= r.keys() and torch.is_tensor(r["torch"])
            for r in state["rng"])):
        raise Unreadable(f"{what} {path} has RNG states that are not train.py's: not a model_*.pth it wrote")
    return state


def _has(state, key):
    """Whether state holds key; "args.preset" is the "preset" entry of state["args"]."""
    for name in key.split("."):
        if not isinstance(state, dict) or name not in state:
            return False
        state = state[name]
    return True


def _state_dict(state, path, what):
    """The state dict read from a file, or from its "model" entry (a train.py checkpoint); else a one-line error
    naming `what` and the path."""
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        sys.exit(f"error: {what} {path} holds a {type(state).__name__}, not a state dict (parameter names -> tensors)")
    return state


RESUME_KEYS = ("model", "optimizer", "args.preset", "rng", "iteration", "seen")  # what --resume reads
CHECKPOINT_NAME = re.compile(r"model_(\d{7,})\.pth")  # save()'s names: the iteration, 7 digits at least


def checkpoints(output_dir):
    """train.py's checkpoints in output_dir as [(iteration, path)], newest first. Other files, model_best.pth or
    Detectron2's model_final.pth say, are not this run's checkpoints."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    found = [(int(m.group(1)), os.path.join(output_dir, f)) for f in names if (m := CHECKPOINT_NAME.fullmatch(f))]
    return sorted(found, reverse=True)  # by iteration: model_10000000.pth after model_9999999.pth


def latest(output_dir):
    """The newest of train.py's checkpoints in output_dir, or None."""
    found = checkpoints(output_dir)
    return found[0][1] if found else None


def seed(value):
    """Seed torch, numpy and Python's random, the RNGs a checkpoint saves (rng_state)."""
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def find_resume(args):
    """The checkpoint this run continues, as (path, checkpoint), or (None, None) for a new run: --resume PATH, or
    --resume auto for the latest one in --output-dir. It must be this very run's (load_for_resume), written by as
    many processes as there are now (one RNG state each). A folder that holds a run (checkpoints or metrics.jsonl)
    is written to only to continue that run from its own checkpoint there, so nothing written is lost; anything else
    is refused, except a --dry-run, which writes nothing."""
    own = latest(args.output_dir)
    path, ckpt = (_newest_readable(args) if args.resume == "auto" else
                  (args.resume, load_for_resume(args.resume, args) if args.resume else None))  # refuses another run
    if ckpt and len(ckpt["rng"]) != args.world_size:
        sys.exit(f"error: {path} was written by {len(ckpt['rng'])} process(es); resume it with as many")
    held = own or os.path.exists(os.path.join(args.output_dir, "metrics.jsonl"))
    if args.resume == "auto" and own and not path and not args.dry_run:
        sys.exit(f"error: --output-dir {args.output_dir}: none of its checkpoints can be read (see above); move them "
                 f"aside to start the run anew, or give another --output-dir")
    if held and not own and args.resume == "auto" and _started_here(args):
        print(f"--output-dir {args.output_dir}: this run stopped before its first checkpoint; starting it anew")
        return None, None
    if held and not args.dry_run and not (path and os.path.samefile(os.path.dirname(path) or ".", args.output_dir)):
        how = "continue it with --resume auto" if own else "it has no checkpoint to continue from"
        sys.exit(f"error: --output-dir {args.output_dir} already holds a run (checkpoints or metrics.jsonl); {how}, "
                 f"or give another --output-dir")
    return path, ckpt


def _newest_readable(args):
    """--resume auto: (path, checkpoint) of the newest checkpoint in --output-dir that can be read, warning about
    each newer one that cannot (a file damaged after it was written); (None, None) when there is none."""
    for _, path in checkpoints(args.output_dir):
        try:
            ckpt = _load(path, "checkpoint", keys=RESUME_KEYS)
        except Unreadable as e:
            print(f"warning: {e}; trying the previous checkpoint")
            continue
        return path, load_for_resume(path, args, ckpt)
    return None, None


def _started_here(args):
    """Whether --output-dir's args.json is this very run's (same preset, cascade and TRAJECTORY_FLAGS): a run that
    stopped before its first checkpoint, which can only start anew (its metrics.jsonl begins again)."""
    try:
        with open(os.path.join(args.output_dir, "args.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and not _changed_flags(run, args)


def _changed_flags(run, args):
    """The flags that make `args` another run than `run` (a dict of a run's flags), as '--flag old -> new'."""
    return [f"--{k.replace('_', '-')} {run.get(k, RELATED_WORK_FLAGS.get(k))} -> {getattr(args, k)}"
            for k in ("preset", "cascade", *TRAJECTORY_FLAGS, *RELATED_WORK_FLAGS)
            if not _same_value(run.get(k, RELATED_WORK_FLAGS.get(k)), getattr(args, k))]


def _same_value(a, b):
    """Two values of a flag alike; paths (--data, --train-ann, --train-images) once relative and once absolute are the
    same path after resolving them; a tuple is its list in args.json."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b))


def start_run(args, path, ckpt, model, optimizer, scaler, evaluation_due, rank, device, log=print):
    """All that a run does to its folder and its state before its first iteration, once nothing can refuse it any
    more (find_resume, --dry-run), so that a refused run leaves a run's files as they were. Every process calls it.
    - rank 0 writes args.json (the resolved flags) and opens metrics.jsonl for appending; a resumed run first cuts a
      half-written last row (the run was killed while writing it);
    - with a checkpoint ckpt (read from path): the model, the optimizer (momentum buffers), the GradScaler and this
      process's RNG states continue from it. Call it after the data loader exists, whose workers draw their seeds
      from the torch RNG, so that the RNG streams continue exactly where they stopped.
    Returns (metrics.jsonl on rank 0, None on the others; whether the evaluation due at the checkpoint's iteration
    (evaluation_due) is missing from metrics.jsonl, as after a run killed while evaluating: rank 0 decides for all).
    """
    metrics = None
    if rank == 0:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
        except OSError as e:
            sys.exit(f"error: cannot write into --output-dir {args.output_dir}: {e}")
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if ckpt and os.path.exists(metrics_path):
            with open(metrics_path, "rb+") as f:
                f.truncate(f.read().rfind(b"\n") + 1)
        metrics = open(metrics_path, "a" if ckpt else "w")  # no checkpoint: a new run, or one started anew
    if ckpt is None:
        return metrics, False
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. the json gained a class: the predictors' shapes differ
        sys.exit(f"error: checkpoint {path} does not fit this run's model (did the data's classes change?): "
                 f"{_last_line(e)}")
    if scaler and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank])  # train.py's plan has said "resumes PATH at iteration N"
    if ckpt["iteration"] >= args.max_iters:
        log(f"the run has ended (metrics.jsonl holds its rows); evaluate.py --checkpoint {path} evaluates it")
    return metrics, evaluation_due and _evaluation_missing(metrics, ckpt["iteration"], device, log)


def _last_line(error):
    """The informative line of a load_state_dict error (its first says only 'Error(s) in loading state_dict')."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


def write_row(metrics, row):
    """One row (a dict) into the open metrics.jsonl, flushed: a killed run keeps every row written before."""
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()


def _evaluation_missing(metrics, iteration, device, log=print):
    """Whether the run's metrics.jsonl lacks the evaluation row (one without a "loss") of this iteration, as after a
    run killed while evaluating, resumed from the checkpoint of the iteration it was evaluating. metrics: the open
    metrics.jsonl on rank 0, None on the other processes; rank 0 reads it and decides for all of them (every process
    calls this, and then they evaluate together)."""
    missing = metrics is not None and not _evaluated(metrics.name, iteration)
    if missing:
        log(f"the evaluation at iteration {iteration} is missing from {metrics.name}: evaluating now")
    return distributed.sum_over_processes([int(missing)], device)[0] > 0  # rank 0's answer, on every process


def _evaluated(metrics_path, iteration):
    """Whether metrics.jsonl holds an evaluation row (one without a "loss") of this iteration."""
    if not os.path.exists(metrics_path):
        return False
    with open(metrics_path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # not a row this code wrote: plot.py names the line
                continue
            if isinstance(row, dict) and row.get("iter") == iteration and "loss" not in row:
                return True
    return False


def rng_state():
    """This process's RNG states; on a GPU, of its own device (distributed.init makes it the current one)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    """Continue this process's RNG streams from rng_state()'s record."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def data_identity(dataset):
    """What a checkpoint records of its training set: the classes [(category id, name)] its labels stand for, and a
    digest of the image and annotation ids it trains on (the same json path may hold other data by now); and, so that
    predict.py can name and draw what the model finds without the data, its keypoint names and skeleton."""
    ids = repr((dataset.image_ids, sorted(dataset.coco.anns)))
    return {"classes": dataset.classes, "digest": hashlib.sha256(ids.encode()).hexdigest(),
            "keypoint_names": dataset.keypoint_names, "keypoint_skeleton": dataset.keypoint_skeleton}


def refuse_other_data(path, ckpt, identity):
    """--resume: the training set must be the checkpoint's (a checkpoint written before data_identity passes; no
    checkpoint, a new run, too)."""
    recorded = ckpt and ckpt.get("data")
    if recorded and recorded["classes"] != identity["classes"]:
        sys.exit(f"error: checkpoint {path} was trained on the classes {recorded['classes']}, the data now has "
                 f"{identity['classes']}; start a new run (--weights {path} to start from its weights)")
    if recorded and recorded["digest"] != identity["digest"]:
        sys.exit(f"error: the training data changed since checkpoint {path} was written (other images or "
                 f"annotations): resuming would not continue it exactly; start a new run with --weights {path}")


def save(output_dir, iteration, model, optimizer, scaler, args, seen, data=None):
    """output_dir/model_<iteration>.pth with every process's RNG state, so that resume is exact for each: called by
    every process, which send theirs to rank 0; rank 0 writes, atomically (a crash mid-write leaves the previous
    checkpoint intact). data: data_identity of the training set."""
    rng = distributed.gather(rng_state())
    if rng is None:  # not rank 0
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
             "args": vars(args), "scaler": scaler.state_dict() if scaler else None, "seen": seen, "rng": rng,
             "data": data}
    atomic_save(state, os.path.join(output_dir, f"model_{iteration:07d}.pth"), "checkpoint")


def atomic_save(obj, path, what):
    """torch.save(obj) to path through path.tmp, so that a crash mid-write leaves the previous file intact. A failed
    write (a full disk: torch reports it as "file write failed") leaves no partial file and stops the run with one
    line naming the path."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = getattr(e, "errno", None) == errno.ENOSPC or free < 2 ** 24  # under 16 MiB left with the partial file
        reason = "no space left on device" if full else str(e).strip().splitlines()[0]
        sys.exit(f"error: cannot write {what} {path}: {reason}; nothing partial is left behind")


def load_for_resume(path, args, ckpt=None):
    """--resume: the checkpoint of this very run, i.e. the same preset and the same TRAJECTORY_FLAGS (ckpt: path's
    content, when it was read already)."""
    if ckpt is None:
        ckpt = read(path, "checkpoint", keys=RESUME_KEYS)
    run = ckpt["args"]
    if run["preset"] != args.preset:
        sys.exit(f"error: checkpoint {path} is from preset {run['preset']!r}, not {args.preset!r}")
    if run.get("cascade", False) != args.cascade:
        hint = f"start a new run with --weights {path} to switch to the cascade" if args.cascade else "add --cascade"
        sys.exit(f"error: checkpoint {path} was trained {'without' if args.cascade else 'with'} --cascade; {hint}")
    changed = _changed_flags(run, args)
    if changed:
        sys.exit(f"error: resuming {path} with other flags than its run's ({'; '.join(changed)}) would not continue "
                 f"it exactly; give the run's values (left of each arrow; a default may have changed since), or "
                 f"start a new run from it with --weights {path}")
    return ckpt


def load_pretrained(backbone, path, log=print):
    """Load a torchvision ImageNet checkpoint into the backbone; report what did not match (the fc is expected)."""
    state = _state_dict(read(path, "--pretrained", weights_only=True), path, "--pretrained")
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # strict=False still refuses a tensor whose shape differs
        sys.exit(f"error: --pretrained {path} does not fit this backbone: {str(e).splitlines()[-1].strip()}")
    if len(result.missing_keys) == len(backbone.state_dict()):
        sys.exit(f"error: --pretrained {path} has no tensor named as this backbone's (another architecture?)")
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("fc.", "classifier."))]
    log(f"loaded {path}: {len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
        f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    _note_attention(result.missing_keys, path, log)
    gn = any(isinstance(m, GroupNorm) for m in backbone.modules())
    if gn and any(k.endswith("running_mean") for k in unexpected):
        log(f"note: {path} is a BatchNorm network; its BN scales and shifts went into this model's GroupNorm layers "
            f"(the paper fine-tunes its GN models from GN ImageNet weights)")


def load_state_dict_non_strict(model, state_dict):
    """Initialize model from state_dict, non-strict: tensors of names the model lacks are left out, tensors whose shape
    differs from the model's are skipped (they keep their init). A Mask R-CNN state dict goes into a cascade model
    through cascade.cascade_state_dict: its box head becomes stage 1, whose class-agnostic predictor (4 outputs) then
    keeps its init, as Mask R-CNN's class-specific box deltas (K*4 outputs) do not fit it.
    Returns (missing keys, unexpected keys, skipped keys)."""
    if isinstance(getattr(model, "roi_heads", None), cascade.CascadeRoIHeads):
        state_dict = cascade.cascade_state_dict(state_dict)
    own = model.state_dict()
    skipped = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    return result.missing_keys, result.unexpected_keys, skipped


def load_weights(model, path, log=print):
    """--weights: e.g. a scratch Mask R-CNN switched to the cascade for the rest of its training (Sec. 5)."""
    state = _state_dict(read(path, "--weights"), path, "--weights")
    missing, unexpected, skipped = load_state_dict_non_strict(model, state)
    # Every use of --weights (the cascade switch, new heads, another data set) carries the backbone over; another
    # preset's file fits at most a few biases shaped by the class or anchor count, so it would train from scratch.
    if all(k in missing for k in model.state_dict() if k.startswith("backbone.")):
        sys.exit(f"error: --weights {path} fits none of this model's backbone tensors (names and shapes): "
                 f"a checkpoint of another preset?")
    log(f"loaded {path}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
        f"{unexpected[:3]}, {len(skipped)} skipped for their shape {skipped[:3]}")
    _note_attention(missing, path, log)


def _note_attention(missing, path, log=print):
    """--attention cbam (related work) from weights without it: say so, the CBAM layers keep their random init."""
    cbam = [k for k in missing if ".cbam." in k]
    if cbam:
        log(f"note: {path} has no CBAM weights (--attention cbam): its {len(cbam)} CBAM tensors keep their random "
            f"init")
