"""The iteration-based loop's batch stream: passes as mmengine's, resumed without loading the data."""
import pytest
from mmengine.dataset import DefaultSampler
from torch.utils.data import DataLoader

from instseg.data.samplers import ResumableAspectRatioBatchSampler
from instseg.engine import loops
from instseg.engine.loops import EndlessBatches

from tests.data.test_samplers import Shapes


class Loaded(Shapes):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.loaded = []

    def __getitem__(self, idx: int) -> int:
        self.loaded.append(idx)
        return idx


def stream(size: int = 7) -> EndlessBatches:
    data = Loaded(size)
    batches = ResumableAspectRatioBatchSampler(DefaultSampler(data, shuffle=True, seed=3), batch_size=2)
    return EndlessBatches(DataLoader(data, batch_sampler=batches, collate_fn=list))


def take(batches: EndlessBatches, n: int) -> list:
    return [next(batches) for _ in range(n)]


def test_each_pass_is_shuffled_anew_and_nothing_waits_without_workers(monkeypatch):
    waits = []
    monkeypatch.setattr(loops.time, 'sleep', waits.append)
    passes = take(stream(), 12)  # 4 batches a pass
    assert passes[:4] != passes[4:8] != passes[8:]
    assert all(sorted(i for batch in passes[p:p + 4] for i in batch) == list(range(7)) for p in (0, 4, 8))
    assert waits == []


@pytest.mark.parametrize('trained', [6, 8], ids=['inside-a-pass', 'at-the-end-of-a-pass'])
def test_a_resumed_stream_goes_on_where_the_uninterrupted_one_does_without_loading_the_skipped(trained):
    expected = take(stream(), trained + 5)[trained:]
    resumed = stream()
    resumed.skip(trained)
    assert take(resumed, trained) == [None] * trained  # what mmengine's resume takes and drops
    assert resumed._dataloader.dataset.loaded == []
    assert take(resumed, 5) == expected
    assert resumed._dataloader.dataset.loaded == [i for batch in expected for i in batch]
