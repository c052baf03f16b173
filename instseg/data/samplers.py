"""The training batch sampler: mmdet's AspectRatioBatchSampler, able to leave out batches unloaded.

A resumed run must go on with the batch after its checkpoint's. mmengine gets there by fetching every
batch trained before it, images decoded and augmented, and dropping them: minutes on a long schedule
(hours into a COCO 1x). The batches are fixed by the sampler's indices alone, so this sampler yields the
same batches and, told to, leaves out the first of its next pass before any is loaded
(``instseg.engine.loops``).
"""
from typing import Iterator, List

from mmdet.datasets.samplers import AspectRatioBatchSampler

from instseg.registry import DATA_SAMPLERS


@DATA_SAMPLERS.register_module()
class ResumableAspectRatioBatchSampler(AspectRatioBatchSampler):
    """mmdet's AspectRatioBatchSampler; ``skip_next(n)``: its next pass leaves out its first n batches."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip_next(self, batches: int) -> None:
        self._skip = batches

    def __iter__(self) -> Iterator[List[int]]:
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch
