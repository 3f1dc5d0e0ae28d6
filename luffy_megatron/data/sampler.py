"""The order in which a run draws its training prompts, resumable from a saved position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptSampler:
    """Upstream's prompt order (`ResumableRandomSampler` in rl_dataset_with_target.py, DataLoader with
    drop_last=True): a torch.Generator seeded with data.seed (upstream: 47) draws `torch.randperm(size)` for the
    first epoch and the next permutation from the same generator for each later epoch; batches are consecutive
    slices, the last partial one dropped. `position` counts prompts consumed (saved in checkpoints), so a
    resumed run continues the same order. data.shuffle=false: the dataset order (upstream's SequentialSampler)."""

    size: int
    batch_size: int
    seed: int = 47
    shuffle: bool = True
    position: int = 0

    def __post_init__(self):
        self._perms: list[list[int]] = []
        self._generator = None

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        if self._generator is None:
            self._generator = torch.Generator()
            self._generator.manual_seed(self.seed)
        while len(self._perms) <= epoch:
            self._perms.append(torch.randperm(self.size, generator=self._generator).tolist())
        return self._perms[epoch]

    def next_batch(self) -> list[int]:
        per_epoch = self.size - self.size % self.batch_size  # drop the last partial batch, as upstream
        epoch, offset = divmod(self.position, per_epoch)
        self.position += self.batch_size
        return self._order(epoch)[offset : offset + self.batch_size]
