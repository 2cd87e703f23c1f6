"""Benchmark files in their published layouts, read into one `Question` list.

Layouts (each checked against the benchmark's own loader or evaluation script):
- TimeLens-Bench (arXiv 2512.14698; TimeLens repo loader): `{vid: {"duration": s, "spans": [[s, e], ...],
  "queries": [str, ...]}}`, video `<vid>.mp4`. No question ids are published: ours are `<vid>#<k>`.
- Video-MME v1 (lmms-lab/Video-MME `videomme/test-00000-of-00001.parquet`): rows `video_id, duration
  (short|medium|long), domain, sub_category, url, videoID, question_id, task_type, question,
  options ["A. ...", ...], answer`; video `<videoID>.mp4`, subtitles `subtitle/<videoID>.srt`. The same rows as
  JSON/JSONL, and the grouped JSON of BradyFU/Video-MME evaluation/output_test_template.json, are read too.
- Video-MME-v2 (MME-Benchmarks/Video-MME-v2 `test.parquet`, read as in evaluation/test_video_mme_v2.py):
  rows `video_id, question, options, answer, level, group_type (relevance|logic), group_structure
  ("[1, 2, 3, 4]" | "[1, [2, 3], 4]" | "[[1, 2], 3, 4]"), second_head, third_head`; every 4 consecutive rows are
  one group (the official script groups by row // 4, without checking that they share a video); video `<video_id>.mp4`; subtitles `<video_id>.jsonl`.
  Assumptions where the public material does not pin a field: `options` may be a list or one newline-joined
  string; the question id is `question_id` if present, else `index`, else the row number (the official
  script's `index`); the subtitle folder is `subtitle/` or `subtitles/` beside the parquet.
- LongVideoBench (`lvb_val.json`, longvideobench/longvideobench_dataset.py): list of `{video_id, question,
  candidates, correct_choice, position, topic_category, question_category, level, id, video_path,
  subtitle_path, duration_group, starting_timestamp_for_subtitles, duration, ...}`; video `videos/<video_path>`
  (or `<video_path>` in the videos folder given); subtitles `subtitles/<subtitle_path>`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.eval.subtitles import Subtitle, read_lvb_json, read_srt, read_word_jsonl

KINDS = ("timelens", "videomme", "videomme_v2", "longvideobench")
LETTERS = "ABCDEFGH"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
V2_STRUCTURES = ("[1, 2, 3, 4]", "[1, [2, 3], 4]", "[[1, 2], 3, 4]")


class BenchmarkFormatError(ValueError):
    """A benchmark file that does not follow its published layout (message names file and field)."""


@dataclass
class Question:
    """One benchmark item, whatever the benchmark: an MCQ (options + answer letter) or a grounding query
    (spans + duration). `id` is the benchmark's own question id, the key of predictions.jsonl."""

    id: str
    kind: str
    video: Path
    question: str
    options: list[str] = field(default_factory=list)
    answer: str | None = None
    task: str = ""
    duration_group: str = ""
    duration: float | None = None
    spans: list[tuple[float, float]] = field(default_factory=list)
    group: str | None = None
    group_type: str | None = None
    group_structure: str | None = None
    subtitles: list[Subtitle] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_grounding(self) -> bool:
        return self.kind == "timelens"


@dataclass
class Benchmark:
    kind: str
    path: Path
    questions: list[Question]


# ---------------------------------------------------------------- file loading and layout detection


def _load_rows(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".jsonl":
            return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except Exception as exc:  # any parse error, reported with the file name
        raise BenchmarkFormatError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc
    raise BenchmarkFormatError(
        f"{path}: unsupported benchmark file type {suffix!r} (.json, .jsonl, .parquet)"
    )


def _kind_of(data: Any) -> str | None:
    if isinstance(data, dict) and data:
        first = next(iter(data.values()))
        if isinstance(first, dict) and "spans" in first and "queries" in first:
            return "timelens"
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        keys = set(data[0])
        if {"candidates", "correct_choice"} <= keys or {"candidates", "video_path", "subtitle_path"} <= keys:
            return "longvideobench"
        if "group_type" in keys or "group_structure" in keys:
            return "videomme_v2"
        if "questions" in keys and ("duration_category" in keys or "video_id" in keys):
            return "videomme"
        if {"question_id", "options"} <= keys or {"videoID", "options"} <= keys:
            return "videomme"
    return None


def _layout_error(path: Path) -> BenchmarkFormatError:
    return BenchmarkFormatError(
        f"{path}: layout matches none of {', '.join(KINDS)} (TimeLens: {{vid: {{duration, spans, queries}}}}; "
        "Video-MME: rows with question_id/options; Video-MME-v2: rows with group_type; "
        "LongVideoBench: rows with candidates/correct_choice)"
    )


def detect_kind(path: str | Path) -> str:
    """The benchmark a file belongs to, from its layout alone."""
    path = Path(path)
    kind = _kind_of(_load_rows(path))
    if kind is None:
        raise _layout_error(path)
    return kind


def _need(row: dict, key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise BenchmarkFormatError(f"{where}: missing field {key!r}")
    return row[key]


def _strip_letter(option: str) -> str:
    return re.sub(r"^\s*\(?[A-H][.):]\s*", "", str(option)).strip()


def _split_options(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        parts = [p for p in re.split(r"\n+", value.strip()) if p.strip()]
    elif isinstance(value, Iterable):
        parts = [str(p) for p in value]
    else:
        raise BenchmarkFormatError(f"{where}: field 'options' is neither a list nor a string")
    if not 2 <= len(parts) <= len(LETTERS):
        raise BenchmarkFormatError(f"{where}: field 'options' has {len(parts)} entries (2..8 expected)")
    return [_strip_letter(p) for p in parts]


def _check_letter(answer: Any, n_options: int, where: str) -> str:
    m = re.fullmatch(r"\(?([A-Ha-h])[.)]?", str(answer).strip())
    letter = m.group(1).upper() if m else ""
    if not letter or letter not in LETTERS[:n_options]:
        raise BenchmarkFormatError(
            f"{where}: field 'answer' = {answer!r} is not one of {LETTERS[:n_options]}"
        )
    return letter


# ---------------------------------------------------------------- per benchmark


def _read_timelens(path: Path, data: dict) -> list[Question]:
    questions = []
    for vid, item in data.items():
        where = f"{path} [{vid!r}]"
        if not isinstance(item, dict):
            raise BenchmarkFormatError(f"{where}: entry is not an object")
        duration = float(_need(item, "duration", where))
        spans, queries = _need(item, "spans", where), _need(item, "queries", where)
        if len(spans) != len(queries):
            raise BenchmarkFormatError(f"{where}: {len(spans)} spans but {len(queries)} queries")
        for k, (span, query) in enumerate(zip(spans, queries, strict=True)):
            if not (isinstance(span, (list, tuple)) and len(span) == 2):
                raise BenchmarkFormatError(f"{where}: spans[{k}] is not a [start, end] pair")
            questions.append(
                Question(
                    id=f"{vid}#{k}",
                    kind="timelens",
                    video=Path(str(vid)),  # <vid>.mp4 in the release; other containers are tried too
                    # TimeLens cleans queries this way before prompting (whitespace, trailing period).
                    question=re.sub(r"\s+", " ", str(query)).strip().strip(".").strip(),
                    task=path.stem,
                    duration=duration,
                    spans=[(float(span[0]), float(span[1]))],
                    extra={"video_id": vid},
                )
            )
    return questions


def _read_videomme(path: Path, data: list) -> list[Question]:
    rows: list[dict] = []
    if "questions" in data[0]:  # the grouped layout of the official evaluation template
        for v, video in enumerate(data):
            for q in _need(video, "questions", f"{path} [video {v}]"):
                rows.append(
                    {
                        "video_id": video.get("video_id"),
                        "videoID": video.get("videoID", video.get("video_id")),
                        "duration": video.get("duration_category", video.get("duration", "")),
                        "domain": video.get("video_category", ""),
                        "sub_category": video.get("video_subcategory", ""),
                        **q,
                        "options": q.get("options", q.get("choices")),
                    }
                )
    else:
        rows = data
    questions = []
    for r, row in enumerate(rows):
        where = f"{path} [row {r}]"
        qid = str(_need(row, "question_id", where))
        options = _split_options(_need(row, "options", where), where)
        video_name = str(row.get("videoID") or _need(row, "video_id", where))
        questions.append(
            Question(
                id=qid,
                kind="videomme",
                video=Path(video_name),
                question=str(_need(row, "question", where)),
                options=options,
                answer=_check_letter(_need(row, "answer", where), len(options), where),
                task=str(row.get("task_type", "")),
                duration_group=str(row.get("duration", "")),
                extra={
                    "video_id": str(row.get("video_id", "")),
                    "videoID": video_name,
                    "domain": row.get("domain", ""),
                    "sub_category": row.get("sub_category", ""),
                },
            )
        )
    return questions


def _read_videomme_v2(path: Path, data: list) -> list[Question]:
    if len(data) % 4:
        raise BenchmarkFormatError(f"{path}: {len(data)} rows; Video-MME-v2 groups are 4 consecutive rows")
    questions = []
    for r, row in enumerate(data):
        where = f"{path} [row {r}]"
        options = _split_options(_need(row, "options", where), where)
        group_type = str(_need(row, "group_type", where))
        if group_type not in ("relevance", "logic"):
            raise BenchmarkFormatError(f"{where}: field 'group_type' = {group_type!r} (relevance|logic)")
        structure = None
        if group_type == "logic":
            raw = str(_need(row, "group_structure", where))
            try:
                structure = str(ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                structure = raw
            if structure not in V2_STRUCTURES:
                raise BenchmarkFormatError(
                    f"{where}: field 'group_structure' = {structure!r} is not one of {V2_STRUCTURES}"
                )
        video_id = str(_need(row, "video_id", where))
        qid = row.get("question_id", row.get("index", r))
        level = row.get("level")
        questions.append(
            Question(
                id=str(qid),
                kind="videomme_v2",
                video=Path(video_id),
                question=str(_need(row, "question", where)),
                options=options,
                answer=_check_letter(_need(row, "answer", where), len(options), where),
                task=str(row.get("second_head") or ""),
                group=f"g{r // 4}",
                group_type=group_type,
                group_structure=structure,
                extra={
                    "video_id": video_id,
                    "level": None if level is None or str(level) == "None" else int(level),
                    "second_head": row.get("second_head"),
                    "third_head": row.get("third_head"),
                },
            )
        )
    for g in range(0, len(questions), 4):
        group = questions[g : g + 4]
        if len({q.group_type for q in group}) != 1:
            raise BenchmarkFormatError(f"{path} [rows {g}-{g + 3}]: a group's 4 rows must share group_type")
    return questions


def _read_longvideobench(path: Path, data: list) -> list[Question]:
    questions = []
    for r, row in enumerate(data):
        where = f"{path} [row {r}]"
        options = [str(c) for c in _need(row, "candidates", where)]
        choice = _need(row, "correct_choice", where)
        if not isinstance(choice, int) or not 0 <= choice < len(options):
            raise BenchmarkFormatError(
                f"{where}: field 'correct_choice' = {choice!r} is not an index into candidates"
            )
        questions.append(
            Question(
                id=str(_need(row, "id", where)),
                kind="longvideobench",
                video=Path(str(_need(row, "video_path", where))),
                question=str(_need(row, "question", where)),
                options=options,
                answer=LETTERS[choice],
                task=str(row.get("question_category", "")),
                duration_group=str(row.get("duration_group", "")),
                duration=float(row["duration"]) if row.get("duration") is not None else None,
                extra={
                    "video_id": row.get("video_id"),
                    "subtitle_path": row.get("subtitle_path"),
                    "starting_timestamp_for_subtitles": float(
                        row.get("starting_timestamp_for_subtitles") or 0.0
                    ),
                    "level": row.get("level"),
                    "topic_category": row.get("topic_category"),
                },
            )
        )
    return questions


_READERS = {
    "timelens": _read_timelens,
    "videomme": _read_videomme,
    "videomme_v2": _read_videomme_v2,
    "longvideobench": _read_longvideobench,
}

# ---------------------------------------------------------------- videos and subtitles from local folders


def _video_candidates(q: Question, videos_dir: Path) -> list[Path]:
    names = (
        [q.video.name]
        if q.video.suffix.lower() in VIDEO_EXTENSIONS
        else [q.video.name + e for e in VIDEO_EXTENSIONS]
    )
    dirs = [videos_dir, videos_dir / "videos", videos_dir / "video", videos_dir / "data"]
    return [d / n for d in dirs for n in names]


def _resolve_videos(path: Path, questions: list[Question], videos_dir: Path) -> None:
    missing: dict[str, str] = {}
    cache: dict[Path, Path | None] = {}
    for q in questions:
        if q.video not in cache:
            cache[q.video] = next((c for c in _video_candidates(q, videos_dir) if c.is_file()), None)
        found = cache[q.video]
        if found is None:
            missing.setdefault(str(q.video), q.id)
        else:
            q.video = found
    if missing:
        shown = ", ".join(f"{v} (question {qid})" for v, qid in list(missing.items())[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(
            f"{path}: {len(missing)} video(s) not found under {videos_dir}: {shown}{more}"
        )


def _subtitle_dirs(path: Path, kind: str, subtitles_dir: Path | None) -> list[Path]:
    if subtitles_dir is not None:
        return [Path(subtitles_dir)]
    names = {
        "videomme": ("subtitle", "subtitles"),
        "videomme_v2": ("subtitle", "subtitles"),
        "longvideobench": ("subtitles",),
    }
    return [base / n for base in (path.parent, path.parent.parent) for n in names.get(kind, ())]


def _attach_subtitles(path: Path, kind: str, questions: list[Question], subtitles_dir: Path | None) -> None:
    """Subtitles are optional in every benchmark (many Video-MME videos have none): a missing file gives
    no cues; a malformed one is an error."""
    dirs = [d for d in _subtitle_dirs(path, kind, subtitles_dir) if d.is_dir()]
    if not dirs:
        return
    cache: dict[str, list[Subtitle]] = {}
    for q in questions:
        if kind == "videomme":
            name, reader = f"{q.extra['videoID']}.srt", read_srt
        elif kind == "videomme_v2":
            name, reader = f"{q.extra['video_id']}.jsonl", read_word_jsonl
        elif kind == "longvideobench" and q.extra.get("subtitle_path"):
            offset = q.extra["starting_timestamp_for_subtitles"]
            name = str(q.extra["subtitle_path"])

            def reader(p: Path, _o: float = offset, _d: float | None = q.duration) -> list[Subtitle]:
                return read_lvb_json(p, _o, _d)
        else:
            continue
        key = f"{name}@{q.extra.get('starting_timestamp_for_subtitles', 0)}"
        if key not in cache:
            file = next((d / name for d in dirs if (d / name).is_file()), None)
            cache[key] = reader(file) if file is not None else []
        q.subtitles = cache[key]


def read_benchmark(
    path: str | Path,
    videos_dir: str | Path | None = None,
    kind: str | None = None,
    subtitles_dir: str | Path | None = None,
) -> Benchmark:
    """Read a benchmark file. With `videos_dir`, every video must exist there (else FileNotFoundError naming
    the missing ones); without it, videos stay as the file names the benchmark gives (enough to score)."""
    path = Path(path)
    data = _load_rows(path)
    found = _kind_of(data)
    if kind is None:
        if found is None:
            raise _layout_error(path)
        kind = found
    if kind not in _READERS:
        raise BenchmarkFormatError(f"unknown benchmark kind {kind!r}; expected one of {', '.join(KINDS)}")
    if found is not None and found != kind:
        raise BenchmarkFormatError(f"{path}: --kind {kind} given but the file is laid out as {found}")
    if not data:
        raise BenchmarkFormatError(f"{path}: no questions")
    if isinstance(data, dict) != (kind == "timelens") or not isinstance(data, (dict, list)):
        shape = "an object {vid: {...}}" if kind == "timelens" else "a list of rows"
        raise BenchmarkFormatError(f"{path}: a {kind} file holds {shape}")
    if isinstance(data, list) and not all(isinstance(r, dict) for r in data):
        raise BenchmarkFormatError(f"{path}: every row must be an object")
    questions = _READERS[kind](path, data)
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise BenchmarkFormatError(f"{path}: question id {q.id!r} occurs twice")
        seen.add(q.id)
    if videos_dir is not None:
        _resolve_videos(path, questions, Path(videos_dir))
    _attach_subtitles(path, kind, questions, Path(subtitles_dir) if subtitles_dir else None)
    return Benchmark(kind=kind, path=path, questions=questions)
