import numpy as np
import pytest
import torch

from pipeline import simulation, storage
from pipeline.batches import EpochBatches
from pipeline.data import SimulationDataModule
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sims.h5"
    plan = simulation.SimulationPlan("nan_two_moons", 3000, 1, 1000)
    simulation.run(plan, get_task("nan_two_moons"), out, SerialComm(), overwrite=False)
    return out


def test_ranks_get_equal_disjoint_shares_that_change_with_the_epoch():
    items = np.arange(103)
    ranks = [EpochBatches(items, 10, seed=5, rank=r, world_size=3) for r in range(3)]
    seen = [np.concatenate(list(r)) for r in ranks]
    assert [len(s) for s in seen] == [34, 34, 34]  # 103 // 3 each: DDP needs equal steps
    assert len(np.unique(np.concatenate(seen))) == 102
    assert all(len(list(r)) == len(r) == 4 for r in ranks)
    again = np.concatenate(list(EpochBatches(items, 10, seed=5, rank=0, world_size=3)))
    np.testing.assert_array_equal(seen[0], again)  # (seed, epoch) alone fix the order
    ranks[0].set_epoch(1)
    assert not np.array_equal(np.concatenate(list(ranks[0])), seen[0])
    ordered = EpochBatches(items, 50, seed=None)
    np.testing.assert_array_equal(np.concatenate(list(ordered)), items)


def test_streaming_reads_blocks_and_matches_the_loaded_statistics(data, monkeypatch):
    memory = SimulationDataModule(data, 0.1, 100, seed=0, loading="memory")
    memory.setup()

    def no_full_read(*args, **kwargs):
        raise AssertionError("streaming must not load the whole file")

    monkeypatch.setattr(storage, "read_simulations", no_full_read)
    stream = SimulationDataModule(data, 0.1, 100, seed=0, loading="stream")
    stream.setup()
    assert stream.num_nonfinite == memory.num_nonfinite > 0
    assert stream.num_train + stream.num_val == memory.num_train + memory.num_val
    # Different splits (whole blocks against rows) of the same 3000 draws: the moments agree
    # to within a few standard errors (0.1 sd / sqrt(2700) ~ 0.002 sd for the means).
    for key, value in memory.statistics().items():
        torch.testing.assert_close(stream.statistics()[key], value, atol=0.05, rtol=0.05)
    batches = list(stream.train_dataloader())
    assert len(batches) == 27  # 30 blocks, 3 held out
    assert all(len(theta) == len(x) <= 100 for theta, x in batches)
    assert all(torch.isfinite(theta).all() and torch.isfinite(x).all() for theta, x in batches)
    val = list(stream.val_dataloader())
    assert sum(len(theta) for theta, _ in val) == stream.num_val


def test_in_memory_batches_are_tensor_slices_of_the_training_split(data):
    module = SimulationDataModule(data, 0.1, 128, seed=0, loading="memory")
    module.setup()
    batches = list(module.train_dataloader())
    assert [len(theta) for theta, _ in batches[:-1]] == [128] * (len(batches) - 1)
    theta = torch.cat([b[0] for b in batches])
    assert len(theta) == module.num_train
    assert len(torch.unique(theta, dim=0)) == module.num_train  # each row once per epoch


def test_unknown_loading_is_refused(data):
    with pytest.raises(ValueError, match="loading must be one of auto, memory, stream"):
        SimulationDataModule(data, 0.1, 100, seed=0, loading="disk")


def test_streaming_refuses_a_file_too_small_for_both_splits(data):
    # 3000 rows in blocks of 2000: 2 blocks, and 10% of 2 rounds to no validation block.
    module = SimulationDataModule(data, 0.1, 2000, seed=0, loading="stream")
    with pytest.raises(ValueError, match="2 block.s. of batch_size 2000 cannot be split"):
        module.setup()
