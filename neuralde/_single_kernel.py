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

The call takes its inputs as one buffer (`_Packing`). The emitter aborts the
process (a failed CHECK on its buffer table, in ``IrEmitter::HandleParameter``)
when a parameter of the called computation has lost every use while its
operand is not a constant it embeds: XLA clones a constant operand of a call
into the callee and folds what it can of the callee's uses of it, and it embeds
constants of up to 10000 bytes as globals, not larger ones. Separate inputs hit
this: a broadcast constant (two equal tolerances) or a large constant buffer (a
dense history's initial value) as an operand. One buffer holding every input is
either computed at run time (then XLA knows nothing of it and every use stays)
or, when every input is a constant, one constant that is kept under 10000 bytes.
Arrays that a previous loop produced (a checkpoint buffer) are never constants
and are passed beside the buffer, whatever their size (``produced``).

Results agree with the ordinary loop to rounding (the single kernel may
contract a multiply and an add differently). The loops that use it: the forward
solve's (`_loop.run_while`: ODE, SDE and small implicit solves, without a dense
history, whose initial buffers are too large to pack), and `CheckpointAdjoint`'s
loop of steps alone, forward and backward.
"""
from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_ATTRIBUTES = {"inlineable": "false", "xla_cpu_small_call": "true"}

# Operations the single-kernel emitter handles (checked on the StableHLO that
# is lowered, so after `vmap`, `jvp` and every other transformation).
_ALLOWED = frozenset(
    "stablehlo." + name
    for name in """
    abs add and atan2 bitcast_convert broadcast_in_dim case cbrt ceil clamp compare complex concatenate
    constant convert count_leading_zeros cosine divide dynamic_slice dynamic_update_slice exponential
    exponential_minus_one floor if imag iota is_finite log log_plus_one logistic maximum minimum multiply negate not
    optimization_barrier or pad popcnt power real reduce remainder reshape return reverse round_nearest_afz
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
# The packed inputs, in bytes: XLA:CPU embeds a constant of up to 10000 bytes
# (`CpuInstructionFusion::GetLargeConstantThresholdBytes`) as a global, which
# the emitter handles as an operand of the call even where its uses inside were
# folded away; a larger one it does not (see the module docstring).
_MAX_INPUT_BYTES = 10000

_tag_p = Primitive("neuralde_single_kernel")
_tag_p.multiple_results = True
_tag_p.def_impl(lambda *xs: list(xs))
_tag_p.def_abstract_eval(lambda *avals: list(avals))
ad.deflinear2(_tag_p, lambda cts, *_: list(cts))
batching.primitive_batchers[_tag_p] = lambda args, dims: (_tag_p.bind(*args), dims)


def enabled() -> bool:
    return os.environ.get("NEURALDE_SINGLE_KERNEL", "1") != "0"


def single_kernel(fn, *args, produced=None):
    """``fn(*args)`` (``fn(produced, *args)`` when ``produced`` is given),
    compiled as one XLA:CPU kernel where that is known to work (see the module
    docstring); elsewhere an ordinary call.

    ``produced``: a pytree of arrays that an earlier loop computed and that
    ``fn`` reads (never constants of the program); passed as they are, outside
    the packed inputs and their size bound."""
    run = fn if produced is None else functools.partial(fn, produced)
    if not enabled():
        return run(*args)
    closed, out_shape = jax.make_jaxpr(run, return_shape=True)(*args)
    ins = list(closed.consts) + jtu.tree_leaves(args)
    # ``produced`` arrays the function closes over are consts of its jaxpr:
    # take them out of the packing by identity.
    extra = jtu.tree_leaves(produced)
    outside = [i for i, x in enumerate(ins) if any(x is e for e in extra)]
    packed_ins = [x for i, x in enumerate(ins) if i not in outside]
    try:
        packing = _Packing([(jnp.result_type(x), jnp.shape(x)) for x in packed_ins])
    except TypeError:  # a dtype the buffer does not carry (complex, a PRNG key)
        packing = None
    if packing is None or packing.nbytes > _MAX_INPUT_BYTES:
        return run(*args)
    n_consts = len(closed.consts)
    out_tree = jtu.tree_structure(out_shape)

    def call(buffer, *passed):
        values = iter(packing.unpack(buffer))
        passed = iter(passed)
        flat = [next(passed) if i in outside else next(values) for i in range(len(ins))]
        return jax.core.eval_jaxpr(closed.jaxpr, flat[:n_consts], *flat[n_consts:])

    outs = jax.jit(call)(packing.pack(packed_ins), *[ins[i] for i in outside])
    return jtu.tree_unflatten(out_tree, _tag_p.bind(*outs))


class _Packing:
    """Arrays of several dtypes as one flat buffer of the widest float dtype
    among them, and back, exactly: narrower floats are widened, integers and
    booleans are widened to an integer of the buffer's width whose bits the
    buffer carries. Every step is linear in the floats, so derivatives pass
    through; ``float0`` arrays (the tangents of integers) carry nothing.
    (`_loop._Flat` keeps one buffer per dtype instead, for a loop's carry,
    which must not convert its integers every iteration; here one buffer is
    the point: a per-dtype group of constants is what the emitter aborts on.)"""

    def __init__(self, specs):
        dtypes = [jnp.dtype(d) for d, _ in specs]
        if any(d != jax.dtypes.float0 and (d.kind not in "biuf" or d.itemsize > 8) for d in dtypes):
            raise TypeError("only real floats, integers and booleans are packed")
        width = 8 if any(d.itemsize == 8 for d in dtypes) else 4
        self.dtype = jnp.dtype(f"float{8 * width}")
        self.signed, self.unsigned = jnp.dtype(f"int{8 * width}"), jnp.dtype(f"uint{8 * width}")
        self.layout, offset = [], 0
        for dt, (_, shape) in zip(dtypes, specs):
            n = 0 if dt == jax.dtypes.float0 else math.prod(shape)
            self.layout.append((dt, tuple(shape), offset, n))
            offset += n
        self.nbytes = offset * width

    def _carrier(self, dt):
        return self.unsigned if dt.kind == "u" else self.signed

    def pack(self, arrays):
        parts = [jnp.zeros((0,), self.dtype)]
        for x, (dt, _, _, _) in zip(arrays, self.layout):
            if dt == jax.dtypes.float0:
                continue
            x = jnp.ravel(x)
            if dt.kind == "f":
                parts.append(x.astype(self.dtype))
            else:
                parts.append(jax.lax.bitcast_convert_type(x.astype(self._carrier(dt)), self.dtype))
        return jnp.concatenate(parts)

    def unpack(self, buffer):
        out = []
        for dt, shape, offset, n in self.layout:
            if dt == jax.dtypes.float0:
                out.append(np.zeros(shape, dt))
                continue
            x = jax.lax.slice_in_dim(buffer, offset, offset + n)
            if dt.kind == "f":
                x = x.astype(dt)
            else:
                x = jax.lax.bitcast_convert_type(x, self._carrier(dt))
                x = x != 0 if dt == jnp.bool_ else x.astype(dt)
            out.append(x.reshape(shape))
        return out


def _elements(value_type) -> int:
    try:
        shape = mlir.ir.RankedTensorType(value_type).shape
    except (ValueError, TypeError):
        return 0  # a token or a tuple: no data of its own
    return math.prod(shape)


def _bytes(value_type) -> int:
    try:
        width = mlir.ir.RankedTensorType(value_type).element_type.width
    except (ValueError, TypeError, AttributeError):
        width = 64
    return _elements(value_type) * max(width, 8) // 8


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


def _lowering(ctx, *xs):
    try:
        for x in xs:
            _mark(ctx.module_context, x)
    except Exception:  # pragma: no cover - an MLIR API that moved: lower as an ordinary call
        pass
    return list(xs)


def _mark(module_context, x):
    if tuple(module_context.platforms) == ("cpu",):
        owner = x.owner
        op = getattr(owner, "operation", None)
        if op is not None and op.name == "func.call" and "xla_cpu_small_call" not in _attribute_names(op):
            callee = op.attributes["callee"].value
            if _verdicts["module"] is not module_context.module:
                _verdicts["module"], _verdicts["seen"] = module_context.module, {}
            seen = _verdicts["seen"]
            # The packed inputs (the first operand) within the bound also after
            # `jax.vmap` (the others are `produced` by a loop).
            small_inputs = not op.operands or _bytes(op.operands[0].type) <= _MAX_INPUT_BYTES
            if small_inputs and _eligible(module_context.symbol_table, callee, seen):
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
