"""Relax passes that cut the VM's per-call work between kernels, which on a model of ~0.05-0.1 ms
(kws-cnn) is a few percent of an inference: 9 reshape views and 16 register clears there.

``FoldReshapeIntoKernels``: a ``R.reshape`` whose result only feeds ``call_tir`` kernels is a
``vm.builtin.reshape`` call (a new tensor view object) per inference; the kernel can take the
unreshaped tensor instead and view it with the old shape inside (a TIR ``DeclBuffer`` aliasing the
parameter's data), which costs nothing at run time.

``DropKills``: removes the ``kill_tensor`` / ``kill_storage`` / ``vm.kill_object`` calls that
StaticPlanBlockMemory and KillAfterLastUse insert (each a ``vm.builtin.null_value`` call, 16 in
kws-cnn). With static shapes every allocation is planned, the pooled allocator keeps freed blocks
anyway, and the frame's registers are released when ``main`` returns.

``MarkSingleBufferNoAlias``: TVM 0.27's LLVM codegen, compiling one module, lets a PrimFunc without
``tirx.noalias`` that comes later in the module take the alias information from the ``noalias``
kernels before it: their accesses get TVM's "may alias anything" TBAA tag, and a register-tiled
loop then stores its accumulators on every step (a language model's prefill matmul ran at half
speed after the VM's ``shape_func``). A PrimFunc with at most one buffer parameter (the VM's shape
functions, ``compute_symbolic_expr``) aliases nothing, so marking it ``noalias`` is always right.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx


def _static_shape(ty) -> tuple[int, ...] | None:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
    return None if None in dims else tuple(dims)


def _compact(buf) -> bool:
    return not list(buf.strides) and isinstance(buf.elem_offset, tvm.tirx.IntImm) and buf.elem_offset.value == 0


def _retarget(func: tirx.PrimFunc, index: int, shape: tuple[int, ...]) -> tirx.PrimFunc | None:
    """``func`` taking parameter ``index`` with ``shape``; the body still sees the old buffer, as a view."""
    old = func.params[index]
    if not isinstance(old, tirx.Buffer) or not _compact(old) or str(old.scope()) != "global" \
            or not all(isinstance(d, tvm.tirx.IntImm) for d in old.shape):
        return None
    new = tirx.decl_buffer(shape, old.dtype, name=old.name, data_alignment=old.data_alignment,
                           offset_factor=old.offset_factor)
    view = tirx.DeclBuffer(old, data=new.data)
    body = func.body
    if isinstance(body, tvm.s_tir.SBlockRealize):  # scheduled TIR: the view goes inside the root block
        b = body.block
        block = tvm.s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, tirx.SeqStmt([view, b.body]), b.init,
                                 b.alloc_buffers, b.match_buffers, b.annotations)
        body = tvm.s_tir.SBlockRealize(body.iter_values, body.predicate, block)
    else:
        body = tirx.SeqStmt([view, body])
    params = list(func.params)
    params[index] = new
    return tirx.PrimFunc(params, body, func.ret_type, func.attrs)


@tvm.transform.module_pass(opt_level=0, name="FoldReshapeIntoKernels")
def FoldReshapeIntoKernels(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:  # noqa: N802 (a TVM pass)
    """Run after ``RewriteDataflowReshape`` (reshapes are ``R.reshape`` then), before ``ToNonDataflow``."""
    reshape_op, call_tir_op = tvm.ir.Op.get("relax.reshape"), tvm.ir.Op.get("relax.call_tir")
    new_funcs: dict[tuple, relax.GlobalVar] = {}
    in_place: dict = {}  # old kernel GlobalVar -> (new GlobalVar, kernel)
    uses: dict[str, int] = {}  # kernel -> references: a kernel used once is changed in place (it keeps its name)

    def count(expr):
        if isinstance(expr, relax.GlobalVar):
            uses[expr.name_hint] = uses.get(expr.name_hint, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, count)

    @relax.expr_functor.mutator
    class Folder(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.sources: dict = {}  # reshape result var -> (source var, its shape)

        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(reshape_op) and isinstance(value.args[0], relax.Var):
                shape = _static_shape(value.args[0].ty)
                if shape is not None:
                    self.sources[binding.var] = (value.args[0], shape)
            super().visit_var_binding_(binding)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir_op):
                return call
            gvar, args = call.args[0], list(call.args[1].fields)
            changes = [(i, self.sources[a]) for i, a in enumerate(args) if isinstance(a, relax.Var) and a in self.sources]
            if not changes:
                return call
            key = (gvar.name_hint, tuple((i, shape) for i, (_, shape) in changes))
            if key not in new_funcs:
                func = self.builder_.get()[gvar]
                for i, (_, shape) in changes:
                    func = func and _retarget(func, i, shape)
                if func is None:
                    return call
                if uses[gvar.name_hint] == 1:  # replaced below, under the same name
                    new_funcs[key] = relax.GlobalVar(gvar.name_hint)
                    relax.expr._update_type(new_funcs[key], func.ty)
                    in_place[gvar] = (new_funcs[key], func)
                else:
                    new_funcs[key] = self.builder_.add_func(func.without_attr("global_symbol"), gvar.name_hint + "_v")
            for i, (src, _) in changes:
                args[i] = src
            return relax.Call(call.op, [new_funcs[key], relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)

    folder = Folder(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gvar, folder.visit_expr(func))
    mod = folder.builder_.finalize()
    funcs = {gvar: func for gvar, func in mod.functions_items() if gvar not in in_place}
    funcs.update(dict(in_place.values()))
    mod = tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)
    # the reshapes (now unused) and the kernels no longer called go
    return relax.transform.DeadCodeElimination()(mod)


@relax.transform.function_pass(opt_level=0, name="DropKills")
def DropKills(func: relax.Function, _mod, _ctx) -> relax.Function:  # noqa: N802 (a TVM pass)
    kills = [tvm.ir.Op.get(name) for name in ("relax.memory.kill_tensor", "relax.memory.kill_storage", "relax.vm.kill_object")]

    @relax.expr_functor.mutator
    class Dropper(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            value = binding.value
            if not (isinstance(value, relax.Call) and any(value.op.same_as(k) for k in kills)):
                super().visit_var_binding_(binding)

    return Dropper().visit_expr(func)


def _buffer_params(func: tirx.PrimFunc) -> int:
    return sum(1 for p in func.params if isinstance(p, tirx.Buffer) or str(getattr(p, "dtype", "")) == "handle")


@tvm.transform.module_pass(opt_level=0, name="MarkSingleBufferNoAlias")
def MarkSingleBufferNoAlias(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:  # noqa: N802 (a TVM pass)
    """``tirx.noalias`` on every PrimFunc with at most one buffer parameter (see the module docstring)."""
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.noalias", False)) \
                and _buffer_params(func) <= 1:
            updates[gv] = func.with_attr("tirx.noalias", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
