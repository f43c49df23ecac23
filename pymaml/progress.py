"""What a training run shows and how it stops: the progress bar and log lines (Progress), and
the first Ctrl-C turned into a request to stop after the current iteration (StopOnInterrupt),
so that the loop can write a checkpoint before it returns."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Optional


class StopOnInterrupt:
    """Turns the first Ctrl-C into a request to stop after the current iteration (checked by
    the loop, which then checkpoints); a second Ctrl-C interrupts at once. Only in the main
    thread, where Python delivers signals, and only over a Python handler (a process that
    ignores SIGINT, or set it from C, keeps its choice)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGINT)):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Progress:
    """A tqdm bar with the running meta-loss (when shown) and/or a log line every `log_every`
    iterations with the mean meta-loss since the last line; `speaks`: whether `say` says
    anything."""

    def __init__(self, show: bool, log_every: int, start: int, total: int, speaks: bool):
        self.log_every = log_every
        self.total = total
        self.speaks = speaks
        self.bar = None
        if show:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True,
                            desc="meta-training", smoothing=0.05)
        self.running = None
        self.window_sum, self.window_n = 0.0, 0
        self.started = time.perf_counter()

    def update(self, first: int, values) -> None:
        """Iterations first, first + 1, ... gave the meta-losses `values` (floats)."""
        if self.bar is None and not self.log_every:
            return
        for iteration, loss in enumerate(values, first):
            # Running meta-loss: an exponential moving average over about the last 100 iterations.
            self.running = loss if self.running is None else 0.99 * self.running + 0.01 * loss
            self.window_sum += loss
            self.window_n += 1
            if self.log_every and (iteration % self.log_every == 0 or iteration == self.total):
                self.write(f"iteration {iteration}/{self.total}  meta-loss {self.window_sum / self.window_n:.5f} "
                           f"(mean of the last {self.window_n})  {time.perf_counter() - self.started:.1f} s")
                self.window_sum, self.window_n = 0.0, 0
        if self.bar is not None and values:
            last = first + len(values) - 1
            self.bar.update(len(values))
            # the postfix as of every hundredth iteration (and the last)
            if last // 100 > (first - 1) // 100 or last == self.total:
                self.bar.set_postfix(meta_loss=f"{self.running:.4f}", refresh=False)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def say(self, line: str) -> None:
        """`line`, where the run shows anything (a bar or log lines): not in a quiet run."""
        if self.speaks:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def for_run(rank: int, progress: Optional[bool], log_every: Optional[int], start: int,
            total: int) -> Progress:
    """The run's Progress: the bar only on rank 0, and by default only when stderr is a
    terminal; log lines by default only when no bar shows (ten per run), never off rank 0."""
    show = rank == 0 and (sys.stderr.isatty() if progress is None else bool(progress))
    if log_every is None:
        log_every = 0 if show else max(1, total // 10)
    # (no bar for a finished run, though it may say so)
    return Progress(show and start < total, log_every if rank == 0 else 0, start, total,
                    speaks=rank == 0 and (show or bool(log_every)))
