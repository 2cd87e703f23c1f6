"""Write the synthetic held-out split (sidecar annotations, docs/DATA_FORMATS.md section 1) as benchmark files
in the published layouts, so the default pipeline's eval goes through the same readers as the real benchmarks.

What goes where:
- TimeLens `timelens/heldout-timelens.json`: every grounding query.
- Video-MME `videomme/videomme/test-00000-of-00001.parquet` (+ `videomme/subtitle/<videoID>.srt`): 4-option MCQs.
- Video-MME-v2 `videomme_v2/test.parquet` (+ `videomme_v2/subtitle/<video_id>.jsonl`): 8-option MCQs in runs of
  4 consecutive rows, one group each, in video order (a final run of fewer than 4 is left out). A synthetic video
  has only 1-3 such questions, so a group may span videos, unlike the real set's 4 questions per video; the
  official scorer groups by row position only, so scoring is unaffected. The synthetic questions are not a
  reasoning chain, so groups are "relevance" unless an MCQ carries `group_type`/`group_structure`.
- LongVideoBench `longvideobench/lvb_val.json` (+ `longvideobench/subtitles/<stem>_en.json`): MCQs with 4-5
  options, subtitles included.
Videos are not copied: every file refers to the video by name, resolved from the videos folder at eval time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from keye.core.atomic import atomic_path, atomic_write_json
from keye.eval.readers import LETTERS
from keye.eval.subtitles import Subtitle, write_lvb_json, write_srt, write_word_jsonl


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def _videomme_duration(seconds: float) -> str:
    """Video-MME's short / medium / long, by the benchmark's bounds (< 2 min, 4-15 min, 30-60 min)."""
    return "short" if seconds <= 120 else ("medium" if seconds <= 900 else "long")


def _lvb_duration_group(seconds: float) -> int:
    """LongVideoBench duration groups: (8,15] -> 15, (15,60] -> 60, (180,600] -> 600, (900,3600] -> 3600."""
    for bound in (15, 60, 600):
        if seconds <= bound:
            return bound
    return 3600


def _load(path: Path) -> dict:
    ann = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("video", "duration"):
        if key not in ann:
            raise ValueError(f"{path}: annotation lacks field {key!r}")
    for k, mcq in enumerate(ann.get("mcq", [])):
        for key in ("question", "options", "answer"):
            if key not in mcq:
                raise ValueError(f"{path}: mcq[{k}] lacks field {key!r}")
        if not (isinstance(mcq["answer"], int) and 0 <= mcq["answer"] < len(mcq["options"]) <= len(LETTERS)):
            raise ValueError(f"{path}: mcq[{k}].answer = {mcq['answer']!r} is not an index into its options")
    for k, g in enumerate(ann.get("grounding", [])):
        for key in ("query", "start", "end"):
            if key not in g:
                raise ValueError(f"{path}: grounding[{k}] lacks field {key!r}")
    return ann


def _cues(ann: dict) -> list[Subtitle]:
    return [Subtitle(float(s["start"]), float(s["end"]), str(s["text"])) for s in ann.get("subtitles", [])]


def write_heldout_benchmarks(
    annotation_jsons: Sequence[Path], videos_dir: Path, out_dir: Path, split: str | None = "heldout"
) -> dict[str, Path]:
    """Benchmark files for the annotations of `split` (None: all given), one per benchmark that gets at least
    one question; returns {kind: benchmark file}. Every referenced video must exist in `videos_dir`."""
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    anns = []
    for path in sorted(Path(p) for p in annotation_jsons):
        ann = _load(path)
        if split is not None and ann.get("split") != split:
            continue
        if not (videos_dir / ann["video"]).is_file():
            raise FileNotFoundError(f"{path}: video {ann['video']!r} not found in {videos_dir}")
        anns.append(ann)
    anns.sort(key=lambda a: Path(a["video"]).stem)

    timelens: dict[str, dict] = {}
    vmme: list[dict] = []
    vmme_subs: dict[str, list[Subtitle]] = {}
    eight: list[tuple[str, dict]] = []
    v2_subs: dict[str, list[Subtitle]] = {}
    lvb: list[dict] = []
    lvb_subs: dict[str, list[Subtitle]] = {}

    for ann in anns:
        stem, duration = Path(ann["video"]).stem, float(ann["duration"])
        if ann.get("grounding"):
            timelens[stem] = {
                "duration": duration,
                "spans": [[float(g["start"]), float(g["end"])] for g in ann["grounding"]],
                "queries": [str(g["query"]) for g in ann["grounding"]],
            }
        four = [m for m in ann.get("mcq", []) if len(m["options"]) == 4]
        if four:
            video_id = f"{len(vmme_subs) + 1:03d}"
            vmme_subs[stem] = _cues(ann)
            for k, m in enumerate(four, 1):
                vmme.append(
                    {
                        "video_id": video_id,
                        "duration": _videomme_duration(duration),
                        "domain": "Synthetic",
                        "sub_category": "Synthetic events",
                        "url": "",
                        "videoID": stem,
                        "question_id": f"{video_id}-{k}",
                        "task_type": str(m.get("kind") or "synthetic"),
                        "question": str(m["question"]),
                        "options": [f"{LETTERS[i]}. {o}" for i, o in enumerate(m["options"])],
                        "answer": LETTERS[m["answer"]],
                    }
                )
        for m in ann.get("mcq", []):
            if len(m["options"]) == 8:
                eight.append((stem, m))
                v2_subs[stem] = _cues(ann)
        lvb_mcqs = [m for m in ann.get("mcq", []) if len(m["options"]) <= 5]
        if lvb_mcqs:
            lvb_subs[f"{stem}_en.json"] = _cues(ann)
        for k, m in enumerate(lvb_mcqs):
            lvb.append(
                {
                    "video_id": stem,
                    "question": str(m["question"]),
                    "question_wo_referring_query": str(m["question"]),
                    "candidates": [str(o) for o in m["options"]],
                    "correct_choice": int(m["answer"]),
                    "position": [],
                    "topic_category": "Synthetic",
                    "question_category": str(m.get("kind") or "synthetic"),
                    "level": "L1-Perception",
                    "id": f"{stem}_{k}",
                    "video_path": str(ann["video"]),
                    "subtitle_path": f"{stem}_en.json",
                    "duration_group": _lvb_duration_group(duration),
                    "starting_timestamp_for_subtitles": 0,
                    "duration": duration,
                    "view_count": 0,
                }
            )

    v2: list[dict] = []
    for g in range(len(eight) // 4):
        group = eight[4 * g : 4 * g + 4]
        group_type = str(group[0][1].get("group_type", "relevance"))
        structure = group[0][1].get("group_structure", "[1, 2, 3, 4]" if group_type == "logic" else None)
        for stem, m in group:
            v2.append(
                {
                    "video_id": stem,
                    "question": str(m["question"]),
                    "options": "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(m["options"])),
                    "answer": LETTERS[m["answer"]],
                    "level": int(m.get("level", 1)),
                    "group_type": group_type,
                    "group_structure": None if structure is None else str(structure),
                    "second_head": str(m.get("kind") or "synthetic"),
                    "third_head": str(m.get("kind") or "synthetic"),
                }
            )
    v2_subs = {stem: cues for stem, cues in v2_subs.items() if any(r["video_id"] == stem for r in v2)}

    out: dict[str, Path] = {}
    if timelens:
        out["timelens"] = out_dir / "timelens" / "heldout-timelens.json"
        atomic_write_json(out["timelens"], timelens)
    if vmme:
        for stem, cues in vmme_subs.items():
            if cues:
                with atomic_path(out_dir / "videomme" / "subtitle" / f"{stem}.srt") as tmp:
                    write_srt(tmp, cues)
        out["videomme"] = out_dir / "videomme" / "videomme" / "test-00000-of-00001.parquet"
        _write_parquet(out["videomme"], vmme)
    if v2:
        for stem, cues in v2_subs.items():
            if cues:
                with atomic_path(out_dir / "videomme_v2" / "subtitle" / f"{stem}.jsonl") as tmp:
                    write_word_jsonl(tmp, cues)
        out["videomme_v2"] = out_dir / "videomme_v2" / "test.parquet"
        _write_parquet(out["videomme_v2"], v2)
    if lvb:
        for name, cues in lvb_subs.items():
            with atomic_path(out_dir / "longvideobench" / "subtitles" / name) as tmp:
                write_lvb_json(tmp, cues)
        out["longvideobench"] = out_dir / "longvideobench" / "lvb_val.json"
        atomic_write_json(out["longvideobench"], lvb)
    return out
