"""Which names a cell reads (inputs) and binds (outputs)."""

from __future__ import annotations

import pytest

from lan2gpu_magic.capture import analyze, plan_cell
from lan2gpu_magic.errors import CellSyntaxError, ConfigurationError


def reads(code: str) -> set[str]:
    return set(analyze(code).reads)


def binds(code: str) -> set[str]:
    return set(analyze(code).binds)


def test_read_before_rebound_is_an_input():
    assert reads("x = x + 1") == {"x"}
    assert binds("x = x + 1") == {"x"}


def test_bound_then_read_is_not_an_input():
    assert "y" not in reads("y = 1\nprint(y)")


def test_conditionally_bound_then_read_is_an_input():
    assert "y" in reads("if c:\n    y = 1\nprint(y)")
    # ...but bound on both branches is certain.
    assert "y" not in reads("if c:\n    y = 1\nelse:\n    y = 2\nprint(y)")


def test_comprehension_variables_are_neither_inputs_nor_outputs():
    code = "r = [i * k for i in range(n) if i % m]"
    assert reads(code) == {"range", "n", "k", "m"}
    assert binds(code) == {"r"}


def test_walrus_binds_at_module_level_even_in_a_comprehension():
    assert binds("s = [(w := v) for v in vals]") == {"w", "s"}
    assert binds("if (n := len(a)) > 2:\n    pass") == {"n"}


def test_del_is_a_read_and_is_reported():
    names = analyze("del z\nq = 1")
    assert names.reads == ["z"]
    assert names.deletes == ["z"]
    assert names.binds == ["q"]


def test_del_after_binding_reads_nothing():
    names = analyze("t = 1\ndel t")
    assert names.reads == []
    assert names.deletes == ["t"]


def test_nested_function_reads_globals_and_not_its_locals():
    code = "def f(a):\n    b = a + g\n    def inner():\n        return b + h\n    return inner\nout = f(3)"
    assert reads(code) == {"g", "h"}
    assert binds(code) == {"f", "out"}


def test_function_defaults_and_decorators_are_read_where_defined():
    code = "@deco(opt)\ndef f(x=default_x) -> ret_t:\n    return x"
    assert reads(code) == {"deco", "opt", "default_x", "ret_t"}


def test_global_declaration_in_a_function_binds_the_module_name():
    assert binds("def h():\n    global G\n    G = 5\nh()") == {"G", "h"}


def test_imports_bind_their_top_name():
    assert binds("import numpy as np, os.path\nfrom numba import cuda as cu") == {"np", "os", "cu"}


def test_with_for_and_except_targets_are_outputs():
    code = (
        "with open(p) as fh:\n    data = fh.read()\n"
        "for i, (j, *rest) in pairs:\n    pass\n"
        "try:\n    pass\nexcept E as err:\n    pass\n"
    )
    assert binds(code) == {"fh", "data", "i", "j", "rest", "err"}
    assert "fh" not in reads(code)


def test_bindings_inside_with_are_not_certain():
    # contextlib.suppress may skip the rest of the body.
    code = "with contextlib.suppress(ZeroDivisionError):\n    y = 1 / 0\nu = y"
    assert "y" in reads(code)


def test_class_body_reads_names_it_assigns_later():
    assert reads("class A:\n    x = x + 10") == {"x"}


def test_loop_target_read_in_the_body_is_not_an_input():
    assert reads("for i in range(3):\n    total += i") == {"range", "total"}


def test_augmented_assignment_reads_and_marks_the_target():
    names = analyze("a += 1")
    assert names.reads == ["a"] and names.binds == ["a"] and names.augmented == {"a"}


def test_subscript_and_attribute_targets_read_their_object():
    assert reads("a[idx] = val\nobj.attr = 2") == {"a", "idx", "val", "obj"}
    assert binds("a[idx] = val\nobj.attr = 2") == set()


def test_class_body_reads_globals_but_binds_only_the_class():
    code = "class C(Base):\n    attr = K\n    def m(self):\n        return self.attr + Z"
    assert reads(code) == {"Base", "K", "Z"}
    assert binds(code) == {"C"}


def test_match_captures_are_outputs():
    code = "match cmd:\n    case [action, *args]:\n        pass\n    case {'k': v, **more}:\n        pass"
    assert binds(code) == {"action", "args", "v", "more"}
    assert reads(code) == {"cmd"}


def test_syntax_errors_propagate():
    with pytest.raises(SyntaxError):
        analyze("x = (")


def test_plan_reports_syntax_errors_at_the_users_line_number():
    with pytest.raises(CellSyntaxError) as info:
        plan_cell("x = 1\ny = (", {}, filename="<c>", line_offset=1)
    assert info.value.lineno == 3
    assert info.value._render_traceback_()[-1] == "SyntaxError: '(' was never closed"


def test_plan_keeps_only_names_that_exist_and_are_not_hidden():
    marker = object()
    ns = {"a": 1, "In": marker, "__name__": "__main__", "print": print, "k": 3}
    plan = plan_cell("b = a + k + q\nIn\n__name__", ns, hidden={"In": marker})
    assert plan.inputs == ("a", "k")
    assert plan.outputs == ("b",)


def test_a_rebound_hidden_name_is_an_input():
    plan = plan_cell("y = In", {"In": "mine"}, hidden={"In": ["ipython's"]})
    assert plan.inputs == ("In",)


def test_explicit_in_and_out_override_the_analysis():
    ns = {"a": 1, "b": 2}
    plan = plan_cell("c = a + b", ns, inputs="a, b", outputs=["c", "d"])
    assert plan.inputs == ("a", "b")
    assert plan.outputs == ("c", "d")
    assert plan.required == {"c", "d"}


def test_explicit_input_that_does_not_exist_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="--in names nope"):
        plan_cell("x = 1", {}, inputs="nope")
    with pytest.raises(ConfigurationError, match="not a variable name"):
        plan_cell("x = 1", {}, outputs="1x")
