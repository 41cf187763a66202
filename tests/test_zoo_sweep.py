"""The CI subset of the model-zoo sweep (benchmarks/zoo_sweep.py): every stage passes, parity included."""
import pytest

from benchmarks.zoo_sweep import QUICK, ZOO, sweep_one


@pytest.mark.parametrize("name", QUICK)
def test_quick_zoo_subset_passes_every_stage(name):
    row = sweep_one(name, ZOO[name])
    assert row["status"] == "pass", f"{name}: {row['stage']}: {row['error']}\n{row.get('traceback')}"


def test_the_sweep_covers_fifty_architectures():
    assert len(ZOO) >= 50
