"""PEFT's `rank_pattern` / `alpha_pattern` keys matched against module names in linear time.

PEFT (`peft.utils.other.get_pattern_key`) runs `re.match(rf"(.*\\.)?({key})$", module)` and takes the first key that
matches. A key comes from a file here, so it is never handed to `re`'s backtracking engine: it is parsed into a
small regular-expression subset (literals, escapes, `.`, classes, `\\d\\w\\s`, groups with `|`, `*` `+` `?` `{m,n}`,
`^`, `$`) and run as a Thompson automaton, O(len(module) · len(key)). Anything outside the subset (look-arounds,
back-references, flags) raises ValueError; so does a key that is not a valid regular expression at all.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_STATES = 4096  # a pattern that expands beyond this ({m,n} nested) is refused
MAX_REPEAT = 64
_LITERAL = re.compile(r"[^\\\[\](){}*+?|^$]*")  # only `.` is special: matches in O(len(key)) without an automaton
_CLASSES = {"d": (False, "digit"), "D": (True, "digit"), "w": (False, "word"), "W": (True, "word"),
            "s": (False, "space"), "S": (True, "space")}  # as `re` reads them in str patterns (Unicode)
_NAMED = {"digit": str.isdecimal, "word": lambda c: c.isalnum() or c == "_", "space": str.isspace}


class _Parser:
    """Recursive descent over the subset; builds an automaton as a list of states:
    ("char", test, next) · ("split", a, b) · ("bol", next) · ("eol", next) · ("match",)."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0
        self.states: list = []

    def fail(self, what: str):
        raise ValueError(f"{what} at position {self.pos} of {self.text!r}")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def add(self, state) -> int:
        if len(self.states) >= MAX_STATES:
            self.fail("pattern too large")
        self.states.append(list(state))
        return len(self.states) - 1

    # Fragments are (start state, [dangling (state, slot)]) pairs, patched to their successor.
    def patch(self, outs, target: int) -> None:
        for state, slot in outs:
            self.states[state][slot] = target

    def alternation(self):
        frags = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            frags.append(self.sequence())
        while len(frags) > 1:
            b, a = frags.pop(), frags.pop()
            split = self.add(("split", a[0], b[0]))
            frags.append((split, a[1] + b[1]))
        return frags[0]

    def sequence(self):
        start, outs = None, None
        while self.peek() not in (None, "|", ")"):
            frag = self.repeat()
            if start is None:
                start, outs = frag
            else:
                self.patch(outs, frag[0])
                outs = frag[1]
        if start is None:  # empty: one pass-through state
            return self.sequence_empty()
        return start, outs

    def repeat(self):
        begin = self.pos
        frag = self.atom()
        c = self.peek()
        if c not in ("*", "+", "?", "{"):
            return frag
        if c == "{":
            m = re.compile(r"\{(\d*)(,?)(\d*)\}").match(self.text, self.pos)
            if not m or not (m.group(1) or m.group(3)):
                self.fail("unsupported brace")
            lo = int(m.group(1) or 0)
            hi = int(m.group(3)) if m.group(3) else (None if m.group(2) else lo)
            if lo > MAX_REPEAT or (hi is not None and (hi > MAX_REPEAT or hi < lo)):
                self.fail("repeat count out of range")
            self.pos = m.end()
        else:
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            self.pos += 1
        if self.peek() == "?":  # lazy: the same set of matches
            self.pos += 1
        if self.peek() in ("*", "+", "?", "{"):
            self.fail("multiple repeat")
        end = self.pos
        copies = [frag] + [self.copy(begin) for _ in range((hi if hi is not None else lo + 1) - 1)]
        self.pos = end
        return self.chain(copies, lo, hi)

    def copy(self, begin: int):
        """A fresh fragment for the atom text at `begin` (every repeat needs its own states)."""
        self.pos = begin
        return self.atom()

    def chain(self, copies, lo: int, hi: int | None):
        """copies[0..lo) in a row, then the rest optional (hi) or the last one looped (no hi)."""
        start, outs = None, []

        def link(frag):
            nonlocal start, outs
            if start is None:
                start = frag[0]
            else:
                self.patch(outs, frag[0])
            outs = frag[1]

        for frag in copies[:lo]:
            link(frag)
        if hi is None:  # the extra copy loops: X{lo,} = X·…·X·X*
            loop = copies[lo]
            split = self.add(("split", loop[0], None))
            self.patch(loop[1], split)
            link((split, [(split, 2)]))
            return start, outs
        skipped = []
        for frag in copies[lo:hi]:  # each optional copy may be skipped, which ends the repeat
            split = self.add(("split", frag[0], None))
            link((split, []))
            outs = frag[1]
            skipped.append((split, 2))
        if start is None:  # X{0}: matches the empty string
            return self.sequence_empty()
        return start, outs + skipped

    def sequence_empty(self):
        split = self.add(("split", None, None))
        return split, [(split, 1), (split, 2)]

    def atom(self):
        c = self.peek()
        if c is None:
            self.fail("unexpected end")
        if c == "(":
            self.pos += 1
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?P<", self.pos):
                end = self.text.find(">", self.pos)
                if end < 0:
                    self.fail("unterminated group name")
                self.pos = end + 1
            elif self.peek() == "?":
                self.fail("unsupported group")
            frag = self.alternation()
            if self.peek() != ")":
                self.fail("missing )")
            self.pos += 1
            return frag
        if c in ")*+?{":
            self.fail(f"unexpected {c!r}")
        self.pos += 1
        if c == "^":
            s = self.add(("bol", None))
            return s, [(s, 1)]
        if c == "$":
            s = self.add(("eol", None))
            return s, [(s, 1)]
        if c == ".":
            test = (True, "\n")
        elif c == "[":
            test = self.char_class()
        elif c == "\\":
            test = self.escape()
        else:
            test = (False, c)
        s = self.add(("char", test, None))
        return s, [(s, 2)]

    def escape(self):
        c = self.peek()
        if c is None:
            self.fail("trailing backslash")
        self.pos += 1
        if c in _CLASSES:
            return _CLASSES[c]
        if c.isalnum():
            self.fail(f"unsupported escape \\{c}")
        return False, c

    def char_class(self):
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        chars: set[str] = set()
        ranges: list[tuple[str, str]] = []
        named: list[str] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                self.fail("unterminated [")
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            self.pos += 1
            if c == "\\":
                e = self.peek()
                if e in _CLASSES and not _CLASSES[e][0]:
                    self.pos += 1
                    named.append(_CLASSES[e][1])
                    continue
                neg, c = self.escape()
                if neg or len(c) != 1:
                    self.fail("unsupported class escape")
            if self.peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                hi = self.peek()
                self.pos += 1
                if hi == "\\":
                    _, hi = self.escape()
                if hi < c:
                    self.fail("bad range")
                ranges.append((c, hi))
            else:
                chars.add(c)
        return negated, (frozenset(chars), tuple(ranges), tuple(named))


def _accepts(test, ch: str) -> bool:
    negated, spec = test
    if isinstance(spec, str):
        hit = _NAMED[spec](ch) if spec in _NAMED else ch == spec
    else:
        chars, ranges, named = spec
        hit = ch in chars or any(lo <= ch <= hi for lo, hi in ranges) or any(_NAMED[n](ch) for n in named)
    return hit != negated


@lru_cache(maxsize=1024)
def _automaton(key: str):
    """The automaton of PEFT's `(.*\\.)?(key)$`, or ValueError."""
    parser = _Parser(key)
    body = parser.alternation()
    if parser.pos != len(key):
        parser.fail("unbalanced )")
    states = parser.states
    match = len(states)
    states.append(["match"])
    eol = len(states)
    states.append(["eol", match])
    parser.patch(body[1], eol)
    # prefix (.*\.)? : either skip it, or any characters then a dot, then the body
    dot = len(states)
    states.append(["char", (False, "."), body[0]])
    loop = len(states)
    anychar = loop + 1
    states.append(["split", anychar, dot])
    states.append(["char", (True, "\n"), loop])
    start = len(states)
    states.append(["split", body[0], loop])
    return states, start


def _closure(states, stack: list[int], pos: int, length: int, seen: set[int]) -> None:
    while stack:
        s = stack.pop()
        if s is None or s in seen:
            continue
        seen.add(s)
        kind = states[s][0]
        if kind == "split":
            stack.extend((states[s][2], states[s][1]))
        elif kind == "bol":
            if pos == 0:
                stack.append(states[s][1])
        elif kind == "eol":
            if pos == length:
                stack.append(states[s][1])


def peft_match(key: str, module: str) -> bool:
    """Whether PEFT's `re.match(rf"(.*\\.)?({key})$", module)` matches; ValueError for a key outside the subset."""
    if _LITERAL.fullmatch(key):  # literal characters and `.`: the body has exactly len(key) characters
        n = len(key)
        if len(module) < n or (len(module) > n and module[-n - 1] != "."):
            return False
        return all(k == c or (k == "." and c != "\n") for k, c in zip(key, module[-n:] if n else ""))
    states, start = _automaton(key)
    current: set[int] = set()
    _closure(states, [start], 0, len(module), current)
    for i, ch in enumerate(module):
        following: set[int] = set()
        stack = [states[s][2] for s in current if states[s][0] == "char" and _accepts(states[s][1], ch)]
        _closure(states, stack, i + 1, len(module), following)
        if not following:
            return False
        current = following
    return any(states[s][0] == "match" for s in current)


def check_pattern(key: str) -> None:
    """ValueError when `key` is outside the supported subset or not a valid regular expression."""
    if not _LITERAL.fullmatch(key):
        _automaton(key)
    re.compile(key)  # compiling never runs the pattern: an invalid one is refused as PEFT would fail on it


def pattern_value(patterns: dict, module: str):
    """PEFT's lookup: the value of the first key (in file order) matching `module`, else None."""
    for key, value in patterns.items():
        if peft_match(key, module):
            return value
    return None
