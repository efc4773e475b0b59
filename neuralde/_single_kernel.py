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
products only and no float reduction of more than 2048 elements (XLA:CPU hands
matrix-matrix products and larger reductions to its YNNPACK library fusion,
which that emitter does not implement), and no array above a size bound (there
the per-kernel cost no longer matters, and XLA's library kernels are faster),
except for arrays that are only written row by row and carried (a checkpoint
buffer), which may be larger. Products that contract nothing (outer products:
the weights' cotangent of a dense layer applied to a vector) are written as
broadcast multiplies inside the call, and small matrix-matrix products as
matrix-vector or outer products (`_small_dot_p`). Anywhere else the call is an
ordinary one; a function with a product that no lowering would take (a dense
layer on a batch, W4) is not packed into a call at all (`_has_large_product`).
``NEURALDE_SINGLE_KERNEL=0`` in the environment turns the mark off.

The call takes its inputs as one buffer (`_Packing`). The emitter aborts the
process (a failed CHECK on its buffer table, in ``IrEmitter::HandleParameter``)
when a parameter of the called computation has lost every use while its
operand is not a constant it embeds: XLA clones a constant operand of a call
into the callee and folds what it can of the callee's uses of it, and it embeds
constants of up to 10000 bytes as globals, not larger ones. Separate inputs hit
this: a broadcast constant (two equal tolerances) or a large constant buffer (a
dense history's initial value) as an operand. One buffer holding every input is
either computed at run time (then XLA knows nothing of it and every use stays)
or, when every input is a constant, one constant. Up to 10000 bytes XLA
embeds it; a larger buffer is first made a run-time value (`_runtime_value`:
its first element passed through a comparison with a random draw, which XLA
can neither fold nor prove; one draw per call). Arrays that a previous loop
produced (a checkpoint buffer) are never constants and are passed beside the
buffer, whatever their size (``produced``); each keeps a use inside the call
that XLA cannot remove (`_anchored`), since a parameter left without one aborts
the emitter too.

Results agree with the ordinary loop to rounding (the single kernel may
contract a multiply and an add differently). The loops that use it: the forward
solve's (`_loop.run_while`: ODE, SDE, delay and small implicit solves, without a
dense history, whose initial buffers are too large to pack), and `CheckpointAdjoint`'s
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
# Operations that only fill, write into or pass on an array (a checkpoint
# buffer: zeroed once, written a row per step, carried by the loops and calls)
# may hold arrays up to _MAX_BUFFER elements: past the zero fill they cost the
# rows they touch, not the array. (W3's every-step buffer holds 4096 steps of
# a 20 x 2 state, 163840 elements, and as many of its FSAL derivative.)
_MOVES = frozenset({"stablehlo.dynamic_update_slice", "stablehlo.broadcast_in_dim", "stablehlo.while",
                    "stablehlo.return", "func.call", "func.return", "stablehlo.optimization_barrier"})
_MAX_BUFFER = 1 << 22
# A matrix-matrix product of at most _MAX_SPLIT_WORK multiply-adds with at
# most _MAX_SPLIT rows or columns on one side, or that many terms summed, is
# split into matrix-vector or outer products. Larger ones are left to XLA's
# library kernels (W4's 256 rows through 64-wide layers: its 64 x 64 layer
# keeps the call from being one kernel in any case, and split products there
# would only add kernels).
_MAX_SPLIT = 4
_MAX_SPLIT_WORK = 1 << 14
# The packed inputs, in bytes: XLA:CPU embeds a constant of up to 10000 bytes
# (`CpuInstructionFusion::GetLargeConstantThresholdBytes`) as a global, which
# the emitter handles as an operand of the call even where its uses inside were
# folded away; a larger one it does not (see the module docstring).
_MAX_INPUT_BYTES = 10000
# No reduction of more elements than this: XLA:CPU hands a float reduction of
# 4096 elements or more to its YNNPACK library fusion, which the single-kernel
# emitter does not implement (it fails to compile). Matrix-matrix products go
# there too (hence `_matrix_vector`).
_MAX_REDUCE = 2048

_tag_p = Primitive("neuralde_single_kernel")
_tag_p.multiple_results = True
_tag_p.def_impl(lambda *xs: list(xs))
_tag_p.def_abstract_eval(lambda *avals: list(avals))
ad.deflinear2(_tag_p, lambda cts, *_: list(cts))
batching.primitive_batchers[_tag_p] = lambda args, dims: (_tag_p.bind(*args), dims)


# The packed buffer, made a value XLA cannot know at compile time when it is
# larger than XLA:CPU's embedded constants (see the module docstring).
_runtime_p = Primitive("neuralde_runtime_value")
_runtime_p.def_impl(lambda x: x)
_runtime_p.def_abstract_eval(lambda a: a)
ad.deflinear2(_runtime_p, lambda ct, _: [ct])
batching.primitive_batchers[_runtime_p] = lambda args, dims: (_runtime_p.bind(*args), dims[0])


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
    if not enabled() or jax.default_backend() != "cpu":
        return run(*args)
    closed, out_shape = jax.make_jaxpr(run, return_shape=True)(*args)
    ins = list(closed.consts) + jtu.tree_leaves(args)
    # ``produced`` arrays the function closes over are consts of its jaxpr:
    # take them out of the packing by identity.
    extra = jtu.tree_leaves(produced)
    outside = frozenset(i for i, x in enumerate(ins) if any(x is e for e in extra))
    outs = _call(closed.jaxpr, len(closed.consts), outside, ins)
    return jtu.tree_unflatten(jtu.tree_structure(out_shape), outs)


def _call(jaxpr, n_consts, outside, ins):
    """``jaxpr`` (``n_consts`` constvars) applied to ``ins``, the inputs at
    the indices ``outside`` passed as they are and the others packed into one
    buffer.

    Under `jax.vmap` the call is batched as a whole (a `custom_vmap` rule): the
    function is vmapped with the batched inputs only, and the result called
    again with every input as it is. Batching the packed call itself would
    batch the buffer, and with it every input in it: the parameters of a
    vector field would be copied once per lane (and the products that use
    them become per-lane products)."""

    def evaluate(*xs):
        return jax.core.eval_jaxpr(jaxpr, xs[:n_consts], *xs[n_consts:])

    packed_ins = [x for i, x in enumerate(ins) if i not in outside]
    # With inputs passed beside the buffer, the buffer also carries a flag
    # that is always true but drawn at run time (see `_anchored`).
    flagged = bool(outside)
    try:
        packing = _Packing([(jnp.result_type(x), jnp.shape(x)) for x in packed_ins]
                           + ([(jnp.dtype(bool), ())] if flagged else []))
    except TypeError:  # a dtype the buffer does not carry (complex, a PRNG key)
        packing = None
    if packing is None or packing.size > _MAX_ELEMENTS or _has_large_product(jaxpr):
        # Inputs this large, or a product no lowering takes into the kernel
        # (W4's 256 x 64 x 64 layer): the loop is not small, and the packed
        # buffer would only cost its copies -- and its slices, independent
        # kernels, let XLA:CPU's executor hand the loop to another thread
        # (20-30 us a call).
        return evaluate(*ins)
    inner = _eval_small_dots if _has_dots(jaxpr) else jax.core.eval_jaxpr

    def call(buffer, *passed):
        values = packing.unpack(buffer)
        flag = values.pop() if flagged else None
        values, rest = iter(values), iter(passed)
        flat = [next(rest) if i in outside else next(values) for i in range(len(ins))]
        outs = inner(jaxpr, flat[:n_consts], *flat[n_consts:])
        return _anchored(outs, passed, flag) if flagged else outs

    def packed_call(*xs):
        flag = [jax.lax.rng_uniform(np.float32(0), np.float32(1), ()) < 2] if flagged else []
        buffer = _runtime_p.bind(packing.pack([x for i, x in enumerate(xs) if i not in outside] + flag))
        return _tag_p.bind(*jax.jit(call)(buffer, *[xs[i] for i in sorted(outside)]))

    packed = jax.custom_batching.custom_vmap(packed_call)

    @packed.def_vmap
    def _batched(axis_size, in_batched, *xs):
        if not any(in_batched):
            # (`jax.jvp` of a batched call: this is the primal part; its
            # tangents are batched by the caller.)
            outs = packed_call(*xs)
            return outs, [False] * len(outs)
        axes = tuple(0 if b else None for b in in_batched)
        # Which outputs depend on the lanes: the others (a cotangent the
        # lanes share, summed inside the function) are returned unbatched --
        # batched, the caller would take them for one value per lane.
        out_batched = []

        def spied(*args):
            outs = evaluate(*args)
            out_batched[:] = [batched_innermost(o) is not False for o in outs]  # unknown: batched, the safe answer
            return outs

        closed = jax.make_jaxpr(jax.vmap(spied, in_axes=axes, axis_size=axis_size))(*xs)
        k = len(closed.consts)
        outs = _call(closed.jaxpr, k, frozenset(i + k for i in outside), [*closed.consts, *xs])
        return [o if b else o[0] for o, b in zip(outs, out_batched)], out_batched

    return packed(*ins)


def batched_innermost(x):
    """Whether ``x`` is batched by the `jax.vmap` being traced innermost (False
    where the innermost trace is not a `vmap`'s, or that `vmap` does not batch
    ``x``); None if JAX's internals moved, each caller choosing its safe
    answer."""
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - JAX internals moved
        return None
    trace = getattr(getattr(jax_core, "trace_ctx", None), "trace", None)
    return isinstance(x, BatchTracer) and getattr(x, "_trace", None) is trace


def _anchored(outs, passed, flag):
    """``outs`` with a use of every array in ``passed`` that XLA cannot
    remove: each output where ``flag`` (always true, drawn at run time), else
    the sum of the arrays' first elements. (Each output, not one: a caller may
    discard some outputs, and the use must survive in the ones it reads; a
    select per output element, once per call.)

    The single-kernel emitter aborts the process on a parameter of the call
    that has lost every use ("All or none of the slices should have an
    explicit index", `IrEmitter::EmitGlobalBufferPointer`). An input passed
    beside the buffer (a checkpoint buffer) can lose its uses inside: a part of
    the carry that the backward step reads only in a branch that does not need
    it (an SDE's Brownian cache) is pruned by XLA's passes, and the loop then
    drops it."""
    parts = [x[(0,) * x.ndim].astype(jnp.float32) for x in passed
             if x.size and x.dtype != jax.dtypes.float0]
    if not parts:
        return list(outs)
    anchor = sum(parts)
    return [jnp.where(flag, out, anchor.astype(out.dtype)) if out.size and out.dtype != jax.dtypes.float0 else out
            for out in outs]


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
        self.size, self.nbytes = offset, offset * width

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
        elif kind == "stablehlo.reduce":
            if any(_elements(v.type) > _MAX_REDUCE for v in op.operands):
                return False
        elif kind not in _ALLOWED:
            return False
        bound = _MAX_BUFFER if kind in _MOVES else _MAX_ELEMENTS
        if any(_elements(r.type) > bound for r in op.results):
            return False
        if kind == "func.call" and not _eligible(symbol_table, op.attributes["callee"].value, seen):
            return False
        return all(ok(inner) for region in op.regions for block in region.blocks for inner in block.operations)

    result = all(ok(op) for block in func.regions[0].blocks for op in block.operations)
    seen[name] = result
    return result


# Of the module being lowered: verdicts on its callees (a call's outputs are
# tagged one by one) and the packed buffers made run-time values; held with
# the module itself, not its id, which a later module may reuse.
_state: dict = {"module": None}


def _module_state(module_context) -> dict:
    if _state["module"] is not module_context.module:
        _state.clear()
        _state.update(module=module_context.module, seen={}, runtime=[])
    return _state


def _runtime_value(x):
    # ``x`` with its first element replaced by itself where a uniform draw in
    # [0, 1) is below 2: always ``x``, but XLA neither folds a random draw nor
    # can prove the comparison, so it cannot treat the result as a constant.
    # (One element: XLA fuses the draw into its consumer, per element.)
    flat = x.reshape(-1)
    draw = jax.lax.rng_uniform(np.float32(0), np.float32(1), ())
    first = jax.lax.select(draw < 2, flat[0], jnp.zeros((), x.dtype))
    return jax.lax.dynamic_update_index_in_dim(flat, first, 0, 0).reshape(x.shape)


def _runtime_lowering_cpu(ctx, x):
    (aval,) = ctx.avals_in
    if aval.size * aval.dtype.itemsize <= _MAX_INPUT_BYTES:
        return [x]  # embedded by XLA if it is a constant
    (out,) = mlir.lower_fun(_runtime_value, multiple_results=False)(ctx, x)
    _module_state(ctx.module_context)["runtime"].append(out)
    return [out]


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
            state = _module_state(module_context)
            # The packed inputs (the first operand): within the bound also after
            # `jax.vmap`, or made a run-time value (the other operands are
            # `produced` by a loop).
            safe_inputs = not op.operands or _bytes(op.operands[0].type) <= _MAX_INPUT_BYTES or any(
                v == op.operands[0] for v in state["runtime"])
            if safe_inputs and _eligible(module_context.symbol_table, callee, state["seen"]):
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
mlir.register_lowering(_runtime_p, lambda ctx, x: [x])
mlir.register_lowering(_runtime_p, _runtime_lowering_cpu, platform="cpu", cacheable=False)


# --- outer and split products -----------------------------------------------
#
# The single-kernel emitter handles matrix-vector products but not the library
# fusion XLA:CPU makes of a matrix-matrix one. A neural field has them: the
# gradient of a vector state through a dense layer (the weights' cotangent is
# the outer product of the layer's input and output cotangents, a `dot_general`
# that contracts nothing), and any field on a batch held as one state (W3: 20
# states in 2-D through a 2-50-2 MLP). Inside a `single_kernel` call every
# `dot_general` becomes `_small_dot_p`, the same product, which for XLA:CPU is
# lowered
# - when it contracts nothing and is within the element bound, as a broadcast
#   multiply;
# - when it is a small matrix-matrix product (at most _MAX_SPLIT_WORK
#   multiply-adds, no batch axes) with at most _MAX_SPLIT rows or columns on
#   one side, as one matrix-vector product per row or column, and with at most
#   _MAX_SPLIT terms summed, as that many broadcast multiplies added;
# - otherwise as the `dot_general` it was.
# The choice is made when lowering, on the final shapes (after `jax.vmap`).
# (Products that sum, written as one multiply and a `reduce`, also compile as
# one kernel, but the emitter's reduction is slow: W3's forward solve took 94
# against 54 us in XLA's separate kernels. Split, W3's training step went from
# 0.60 to 0.39 ms.)

_small_dot_p = Primitive("neuralde_small_dot")


def _dot(x, y, **params):
    return jax.lax.dot_general_p.bind(x, y, **params)


_small_dot_p.def_impl(_dot)
_small_dot_p.def_abstract_eval(lambda x, y, **params: jax.lax.dot_general_p.abstract_eval(x, y, **params)[0])


def _substituted(fn, *args):
    """``fn(*args)``, traced, its products made `_small_dot_p`."""
    closed = jax.make_jaxpr(fn)(*args)
    return _eval_small_dots(closed.jaxpr, closed.consts, *args)


def _struct(aval):
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _transpose_lhs(ct, x, y, **params):
    return _substituted(lambda c, b: jax.linear_transpose(lambda a: _dot(a, b, **params), _struct(x.aval))(c)[0],
                        ct, y)[0]


def _transpose_rhs(ct, x, y, **params):
    return _substituted(lambda c, a: jax.linear_transpose(lambda b: _dot(a, b, **params), _struct(y.aval))(c)[0],
                        ct, x)[0]


ad.defbilinear(_small_dot_p, _transpose_lhs, _transpose_rhs)


def _small_dot_batch(args, dims, **params):
    axes = [d if isinstance(d, int) else None for d in dims]
    out = _substituted(jax.vmap(functools.partial(_dot, **params), in_axes=axes), *args)[0]
    return out, 0


batching.primitive_batchers[_small_dot_p] = _small_dot_batch


def _product_shape(x_shape, y_shape, dimension_numbers):
    (xc, yc), (xb, yb) = dimension_numbers
    batch = [x_shape[i] for i in xb]
    x_free = [n for i, n in enumerate(x_shape) if i not in xc and i not in xb]
    y_free = [n for i, n in enumerate(y_shape) if i not in yc and i not in yb]
    contracted = [x_shape[i] for i in xc]
    return batch, x_free, y_free, contracted


def _as_matrices(x, y, dimension_numbers, dtype):
    """``x`` as ``(*batch, M, K)`` and ``y`` as ``(*batch, K, N)`` in
    ``dtype``, and the shape of their product."""
    (xc, yc), (xb, yb) = dimension_numbers
    batch, x_free, y_free, contracted = _product_shape(x.shape, y.shape, dimension_numbers)
    x_rest = [i for i in range(x.ndim) if i not in xc and i not in xb]
    y_rest = [i for i in range(y.ndim) if i not in yc and i not in yb]
    k = math.prod(contracted)
    xm = jax.lax.transpose(x, (*xb, *x_rest, *xc)).reshape(*batch, math.prod(x_free), k).astype(dtype)
    ym = jax.lax.transpose(y, (*yb, *yc, *y_rest)).reshape(*batch, k, math.prod(y_free)).astype(dtype)
    return xm, ym, (*batch, *x_free, *y_free)


def _split_product(x, y, *, dimension_numbers, preferred_element_type, **_):
    """A product as products the single-kernel emitter handles: with at most
    _MAX_SPLIT columns (rows) on one side and more than one term summed, one
    matrix-vector product per column (row); otherwise one broadcast multiply
    per term summed, added -- one for an outer product, which contracts
    nothing. (Only outer products may have batch axes: see `_small_dot_cpu`.)"""
    dtype = preferred_element_type or jnp.result_type(x, y)
    xm, ym, shape = _as_matrices(x, y, dimension_numbers, dtype)
    m, k, n = xm.shape[-2], xm.shape[-1], ym.shape[-1]
    if k > 1 and n <= _MAX_SPLIT and n <= m:
        out = jnp.stack([xm @ ym[:, j] for j in range(n)], axis=1)
    elif k > 1 and m <= _MAX_SPLIT:
        out = jnp.stack([xm[i] @ ym for i in range(m)], axis=0)
    else:
        out = xm[..., 0:1] * ym[..., 0:1, :]
        for j in range(1, k):
            out = out + xm[..., j:j + 1] * ym[..., j:j + 1, :]
    return out.reshape(shape)


def _product_kind(x_shape, y_shape, dimension_numbers) -> str:
    """How a call's product is lowered for XLA:CPU: ``"split"`` (an outer
    product within the element bound, or a small matrix-matrix product,
    written as `_split_product`), ``"vector"`` (a matrix-vector product the
    emitter takes as it is) or ``"large"`` (neither: no call that holds it is
    one kernel)."""
    batch, x_free, y_free, contracted = _product_shape(x_shape, y_shape, dimension_numbers)
    m, n, k = math.prod(x_free), math.prod(y_free), math.prod(contracted)
    outer = k == 1 and math.prod(batch + x_free + y_free) <= _MAX_ELEMENTS
    small = (not batch and min(m, n) > 1 and (min(m, n) <= _MAX_SPLIT or k <= _MAX_SPLIT)
             and m * n * k <= _MAX_SPLIT_WORK)
    if outer or small:
        return "split"
    if not batch and min(m, n) == 1 and max(math.prod(x_shape), math.prod(y_shape)) <= _MAX_MATRIX:
        return "vector"
    return "large"


def _small_dot_cpu(x, y, **params):
    if _product_kind(x.shape, y.shape, params["dimension_numbers"]) == "split":
        return _split_product(x, y, **params)
    return _dot(x, y, **params)


mlir.register_lowering(_small_dot_p, mlir.lower_fun(_dot, multiple_results=False))
mlir.register_lowering(_small_dot_p, mlir.lower_fun(_small_dot_cpu, multiple_results=False), platform="cpu")


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _has_dots(jaxpr) -> bool:
    """Whether ``jaxpr`` (its inner jaxprs included) has a `dot_general`."""
    return any(eqn.primitive is jax.lax.dot_general_p or any(_has_dots(j) for j in _sub_jaxprs(eqn.params))
               for eqn in jaxpr.eqns)


def _has_large_product(jaxpr) -> bool:
    """Whether ``jaxpr`` (its inner jaxprs included) has a `dot_general` that
    no lowering of a call takes into one kernel: neither an outer product
    within the element bound, nor a small product that `_small_dot_cpu`
    splits, nor a matrix-vector product within _MAX_MATRIX. `jax.vmap` only
    enlarges a product (a batched call is screened again, `_call`), and the
    derivatives of such a product are products as large."""

    def large(eqn):
        x, y = (v.aval for v in eqn.invars[:2])
        return _product_kind(x.shape, y.shape, eqn.params["dimension_numbers"]) == "large"

    def search(j):
        return any(large(e) if e.primitive is jax.lax.dot_general_p else any(search(s) for s in _sub_jaxprs(e.params))
                   for e in j.eqns)

    return search(jaxpr)


def _rewrite(value):
    """An inner jaxpr (closed or open) with its products made `_small_dot_p`;
    the value itself where there is nothing to change or it cannot be."""
    if isinstance(value, (tuple, list)):
        items = [_rewrite(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        jaxpr, consts = value.jaxpr, value.consts
    elif isinstance(value, jax.extend.core.Jaxpr) and not value.constvars:
        jaxpr, consts = value, []
    else:
        return value
    if not _has_dots(jaxpr):
        return value
    structs = [_struct(v.aval) for v in jaxpr.invars]
    new = jax.make_jaxpr(lambda *a: _eval_small_dots(jaxpr, consts, *a))(*structs)
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return new
    return new.jaxpr if not new.consts else value


def _rewrite_or_keep(value):
    # A parameter of a structure the rewrite does not know keeps its products
    # as they are (correct, only not written as multiplies).
    try:
        return _rewrite(value)
    except Exception:  # pragma: no cover - depends on JAX's parameter types
        return value


def _eval_small_dots(jaxpr, consts, *args):
    """`jax.core.eval_jaxpr`, with every `dot_general` (inner jaxprs
    included) bound as `_small_dot_p`."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is jax.lax.dot_general_p:
            outs = [_small_dot_p.bind(*invals, **eqn.params)]
        else:
            params = {k: _rewrite_or_keep(v) for k, v in eqn.params.items()}
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]
