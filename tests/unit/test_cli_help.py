"""`--help` text of every command-line tool: the module docstring, shown verbatim by argparse."""
import ast
import glob

from tests.conftest import ROOT


def test_help_texts_keep_their_line_breaks():
    """A backslash at the end of a line inside a plain (non-raw) docstring joins the lines, so the usage example
    prints as one line with a run of stray spaces where the break was: every docstring line must survive."""
    checked = []
    for path in sorted(glob.glob(str(ROOT / "*" / "*.py"))):
        source = open(path, encoding="utf-8").read()
        if "argparse" not in source:
            continue
        module = ast.parse(source)
        node = module.body[0].value if module.body and isinstance(module.body[0], ast.Expr) else None
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        assert node.value.count("\n") == node.end_lineno - node.lineno, f"{path}: docstring lines joined by '\\'"
        checked.append(path)
    assert len(checked) >= 10  # recipes/, data_pipeline/, bench/ tools
