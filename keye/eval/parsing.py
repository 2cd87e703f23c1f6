"""Turn a model's raw answer into an option letter or a (start, end) span; None means unparsable.

Follows the benchmarks' prompts ("Respond with only the letter ...", "Answer with the option's letter ...",
"The event happens in <start time> - <end time> seconds") and their extractors (Video-MME
`extract_characters_regex`, Video-MME-v2 `extract_characters_regex_v2`, TimeLens `extract_time`: clock times
first, then "m - n" / "m to n", then any two numbers), but stricter about stray capitals: the official
extractors take the first capital A-D anywhere, so "Answer: b" reads as "A"; here an explicit answer phrase
wins, a lone lowercase letter counts only where it stands alone, and the article "A" ("A man ...") is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_THINK_END = re.compile(r"</think>", re.I)
_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer|best\s+answer|correct\s+answer|best\s+option|correct\s+option|correct\s+choice|"
    r"the\s+answer|answer|option|choice)\s*(?:is|:|=|would\s+be|should\s+be)?\s*[:\-]?\s*[\(\[\*\"']*\s*"
    r"([A-Ha-h])(?![A-Za-z0-9])",
    re.I,
)
_LEADING_LETTER = re.compile(r"^[\s\*\"'`]*[\(\[]?\s*([A-Ha-h])\s*(?:[\)\]\.:,]|$)")
_STANDALONE_UPPER = re.compile(r"(?<![A-Za-z0-9])([A-H])(?![A-Za-z0-9])")


def final_text(text: str) -> str:
    """The part of a reply after any reasoning block (`... </think>`)."""
    parts = _THINK_END.split(text or "")
    return parts[-1].strip()


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def parse_choice(text: str, n_options: int, options: Sequence[str] = ()) -> str | None:
    """Option letter in A..(n_options) from a reply such as "B", "(B)", "Answer: b.", "The best answer is C",
    "Final Answer: D." or the text of one option; None if no letter can be read."""
    s = final_text(text)
    if not s:
        return None
    valid = "ABCDEFGH"[:n_options]

    def ok(letter: str) -> str | None:
        up = letter.upper()
        return up if up in valid else None

    # 1. An explicit answer phrase; the last "final answer" wins over earlier mentions.
    matches = list(_ANSWER_PHRASE.finditer(s))
    finals = [m for m in matches if m.group(0).lower().startswith("final")]
    for m in finals[-1:] + matches:
        letter = m.group(1)
        tail = s[m.end() :]
        # A lowercase letter must stand alone ("answer: b." yes, "answer is a bit unclear" no).
        if letter.islower() and not re.match(r"^\s*(?:$|[\.\)\],:;!]|\n)", tail):
            continue
        if ok(letter):
            return ok(letter)
    # 2. A reply that starts with the letter: "B", "(B)", "B. The man ...", "c)".
    m = _LEADING_LETTER.match(s)
    if m and ok(m.group(1)) and not (m.group(1) == "A" and re.match(r"^\s*A [a-z]", s)):
        return ok(m.group(1))
    # 3. The text of exactly one option.
    if options:
        said = _norm(s)
        hits = [i for i, o in enumerate(options) if _norm(o) and _norm(o) == said]
        if not hits:
            hits = [i for i, o in enumerate(options) if len(_norm(o)) > 2 and _norm(o) in said]
        if len(hits) == 1 and hits[0] < n_options:
            return valid[hits[0]]
    # 4. The first standalone capital in range, skipping the article "A".
    for m in _STANDALONE_UPPER.finditer(s):
        letter = m.group(1)
        if letter == "A" and re.match(r"^ [a-z]", s[m.end() :]):
            continue
        if ok(letter):
            return ok(letter)
    return None


_CLOCK = re.compile(r"(?<![\d:.])(\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?)(?![\d:])")
_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"\s*(?:s|sec|secs|second|seconds)?\.?"
_RANGE = re.compile(_NUM + _UNIT + r"\s*(?:-|–|—|~|to|until|till|and)\s*" + _NUM, re.I)


def _clock_seconds(clock: str) -> float:
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def parse_span(text: str) -> tuple[float, float] | None:
    """(start, end) seconds from a reply such as "The event happens in 3.2 - 5.0 seconds", "from 3.2s to 5 s",
    "3.2-5.0", "00:03 - 00:05" or "starts at 3.2 and ends at 5"; None if fewer than two times are given.
    A reversed span is returned as given (TimeLens scores start >= end as IoU 0)."""
    s = final_text(text)
    if not s:
        return None
    clocks = _CLOCK.findall(s)
    if len(clocks) >= 2:
        return _clock_seconds(clocks[0]), _clock_seconds(clocks[1])
    m = _RANGE.search(s)
    if m:
        return float(m.group(1)), float(m.group(2))
    nums = [float(n) for n in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)", s)]
    if len(nums) >= 2:
        return nums[0], nums[1]
    return None
