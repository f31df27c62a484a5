"""assignment.py: the student edition, the grader and the reference pasted back.

For each part, the edition that leaves it to write fails that part's grading tests and passes every other part's; the
reference code gets full points. Run only the grading tests of each edition (about 10 s an edition on 2 cores).
"""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

import assignment
from assignment import PARTS

ROOT = assignment.ROOT
CODE_PARTS = [p for p in PARTS if p.tests]  # parts 1-5; part 6 is checked from its runs


def make_edition(tmp_path, parts):
    out = tmp_path / "edition"
    assignment.make(str(out), parts)
    return out


def test_every_part_names_real_functions_that_its_grading_tests_call():
    for part in PARTS:
        assert os.path.exists(os.path.join(ROOT, part.handout)), part.handout
        if not part.tests:
            continue
        with open(os.path.join(ROOT, part.tests)) as f:
            tests = f.read()
        for function in part.functions:
            assert assignment.reference_body(function), function  # exists, has a docstring and a body
            name = function.split(".")[-1]
            name = function.split(".")[-2] if name == "__call__" else name  # Matcher(...)(iou)
            name = "AnchorGenerator" if function == "rpn.AnchorGenerator.forward" else name
            assert re.search(rf"\b{name}\b", tests), f"{part.tests} never calls {function}"


def test_the_reference_code_gets_full_points(capsys):
    scores = assignment.grade(ROOT, CODE_PARTS)
    out = capsys.readouterr().out
    for part in CODE_PARTS:
        assert scores[part.number] == (part.points, part.points), out
    assert "FAIL" not in out
    assert f"total: {sum(p.points for p in CODE_PARTS):.1f}/" in out


@pytest.mark.parametrize("part", CODE_PARTS, ids=[f"part{p.number}" for p in CODE_PARTS])
def test_an_edition_fails_its_part_and_passes_the_others(part, tmp_path, capsys):
    edition = make_edition(tmp_path, [part])
    scores = assignment.grade(str(edition), CODE_PARTS)
    out = capsys.readouterr().out
    assert scores[part.number] == (0.0, part.points), out
    for other in CODE_PARTS:
        if other is not part:
            assert scores[other.number] == (other.points, other.points), out
    # every failure of the part is its own NotImplementedError, named in one line
    failures = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert failures and all(f"NotImplementedError: Part {part.number}: write " in line for line in failures), out


def test_the_edition_keeps_signatures_and_docstrings_and_solving_it_gives_the_reference_back(tmp_path):
    edition = make_edition(tmp_path, PARTS)
    for part in PARTS:
        for function in part.functions:
            path, qualname = assignment.split_name(function)
            ours = assignment.find_function(ast.parse((edition / path).read_text()), qualname)
            reference = assignment.find_function(ast.parse(open(os.path.join(ROOT, path)).read()), qualname)
            assert ast.dump(ours.args) == ast.dump(reference.args), function
            assert ast.get_docstring(ours) == ast.get_docstring(reference), function
            assert len(ours.body) == 2 and isinstance(ours.body[1], ast.Raise), function
            message = ours.body[1].exc.args[0].value
            assert message == f"Part {part.number}: write {function} (see {part.handout})"
    assert "--output-dir runs/demo --plain-ops" in (edition / "Makefile").read_text()  # the student's functions
    assert json.loads((edition / "assignment.json").read_text()) == {"parts": [p.number for p in PARTS]}
    assert not (edition / "tests" / "test_assignment.py").exists()
    assignment.solve(str(edition), PARTS)
    files = assignment.repository_files()
    for f in files:
        if f != "Makefile":
            assert (edition / f).read_bytes() == open(os.path.join(ROOT, f), "rb").read(), f
    assert sorted(str(p.relative_to(edition)) for p in edition.rglob("*") if p.is_file()
                  and "__pycache__" not in p.parts) == sorted(files + ["assignment.json"])


@pytest.mark.parametrize("parts, first", [(PARTS, 2), ([PARTS[2]], 3)], ids=["all-parts", "part3"])
def test_training_with_a_part_left_to_write_stops_with_one_line(parts, first, tmp_path):
    # All parts: building the model calls part 2's anchors; part 3 alone: the first training step pools RoIs.
    edition = make_edition(tmp_path, parts)
    result = subprocess.run([sys.executable, "train.py", "--device", "cpu", "--plain-ops", "--output-dir",
                             str(tmp_path / "run"), "--max-iters", "1", "--no-eval", "--workers", "0"],
                            cwd=edition, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(rf"error: Part {first}: write \S+ \(see assignments/part{first}_\w+\.md\)",
                        result.stderr.strip().splitlines()[-1]), result.stderr


def write_experiment(root, box_ap=(0.48, 0.50), figure=True, answered=True):
    for run, ap in zip(assignment.PART6_RUNS, box_ap):
        (root / run).mkdir(parents=True)
        rows = [{"iter": 200, "bbox/AP": ap / 2}, {"iter": 250, "loss": 1.0}, {"iter": 250, "bbox/AP": ap}]
        (root / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if figure:
        (root / assignment.PART6_FIGURE).write_bytes(b"png")
    (root / "assignments").mkdir()
    (root / assignment.PART6_ANSWERS).write_text("1. GN trains from scratch.\n" if answered else "1. (your answer)\n")


def test_the_experiment_is_checked_from_its_runs(tmp_path, capsys):
    part6 = PARTS[5]
    write_experiment(tmp_path / "done")
    assert assignment.grade(str(tmp_path / "done"), [part6]) == {6: (assignment.PART6_AUTO, assignment.PART6_AUTO)}
    assert "answered: graded by the instructor" in capsys.readouterr().out
    write_experiment(tmp_path / "broken", box_ap=(0.48, 0.05), figure=False, answered=False)
    earned, _ = assignment.grade(str(tmp_path / "broken"), [part6])[6]
    out = capsys.readouterr().out
    assert earned == pytest.approx(assignment.PART6_AUTO / 3)
    assert "box AP 5.0 at iteration 250: below 30.0" in out and "missing: run make experiment" in out
    assert "not answered yet" in out
    (tmp_path / "none").mkdir()
    assert assignment.grade(str(tmp_path / "none"), [part6])[6][0] == 0
    assert "no evaluation at iteration 250" in capsys.readouterr().out


def test_command_line_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "assignment.py"), *args], capture_output=True,
                              text=True, timeout=60)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "assignment.json").write_text('{"parts": 5}')
    for args, message in [(("make", "--out", str(tmp_path / "full")), "exists and is not empty"),
                          (("make", "--out", str(tmp_path / "new"), "--parts", "1,9"), "no part 9; the parts are 1..6"),
                          (("make", "--out", str(tmp_path / "new"), "--parts", "one"), "give part numbers"),
                          (("grade", str(tmp_path / "missing")), "no such folder"),
                          (("make", "--out", str(tmp_path / "full" / "x")), "give a new folder"),  # a file
                          (("grade", str(tmp_path / "bad")), "is not what assignment.py make writes"),
                          (("solve", str(tmp_path / "full")), "boxes.py: No such file or directory")]:
        result = run(*args)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and message in result.stderr, result
        assert len(result.stderr.strip().splitlines()) == 1


def test_reference_tests_grade_the_students_files_with_this_repositorys_tests(tmp_path, capsys):
    # A submission that solved part 1 by weakening its tests instead: graded in place it would get full points.
    submission = make_edition(tmp_path, [PARTS[0]])
    (submission / PARTS[0].tests).write_text("def test_nothing():\n    pass\n")
    assert assignment.grade(str(submission), [PARTS[0]])[1] == (20, 20)
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assignment.with_reference_tests(str(submission), [PARTS[0]], str(fresh))
    assert (fresh / PARTS[0].tests).read_text() == open(os.path.join(ROOT, PARTS[0].tests)).read()
    assert (fresh / "boxes.py").read_text() == (submission / "boxes.py").read_text()  # the student's file
    assert assignment.grade(str(fresh), [PARTS[0]])[1] == (0, 20)


@pytest.mark.parametrize("borrow", [
    ("    return fast_ops.group_norm(x, num_groups, weight, bias, eps)", ""),
    ("    return gn(x, num_groups, weight, bias, eps)", "from fast_ops import group_norm as gn\n"),
    ("    from torchvision.ops import misc\n    return misc.torch.nn.functional.group_norm(x, num_groups, weight, "
     "bias, eps)", ""),
], ids=["attribute", "module-import", "local-import"])
def test_a_part_that_calls_the_fast_ops_or_torchvision_gets_no_points(borrow, tmp_path, capsys):
    # fast_ops.py holds tested equals of the plain functions; torchvision their references
    edition = make_edition(tmp_path, [PARTS[4]])
    body, header = borrow
    norm = (edition / "norm.py").read_text()
    stub = '    raise NotImplementedError("Part 5: write norm.group_norm (see assignments/part5_norm.md)")'
    (edition / "norm.py").write_text(header + norm.replace(stub, body))
    assert assignment.borrowed(str(edition), PARTS[4])[0][0] == "norm.group_norm"
    assert assignment.borrowed(ROOT, PARTS[4]) == []  # the reference's norm.py imports fast_ops for the layer only
    if not header:  # graded: the tests pass (fast_ops.group_norm is right), the part still gets no points
        assert assignment.grade(str(edition), [PARTS[4]])[5] == (0.0, PARTS[4].points)
        assert re.search(r"FAIL  norm.group_norm uses \w+, which holds the answer", capsys.readouterr().out)
