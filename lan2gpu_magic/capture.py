"""Step 1 of a cell's trip: which names it reads (inputs) and binds (outputs).

Inputs are names the cell may read before the cell itself has certainly bound
them, and that exist in the notebook's namespace (not builtins, not IPython's
own hidden names). "Certainly" follows the control flow: ``y = 1; print(y)``
does not send ``y``; ``if c: y = 1`` then ``print(y)`` does. Names read inside
functions, lambdas, classes and comprehensions defined by the cell count as read
where they are defined (a function may run at any time after that).

Outputs are the names the cell binds at module level: assignment, augmented
assignment, ``for``/``with``/``except`` targets, imports, ``def``/``class``,
walrus, ``global`` declarations in functions, ``match`` captures. Names deleted
with a top-level ``del`` are reported so the notebook can delete them too.
Comprehension variables and a function's locals are not outputs.
"""

from __future__ import annotations

import ast
import dis
import symtable
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CellSyntaxError, ConfigurationError


@dataclass
class CellNames:
    """What the cell reads and binds, independent of any namespace."""

    reads: list[str] = field(default_factory=list)  # may be read before bound, in order
    binds: list[str] = field(default_factory=list)  # bound at module level, in order
    augmented: set[str] = field(default_factory=set)
    deletes: list[str] = field(default_factory=list)

    def read(self, name: str) -> None:
        if name not in self.reads:
            self.reads.append(name)

    def bind(self, name: str) -> None:
        if name not in self.binds:
            self.binds.append(name)


@dataclass(frozen=True)
class CellPlan:
    """What to send and what to bring back for one cell."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    required: frozenset[str] = frozenset()  # --out: missing or unpicklable is an error
    always: frozenset[str] = frozenset()  # augmented-assigned: back even if same object
    deletes: tuple[str, ...] = ()


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _target_names(node: ast.AST) -> list[str]:
    """Names bound by an assignment target (``a``, ``a, (b, *c)``; not ``a.x``/``a[i]``)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Starred):
        return _target_names(node.value)
    if isinstance(node, ast.Tuple | ast.List):
        return [n for elt in node.elts for n in _target_names(elt)]
    return []


def _scope_globals(table: symtable.SymbolTable) -> tuple[set[str], set[str]]:
    """(module names read, module names assigned via ``global``) by a scope and its children."""
    reads: set[str] = set()
    binds: set[str] = set()
    is_class = table.get_type() == "class"
    for sym in table.get_symbols():
        # A class body looks names up in the module too, even ones it assigns
        # later (`x = x + 1`), so every name it reads may be a module read.
        if sym.is_referenced() and (sym.is_global() or (is_class and not sym.is_parameter())):
            reads.add(sym.get_name())
        if sym.is_declared_global() and (sym.is_assigned() or sym.is_imported()):
            binds.add(sym.get_name())
    for child in table.get_children():
        sub_reads, sub_binds = _scope_globals(child)
        reads |= sub_reads
        binds |= sub_binds
    return reads, binds


class _Flow:
    """Walks module-level statements in order, tracking names certainly bound."""

    def __init__(self, names: CellNames, nested: dict[int, tuple[set[str], set[str]]]) -> None:
        self.names = names
        self.nested = nested  # line -> globals read/bound by scopes starting there

    # -- expressions (reads at module scope, walrus binds) -------------------

    def expr(self, node: ast.AST | None, bound: set[str]) -> None:
        if node is None:
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id not in bound:
                self.names.read(node.id)
            return
        if isinstance(node, ast.NamedExpr):
            self.expr(node.value, bound)
            self.names.bind(node.target.id)
            return
        if isinstance(node, _SCOPES):
            self._scope_header(node, bound)
            return
        if isinstance(node, _COMPREHENSIONS):
            # Only the first iterable is evaluated here; the rest is its own scope,
            # except walrus targets, which bind at module level.
            self.expr(node.generators[0].iter, bound)
            self._scope_reads(node, bound)
            for sub in ast.walk(node):
                if isinstance(sub, ast.NamedExpr):
                    self.names.bind(sub.target.id)
            return
        for child in ast.iter_child_nodes(node):
            self.expr(child, bound)

    def _scope_header(self, node: ast.AST, bound: set[str]) -> None:
        """Parts of a def/lambda/class evaluated where it is defined, then its body's reads."""
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for deco in node.decorator_list:
                self.expr(deco, bound)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = node.args
            for default in [*args.defaults, *args.kw_defaults]:
                self.expr(default, bound)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                self.expr(arg.annotation, bound)
            for var in (node.args.vararg, node.args.kwarg):
                if var is not None:
                    self.expr(var.annotation, bound)
            self.expr(node.returns, bound)
        if isinstance(node, ast.ClassDef):
            for base in [*node.bases, *(k.value for k in node.keywords)]:
                self.expr(base, bound)
        self._scope_reads(node, bound)

    def _scope_reads(self, node: ast.AST, bound: set[str]) -> None:
        end = getattr(node, "end_lineno", None) or node.lineno  # type: ignore[attr-defined]
        for line in range(node.lineno, end + 1):  # type: ignore[attr-defined]
            reads, binds = self.nested.pop(line, (set(), set()))
            for name in sorted(reads - bound):
                self.names.read(name)
            for name in sorted(binds):
                self.names.bind(name)

    # -- statements ---------------------------------------------------------

    def block(self, body: Iterable[ast.stmt], bound: set[str]) -> set[str]:
        """Process statements in order; return the names certainly bound after them."""
        bound = set(bound)
        for stmt in body:
            bound = self.stmt(stmt, bound)
        return bound

    def _bind(self, names: Iterable[str], bound: set[str], certain: bool = True) -> None:
        for name in names:
            self.names.bind(name)
            if certain:
                bound.add(name)

    def stmt(self, node: ast.stmt, bound: set[str]) -> set[str]:
        bound = set(bound)
        if isinstance(node, ast.Assign):
            self.expr(node.value, bound)
            for target in node.targets:
                self._target(target, bound)
        elif isinstance(node, ast.AnnAssign):
            self.expr(node.value, bound)
            self.expr(node.annotation, bound)
            if node.value is not None or not isinstance(node.target, ast.Name):
                self._target(node.target, bound)
        elif isinstance(node, ast.AugAssign):
            self.expr(node.value, bound)
            if isinstance(node.target, ast.Name):
                if node.target.id not in bound:
                    self.names.read(node.target.id)
                self.names.augmented.add(node.target.id)
                self._bind([node.target.id], bound)
            else:
                self.expr(node.target, bound)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    self._bind([alias.asname or alias.name.split(".")[0]], bound)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            self._scope_header(node, bound)
            self._bind([node.name], bound)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                for name in _target_names(target):
                    if name not in bound:
                        self.names.read(name)
                    if name not in self.names.deletes:
                        self.names.deletes.append(name)
                    bound.discard(name)
                if not isinstance(target, ast.Name | ast.Tuple | ast.List):
                    self.expr(target, bound)
        elif isinstance(node, ast.If | ast.While):
            self.expr(node.test, bound)
            after_body = self.block(node.body, bound)
            after_else = self.block(node.orelse, bound)
            if isinstance(node, ast.If):
                bound |= after_body & after_else
        elif isinstance(node, ast.For | ast.AsyncFor):
            self.expr(node.iter, bound)
            inner = set(bound)
            self._target(node.target, inner)
            self.block(node.body, inner)
            self.block(node.orelse, bound)
        elif isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                self.expr(item.context_expr, bound)
                if item.optional_vars is not None:
                    self._target(item.optional_vars, bound)
            # A context manager can swallow an exception (contextlib.suppress), so
            # bindings in the body are not certain after it.
            self.block(node.body, bound)
        elif isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)):
            self.block(node.body, bound)
            for handler in node.handlers:
                self.expr(handler.type, bound)
                inner = set(bound)
                if handler.name:
                    self._bind([handler.name], inner)
                self.block(handler.body, inner)
            self.block(node.orelse, bound)
            bound = self.block(node.finalbody, bound)
        elif isinstance(node, ast.Match):
            self.expr(node.subject, bound)
            for case in node.cases:
                inner = set(bound)
                for sub in ast.walk(case.pattern):
                    if isinstance(sub, ast.MatchAs | ast.MatchStar) and sub.name:
                        self._bind([sub.name], inner)
                    elif isinstance(sub, ast.MatchMapping) and sub.rest:
                        self._bind([sub.rest], inner)
                    elif isinstance(sub, ast.MatchValue | ast.MatchClass):
                        self.expr(sub.value if isinstance(sub, ast.MatchValue) else sub.cls, bound)
                self.expr(case.guard, inner)
                self.block(case.body, inner)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            pass
        else:  # Expr, Return, Raise, Assert, Pass, Break, Continue, ...
            self.expr(node, bound)
        return bound

    def _target(self, target: ast.AST, bound: set[str]) -> None:
        names = _target_names(target)
        if names:
            self._bind(names, bound)
        # Reads inside targets: a[i] = ..., obj.attr = ..., and starred parts.
        for sub in ast.walk(target):
            if isinstance(sub, ast.Subscript | ast.Attribute):
                self.expr(sub, bound)


def analyze(code: str, filename: str = "<cell>") -> CellNames:
    """Reads and binds of ``code``; raises SyntaxError like ``compile`` would."""
    tree = ast.parse(code, filename, "exec")
    table = symtable.symtable(code, filename, "exec")
    nested: dict[int, tuple[set[str], set[str]]] = {}
    for child in table.get_children():
        reads, binds = nested.setdefault(child.get_lineno(), (set(), set()))
        sub_reads, sub_binds = _scope_globals(child)
        reads |= sub_reads
        binds |= sub_binds
    names = CellNames()
    flow = _Flow(names, nested)
    flow.block(tree.body, set())
    return names


def _split(names: str | Iterable[str] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    out = [n.strip() for n in names if n.strip()]
    for name in out:
        if not name.isidentifier():
            raise ConfigurationError(f"{name!r} is not a variable name")
    return out


def plan_cell(
    code: str,
    namespace: Mapping[str, Any],
    *,
    hidden: Mapping[str, Any] | None = None,
    inputs: str | Iterable[str] | None = None,
    outputs: str | Iterable[str] | None = None,
    filename: str = "<cell>",
    line_offset: int = 0,
) -> CellPlan:
    """Decide what to send and bring back; ``inputs``/``outputs`` override the analysis.

    ``hidden`` is IPython's ``user_ns_hidden``: a name still bound to its hidden
    value (``In``, ``Out``, ``exit``, ...) is never an input.
    """
    try:
        names = analyze(code, filename)
    except SyntaxError as exc:
        # Point at the line as the user sees it (the magic line comes first).
        if exc.lineno is not None:
            exc.lineno += line_offset
        if exc.end_lineno is not None:
            exc.end_lineno += line_offset
        raise CellSyntaxError(exc) from None
    hidden = hidden or {}
    explicit_in = _split(inputs)
    explicit_out = _split(outputs)
    if explicit_in is not None:
        missing = [n for n in explicit_in if n not in namespace]
        if missing:
            raise ConfigurationError(
                f"--in names {', '.join(missing)}, which the notebook does not define; "
                "define them first or drop them from --in"
            )
        chosen_in = explicit_in
    else:
        chosen_in = [
            n
            for n in names.reads
            if n in namespace
            and not (n.startswith("__") and n.endswith("__"))
            and not (n in hidden and hidden[n] is namespace[n])
        ]
    if explicit_out is not None:
        return CellPlan(
            inputs=tuple(chosen_in),
            outputs=tuple(explicit_out),
            required=frozenset(explicit_out),
            always=frozenset(explicit_out),
        )
    # Notebook functions the cell uses may assign globals (`global n; n += 1`).
    outputs = list(names.binds)
    for name in chosen_in:
        for written in global_writes(namespace[name], namespace):
            if written not in outputs:
                outputs.append(written)
    return CellPlan(
        inputs=tuple(chosen_in),
        outputs=tuple(outputs),
        always=frozenset(names.augmented),
        deletes=tuple(names.deletes),
    )


def global_writes(value: Any, namespace: Mapping[str, Any]) -> list[str]:
    """Globals a function defined in ``namespace`` assigns or deletes."""
    if not isinstance(value, types.FunctionType) or value.__globals__ is not namespace:
        return []
    found: list[str] = []
    codes = [value.__code__]
    while codes:
        code = codes.pop()
        for ins in dis.get_instructions(code):
            if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL") and ins.argval not in found:
                found.append(ins.argval)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return found
