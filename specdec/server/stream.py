"""Incremental detokenization with stop strings."""

from __future__ import annotations


class TextStream:
    """Incremental detokenization with stop strings.

    Text is released only when it can no longer change: a trailing incomplete UTF-8 sequence (decoded as
    U+FFFD) and a tail that could still grow into a stop string are held back, so neither a stop string nor
    anything after it is ever sent, even when it spans several tokens or a multi-token step.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text released
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Feed emitted ids (one step's); returns the text released. After a stop, ignores the rest."""
        start = self.sent
        for token in token_ids:
            if self.stopped:
                break
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                self.sent = len(self.text)
                break
            safe = len(self.text) - self._held_back()
            self.sent = max(self.sent, safe)
        return self.text[start: self.sent]

    def flush(self) -> str:
        """At the end: release what was held back (it did not become a stop string)."""
        start, self.sent = self.sent, len(self.text)
        return self.text[start:]

    def _held_back(self) -> int:
        text = self.text
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
