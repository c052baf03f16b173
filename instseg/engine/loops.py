"""mmengine's epoch-based training loop, made resumable inside an epoch.

mmengine resumes an epoch-based run at the start of the checkpoint's epoch: a checkpoint saved in the
middle of one (a stop signal's, SafeCheckpointHook) would train that epoch's first batches twice and
run past the schedule's iterations. Here the batches the epoch trained before the checkpoint are
fetched and skipped: a sampler gives the same order for the same seed and epoch, so training goes on
with the batch after the checkpoint, as it would have without the stop.
"""
from mmengine.runner import EpochBasedTrainLoop

from instseg.registry import LOOPS


def batches_into_epoch(iteration: int, epoch: int, dataloader) -> int:
    """How many batches of the epoch after ``epoch`` completed ones the run had trained at ``iteration``:
    0 at the epoch's start, ``len(dataloader)`` at its end."""
    return iteration - epoch * len(dataloader)


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):

    # Random states to restore once the skipped batches are fetched (fetching draws the pipeline's
    # augmentations): set by RNGStateHook when it resumes a mid-epoch checkpoint.
    rng_state_after_skip = None

    def run_epoch(self) -> None:
        trained = batches_into_epoch(self._iter, self._epoch, self.dataloader)  # > 0 only when resumed mid-epoch
        if trained <= 0:
            return super().run_epoch()
        from instseg.engine.hooks import RestoreAfterReplay

        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        batches = iter(self.dataloader)
        if self.rng_state_after_skip is not None:
            batches = RestoreAfterReplay(batches, trained, self.rng_state_after_skip)
            self.rng_state_after_skip = None
        for idx, data_batch in enumerate(batches):
            if idx >= trained:
                self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1
