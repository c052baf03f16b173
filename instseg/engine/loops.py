"""mmengine's training loops, resumed without reloading the data trained before the checkpoint.

A resumed run goes on with the batch after its checkpoint's. mmengine gets there by fetching every
batch trained before it (images decoded and augmented) and dropping it, and resumes an epoch-based run
at the start of the checkpoint's epoch: a checkpoint saved in the middle of one (a stop signal's,
SafeCheckpointHook) would train that epoch's first batches twice and run past the schedule's iterations.
Here a sampler gives the same batches for the same seed and epoch, so the batch sampler
(``ResumableAspectRatioBatchSampler``) leaves out the ones trained before the checkpoint unloaded: the
epoch-based loop goes on inside the checkpoint's epoch, the iteration-based one at its place in the data.
With another batch sampler (one a user's own config builds) those batches are fetched and dropped.
"""
import time

from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from instseg.registry import LOOPS


def batches_into_epoch(iteration: int, epoch: int, dataloader) -> int:
    """How many batches of the epoch after ``epoch`` completed ones the run had trained at ``iteration``:
    0 at the epoch's start, ``len(dataloader)`` at its end."""
    return iteration - epoch * len(dataloader)


def can_skip(dataloader) -> bool:
    return hasattr(getattr(dataloader, 'batch_sampler', None), 'skip_next')


def set_epoch(dataloader, epoch: int) -> None:
    """The epoch of the sampler (its shuffle's seed), where mmengine's iteration-based loop sets it."""
    for sampler in (getattr(dataloader, 'sampler', None), getattr(dataloader.batch_sampler, 'sampler', None)):
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
            return


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
        skipping = can_skip(self.dataloader)
        if skipping:
            self.dataloader.batch_sampler.skip_next(trained)
        replayed = 0 if skipping else trained  # batches fetched only to be dropped
        batches = iter(self.dataloader)
        if self.rng_state_after_skip is not None:
            batches = RestoreAfterReplay(batches, replayed, self.rng_state_after_skip)
            self.rng_state_after_skip = None
        for idx, data_batch in enumerate(batches, start=trained - replayed):
            if idx >= trained:
                self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1


class EndlessBatches:
    """The iteration-based loop's stream of batches: one pass over the data after another, each pass's
    sampler set to its epoch, as mmengine's ``_InfiniteDataloaderIterator``, except that

    - it waits 2 s between passes (mmengine's guard against a deadlock at the turn of an epoch) only
      where worker processes load the data: without, K-Net's CPU schedule (25 passes) waited 50 s;
    - ``skip(n)``: its next n batches come as None, without loading, and the stream goes on where it
      would have after n batches. mmengine's resume fetches (here: takes) the n batches before the
      checkpoint, so resuming costs seconds, not a reload of the data."""

    def __init__(self, dataloader, iterator=None) -> None:
        self._dataloader = dataloader
        self._iterator = iterator if iterator is not None else iter(dataloader)
        self._epoch = 0
        self._skipped, self._skip_from = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._skipped:
            if self._skip_from is not None:  # now: hooks before the first fetch may have set the epoch
                self._jump(self._skip_from)
                self._skip_from = None
            self._skipped -= 1
            return None
        try:
            return next(self._iterator)
        except StopIteration:
            if self._dataloader.num_workers > 0:
                time.sleep(2)
            self._start_pass(self._epoch + 1)
            return next(self._iterator)

    def skip(self, batches: int) -> None:
        self._skipped = self._skip_from = batches

    def _jump(self, batches: int) -> None:
        passes, into = divmod(batches, len(self._dataloader))
        if into:
            self._start_pass(passes, skip=into)
        else:  # at the end of pass passes - 1: the next one starts on the first real fetch, as it would have
            self._epoch, self._iterator = passes - 1, iter(())

    def _start_pass(self, epoch: int, skip: int = 0) -> None:
        self._epoch = epoch
        set_epoch(self._dataloader, epoch)
        if skip:
            self._dataloader.batch_sampler.skip_next(skip)
        self._iterator = iter(self._dataloader)


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """mmengine's IterBasedTrainLoop on ``EndlessBatches``: resumed, it takes the batches trained before
    the checkpoint without loading them (with a batch sampler that can skip)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # mmengine's iterator made the first pass's DataLoader iterator (drawing a seed from torch's
        # random state, before the model's init): the stream goes on with it, so runs stay as they were.
        self._batches = EndlessBatches(self.dataloader, self.dataloader_iterator._iterator)
        self.dataloader_iterator = self._batches

    def run(self):
        if self._iter > 0 and can_skip(self.dataloader):
            self._batches.skip(self._iter)  # mmengine's run() takes them after its hooks (DistSamplerSeedHook
            # sets the sampler's epoch); RNGStateHook's states apply after them
        return super().run()
