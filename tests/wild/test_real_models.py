"""Real ONNX models shipped inside PyPI wheels (edgellm/zoo/wild.py), built as a new user would: `--backend auto`
compiles and verifies each with TVM and OpenVINO; the package must match ONNX Runtime on its stored sample and on a
second input drawn here. CI builds CI_MODELS (a few minutes); EDGELLM_REAL_MODELS=all builds every one
(benchmarks/real_models.py writes the table with timings)."""

import os

import numpy as np
import pytest

from edgellm.zoo import wild

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

# small, and between them: Paddle2ONNX shape arithmetic, an If on an input with an LSTM inside, int inputs
CI_MODELS = ["ppocr-cls", "silero-vad", "magika"]
MODELS = list(wild.WILD) if os.environ.get("EDGELLM_REAL_MODELS") == "all" else CI_MODELS


def _ort(path, inputs, frozen):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {**inputs, **{k: np.array(v, np.int64) for k, v in frozen.items()}}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _second_input(inputs: dict, seed: int) -> dict:
    """The stored sample moved a little: floats by noise of 10% of their spread, ints kept."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.1 * (v.std() or 1) * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in inputs.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from edgellm import api

    out = tmp_path_factory.mktemp("wild")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = api.build(str(wild.fetch(name)), "host", out / f"{name}.edgepkg", backend="auto",
                                    **wild.build_options(name, out))
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_auto_builds_and_matches_onnx_runtime(built, name):
    from edgellm import runtime
    from edgellm.runtime.accuracy import compare

    result = built(name)
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    for trial in manifest["backend_choice"]["trials"]:  # a backend that failed says why in one line
        assert trial["status"] == "passed" or ("\n" not in trial["error"] and "Traceback" not in trial["error"]), trial
    pkg = runtime.load(result.path)
    assert pkg.check_reference()["passed"]
    frozen = wild.WILD[name].input_values
    x = _second_input(pkg.example_inputs(), seed=11)
    ref, got = _ort(wild.fetch(name), x, frozen), pkg.run(**x)
    for out_name, want in ref.items():
        stats = compare(want, got[out_name])
        assert stats["rel_max_abs"] <= manifest["verification"]["tolerance"], (out_name, stats)
        if stats["scale"] > 0:
            assert stats["cosine"] >= 0.9999, (out_name, stats)


def test_silero_vad_streams_its_state_like_onnx_runtime(built):
    """The If on the sample rate folds once sr is frozen; 8 chunks of audio, the LSTM state carried call to call."""
    from edgellm import runtime

    result = built("silero-vad")
    assert [i["name"] for i in result.manifest["inputs"]] == ["input", "state"]
    pkg = runtime.load(result.path)
    audio = wild._audio(512 * 8, seed=3)[0]
    state = ref_state = np.zeros((2, 1, 128), np.float32)
    for i in range(8):
        chunk = audio[None, 512 * i:512 * (i + 1)]
        ref = _ort(wild.fetch("silero-vad"), {"input": chunk, "state": ref_state}, {"sr": 16000})
        got = pkg.run(input=chunk, state=state)
        ref_state, state = ref["stateN"], got["stateN"]
        np.testing.assert_allclose(got["output"], ref["output"], atol=1e-4)
        np.testing.assert_allclose(state, ref_state, atol=1e-4)
