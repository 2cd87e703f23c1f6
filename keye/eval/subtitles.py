"""Subtitle files in the three layouts the benchmarks ship, read into one cue list and written back.

Video-MME (v1) ships SubRip files (`subtitle/<videoID>.srt`); Video-MME-v2 ships word-level JSONL
(`<video_id>.jsonl`, one `{"text", "start_time", "end_time"}` per word, see MME-Benchmarks/Video-MME-v2
evaluation/test_video_mme_v2.py); LongVideoBench ships a JSON list per video whose cues are either
`{"start": "HH:MM:SS.mmm", "end": ..., "line": ...}` or `{"timestamp": [s, e], "text": ...}` (see
longvideobench/longvideobench_dataset.py). The held-out export writes the same three layouts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subtitle:
    """One cue, in seconds from the start of the video."""

    start: float
    end: float
    text: str


_SRT_TIME = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?")


def clock_to_seconds(clock: str) -> float:
    """'HH:MM:SS,mmm' / 'HH:MM:SS.mmm' / 'MM:SS' -> seconds."""
    parts = clock.strip().replace(",", ".").split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"not a clock time: {clock!r}")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def seconds_to_clock(seconds: float, sep: str = ".") -> str:
    """Seconds -> 'HH:MM:SS.mmm' (sep=',' for SubRip)."""
    ms = int(round(max(seconds, 0.0) * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def read_srt(path: Path) -> list[Subtitle]:
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    cues: list[Subtitle] = []
    for block in re.split(r"\r?\n\s*\r?\n", text.strip()):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        arrow = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if arrow is None:
            continue
        left, right = lines[arrow].split("-->", 1)
        try:
            start, end = clock_to_seconds(left), clock_to_seconds(right.split()[0])
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}: bad SubRip time line {lines[arrow]!r}") from exc
        body = re.sub(r"<[^>]+>", "", " ".join(lines[arrow + 1 :])).strip()
        if body:
            cues.append(Subtitle(start, end, body))
    return cues


def write_srt(path: Path, cues: list[Subtitle]) -> None:
    blocks = [
        f"{i}\n{seconds_to_clock(c.start, ',')} --> {seconds_to_clock(c.end, ',')}\n{c.text}\n"
        for i, c in enumerate(cues, 1)
    ]
    Path(path).write_text("\n".join(blocks), encoding="utf-8")


def read_word_jsonl(path: Path, gap: float = 0.5) -> list[Subtitle]:
    """Video-MME-v2 word-level JSONL, regrouped into phrase cues at pauses longer than `gap` seconds
    or at sentence ends (the official script groups the same way before interleaving)."""
    words = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            words.append((float(row["start_time"]), float(row["end_time"]), str(row["text"])))
        except KeyError as exc:
            raise ValueError(f"{path}:{n}: subtitle word lacks field {exc.args[0]!r}") from exc
    cues: list[Subtitle] = []
    current: list[tuple[float, float, str]] = []
    for word in words:
        if current:
            pause = word[0] - current[-1][1]
            if pause > gap or (current[-1][2].rstrip().endswith((".", "!", "?")) and pause > 0.1):
                cues.append(Subtitle(current[0][0], current[-1][1], " ".join(w[2] for w in current)))
                current = []
        current.append(word)
    if current:
        cues.append(Subtitle(current[0][0], current[-1][1], " ".join(w[2] for w in current)))
    return cues


def write_word_jsonl(path: Path, cues: list[Subtitle]) -> None:
    """Spread each cue's words evenly over the cue (the synthetic set has no word timings)."""
    rows = []
    for cue in cues:
        words = cue.text.split()
        step = (cue.end - cue.start) / max(len(words), 1)
        for i, word in enumerate(words):
            start = cue.start + i * step
            rows.append({"text": word, "start_time": round(start, 3), "end_time": round(start + step, 3)})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_lvb_json(path: Path, offset: float = 0.0, duration: float | None = None) -> list[Subtitle]:
    """LongVideoBench subtitle JSON; `offset` is the item's starting_timestamp_for_subtitles."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    cues: list[Subtitle] = []
    for n, row in enumerate(rows):
        if "timestamp" in row:
            start, end = row["timestamp"]
            end = end if isinstance(end, (int, float)) else (duration if duration is not None else start)
            text = row.get("text", "")
        elif "start" in row and "end" in row:
            start, end = clock_to_seconds(row["start"]), clock_to_seconds(row["end"])
            text = row.get("line", row.get("text", ""))
        else:
            raise ValueError(f"{path}: subtitle entry {n} has neither 'timestamp' nor 'start'/'end'")
        cues.append(Subtitle(float(start) - offset, float(end) - offset, str(text).strip()))
    return cues


def write_lvb_json(path: Path, cues: list[Subtitle]) -> None:
    rows = [
        {"start": seconds_to_clock(c.start), "end": seconds_to_clock(c.end), "line": c.text} for c in cues
    ]
    Path(path).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
