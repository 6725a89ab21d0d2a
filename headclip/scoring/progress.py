"""Progress of a scoring run: a bar in a terminal, plain log lines in job logs."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Counts shards and images; reports every ``interval`` seconds."""

    def __init__(self, shards: int, images: int, interval: float = 5.0):
        self.shards, self.images = shards, images
        self.shards_done = self.images_done = self.errors = self.skipped_images = 0
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
        if self.bar is not None:
            self.bar.update(result.images)
            self.bar.set_postfix(shards=f"{self.shards_done}/{self.shards}", errors=self.errors)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.images_done - self.skipped_images) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        remaining = self.images - self.images_done
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        return (f"shards {self.shards_done}/{self.shards}, images {self.images_done}/{self.images} "
                f"({self.errors} errors), {rate:.1f} images/s, ETA {eta}")

    def tick(self) -> None:
        now = time.perf_counter()
        if self.bar is None and now - self.last >= self.interval:
            self._log()
            self.last = now

    def _log(self) -> None:
        counts = (self.shards_done, self.images_done, self.errors)
        if counts != self.logged:  # the same counts are not said twice
            log.info("progress: %s", self.line())
            self.logged = counts

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._log()
