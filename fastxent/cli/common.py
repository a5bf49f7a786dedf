"""What every subcommand shares: the bad-input error, the progress bar, warnings."""

import shutil
import sys
import time

#: Seconds between two redraws of the plain progress line (five a second).
PROGRESS_INTERVAL = 0.2


class CommandError(Exception):
    """Bad input to the command: printed as one line on stderr, exit status 2."""


def warn(message):
    """One line on stderr, prefixed with the program's name."""
    print(f"fastxent: {message}", file=sys.stderr)


class Progress:
    """A progress bar on stderr when it is a terminal; nothing when piped.

    Uses tqdm when installed (``pip install 'fastxent[cli]'``), else a plain
    line rewritten in place at most every :data:`PROGRESS_INTERVAL` seconds.
    """

    def __init__(self, total, unit="", stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.unit = unit
        self.done = 0
        self.text = ""
        self.start = time.perf_counter()
        self.last = 0.0
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.width = max(20, (shutil.get_terminal_size().columns or 80) - 1)
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit=unit or "it", unit_scale=bool(unit),
                                file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, count=1, text=None):
        """Advance by ``count``; ``text`` describes what runs next."""
        if not self.enabled:
            return
        if self.bar is not None:
            if text is not None:
                self.bar.set_description_str(text, refresh=False)
            self.bar.update(count)
            return
        self.done += count
        if text is not None:
            self.text = text
        now = time.perf_counter()
        if now - self.last < PROGRESS_INTERVAL and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        line = f"{self.done:,}/{self.total:,}" + (f" {self.unit}s" if self.unit else "")
        if self.unit and elapsed > 0 and self.done:
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate
            line += f", {rate:,.0f} {self.unit}s/s, ETA {int(eta // 60)}:{int(eta % 60):02d}"
        if self.text:
            line = f"{self.text}  [{line}]"
        self.stream.write("\r" + line[:self.width].ljust(self.width))
        self.stream.flush()

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
