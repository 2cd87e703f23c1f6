"""Reading a predictions.jsonl that someone else may have written: every line is checked, so a score is never
computed from a file that silently lost, invented or doubled answers.

Strict by default (the first problem is an error naming file:line); `lenient` keeps going, returns each problem as
a warning line and counts them, so the metrics say how much of the input was unusable.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path


class PredictionsError(ValueError):
    """A predictions file that cannot be scored honestly; the message names the file and line."""


@dataclass
class PredictionsRead:
    answers: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"malformed": 0, "unknown_ids": 0, "duplicate_ids": 0}
    )


def read_predictions_checked(
    path: str | Path, known_ids: Collection[str] | None = None, lenient: bool = False
) -> PredictionsRead:
    """{question id: raw answer} plus the problems found. Errors (strict): an empty file, a line that is not a
    JSON object with 'id' and 'answer', an id not in `known_ids`, an id given twice."""
    path = Path(path)
    out = PredictionsRead({})
    seen: dict[str, int] = {}
    known = set(known_ids) if known_ids is not None else None

    def problem(kind: str, msg: str) -> None:
        if not lenient:
            raise PredictionsError(msg + " (fix the file, or pass --lenient to skip such lines)")
        out.counts[kind] += 1
        out.warnings.append(msg)

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PredictionsError(f"{path}: no such predictions file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PredictionsError(f"{path}: cannot read it as UTF-8 text: {e}") from None
    n_rows = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        n_rows += 1
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problem("malformed", f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict) or "id" not in row or "answer" not in row:
            problem("malformed", f'{where}: a prediction is a JSON object {{"id": ..., "answer": ...}}')
            continue
        qid = str(row["id"])
        if known is not None and qid not in known:
            problem("unknown_ids", f"{where}: id {qid!r} is not in the benchmark")
            continue
        if qid in seen:
            problem("duplicate_ids", f"{where}: id {qid!r} was already given on line {seen[qid]}")
            continue
        seen[qid] = n
        if row.get("missing"):
            continue  # written for a question that got no answer: stays missing when re-scored
        out.answers[qid] = "" if row["answer"] is None else str(row["answer"])
    if n_rows == 0:
        raise PredictionsError(f"{path}: no predictions in the file (it is empty)")
    return out
