"""TVM's bf16 (edgellm/backends/tvm_bf16.py): the fp32 -> bf16 rounding, the packed dense on ``vdpbf16ps``
(run natively on a CPU with AVX512-BF16, else on Bochs's emulated Sapphire Rapids), the Relax rewrite's
numerics on a small transformer block, and a real package for x86_64-amx.

Tolerances: the dense multiplies bf16 values exactly and accumulates in fp32, so it is held to 1e-6 of the
output scale against a float64 product of the same bf16 inputs (measured 6e-8..1.1e-7). The rewritten model
rounds weights and activations to bf16 (8-bit mantissa): cosine >= 0.999 against fp32, the bf16 contract's
floor (measured 0.99999 on this block, 0.99998 on MiniLM).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
ml_dtypes = pytest.importorskip("ml_dtypes")

from edgellm import api, targets
from edgellm.backends import tvm_bf16 as bf16
from edgellm.runtime.device import cpu_flags
from tests import x86_emulator

SPR = tvm.target.Target(targets.resolve("x86_64-amx").tvm)
#: Sapphire Rapids without its tiles: Bochs has no AMX (tests/backends/test_tvm_amx.py runs the tile kernels natively)
SPR_NO_AMX = tvm.target.Target({**SPR.export(), "mattr": [*SPR.attrs["mattr"], "-amx-tile", "-amx-int8", "-amx-bf16"]})


def test_rounding_is_round_to_nearest_even_like_ml_dtypes():
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(4096) * 10.0 ** rng.integers(-8, 8, 4096)).astype(np.float32),
                        # exact ties (the 16 dropped bits are 0x8000): even stays, odd rounds up; and a carry into the exponent
                        np.array([0x3F808000, 0x3F818000, 0x3FFF8000, 0xBF808000], np.uint32).view(np.float32)])
    np.testing.assert_array_equal(bf16.to_bf16_bits(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    from tvm import te

    a = te.placeholder(x.shape, "float32", name="x")
    lib = tvm.compile(te.create_prim_func([a, bf16.to_bf16_te(a)]), tvm.target.Target(targets.host().tvm))
    out = tvm.runtime.tensor(np.zeros(x.shape, np.uint16))
    lib(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), bf16.to_bf16_bits(x))


@pytest.mark.parametrize("m,k,n", [(49, 96, 160), (8, 64, 16), (1, 256, 64)])
def test_packed_dense_runs_vdpbf16ps_and_matches_float64(m, k, n):
    sch = bf16.bf16_rules()[-1].apply(bf16.dense_bf16_primfunc(m, k, n), SPR, False)
    assert sch is not None, "the bf16 rule did not schedule the packed dense"
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), SPR)
    assert re.search(r"vdpbf16ps\s+.*zmm", lib.mod.inspect_source("asm")), "no zmm vdpbf16ps in the generated code"
    rng = np.random.default_rng(1)
    a = bf16.to_bf16_bits(rng.standard_normal((m, k)).astype(np.float32))
    w = bf16.to_bf16_bits(rng.standard_normal((n, k)).astype(np.float32))
    packed = bf16.pack_weight(w)
    if {"avx512f", "avx512_bf16"} <= cpu_flags():
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), out)
        out = out.numpy()
    else:
        out = x86_emulator.run_primfunc(lib, [a, packed, np.zeros((m, n), np.float32)], "sapphire_rapids")[2]
    ref = bf16.bf16_bits_to_f32(a).astype(np.float64) @ bf16.bf16_bits_to_f32(w).astype(np.float64).T
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()


def _block():
    """A transformer block's shapes in small: two projections, attention (activation x activation), GELU MLP."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            x = self.norm(x + self.out(torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v))
            return x + self.mlp(x)

    from edgellm.source import Source
    from edgellm.trace import trace

    torch.manual_seed(0)
    return trace(Source("block", "torch", "block", Block().eval(), {"x": torch.randn(1, 32, 64)}))


def _cnn():
    """A 7x7 stride-2 RGB stem (Cin 3: padded to 4), 3x3 convs (stride 1 and 2), a depthwise conv, a strided 1x1, a linear."""
    import torch
    from torch import nn

    from edgellm.source import Source
    from edgellm.trace import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1),
                          nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.Conv2d(32, 64, 1, 2), nn.Flatten(), nn.Linear(64 * 4 * 4, 10)).eval()
    return trace(Source("cnn", "torch", "cnn", model, {"x": torch.randn(1, 3, 32, 32)}))


MODELS = {  # (traced model, layers in bf16, layers left fp32)
    "block": (_block, 4, {"matmul: activation x activation (attention)": 2}),
    "cnn": (_cnn, 5, {"conv2d: depthwise": 1}),
}


def _fp32_and_bf16_on_host(traced, mod):
    """(fp32 output, ``mod``'s output): the traced model and its rewritten module, compiled for this machine with
    edgellm's pipeline, run on the example input."""
    from tvm import relax

    from edgellm.backends import tvm_pipelines
    from edgellm.backends.tvm_base import to_relax

    host = tvm.target.Target(targets.host().tvm)
    x = traced.example_inputs["x"]

    def run(m):
        with tvm.transform.PassContext(opt_level=3):
            ex = tvm.compile(m, host, relax_pipeline=tvm_pipelines.get("edgellm", host))
        out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
        return (out[0] if not hasattr(out, "numpy") else out).numpy().ravel()

    return run(to_relax(traced)), run(mod)


@pytest.mark.parametrize("name", MODELS)
def test_rewrite_keeps_the_model_within_the_bf16_contract(name):
    """The rewritten graph, compiled for this CPU (the bf16 dense then without vdpbf16ps: the same numbers,
    TVM's generic schedule): a transformer block's four constant-weight matmuls in bf16, attention's two fp32;
    a CNN's kxk, strided and 1x1 convs and its linear layer in bf16 (im2col), the depthwise conv fp32."""
    from edgellm.backends.tvm_base import to_relax

    make, n_bf16, left = MODELS[name]
    traced = make()
    mod, info = bf16.rewrite(to_relax(traced), SPR_NO_AMX)
    assert info["layers_bf16"] == n_bf16 and info["layers_fp32"] == left
    ref, got = _fp32_and_bf16_on_host(traced, mod)
    cosine = float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine >= 0.999 and not np.array_equal(ref, got)  # bf16 really rounded something


def test_on_amx_targets_only_layers_that_fit_tiles_go_bf16():
    """On an AMX core ``vdpbf16ps`` is slower than fp32 FMAs, so layers the tiles do not take stay fp32: the block's
    four projections (32 rows, K 64 / 256) all fit; of the CNN's, the strided 3x3 (64 rows, K 288) and the 1x1
    (16 rows, K 32) do, the 7x7 stem (K 196), the 3x3 (K 144) and the linear layer (1 row) do not."""
    from edgellm.backends.tvm_base import to_relax

    _, info = bf16.rewrite(to_relax(_block()), SPR)
    assert info["layers_bf16"] == 4 and "AMX tdpbf16ps" in info["compute"]
    _, info = bf16.rewrite(to_relax(_cnn()), SPR)
    assert info["layers_bf16"] == 2
    assert sum(v for k, v in info["layers_fp32"].items() if k.endswith(bf16.NOT_TILES)) == 3, info["layers_fp32"]


def test_on_amx_targets_rows_are_padded_to_whole_tiles():
    """A 3x3 conv on a 7x7 map has 49 output rows: on an AMX target the patches get 15 zero rows (a third more work
    at most; ResNet-18's 14x14 and 7x7 convs) and the padded outputs are sliced off; a 1-row linear layer would take
    15 and stays fp32. Compiled for this machine (on an AMX CPU the tiles run), the output keeps the bf16 contract."""
    import torch
    from torch import nn

    from edgellm.backends.tvm_base import to_relax
    from edgellm.source import Source
    from edgellm.trace import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 10)).eval()
    traced = trace(Source("cnn7", "torch", "cnn7", model, {"x": torch.randn(1, 32, 7, 7)}))
    mod, info = bf16.rewrite(to_relax(traced), SPR)
    assert info["layers_bf16"] == 1 and sum(info["layers_fp32"].values()) == 1, info
    ref, got = _fp32_and_bf16_on_host(traced, mod)
    assert got.shape == (10,)
    assert float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)) >= 0.999
    assert np.abs(got - ref).max() <= 5e-2 * np.abs(ref).max()


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("model,target,instr,flags", [
    ("kws-cnn", "x86_64-avx512-bf16", "vdpbf16ps", {"avx512_bf16"}),
    pytest.param("minilm", "x86_64-amx", "tdpbf16ps", {"avx512_bf16", "amx_bf16"}, marks=pytest.mark.slow)])
def test_tvm_bf16_package(tmp_path, model, target, instr, flags):
    result = api.build(f"zoo:{model}", target, tmp_path / "k.edgepkg", precision="bf16", backend="tvm")
    m = result.manifest
    assert m["backend"]["name"] == "tvm" and m["backend"]["precision"]["layers_bf16"] >= 1
    assert m["precision"]["name"] == "bf16" and m["precision"]["contract"]["min_cosine"] == 0.995
    with zipfile.ZipFile(result.path) as z:
        (tmp_path / "model.so").write_bytes(z.read("model.so"))
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "model.so")], capture_output=True,
                         text=True, check=True).stdout
    assert re.search(rf"\b{instr}\b", asm)
    if not flags <= cpu_flags():
        assert m["verification"]["status"] == "skipped"
    else:
        assert m["verification"]["status"] == "passed"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_whole_bf16_module_runs_on_emulated_sapphire_rapids(name):
    """Every kernel of the model's bf16 module compiled for x86_64-amx without its tiles, run on Bochs's Sapphire Rapids with the
    inputs it gets when the same graph runs here; outputs within 1e-5 of this CPU's kernels (measured <= 7e-7 on
    MiniLM, 24 of its 28 kernels; the others take this CPU's weight layouts)."""
    from edgellm.backends.tvm_base import to_relax

    traced = MODELS[name][0]()
    mod, _ = bf16.rewrite(to_relax(traced), SPR_NO_AMX)
    host = tvm.target.Target(targets.host().tvm)
    x = tvm.runtime.tensor(traced.example_inputs["x"])
    report = x86_emulator.check_module(x86_emulator.build_module(mod, host, False), x86_emulator.build_module(mod, SPR_NO_AMX, True),
                                       "sapphire_rapids", lambda vm: vm["main"](x))
    checked = {k: v for k, v in report.items() if not isinstance(v, str)}
    dense = [k for k in report if "dense_bf16" in k or "im2col" in k]
    # a GEMV (the CNN's linear layer) is skipped: its vdpbf16ps take 8-bit displacements, which Bochs scales wrong
    assert all(k in checked or "8-bit displacement" in report[k] for k in dense), report
    assert len([k for k in dense if k in checked]) >= MODELS[name][1], report
    assert max(checked.values()) <= 1e-5, report


def test_bochs_scales_the_8_bit_displacement_of_vdpbf16ps_wrong():
    """Why the emulated checks skip kernels whose vdpbf16ps has an 8-bit displacement: EVEX scales it by 64 for a
    zmm operand, this Bochs by 4. A one-row dense (its k steps at 0(%r), 64(%r), 128(%r), ...) with only k = 0, 1
    non-zero: on Bochs lane i sums 16 - i products (step j reads pair i + j), where a CPU gives 1. When this test
    fails, Bochs has been fixed: drop ``x86_emulator.bochs_defects``."""
    from tvm import te

    a = te.placeholder((1, 64), "uint16", name="A")
    w = te.placeholder((1, 32, 16, 2), "uint16", name="W")
    sch = bf16.bf16_rules()[-1].apply(te.create_prim_func([a, w, bf16.dense_bf16_te(a, w)]), SPR, False)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), SPR)
    one = bf16.to_bf16_bits(np.ones(1, np.float32))[0]
    weights = np.zeros((16, 64), np.uint16)
    weights[:, 0] = one
    with pytest.raises(x86_emulator.EmulationError, match="8-bit displacement"):
        x86_emulator.run_primfunc(lib, [np.full((1, 64), one, np.uint16), bf16.pack_weight(weights), np.zeros((1, 16), np.float32)],
                                  "sapphire_rapids")
    out = x86_emulator.run_primfunc(lib, [np.full((1, 64), one, np.uint16), bf16.pack_weight(weights), np.zeros((1, 16), np.float32)],
                                    "sapphire_rapids", allow_defects=True)
    np.testing.assert_array_equal(out[2].ravel(), 16 - np.arange(16))
