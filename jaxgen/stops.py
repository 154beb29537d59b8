"""Incremental stop-string detection over streamed text, holding back as little as possible.

Which match wins: generation stops the moment any stop string is complete (OpenAI: "sequences
where the API will stop generating further tokens"), so the winner is the match that ENDS first
in the output. Consequences, for overlapping stop strings:
  * same start position ("ab" and "abc" on "abc..."): the shorter one, which ends first;
  * same end position ("abc" and "bc" on "xabc"): the longer one, which starts first, so the
    output ("x") excludes all of it;
  * one strictly inside another ("bc" inside "abcd"): the inner one ("a" is kept), because it is
    complete before the longer one could be; what is generated after it never matters.
The result depends only on the concatenated text, never on how it was split into feeds.

The matcher is an Aho-Corasick automaton over the stop strings. Its state is the longest suffix
of the output that is a prefix of some stop string: exactly the text that must be held back.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopStringMatcher:
    """Feed text as it is generated; get back what is safe to emit and whether a stop string matched."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._children: list[dict[str, int]] = [{}]  # trie edges per node; node 0 is the root
        self._fail: list[int] = [0]  # node of the longest proper suffix that is also in the trie
        self._match: list[str | None] = [None]  # longest stop string that is a suffix of the node
        self._depth: list[int] = [0]  # length of the node's string
        for stop in stops:
            self._insert(stop)
        self._link()
        self._node = 0
        self._held = ""  # the node's string: the output's tail that could still begin a stop
        self.matched: str | None = None  # the stop string that ended the output, once one has

    def _insert(self, stop: str) -> None:
        """Add one stop string to the trie."""
        node = 0
        for ch in stop:
            if ch not in self._children[node]:
                self._children[node][ch] = len(self._children)
                self._children.append({})
                self._fail.append(0)
                self._match.append(None)
                self._depth.append(self._depth[node] + 1)
            node = self._children[node][ch]
        self._match[node] = stop

    def _link(self) -> None:
        """Breadth-first: failure links, and each node's longest matching suffix."""
        queue = deque(self._children[0].values())
        while queue:
            node = queue.popleft()
            for ch, child in self._children[node].items():
                self._fail[child] = self._step(self._fail[node], ch) if node else 0
                if self._match[child] is None:
                    self._match[child] = self._match[self._fail[child]]
                queue.append(child)

    def _step(self, node: int, ch: str) -> int:
        """The automaton's transition: the longest trie prefix that is a suffix of node's string + ch."""
        while node and ch not in self._children[node]:
            node = self._fail[node]
        return self._children[node].get(ch, 0)

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, stopped); on a match, the text before it, and the matcher is finished."""
        if self.matched is not None:
            return "", True
        pending, offset, node = self._held + text, len(self._held), self._node
        for i, ch in enumerate(text):
            node = self._step(node, ch)
            stop = self._match[node]
            if stop is not None:
                self.matched, self._held = stop, ""
                return pending[: offset + i + 1 - len(stop)], True
        self._node = node
        cut = len(pending) - self._depth[node]
        self._held = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        """The held-back tail, released at the end of generation (nothing after a match)."""
        held, self._held, self._node = self._held, "", 0
        return held
