"""Progress of a scoring run: a bar in a terminal, plain log lines in job logs.

Images are counted as the model's forward batches finish (``scored``, reported by
the scoring actors) and as shards are published; a shard's images count once
either way, so a run of a few large shards still moves.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)


class Progress:
    """Counts shards and images; reports every ``interval`` seconds."""

    def __init__(self, shards: int, images: int, interval: float = 5.0):
        self.shards, self.images = shards, images
        self.shards_done = self.images_done = self.errors = self.skipped_images = 0
        self.scored = 0  # images through the model so far, in finished forward batches (this run's)
        self.interval = interval
        self.start = self.last = time.perf_counter()
        self.done: set[int] = set()
        self.bar = None
        self.logged: tuple = ()
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=images, unit="img", desc="scoring", dynamic_ncols=True)

    def is_done(self, shard: int) -> bool:
        return shard in self.done

    def update(self, result) -> None:
        self.done.add(result.index)
        self.shards_done += 1
        self.images_done += result.images
        self.errors += result.errors
        if result.skipped:
            self.skipped_images += result.images
        self._refresh_bar()

    def batches_scored(self, images: int) -> None:
        """The scoring actors' count of images through the model so far (a retried batch counts again)."""
        self.scored = max(self.scored, int(images))
        self._refresh_bar()

    def current(self) -> int:
        """Images done: in published shards, or scored in a batch of a shard not yet published."""
        scored = min(self.skipped_images + self.scored, self.images)
        return max(self.images_done, scored)

    def _refresh_bar(self) -> None:
        if self.bar is not None:
            self.bar.n = self.current()
            self.bar.set_postfix(shards=f"{self.shards_done}/{self.shards}", errors=self.errors)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.current() - self.skipped_images) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        remaining = self.images - self.current()
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        return (f"images {self.current()}/{self.images} ({self.images_done} in {self.shards_done}/{self.shards} "
                f"published shards, {self.errors} errors), {rate:.1f} images/s, ETA {eta}")

    def tick(self) -> None:
        now = time.perf_counter()
        if self.bar is None and now - self.last >= self.interval:
            self._log()
            self.last = now

    def _log(self) -> None:
        counts = (self.current(), self.shards_done, self.images_done, self.errors)
        if counts != self.logged:  # the same counts are not said twice
            log.info("progress: %s", self.line())
            self.logged = counts

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._log()


class ScoredImages:
    """A Ray actor's count of images through the model, added to by the scoring actors batch by batch."""

    def __init__(self):
        self.images = 0

    def add(self, images: int) -> None:
        self.images += int(images)

    def total(self) -> int:
        return self.images


def watch_batches(counter, progress: Progress, stop: threading.Event) -> None:
    """Until ``stop``: the scoring actors' count of scored images into ``progress``, reported as it goes."""
    import ray

    while not stop.wait(min(progress.interval, 2.0)):
        try:
            progress.batches_scored(ray.get(counter.total.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - progress only: a missed poll is not a failure
            continue
        progress.tick()
