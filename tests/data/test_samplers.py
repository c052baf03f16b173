"""The training batch sampler leaves out the first batches of a pass, unloaded, on request."""
from mmengine.dataset import DefaultSampler

from instseg.data.samplers import ResumableAspectRatioBatchSampler


class Shapes:
    """Images of two aspect ratios (the sampler batches them apart); counts what is loaded."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def get_data_info(self, idx: int) -> dict:
        return dict(width=10, height=20 if idx % 3 else 5)


def batch_sampler(size: int = 11, batch_size: int = 2) -> ResumableAspectRatioBatchSampler:
    return ResumableAspectRatioBatchSampler(DefaultSampler(Shapes(size), shuffle=True, seed=7), batch_size)


def test_it_batches_as_mmdet_and_skips_the_first_batches_of_its_next_pass_only():
    from mmdet.datasets.samplers import AspectRatioBatchSampler
    ours = batch_sampler()
    full = list(ours)
    assert full == list(AspectRatioBatchSampler(DefaultSampler(Shapes(11), shuffle=True, seed=7), 2))
    assert len(full) == len(ours) == 6 and sorted(i for batch in full for i in batch) == list(range(11))
    ours.skip_next(4)
    assert list(ours) == full[4:]
    assert list(ours) == full
