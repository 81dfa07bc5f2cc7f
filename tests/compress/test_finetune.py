"""``--finetune FILE.py:FN``: the user's training callback runs on the pruned model, and what it returns is what
gets built (the SDK itself never invents training data)."""

import numpy as np
import pytest

from edgellm import api, runtime
from edgellm.errors import EdgeError
from tests.conftest import run_cli

CALLBACK = '''
import torch

seen = []

def finetune(module):
    seen.append(sum(p.numel() for p in module.parameters()))
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # a stand-in for training that leaves a fingerprint: the output is the bias
        last.weight.zero_()
        last.bias.copy_(torch.arange(last.bias.numel(), dtype=torch.float32))
    return module

def broken(module):
    raise RuntimeError("out of training data")
'''


@pytest.fixture
def callback(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(CALLBACK)
    return path


def test_build_runs_the_callback_on_the_pruned_model_and_packages_its_result(callback, tmp_path):
    result = api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg", backend="tvm", prune=0.3,
                       finetune=f"{callback}:finetune")
    report = result.manifest["compression"]["prune"]
    assert report["finetuned"] and report["after"]["params"] < report["before"]["params"]
    model = runtime.load(result.path)
    x = np.random.default_rng(0).standard_normal((1, 1, 49, 40)).astype(np.float32)
    out = model(x)
    np.testing.assert_allclose(out.ravel(), np.arange(out.size, dtype=np.float32), atol=1e-5)


def test_prune_command_takes_the_callback(callback, tmp_path):
    proc = run_cli("prune", "zoo:kws-cnn", "--ratio", "0.3", "--finetune", f"{callback}:finetune", "-o", str(tmp_path / "p.pt2"),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"finetuned": true' in proc.stdout and (tmp_path / "p.pt2").is_file()


def test_bad_callbacks_are_one_clear_error(callback, tmp_path):
    with pytest.raises(EdgeError, match="the finetune callback raised RuntimeError: out of training data"):
        api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg", prune=0.3, finetune=f"{callback}:broken")
    with pytest.raises(EdgeError, match="has no function 'nope'"):
        api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg", prune=0.3, finetune=f"{callback}:nope")
    proc = run_cli("build", "zoo:kws-cnn", "--finetune", f"{callback}:finetune", "-o", str(tmp_path / "k.edgepkg"))
    assert proc.returncode == 2 and "--finetune goes with --prune" in proc.stderr
    assert not list(tmp_path.glob("*.edgepkg"))
