"""int8 embedding tables: 4x smaller, gathered rows within half a quantization step of fp32."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from edgellm.backends.tvm_int8.embedding import MIN_ROWS, quantize_embeddings  # noqa: E402


def _gather_module(table: np.ndarray, ids_shape):
    bb = relax.BlockBuilder()
    ids = relax.Var("ids", relax.TensorType(ids_shape, "int64"))
    with bb.function("main", [ids]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(relax.const(table), ids, axis=0, mode="fast"))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, ids):
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(ids)).numpy()


def test_large_table_is_int8_and_rows_match_within_half_a_step():
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((MIN_ROWS * 2, 24)) * rng.uniform(0.01, 3, (MIN_ROWS * 2, 1))).astype(np.float32)
    mod, done = quantize_embeddings(_gather_module(table, (2, 7)))
    assert done == [{"shape": [MIN_ROWS * 2, 24], "bytes_fp32": table.nbytes, "bytes_int8": table.size + MIN_ROWS * 2 * 4}]
    ids = rng.integers(0, table.shape[0], (2, 7))
    got = _run(mod, ids)
    step = np.abs(table[ids]).max(-1, keepdims=True) / 127  # each row's own scale
    err = np.abs(got - table[ids]) / step
    assert err.max() <= 0.5 + 1e-3 and err.max() > 0  # rounded to int8 (not exact), within half a step


def test_small_tables_stay_fp32():
    table = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    mod, done = quantize_embeddings(_gather_module(table, (3,)))
    assert done == []
    ids = np.array([0, 5, 63])
    np.testing.assert_array_equal(_run(mod, ids), table[ids])
