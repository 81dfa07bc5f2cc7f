import numpy as np
import pytest
import torch

from edgellm import source
from edgellm.compress.prune import export, prune, prune_source
from edgellm.errors import EdgeError

pytest.importorskip("torch_pruning")


def _run(module, inputs):
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in inputs.values()))


def _shapes(module):
    return {n: tuple(p.shape) for n, p in module.state_dict().items()}


@pytest.fixture(scope="module")
def kws():
    return source.load("zoo:kws-cnn")


@pytest.mark.parametrize("importance", ["l2", "l1", "taylor"])
def test_structured_kws_shrinks_runs_and_exports(kws, importance, tmp_path):
    before = _shapes(kws.model)
    pruned, report = prune(kws.model, kws.inputs, 0.3, "structured", importance)
    assert _shapes(kws.model) == before, "the caller's module is left alone"
    assert report["mode"] == "structured" and report["ratio"] == 0.3
    assert report["after"]["params"] < 0.7 * report["before"]["params"]
    assert report["after"]["macs"] < 0.7 * report["before"]["macs"]
    assert report["after"]["state_dict_bytes"] < report["before"]["state_dict_bytes"]
    after = _shapes(pruned)
    # every conv really lost channels (64 -> 44); the classifier keeps its 12 classes
    assert after["features.0.0.weight"][0] < 64 and after["features.2.0.weight"][:2] == (after["features.0.0.weight"][0],) * 2
    assert after["classifier.weight"] == (12, after["features.0.0.weight"][0])
    assert _run(pruned, kws.inputs).shape == (1, 12)
    export(pruned, kws.inputs, tmp_path / "pruned.pt2")
    program = torch.export.load(str(tmp_path / "pruned.pt2"))
    assert program.module()(*(torch.from_numpy(a) for a in kws.inputs.values())).shape == (1, 12)


@pytest.mark.parametrize("round_to, kept", [(16, 48), (8, 48), (None, 44)])
def test_round_to_keeps_the_nearest_multiple(kws, round_to, kept):
    """64 channels at ratio 0.3 keep 44.8: the nearest multiple of 16 or 8 is 48 (torch-pruning's own
    rounding floors to 32 at 16, over-pruning); without round_to the count is torch-pruning's own."""
    pruned, report = prune(kws.model, kws.inputs, 0.3, "structured", round_to=round_to)
    convs = [p.shape[0] for n, p in pruned.state_dict().items() if n.startswith("features") and p.ndim == 4]
    assert convs and set(convs) == {kept}
    assert report["round_to"] == round_to


def test_prune_source_then_build_path(kws):
    src = source.load("zoo:kws-cnn")
    report = prune_source(src, 0.3)
    assert report["after"]["params"] < report["before"]["params"]
    from edgellm.trace import trace

    traced = trace(src)  # the pruned module traces with torch.export like any source
    assert traced.outputs[0].shape == (1, 12)


def test_finetune_callback_runs(kws):
    seen = []
    pruned, report = prune(kws.model, kws.inputs, 0.3, finetune=lambda m: seen.append(m) or m)
    assert seen == [pruned] and report["finetuned"]


def test_unstructured_report(kws):
    pruned, report = prune(kws.model, kws.inputs, 0.5, "unstructured")
    assert report["scope"] == "global" and abs(report["sparsity"] - 0.5) < 0.01
    assert report["after"]["params"] == report["before"]["params"]  # shapes kept
    assert report["after"]["nonzero_params"] < 0.6 * report["before"]["params"]
    assert report["after"]["deflated_bytes"] < report["before"]["deflated_bytes"]  # zeros deflate
    layers = report["layers"]
    assert set(layers) >= {"features.0.0", "classifier"} and all(0 <= v["sparsity"] <= 1 for v in layers.values())
    assert not any(n.endswith(("_orig", "_mask")) for n in pruned.state_dict()), "pruning made permanent"
    weights = pruned.features[2][0].weight
    assert float((weights == 0).float().mean()) == pytest.approx(layers["features.2.0"]["sparsity"])
    _, per_layer = prune(kws.model, kws.inputs, 0.5, "unstructured", scope="layer")
    assert all(abs(v["sparsity"] - 0.5) < 0.01 for v in per_layer["layers"].values())


@pytest.mark.parametrize("kwargs, words", [
    ({"ratio": 1.2}, "not between 0 and 1"),
    ({"ratio": 0.3, "mode": "channels"}, "unknown pruning mode"),
    ({"ratio": 0.3, "importance": "random"}, "unknown pruning importance"),
    ({"ratio": 0.3, "mode": "unstructured", "importance": "taylor"}, "magnitude only"),
])
def test_bad_arguments(kws, kwargs, words):
    with pytest.raises(EdgeError, match=words):
        prune(kws.model, kws.inputs, **kwargs)


def test_onnx_sources_are_refused(tmp_path):
    class Fake:
        kind, ref = "onnx", "m.onnx"

    with pytest.raises(EdgeError, match="ONNX"):
        prune_source(Fake(), 0.3)


@pytest.mark.slow
def test_structured_mobilenet_v2():
    src = source.load("zoo:mobilenet-v2")
    pruned, report = prune(src.model, src.inputs, 0.3)
    assert report["after"]["params"] < 0.7 * report["before"]["params"]
    assert report["after"]["macs"] < 0.7 * report["before"]["macs"]
    assert _shapes(pruned)["classifier.1.weight"][0] == 1000
    assert _run(pruned, src.inputs).shape == (1, 1000)
    torch.export.export(pruned, tuple(torch.from_numpy(a) for a in src.inputs.values()))


@pytest.mark.slow
def test_structured_minilm_heads_and_ffn():
    """Whole heads (12 -> 8 per layer) and FFN units (1536 -> 1075) go; the 384 embedding width stays."""
    src = source.load("zoo:minilm")
    pruned, report = prune(src.model, src.inputs, 0.3)
    assert report["attention_heads"] == {"before": 72, "after": 48, "per_layer": [8] * 6}
    shapes = _shapes(pruned)
    assert shapes["embeddings.word_embeddings.weight"] == (30522, 384)
    for i in range(6):
        p = f"encoder.layer.{i}."
        assert shapes[p + "attention.self.query.weight"] == shapes[p + "attention.self.key.weight"] == (8 * 32, 384)
        assert shapes[p + "attention.output.dense.weight"] == (384, 8 * 32)
        assert shapes[p + "intermediate.dense.weight"][0] < 1536 * 0.75
        assert shapes[p + "output.dense.weight"] == (384, shapes[p + "intermediate.dense.weight"][0])
    assert report["macs_ratio"] < 0.75
    out = _run(pruned, src.inputs)
    assert out.shape == (1, 384) and np.isclose(float(out.norm()), 1.0, atol=1e-5)
    torch.export.export(pruned, tuple(torch.from_numpy(a) for a in src.inputs.values()))
