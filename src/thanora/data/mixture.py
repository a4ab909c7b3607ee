"""The multi-task mixture sampler: which training features form each batch of an epoch, deterministic per epoch.

``proportional`` visits every example once per epoch; ``uniform`` and ``temperature`` draw each sample's task with
p_t (uniform, or ∝ n_t^(1/T)) and cycle through that task's shuffled examples, for the same number of samples per
epoch. With ``stratified`` every batch holds ⌊B/T⌋ or ⌈B/T⌉ samples of every task.

Length grouping (``DataConfig.group_by_length``, HF Trainer's ``group_by_length`` with the mixture's guarantees kept):
the epoch's samples, drawn exactly as without it, are cut into windows of ``length_window`` samples (rounded up to
whole batches), each window is sorted by length and cut into batches, and the batches are shuffled. So every epoch
holds the same samples as without grouping (each once under ``proportional``; the same draws under ``uniform`` and
``temperature``), batches hold samples of similar length (less padding), and the order depends on the seed and epoch
only (resumable). Stratified batches keep their per-task shares: within a window, each task's samples are sorted by
length and dealt back into the same slots. The price: a batch tends to hold one task when the tasks' lengths differ
(a 4-task mixture with BoolQ's passages), which is why it is an option, off by default.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from thanora.data.tasks import DataConfig


class MixtureSampler:
    """Batches of indices into the concatenation of the tasks' training features, deterministic per epoch (see the
    module docstring).

    Args:
        task_sizes: number of training features per task, in task order.
        batch_size: samples per batch.
        data: sampling settings (``sampling``, ``stratified``, ``group_by_length``, ``length_window``).
        seed: base seed (the epoch is mixed in).
        lengths: token count of every feature (global index order); required by ``group_by_length``.
    """

    def __init__(self, task_sizes: Sequence[int], batch_size: int, data: DataConfig, seed: int,
                 lengths: Sequence[int] | None = None) -> None:
        if any(n < 1 for n in task_sizes):
            raise ValueError(f"every task needs at least one training example, got sizes {list(task_sizes)}")
        if data.stratified and batch_size < len(task_sizes):
            raise ValueError(f"stratified batches need batch_size >= number of tasks ({len(task_sizes)})")
        if data.group_by_length and (lengths is None or len(lengths) != sum(task_sizes)):
            raise ValueError("data.group_by_length needs the length of every training feature")
        self.sizes = list(task_sizes)
        self.offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        self.batch_size = batch_size
        self.data = data
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None

    def __len__(self) -> int:
        return math.ceil(sum(self.sizes) / self.batch_size)

    def probabilities(self) -> list[float]:
        """Per-task sampling probability p_t."""
        if self.data.sampling == "uniform":
            weights = [1.0] * len(self.sizes)
        elif self.data.sampling == "temperature":
            weights = [n ** (1.0 / self.data.sampling_temperature) for n in self.sizes]
        else:
            weights = [float(n) for n in self.sizes]
        total = sum(weights)
        return [w / total for w in weights]

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (global feature indices)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        streams = [self._stream(t, rng) for t in range(len(self.sizes))]
        total = sum(self.sizes)
        if self.data.stratified:
            batches = self._stratified(streams, rng)
            return self._grouped_stratified(batches, rng) if self.data.group_by_length else batches
        if self.data.sampling == "proportional":
            order = list(range(total))
            rng.shuffle(order)
        else:
            tasks = rng.choices(range(len(self.sizes)), weights=self.probabilities(), k=total)
            order = [next(streams[t]) for t in tasks]
        if self.data.group_by_length:
            return self._grouped(order, rng)
        return [order[i:i + self.batch_size] for i in range(0, total, self.batch_size)]

    def _window(self) -> int:
        """Samples per sorting window: ``length_window`` rounded up to whole batches."""
        return math.ceil(self.data.length_window / self.batch_size) * self.batch_size

    def _length(self, index: int) -> int:
        assert self.lengths is not None
        return self.lengths[index]

    def _grouped(self, order: list[int], rng: random.Random) -> list[list[int]]:
        window = self._window()
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=self._length)  # stable: ties keep the drawn order
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def _grouped_stratified(self, batches: list[list[int]], rng: random.Random) -> list[list[int]]:
        per_window = max(1, self._window() // self.batch_size)
        task_of = [t for t, n in enumerate(self.sizes) for _ in range(n)]
        out = []
        for start in range(0, len(batches), per_window):
            group = [list(b) for b in batches[start:start + per_window]]
            for task in range(len(self.sizes)):
                slots = [(b, j) for b, batch in enumerate(group) for j, i in enumerate(batch) if task_of[i] == task]
                ranked = sorted((group[b][j] for b, j in slots), key=self._length)
                for (b, j), index in zip(slots, ranked, strict=True):  # shortest into the first batches' slots
                    group[b][j] = index
            out += group
        rng.shuffle(out)
        return out

    def _stratified(self, streams: list[Iterator[int]], rng: random.Random) -> list[list[int]]:
        n_tasks = len(self.sizes)
        batches = []
        for _ in range(len(self)):
            share = [self.batch_size // n_tasks + (1 if t < self.batch_size % n_tasks else 0) for t in range(n_tasks)]
            rng.shuffle(share)
            batch = [next(streams[t]) for t in range(n_tasks) for _ in range(max(1, share[t]))]
            batches.append(batch)
        return batches

    def _stream(self, task: int, rng: random.Random) -> Iterator[int]:
        local = list(range(self.sizes[task]))
        while True:
            rng.shuffle(local)
            for i in local:
                yield self.offsets[task] + i
