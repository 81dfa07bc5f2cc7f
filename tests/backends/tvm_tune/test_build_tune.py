"""`edgellm build --tune N --tuning-db DIR`: tuned builds stay correct, and a second build reuses the database."""

import pytest

from edgellm import api
from edgellm.errors import EdgeError


@pytest.mark.slow
def test_build_tunes_then_reuses_the_database(tmp_path):
    db = tmp_path / "db"
    first = api.build("zoo:kws-cnn", "host", tmp_path / "a.edgepkg", backend="tvm", tune=8, tuning_db=db)
    tuning = first.manifest["backend"]["tuning"]
    assert tuning["trials"] > 0 and first.manifest["verification"]["status"] == "passed"
    assert first.manifest["verification"]["rel_max_abs"] <= 1e-4
    second = api.build("zoo:kws-cnn", "host", tmp_path / "b.edgepkg", backend="tvm", tune=8, tuning_db=db)
    again = second.manifest["backend"]["tuning"]
    # every task tuned the first time is taken from the database (a small budget may leave others to tune now)
    assert again["reused"] >= tuning["tuned"] > 0, (tuning, again)
    assert again["tasks"] == tuning["tasks"]
    assert second.manifest["verification"]["rel_max_abs"] <= 1e-4


def test_tuning_is_refused_for_other_backends(tmp_path):
    with pytest.raises(EdgeError, match="--tune / --tuning-db apply to the TVM backend"):
        api.build("zoo:kws-cnn", "host", tmp_path / "a.edgepkg", backend="openvino", tune=8)
