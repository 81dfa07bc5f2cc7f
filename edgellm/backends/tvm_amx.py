"""AMX tiles for edgellm's packed denses in TVM: int8 (``tdpbusd``) and bf16 (``tdpbf16ps``).

The int8 dense (``tvm_int8/compute.py``: u8 ``[M, K]`` x s8 ``[N/16, K/4, 16, 4]`` -> s32) and the bf16
dense (``tvm_bf16.py``: bf16 bits ``[M, K]`` x ``[N/16, K/2, 16, 2]`` -> fp32) keep their weights in
exactly the layout an AMX B tile wants: one 64-byte row holds 16 output channels x one k group (4
bytes / 2 bf16). So on a Sapphire Rapids class core the same PrimFuncs run on tiles instead of zmm
registers, 16x the multiply-adds of an AVX-512 instruction each:

    parallel over (rows x column) blocks of r*tm x c*16 outputs
        zero the local accumulator block          (fp32 / int32, the "local" cache_write)
        edgellm_amx_*(C_local, A rows, W panels)  one LLVM function: the whole K loop on tiles
        epilogue on the vectorized write-back     (dequantize, bias, activation, requantize: fused)

The block function (``kernel_ir``: LLVM IR text linked into the module with ``pragma_import_llvm``,
as ``tvm_bf16`` does for ``vdpbf16ps``; TVM 0.27 ships no AMX intrinsics) loads r*c accumulator
tiles, runs K in steps of ``kstep`` (r A tiles + c B tiles + r*c dot products a step) and stores
them back. Every kernel uses one tile configuration (8 tiles of 16 rows x 64 bytes), so kernels of
edgellm never reload it between them. Configurations are per thread: the function reads the current one
(``sttilecfg``, ~17 cycles) and loads its own only when it differs (``ldtilecfg``, ~110 cycles, measured
on the Xeon this was written on), and a configuration another library left on the thread is loaded back
before returning: ONNX Runtime's AMX kernels load theirs once per thread and trust it to stay (with
per-shape configurations here, an int8 session run after an edgellm kernel on the same thread died of an
illegal instruction: a tile its configuration had, ours did not).
Linux hands out the 8 KB tile state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``, per process): the function asks once per process, so every host of the
package (TVM's runtime, edgellm's tiny runtime) gets it without setup.

A batched dense (``[B, M, K] x [B, N/16, K/2, 16, 2]``: attention's ``Q K^T`` and ``P V`` after
``tvm_bf16.attention_to_tiles``) runs the same blocks with the batch as one more parallel loop.

Tiles: accumulators 0..r*c-1, A tiles next, B tiles last (r, c <= 2: at most the 8 tile registers).
"""

from __future__ import annotations

from typing import NamedTuple

#: llvm -mcpu values whose cores have AMX-TILE + AMX-INT8 + AMX-BF16
AMX_CPUS = ("sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids")

ROW_BYTES = 64  # bytes of one tile row (palette 1)
MAX_ROWS = 16
LANES = 16  # output channels of a B tile row (16 int32 / fp32 accumulators)


class Operand(NamedTuple):
    """One AMX dot product: what the A and B tiles hold and what accumulates."""

    name: str         # "int8" | "bf16"
    a_dtype: str      # TIR dtype of the activations (bf16 is carried as uint16 bits)
    w_dtype: str
    acc_dtype: str
    elem_bytes: int
    k_group: int      # k values one accumulator lane takes per B tile row
    instr: str        # LLVM intrinsic
    prefetch_steps: int  # K steps ahead that the weight rows are prefetched into L2 (0: none)


# Weight prefetch, measured on MiniLM (2 threads, whole model: its 10.6 MB of int8 weights stream from L3 every
# inference): int8 2.81 -> 2.58 ms at 2 steps ahead (4 and 8 the same, into L1 no gain); bf16 slower with it
# (3.50 -> 3.63-3.84 ms: its weights are twice the bytes a product, the hardware prefetcher already keeps up)
INT8 = Operand("int8", "uint8", "int8", "int32", 1, 4, "tdpbusd", prefetch_steps=2)
BF16 = Operand("bf16", "uint16", "uint16", "float32", 2, 2, "tdpbf16ps", prefetch_steps=0)


def has_amx(target) -> bool:
    """True when the llvm target may use AMX tiles (int8 and bf16)."""
    from edgellm.backends.tvm_cpu.target_info import _attrs

    if target is None or target.kind.name != "llvm":
        return False
    mcpu, mattr, mtriple = _attrs(target)
    if not mtriple.startswith("x86_64") or any(a in mattr for a in ("-amx-tile", "-amx-int8", "-amx-bf16")):
        return False
    return mcpu in AMX_CPUS or {"+amx-tile", "+amx-int8", "+amx-bf16"} <= set(mattr)


def describe(op: Operand, target, vector_isa: str) -> str:
    """The manifest's words for where ``op``'s dense runs on ``target``: on tiles where they fit, else ``vector_isa``."""
    if not has_amx(target):
        return vector_isa
    return (f"AMX {op.instr} tiles where K is whole 64-byte rows and M whole 16-row tiles (zero rows added up to a "
            f"third), else {vector_isa}")


class Plan(NamedTuple):
    """How one dense's output splits into tile blocks."""

    tm: int      # rows of a tile (16)
    r: int       # accumulator tiles down a block
    c: int       # accumulator tiles across a block
    kstep: int   # k values of one A tile row (64 bytes)

    @property
    def rows(self) -> int:
        return self.tm * self.r

    @property
    def cols(self) -> int:
        return LANES * self.c


def plan(op: Operand, m: int, n: int, k: int) -> Plan | None:
    """The tile blocking of an ``[m, k] x [k, n]`` dense, or None when full tiles do not fit it: every kernel uses the
    one configuration (``TILE_CONFIG``: 8 tiles of 16 rows x 64 bytes), so M must be whole 16-row tiles and K whole
    64-byte rows. GEMVs and other shapes stay on the vector rules (MobileNet's 16-32 channel projections took
    1.10-1.16x VNNI's time on tiles with shorter rows)."""
    per_row = ROW_BYTES // op.elem_bytes
    if m % MAX_ROWS or n % LANES or k % per_row:
        return None
    r = 2 if (m // MAX_ROWS) % 2 == 0 else 1
    c = 2 if (n // LANES) % 2 == 0 else 1
    return Plan(MAX_ROWS, r, c, per_row)


def row_padding(op: Operand, target, m: int, n: int, k: int) -> int:
    """Zero rows that bring an ``[m, k] x [k, n]`` dense to whole 16-row tiles on an AMX ``target`` (a CNN's 14x14 and
    7x7 layers: 196 and 49 rows), when they add at most a third to the work and the padded dense fits the tiles; else
    0. The rewrites pad the activation rows in their producer's kernel and slice the outputs off in the epilogue."""
    pad = -m % MAX_ROWS
    if not has_amx(target) or not pad or pad * 3 > m or plan(op, m + pad, n + (-n % LANES), k) is None:
        return 0
    return pad


#: palette 1, all 8 tiles 16 rows x 64 bytes (colsb as u16 from byte 16, rows from byte 48)
TILE_CONFIG = bytes([1] + [0] * 15 + [64, 0] * 8 + [0] * 16 + [MAX_ROWS] * 8 + [0] * 8)


def function_name(op: Operand, p: Plan, k: int) -> str:
    return f"edgellm_amx_{op.name}_{p.tm}x{p.r}x{p.c}_k{k}_s{p.kstep}"


def kernel_ir(op: Operand, p: Plan, k: int) -> str:
    """LLVM IR of the block function ``i32 NAME(ptr C, ptr A, ptr W)``: ``C[rows, cols] += A[rows, K] . W``
    with C row-major (the local block), A row-major with K columns, W the block's c weight panels."""
    name = function_name(op, p, k)
    cfg = "".join(f"\\{b:02X}" for b in TILE_CONFIG)
    ldc = p.cols * 4
    lda = k * op.elem_bytes
    panel = (k // op.k_group) * ROW_BYTES
    n_acc = p.r * p.c
    a_tile = [n_acc + i for i in range(p.r)]
    b_tile = [n_acc + p.r + j for j in range(p.c)]
    acc = [[i * p.c + j for j in range(p.c)] for i in range(p.r)]
    lines = [f"@{name}.cfg = linkonce_odr constant [64 x i8] c\"{cfg}\", align 64",
             f"define linkonce_odr i32 @{name}(ptr %c, ptr %a, ptr %w) {{",
             "entry:",
             "  %cur = alloca <8 x i64>, align 64",
             "  %perm = load atomic i32, ptr @edgellm_amx_permitted monotonic, align 4",
             "  %ask = icmp eq i32 %perm, 0",
             "  br i1 %ask, label %request, label %config",
             "request:",  # ARCH_REQ_XCOMP_PERM (0x1023), XFEATURE_XTILEDATA (18)
             "  %rc = call i64 (i64, ...) @syscall(i64 158, i64 4131, i64 18)",
             "  store atomic i32 1, ptr @edgellm_amx_permitted monotonic, align 4",
             "  br label %config",
             "config:",
             "  call void @llvm.x86.sttilecfg(ptr %cur)",
             "  %have = load <8 x i64>, ptr %cur, align 64",
             f"  %want = load <8 x i64>, ptr @{name}.cfg, align 64",
             "  %ne = icmp ne <8 x i64> %have, %want",
             "  %nebits = bitcast <8 x i1> %ne to i8",
             "  %stale = icmp ne i8 %nebits, 0",
             "  br i1 %stale, label %load, label %body",
             "load:",  # another library's configuration is put back when done
             "  %word0 = extractelement <8 x i64> %have, i32 0",
             "  %palette = trunc i64 %word0 to i8",
             "  %foreign = icmp ne i8 %palette, 0",
             f"  call void @llvm.x86.ldtilecfg(ptr @{name}.cfg)",
             "  br label %body",
             "body:",
             "  %restore = phi i1 [ false, %config ], [ %foreign, %load ]"]
    for i in range(p.r):
        for j in range(p.c):
            off = i * p.tm * ldc + j * LANES * 4
            lines += [f"  %cp{i}{j} = getelementptr i8, ptr %c, i64 {off}",
                      f"  call void @llvm.x86.tileloadd64(i8 {acc[i][j]}, ptr %cp{i}{j}, i64 {ldc})"]
    lines += ["  br label %loop", "loop:",
              "  %kk = phi i64 [ 0, %body ], [ %knext, %loop ]",
              f"  %aoff = mul i64 %kk, {op.elem_bytes}",
              f"  %woff = mul i64 %kk, {ROW_BYTES // op.k_group}"]
    # each tile loaded right before its first use: A0 B0 dp00 B1 dp01 A1 dp10 dp11 (the loads overlap the products)
    for i in range(p.r):
        lines += [f"  %ao{i} = add i64 %aoff, {i * p.tm * lda}",
                  f"  %ap{i} = getelementptr i8, ptr %a, i64 %ao{i}",
                  f"  call void @llvm.x86.tileloadd64(i8 {a_tile[i]}, ptr %ap{i}, i64 {lda})"]
        for j in range(p.c):
            if i == 0:
                lines += [f"  %wo{j} = add i64 %woff, {j * panel}",
                          f"  %wp{j} = getelementptr i8, ptr %w, i64 %wo{j}",
                          f"  call void @llvm.x86.tileloadd64(i8 {b_tile[j]}, ptr %wp{j}, i64 {ROW_BYTES})"]
                for line in range(MAX_ROWS if op.prefetch_steps else 0):  # prefetcht1: the rows of a later B tile
                    ahead = op.prefetch_steps * MAX_ROWS * ROW_BYTES + line * ROW_BYTES
                    lines += [f"  %pf{j}_{line} = getelementptr i8, ptr %wp{j}, i64 {ahead}",
                              f"  call void @llvm.prefetch.p0(ptr %pf{j}_{line}, i32 0, i32 2, i32 1)"]
            lines.append(f"  call void @llvm.x86.{op.instr}(i8 {acc[i][j]}, i8 {a_tile[i]}, i8 {b_tile[j]})")
    lines += [f"  %knext = add i64 %kk, {p.kstep}",
              f"  %more = icmp ult i64 %knext, {k}",
              "  br i1 %more, label %loop, label %done",
              "done:"]
    for i in range(p.r):
        for j in range(p.c):
            lines.append(f"  call void @llvm.x86.tilestored64(i8 {acc[i][j]}, ptr %cp{i}{j}, i64 {ldc})")
    lines += ["  br i1 %restore, label %back, label %exit",
              "back:",
              "  call void @llvm.x86.ldtilecfg(ptr %cur)",
              "  br label %exit",
              "exit:",
              "  ret i32 0", "}",
              "@edgellm_amx_permitted = linkonce_odr global i32 0, align 4",
              "declare i64 @syscall(i64, ...)",
              *(["declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"] if op.prefetch_steps else []),
              "declare void @llvm.x86.sttilecfg(ptr)",
              "declare void @llvm.x86.ldtilecfg(ptr)",
              "declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)",
              "declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)",
              f"declare void @llvm.x86.{op.instr}(i8 immarg, i8 immarg, i8 immarg)", ""]
    return "\n".join(lines)


_REGISTERED: set = set()


def intrinsic(op: Operand, p: Plan, k: int) -> str:
    """Register (once) and name the tensor intrinsic of one block: ``C[rows, cols] += A[rows, k] . W[c panels]``."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = function_name(op, p, k)
    if name in _REGISTERED:
        return name
    rows, cols, kg = p.rows, p.cols, op.k_group
    ir = kernel_ir(op, p, k)
    a_shape, w_shape, c_shape = (rows, k), (p.c, k // kg, LANES, kg), (rows, cols)

    if op is INT8:
        def product(a, w):
            return T.Cast("int32", a) * T.Cast("int32", w)
    else:
        def product(a, w):
            return T.reinterpret("float32", T.shift_left(T.Cast("uint32", a), T.uint32(16))) \
                * T.reinterpret("float32", T.shift_left(T.Cast("uint32", w), T.uint32(16)))

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer(a_shape, op.a_dtype, offset_factor=1), W: T.Buffer(w_shape, op.w_dtype, offset_factor=1),
             C: T.Buffer(c_shape, op.acc_dtype, offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:k], W[0:p.c, 0:k // kg, 0:LANES, 0:kg])
            T.writes(C[0:rows, 0:cols])
            for i, j, kk in T.grid(rows, cols, k):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    C[vi, vj] = C[vi, vj] + product(A[vi, vk], W[vj // LANES, vk // kg, vj % LANES, vk % kg])

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer(a_shape, op.a_dtype, offset_factor=1), W: T.Buffer(w_shape, op.w_dtype, offset_factor=1),
             C: T.Buffer(c_shape, op.acc_dtype, offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols], A[0:rows, 0:k], W[0:p.c, 0:k // kg, 0:LANES, 0:kg])
            T.writes(C[0:rows, 0:cols])
            with T.attr(0, "pragma_import_llvm", ir):
                T.evaluate(T.call_extern("int32", name, C.access_ptr("rw"), A.access_ptr("r"), W.access_ptr("r")))

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


#: below this many multiply-adds the dense stays on one thread (waking the pool costs more than the tiles save)
PARALLEL_MIN_MACS = 1 << 21


def schedule_dense(sch, main, op: Operand):
    """Schedule the matched packed dense ``main`` on AMX tiles, with its producers and fused epilogue;
    NotApplicable when its shape does not suit tiles (the vector rules take it then)."""
    from edgellm.backends.tvm_cpu._common import (NotApplicable, accumulate_in_registers, schedule_injective,
                                                  split_around_reduction, static_extent, vectorize_by)

    block = main.block_rv
    loops = sch.get_loops(block)
    if len(loops) not in (3, 4):
        raise NotApplicable("expected loops [b,] m, n, k")
    batch, (lm, ln, lk) = loops[:-3], loops[-3:]
    M, N, K = (static_extent(sch, lp) for lp in loops[-3:])
    B = static_extent(sch, batch[0]) if batch else 1
    p = plan(op, M, N, K)
    if p is None:
        raise NotApplicable(f"{M}x{N}x{K} does not fit AMX tiles")
    intrin = intrinsic(op, p, K)

    producers, remaining = split_around_reduction(sch, block)
    mo, mi = sch.split(lm, factors=[None, p.rows])
    no, ni = sch.split(ln, factors=[None, p.cols])
    # row blocks outermost: a block's A rows (16 rows K apart a tile) stay in L1 while the weight panels stream past
    # (a B tile is 1 KB contiguous); the other order took 0.78 ms for 1024^3 on 2 threads, this one 0.55
    tiles = [*batch, mo, no]
    sch.reorder(*tiles, mi, ni, lk)
    wb, leftover = accumulate_in_registers(sch, block, tiles[-1], remaining)
    wb_loops = sch.get_loops(wb)[len(tiles):]
    if wb_loops:
        vectorize_by(sch, wb_loops[-1], LANES)
    par = sch.fuse(*tiles)
    if static_extent(sch, par) > 1 and B * M * N * K >= PARALLEL_MIN_MACS:
        sch.parallel(par)
    init = sch.decompose_reduction(block, mi)
    vectorize_by(sch, sch.get_loops(init)[-1], LANES)
    sch.tensorize(mi, intrin)
    for b in producers + leftover:
        schedule_injective(sch, b, LANES)
    return sch


def amx_rules(op: Operand, match) -> list:
    """The schedule rule that puts ``op``'s packed dense on tiles; ``match(sch)`` finds that dense's main block (its
    backend's matcher: tvm_int8's or tvm_bf16's). It declines non-AMX targets and shapes that do not fit (the vector
    rule after it takes those)."""
    from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule

    class PackedDenseAMX(SafeRule):
        """The packed int8 / bf16 dense on AMX tiles (``schedule_dense``)."""

        def schedule(self, sch, func, target):
            if not has_amx(target):
                raise NotApplicable("not an AMX target")
            return schedule_dense(sch, match(sch), op)

    PackedDenseAMX.__name__ = f"PackedDenseAMX{op.name.upper()}"
    return [PackedDenseAMX()]
