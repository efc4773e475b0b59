"""Small loops compiled as one CPU kernel.

XLA:CPU runs a program as a sequence of kernels ("thunks"), one per fusion,
and each launch costs tens of nanoseconds whatever the work inside. A solver
loop on a small state (a few equations, a few parameters) does a few hundred
flops per step spread over some twenty kernels, so the launches, not the
arithmetic, set its speed. XLA itself compiles a `while` loop whose body
accesses under 1 KiB as one kernel (its ``SmallWhileLoopHoistingPass``, which
marks a `call` with the frontend attribute ``xla_cpu_small_call``); a solver
step on two float64 states already accesses about 2 KiB.

`single_kernel` calls a function through `jax.jit` and marks that call the
same way, so that XLA:CPU emits it as one kernel. The mark is applied when the
program is lowered, after every transformation, and only where the emitter is
known to handle the whole function: a CPU-only lowering, every operation from
a list of elementwise, shape and control-flow operations, matrix-vector
products only (a matrix-matrix product's fusion is not implemented by that
emitter), and no array above a size bound (there the per-kernel cost no longer
matters, and XLA's library kernels are faster). Anywhere else the call is an
ordinary one. ``NEURALDE_SINGLE_KERNEL=0`` in the environment turns the mark off.

Results agree with the ordinary loop to rounding (the single kernel may
contract a multiply and an add differently). Where the emitter itself fails
it aborts the process rather than raising, so the mark is used on one loop
only, the forward solve's without a dense history (`_loop.run_while`), which
the tests cover under every transformation they use.
"""
from __future__ import annotations

import math
import os
import re

import jax
import jax.tree_util as jtu
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_ATTRIBUTES = {"inlineable": "false", "xla_cpu_small_call": "true"}

# Operations the single-kernel emitter handles (checked on the StableHLO that
# is lowered, so after `vmap`, `jvp` and every other transformation).
_ALLOWED = frozenset(
    "stablehlo." + name
    for name in """
    abs add and atan2 bitcast_convert broadcast_in_dim case cbrt ceil clamp compare complex concatenate
    constant convert cosine divide dynamic_slice dynamic_update_slice exponential exponential_minus_one
    floor if imag iota is_finite log log_plus_one logistic maximum minimum multiply negate not
    optimization_barrier or popcnt power real reduce remainder reshape return reverse round_nearest_afz
    round_nearest_even rsqrt select shift_left shift_right_arithmetic shift_right_logical sign sine slice
    sqrt subtract tan tanh transpose while xor
    """.split()
) | frozenset({"func.call", "func.return", "chlo.erf_inv", "chlo.erf", "chlo.erfc", "chlo.sinh", "chlo.cosh",
               "chlo.asinh", "chlo.acosh", "chlo.atanh", "chlo.asin", "chlo.acos", "chlo.atan", "chlo.tan",
               "chlo.lgamma", "chlo.digamma", "chlo.square", "chlo.conj", "chlo.is_inf", "chlo.is_pos_inf",
               "chlo.is_neg_inf", "chlo.bessel_i1e"})

# No array larger than this (elements) in the function, and no matrix operand of
# a product larger than _MAX_MATRIX: beyond them XLA's own kernels win.
_MAX_ELEMENTS = 1 << 16
_MAX_MATRIX = 4096
# No operand of the call larger than this. The emitter aborts the process (a
# failed CHECK on its buffer table, in `HandleParameter`) on the loops that
# carry a dense history or CheckpointAdjoint's checkpoints, both large operands.
# Their cause is not isolated (parameters bound to constants of the caller lose
# their uses; see benchmarks/PERF_NOTES.md), so this bound is a guard by
# observation, and only the forward solve's loop without a dense history is
# marked at all.
_MAX_OPERAND = 1024

_tag_p = Primitive("neuralde_single_kernel")
_tag_p.def_impl(lambda x: x)
_tag_p.def_abstract_eval(lambda aval: aval)
ad.deflinear2(_tag_p, lambda ct, _: [ct])
batching.defvectorized(_tag_p)


def enabled() -> bool:
    return os.environ.get("NEURALDE_SINGLE_KERNEL", "1") != "0"


def single_kernel(fn, *args):
    """``fn(*args)``, compiled as one XLA:CPU kernel where that is known to work
    (see the module docstring); elsewhere an ordinary call."""
    if not enabled():
        return fn(*args)
    out = jax.jit(fn)(*args)
    return jtu.tree_map(_tag_p.bind, out)


def _elements(value_type) -> int:
    try:
        shape = mlir.ir.RankedTensorType(value_type).shape
    except (ValueError, TypeError):
        return 0  # a token or a tuple: no data of its own
    return math.prod(shape)


_DIMS = re.compile(r"(lhs_batching|rhs_batching|lhs_contracting|rhs_contracting)_dimensions = \[([\d, ]*)\]")


def _matrix_vector(op) -> bool:
    numbers = str(op.attributes["dot_dimension_numbers"])
    dims = {k: [int(d) for d in v.split(",") if d.strip()] for k, v in _DIMS.findall(numbers)}
    if dims.get("lhs_batching") or dims.get("rhs_batching"):
        return False
    shapes = [mlir.ir.RankedTensorType(v.type).shape for v in op.operands[:2]]
    free = [
        math.prod(n for i, n in enumerate(shape) if i not in dims.get(side + "_contracting", []))
        for shape, side in zip(shapes, ("lhs", "rhs"))
    ]
    return min(free) == 1 and max(math.prod(s) for s in shapes) <= _MAX_MATRIX


def _eligible(symbol_table, name, seen) -> bool:
    if name in seen:
        return seen[name]
    seen[name] = True  # recursion guard (calls form a DAG)
    try:
        func = symbol_table[name]
    except KeyError:
        seen[name] = False
        return False

    def ok(op) -> bool:
        kind = op.name
        if kind == "stablehlo.dot_general":
            if not _matrix_vector(op):
                return False
        elif kind not in _ALLOWED:
            return False
        if any(_elements(r.type) > _MAX_ELEMENTS for r in op.results):
            return False
        if kind == "func.call" and not _eligible(symbol_table, op.attributes["callee"].value, seen):
            return False
        return all(ok(inner) for region in op.regions for block in region.blocks for inner in block.operations)

    result = all(ok(op) for block in func.regions[0].blocks for op in block.operations)
    seen[name] = result
    return result


# Verdicts on the callees of the module being lowered (a call's outputs are
# tagged one by one); held with the module itself, not its id, which a later
# module may reuse.
_verdicts: dict = {"module": None, "seen": {}}


def _lowering(ctx, x):
    try:
        _mark(ctx.module_context, x)
    except Exception:  # pragma: no cover - an MLIR API that moved: lower as an ordinary call
        pass
    return [x]


def _mark(module_context, x):
    if tuple(module_context.platforms) == ("cpu",):
        owner = x.owner
        op = getattr(owner, "operation", None)
        if op is not None and op.name == "func.call" and "xla_cpu_small_call" not in _attribute_names(op):
            callee = op.attributes["callee"].value
            if _verdicts["module"] is not module_context.module:
                _verdicts["module"], _verdicts["seen"] = module_context.module, {}
            seen = _verdicts["seen"]
            small_operands = all(_elements(v.type) <= _MAX_OPERAND for v in op.operands)
            if small_operands and _eligible(module_context.symbol_table, callee, seen):
                attrs = {k: mlir.ir.StringAttr.get(v) for k, v in _ATTRIBUTES.items()}
                if "mhlo.frontend_attributes" in _attribute_names(op):
                    for a in mlir.ir.DictAttr(op.attributes["mhlo.frontend_attributes"]):
                        attrs.setdefault(a.name, a.attr)
                op.attributes["mhlo.frontend_attributes"] = mlir.ir.DictAttr.get(attrs)


def _attribute_names(op):
    names = [a if isinstance(a, str) else a.name for a in op.attributes]
    if "mhlo.frontend_attributes" in names:
        names += [a.name for a in mlir.ir.DictAttr(op.attributes["mhlo.frontend_attributes"])]
    return names


mlir.register_lowering(_tag_p, _lowering, cacheable=False)
