"""Course assignments made from this code: a student edition in which chosen functions are left to write, a grader
that runs each part's tests and prints points, and the reference functions pasted back when a part is over.

    python assignment.py make --out ../student              # all parts; or --parts 1,3
    python assignment.py grade ../student                   # points per part and a total (default: this folder)
    python assignment.py grade ../submission --reference-tests  # the student's files, this repository's tests
    python assignment.py solve ../student --parts 1         # paste part 1's reference functions back

The parts are listed once, in PARTS below: the functions a student writes (module.function or module.Class.method),
the grading tests (tests/grading/), the points and the handout (assignments/). In the student edition each of those
functions keeps its signature and docstring, and its body becomes one `raise NotImplementedError("Part N: ...")`;
everything else is the reference code, so the edition trains, evaluates and tests as before wherever it does not
call a function left to write (train.py and evaluate.py stop with that one line where it does). The functions are
found with `ast`: the reference code carries no markers. The edition's `make demo` runs with --plain-ops, so that
the demo trains with the student's functions and not their fast equals in fast_ops.py.
Grading: every grading test of a part weighs the same (a parametrized test counts once and passes when all its
cases pass); a part whose functions call fast_ops or torchvision gets 0; part 6, the experiment, is checked from
its runs, and its written answers are graded by hand.
"""
import argparse
import ast
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Part:
    number: int
    title: str
    functions: tuple  # "module.function" or "module.Class.method", the functions the student writes
    tests: str  # the grading tests, relative to the repository root ("" for the experiment)
    points: int
    handout: str


PARTS = (
    Part(1, "Boxes: IoU, box encoding (Faster R-CNN Eq. 2), greedy NMS",
         ("boxes.box_iou", "boxes.BoxCoder.encode", "boxes.BoxCoder.decode", "boxes.nms"),
         "tests/grading/test_part1_boxes.py", 20, "assignments/part1_boxes.md"),
    Part(2, "The RPN: anchors, matching, balanced sampling, the loss (Faster R-CNN Eq. 1)",
         ("rpn.cell_anchors", "rpn.AnchorGenerator.forward", "boxes.Matcher.__call__", "boxes.BalancedSampler.__call__",
          "rpn.rpn_loss"),
         "tests/grading/test_part2_rpn.py", 20, "assignments/part2_rpn.md"),
    Part(3, "RoIAlign, the FPN level of an RoI (FPN Eq. 1), mask targets",
         ("roi_align.bilinear", "roi_align.bin_points", "roi_align.roi_align", "roi_align.map_levels",
          "roi_align.multilevel_roi_align", "roi_align.mask_targets"),
         "tests/grading/test_part3_roi_align.py", 20, "assignments/part3_roi_align.md"),
    Part(4, "The heads' losses (Fast R-CNN Eq. 1, Mask R-CNN L_mask) and pasting masks into the image",
         ("roi_heads.fast_rcnn_loss", "masks.mask_loss", "masks.paste_masks"),
         "tests/grading/test_part4_heads.py", 15, "assignments/part4_heads.md"),
    Part(5, "GroupNorm (GN Eqs. 1, 2, 6, 7) and SyncBN's joint statistics",
         ("norm.group_norm", "norm.joint_statistics"),
         "tests/grading/test_part5_norm.py", 15, "assignments/part5_norm.md"),
    Part(6, "The experiment: from scratch vs. pre-trained (Rethinking Fig. 3, Sec. 5.2)",
         (), "", 10, "assignments/part6_experiment.md"),
)
PART6_RUNS = ("runs/mini/scratch", "runs/mini/pretrained")  # what `make experiment` writes
PART6_FIGURE = "runs/mini/ap.png"
PART6_ANSWERS = "assignments/part6_answers.md"
PART6_ITERS = 250  # the iterations of each run in `make experiment`
PART6_MIN_BOX_AP = 30.0  # a detector that works; `make experiment` reaches about 48-50 (README, measured)
PART6_AUTO, PART6_BY_HAND = 6, 4  # the experiment's points: checked from its runs / the written answers
EDITION_FILE = "assignment.json"  # written into a student edition: which parts it assigns
NOT_IN_EDITION = ("tests/test_assignment.py",)  # tests of this tool itself, not of the code students write
GRADING_TIMEOUT_S = 600  # per part: a student's loop that never ends must not hang the grader
BORROWED = ("fast_ops", "torchvision")  # what a part's functions may not call: the answers are in there


class AssignmentError(Exception):
    """A one-line reason why an edition cannot be made, graded or solved."""


def parse_parts(text):
    """'1,3' -> (Part 1, Part 3); '' or None -> every part."""
    if not text:
        return PARTS
    try:
        numbers = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise AssignmentError(f"--parts {text}: give part numbers separated by commas, e.g. 1,3")
    unknown = [n for n in numbers if not 1 <= n <= len(PARTS)]
    if unknown:
        raise AssignmentError(f"--parts {text}: no part {unknown[0]}; the parts are 1..{len(PARTS)}")
    return tuple(PARTS[n - 1] for n in numbers)


# ---------------------------------------------------------------------------------------------- finding functions

def find_function(tree, qualname):
    """The ast node of `function` or `Class.method` at the top level of a module's tree, or None."""
    nodes, node = tree.body, None
    for name in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            return None
        nodes = node.body
    return node if isinstance(node, ast.FunctionDef) else None


def body_lines(source, qualname, path):
    """(first, last) 1-based lines of a function's body after its docstring, and the body's indentation."""
    node = find_function(ast.parse(source), qualname)
    if node is None:
        raise AssignmentError(f"{path}: no function {qualname}")
    doc = node.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise AssignmentError(f"{path}: {qualname} has no docstring; a student needs one to write it")
    indent = source.splitlines()[doc.lineno - 1][:doc.col_offset]
    return doc.end_lineno + 1, node.end_lineno, indent


def split_name(function):
    """'boxes.BoxCoder.encode' -> ('boxes.py', 'BoxCoder.encode')."""
    module, qualname = function.split(".", 1)
    return module + ".py", qualname


def stub_line(part, function):
    return f'raise NotImplementedError("Part {part.number}: write {function} (see {part.handout})")'


def replace_bodies(path, replacements):
    """replacements {qualname: new body lines}: each function's body after its docstring becomes those lines."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines(keepends=True)
    spans = sorted(((*body_lines(source, q, path), q) for q in replacements), reverse=True)  # last first
    for first, last, indent, qualname in spans:
        lines[first - 1:last] = [indent + line + "\n" if line else "\n" for line in replacements[qualname]]
    with open(path, "w") as f:
        f.write("".join(lines))


def reference_body(function):
    """The reference code's body (after the docstring) of `function`, as lines without their indentation."""
    path, qualname = split_name(function)
    with open(os.path.join(ROOT, path)) as f:
        source = f.read()
    first, last, indent = body_lines(source, qualname, path)
    return [line[len(indent):] if line.strip() else "" for line in source.splitlines()[first - 1:last]]


def by_file(parts, body):
    """{file: {qualname: body lines}} for every function of the parts; body(part, function) gives the lines."""
    files = {}
    for part in parts:
        for function in part.functions:
            path, qualname = split_name(function)
            files.setdefault(path, {})[qualname] = body(part, function)
    return files


# ------------------------------------------------------------------------------------------------------ make, solve

def repository_files():
    """The files of this repository: those git tracks or would track (not ignored), or, outside a git checkout, every
    file but the usual debris."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, text=True).stdout
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "data_cache", "__pycache__", ".pytest_cache"}
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip]
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names]
    return [f for f in files if f not in NOT_IN_EDITION and os.path.isfile(os.path.join(ROOT, f))]


def make(out, parts):
    """Write the student edition of `parts` into the new folder `out`."""
    if not out or (os.path.exists(out) and not os.path.isdir(out)):
        raise AssignmentError(f"--out {out!r}: give a new folder")
    if os.path.exists(out) and os.listdir(out):
        raise AssignmentError(f"{out} exists and is not empty; give a new folder to --out")
    for f in repository_files():
        os.makedirs(os.path.join(out, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(out, f))
    for path, replacements in by_file(parts, lambda part, function: [stub_line(part, function)]).items():
        replace_bodies(os.path.join(out, path), replacements)
    makefile = os.path.join(out, "Makefile")
    with open(makefile) as f:
        text = f.read()
    demo = "train.py --device cpu --output-dir runs/demo"
    if demo not in text:
        raise AssignmentError(f"Makefile: its demo target no longer runs '{demo}'; update assignment.make")
    with open(makefile, "w") as f:  # the demo with the student's plain functions, not fast_ops' equals
        f.write(text.replace(demo, demo + " --plain-ops"))
    with open(os.path.join(out, EDITION_FILE), "w") as f:
        json.dump({"parts": [p.number for p in parts]}, f)
        f.write("\n")


def solve(edition, parts):
    """Paste the reference functions of `parts` back into the edition in `edition` (e.g. after a deadline)."""
    for path, replacements in by_file(parts, lambda part, function: reference_body(function)).items():
        replace_bodies(os.path.join(edition, path), replacements)


# ----------------------------------------------------------------------------------------------------------- grade

def run_grading_tests(edition, part):
    """Run one part's grading tests in `edition` -> [(test, passed, first line of the failure)], one per test
    function (a parametrized test passes when every case does)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        command = [sys.executable, "-m", "pytest", part.tests, "-q", "-p", "no:cacheprovider", "--junitxml", report]
        try:
            subprocess.run(command, cwd=edition, capture_output=True, text=True, timeout=GRADING_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return [(part.tests, False, f"the tests did not finish in {GRADING_TIMEOUT_S} s (a loop that never ends?)")]
        if not os.path.exists(report):
            return [(part.tests, False, "pytest wrote no report; run it by hand: python -m pytest " + part.tests)]
        results = {}
        for case in ET.parse(report).getroot().iter("testcase"):  # junit XML: one testcase per test (and case)
            name = re.sub(r"\[.*\]$", "", case.get("name"))  # one entry per test function
            problem = next((case.find(tag) for tag in ("failure", "error", "skipped") if case.find(tag) is not None),
                           None)
            message = "" if problem is None else (problem.get("message") or problem.text or problem.tag)
            passed, first = results.get(name, (True, ""))
            if problem is not None and passed:
                passed, first = False, message.strip().splitlines()[0] if message.strip() else problem.tag
            results[name] = (passed, first)
    if not results:
        return [(part.tests, False, "no test ran; run it by hand: python -m pytest " + part.tests)]
    return [(name, passed, message) for name, (passed, message) in results.items()]


def _bound_to(tree, modules):
    """The names a tree's import statements bind to the modules (or their members): `import fast_ops`,
    `from fast_ops import nms as n`, `import torchvision.ops as ops`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in modules:
            names |= {a.asname or a.name for a in node.names}
    return names


def borrowed(edition, part):
    """[(function, name)]: the part's functions in the edition that use fast_ops or torchvision (an import in the
    function, or a name the module imports from them), which hold the reference answers."""
    found = []
    for function in part.functions:
        path, qualname = split_name(function)
        try:
            with open(os.path.join(edition, path)) as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):
            continue  # no such file, or one that does not parse: its tests fail
        node = find_function(tree, qualname)
        if node is None:
            continue  # its tests fail
        bound = _bound_to(tree, BORROWED) | set(BORROWED)
        used = sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & bound | _bound_to(node, BORROWED))
        if used:
            found.append((function, used[0]))
    return found


def check_experiment(edition):
    """Part 6 from its runs -> [(what, points earned, points possible, note)]."""
    checks = []
    share = PART6_AUTO / (len(PART6_RUNS) + 1)
    for run in PART6_RUNS:
        path = os.path.join(edition, run, "metrics.jsonl")
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        final = [r for r in rows if r.get("iter") == PART6_ITERS and "bbox/AP" in r]
        box_ap = 100 * final[-1]["bbox/AP"] if final else None  # metrics.jsonl holds COCOeval's fractions
        ok = box_ap is not None and math.isfinite(box_ap) and box_ap >= PART6_MIN_BOX_AP
        if box_ap is None:
            note = f"no evaluation at iteration {PART6_ITERS} in {run}/metrics.jsonl: run make experiment"
        elif not ok:
            note = f"box AP {box_ap} at iteration {PART6_ITERS}: below {PART6_MIN_BOX_AP}, the detector does not work"
        else:
            note = f"box AP {box_ap:.1f} at iteration {PART6_ITERS}"
        checks.append((run, share if ok else 0.0, share, note))
    figure = os.path.exists(os.path.join(edition, PART6_FIGURE))
    checks.append((PART6_FIGURE, share if figure else 0.0, share,
                   "drawn" if figure else "missing: run make experiment"))
    answers = os.path.join(edition, PART6_ANSWERS)
    answered = os.path.exists(answers) and "(your answer)" not in open(answers).read()
    checks.append((PART6_ANSWERS, None, PART6_BY_HAND,
                   "answered: graded by the instructor" if answered else "not answered yet"))
    return checks


def grade(edition, parts):
    """Grade `parts` of the edition in `edition`: print a report and return {part number: (earned, possible)};
    the written answers of part 6 are not counted (graded by hand)."""
    scores = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one pytest per part
        runs = {part.number: pool.submit(run_grading_tests, edition, part) for part in parts if part.tests}
    for part in parts:
        print(f"Part {part.number}: {part.title}")
        if part.tests:
            results = runs[part.number].result()
            passed = sum(ok for _, ok, _ in results)
            earned = part.points * passed / len(results)
            for name, ok, message in results:
                print(f"  {'pass' if ok else 'FAIL'}  {name}" + ("" if ok else f": {message[:160]}"))
            for function, name in borrowed(edition, part):
                print(f"  FAIL  {function} uses {name}, which holds the answer: write it in plain PyTorch")
                earned = 0.0
            possible = part.points
        else:
            earned, possible = 0.0, 0.0
            for what, got, of, note in check_experiment(edition):
                shown = "by hand" if got is None else f"{got:.1f}/{of:.1f}"
                print(f"  {shown:>9}  {what}: {note}")
                if got is not None:
                    earned, possible = earned + got, possible + of
        scores[part.number] = (earned, possible)
        by_hand = f" (+ {PART6_BY_HAND} by hand)" if not part.tests else ""
        print(f"  = {earned:.1f}/{possible:.0f} points{by_hand}\n")
    total = sum(e for e, _ in scores.values())
    possible = sum(p for _, p in scores.values())
    by_hand = PART6_BY_HAND if any(p.number == 6 for p in parts) else 0
    print(f"total: {total:.1f}/{possible:.0f} points" + (f" (+ {by_hand} for the written answers, graded by hand)"
                                                          if by_hand else ""))
    return scores


def with_reference_tests(submission, parts, out):
    """A fresh edition of `parts` in `out` holding the submission's own copies of the files its functions live in:
    grading it runs the reference's tests and the reference's every other line on the student's code."""
    make(out, parts)
    for path in sorted({split_name(function)[0] for part in parts for function in part.functions}):
        if not os.path.exists(os.path.join(submission, path)):
            raise AssignmentError(f"{submission}: no {path}; is it a student edition?")
        shutil.copy2(os.path.join(submission, path), os.path.join(out, path))
    if any(not part.functions for part in parts):  # part 6: the submission's runs, figure and written answers
        for path in (*PART6_RUNS, PART6_FIGURE, PART6_ANSWERS):
            source, target = os.path.join(submission, path), os.path.join(out, path)
            if os.path.isdir(source):
                shutil.copytree(source, target)
            elif os.path.isfile(source):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(source, target)


def edition_parts(edition, text):
    """--parts if given, else the parts the edition assigns (assignment.json), else every part."""
    if text:
        return parse_parts(text)
    path = os.path.join(edition, EDITION_FILE)
    if not os.path.exists(path):
        return PARTS
    try:
        with open(path) as f:
            numbers = json.load(f)["parts"]
        if not (isinstance(numbers, list) and numbers and all(isinstance(n, int) for n in numbers)):
            raise TypeError
        return parse_parts(",".join(map(str, numbers)))
    except (ValueError, KeyError, TypeError, AssignmentError):
        raise AssignmentError(f"{path} is not what assignment.py make writes ({{\"parts\": [1, 2, ...]}}); give "
                              f"--parts") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("make", help="write a student edition of this repository")
    c.add_argument("--out", required=True, help="a new (or empty) folder for the student edition")
    c.add_argument("--parts", help="part numbers, e.g. 1,3 (default: all)")
    c = commands.add_parser("grade", help="run the grading tests and print points per part")
    c.add_argument("edition", nargs="?", default=ROOT, help="the edition to grade (default: this folder)")
    c.add_argument("--parts", help="part numbers (default: those the edition assigns, or all)")
    c.add_argument("--reference-tests", action="store_true",
                   help="grade the submission's files that hold the parts' functions inside a fresh copy of this "
                        "repository, so that the tests and everything else are the reference's (for submissions)")
    c = commands.add_parser("solve", help="paste reference functions back into an edition")
    c.add_argument("edition", help="the student edition")
    c.add_argument("--parts", help="part numbers (default: all)")
    args = p.parse_args(argv)
    try:
        if args.command == "make":
            parts = parse_parts(args.parts)
            make(args.out, parts)
            print(f"wrote the student edition of parts {','.join(str(p.number) for p in parts)} to {args.out}; "
                  f"the handouts are in {args.out}/assignments")
        elif args.command == "grade":
            if not os.path.isdir(args.edition):
                raise AssignmentError(f"{args.edition}: no such folder")
            parts = edition_parts(args.edition, args.parts)
            if not args.reference_tests:
                grade(args.edition, parts)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    with_reference_tests(args.edition, parts, os.path.join(tmp, "edition"))
                    grade(os.path.join(tmp, "edition"), parts)
        else:
            solve(args.edition, parse_parts(args.parts))
            print(f"pasted the reference functions of parts {args.parts or 'all'} into {args.edition}")
    except AssignmentError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a folder that cannot be written, a file missing from an edition
        sys.exit(f"error: {e.filename or ''}: {e.strerror or e}")


if __name__ == "__main__":
    main()
