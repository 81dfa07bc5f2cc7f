"""int8 embedding tables: weight-only, one scale per row, dequantized as the rows are gathered.

A transformer's token-embedding table is the biggest tensor it has (MiniLM: 30522 x 384 fp32 = 47 MB
of its 90 MB) and it is read by a gather, not by a matmul, so the int8 dense path never sees it.
Stored as int8 with a per-row symmetric scale it is 4x smaller, and the gather reads 4x fewer bytes:

    take(table, ids)  ->  astype(take(table_i8, ids), f32) * take(row_scale, ids)

Only constant tables with at least ``MIN_ROWS`` rows are rewritten (position / token-type tables are
tiny and stay fp32). The error is at most half a quantization step of the row's own scale.
"""

from __future__ import annotations

import numpy as np

MIN_ROWS = 1024


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 table, float32 [rows, 1] scales): symmetric per row, absmax -> 127."""
    absmax = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_embeddings(mod, min_rows: int = MIN_ROWS):
    """(module with large constant gather tables stored int8, list of {"shape", "bytes_fp32", "bytes_int8"})."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    from edgellm.backends.tvm_cpu.relax_passes import _const_np

    table, ids = is_const(), wildcard()
    pattern = is_op("relax.take")(table, ids)
    done: list[dict] = []

    def rewriter(expr, matches):
        data = _const_np(matches[table])
        axis = expr.attrs["axis"]
        # (width 1: the row scales this rewrite itself emits; rewrite_call runs to a fixed point)
        if data.dtype != np.float32 or data.ndim != 2 or data.shape[0] < min_rows or data.shape[1] < 2 \
                or axis is None or int(axis) != 0:
            return expr
        q, scale = quantize_rows(data)
        mode = str(expr.attrs["mode"])
        rows = relax.op.take(relax.const(q), matches[ids], axis=0, mode=mode)
        scales = relax.op.take(relax.const(scale), matches[ids], axis=0, mode=mode)
        done.append({"shape": list(data.shape), "bytes_fp32": int(data.nbytes), "bytes_int8": int(q.nbytes + scale.nbytes)})
        return relax.op.multiply(relax.op.astype(rows, "float32"), scales)

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewriter, func)
    return mod, done
