"""The house rules of the code itself, checked on every module at the project root:
scripts on top (none imported by another module), no import circles, prediction and export never import training
code, nothing runs at import,
functions of at most 60 lines, at most 7 parameters and at most 3 returned values."""
import ast
import os

import pytest

from conftest import ROOT

SCRIPTS = {"train", "val", "bench", "export", "preprocess_dsb2018", "make_demo_data", "compare"}
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
MAX_LINES, MAX_PARAMS, MAX_RETURNED = 60, 7, 3


def tree(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        return ast.parse(f.read())


def local_imports(name):
    """The project modules that `name` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & set(MODULES)


def functions(name):
    return [n for n in ast.walk(tree(name)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_entry_scripts_exist():
    assert SCRIPTS <= set(MODULES) and {"engine", "runtime", "loaders", "dataset", "rundir"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_no_module_imports_an_entry_script(name):
    assert not local_imports(name) & SCRIPTS


def imported_by(name):
    """Every project module `name` needs, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for found in local_imports(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return seen


PREDICTION = ("predict", "predictor", "evaluation", "outputs", "figures", "bioimageio_package", "export")
TRAINING = {"engine", "loaders", "train", "pretrained"}   # the loop, its batches and augmentation, the training
# script, and the weights a run starts from (--init)


@pytest.mark.parametrize("name", PREDICTION)
def test_prediction_and_export_never_import_training_code(name):
    assert not imported_by(name) & TRAINING, f"{name} needs {sorted(imported_by(name) & TRAINING)}"


def test_no_import_circles():
    graph = {m: local_imports(m) for m in MODULES}

    def reaches(start, target, seen):
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    assert [m for m in MODULES if reaches(m, m, {m})] == []


@pytest.mark.parametrize("name", MODULES)
def test_nothing_runs_at_import(name):
    allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    for node in tree(name).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue                                           # the docstring
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        assert isinstance(node, allowed), f"{name}.py line {node.lineno} runs at import: {ast.unparse(node)[:80]}"


@pytest.mark.parametrize("name", MODULES)
def test_functions_are_short_and_narrow(name):
    for fn in functions(name):
        where = f"{name}.py:{fn.lineno} {fn.name}"
        a = fn.args
        params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
        assert fn.end_lineno - fn.lineno + 1 <= MAX_LINES, f"{where} is {fn.end_lineno - fn.lineno + 1} lines"
        assert params <= MAX_PARAMS, f"{where} takes {params} parameters"
        for node in ast.walk(fn):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                assert len(node.value.elts) <= MAX_RETURNED, f"{where} returns {len(node.value.elts)} values"
