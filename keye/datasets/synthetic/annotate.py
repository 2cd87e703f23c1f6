"""The sidecar annotations of a spec (docs/DATA_FORMATS.md section 1): caption, dense captions, grounding,
multiple-choice questions whose answers are what the frames show."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keye.datasets.synthetic.spec import (
    COLORS,
    DIRECTIONS,
    REGIONS,
    SCHEMA,
    SHAPES,
    VideoSpec,
    _direction,
    _region,
)


def _name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def _a(phrase: str) -> str:
    """Indefinite article + phrase ("an orange circle")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _r3(t: float) -> float:
    return round(float(t), 3)


def annotations(spec: VideoSpec) -> dict:
    """The sidecar document (DATA_FORMATS.md section 1) for a spec; pure function of the spec."""
    rng = np.random.default_rng([spec.seed, 7])
    dur = spec.duration
    events: list[dict] = []
    dense: list[dict] = []
    grounding: list[dict] = []
    sentences: list[tuple[float, str]] = []
    for i, o in enumerate(spec.objects):
        first = _name(o.color, o.shape)
        region = _region(o.p0)
        direction = _direction(o.p0, o.p1)
        events.append({"t": _r3(o.t_in), "type": "appear", "object": i, "color": o.color, "shape": o.shape})
        dense.append(
            {
                "start": _r3(o.t_in),
                "end": _r3(min(o.t_out, o.t_in + 1.0)),
                "text": f"{_a(first)} appears at the {region}",
            }
        )
        dense.append({"start": _r3(o.t_in), "end": _r3(o.t_out), "text": f"the {first} moves {direction}"})
        sentences.append((o.t_in, f"{_a(first)} appears at the {region} and moves {direction}"))
        end_color = o.color
        if o.t_change is not None and o.new_color:
            events.append({"t": _r3(o.t_change), "type": "color_change", "object": i, "color": o.new_color})
            dense.append(
                {
                    "start": _r3(o.t_change),
                    "end": _r3(min(o.t_out, o.t_change + 1.0)),
                    "text": f"the {first} turns {o.new_color}",
                }
            )
            sentences.append((o.t_change, f"the {first} turns {o.new_color}"))
            grounding.append(
                {"query": f"{_a(first)} is visible", "start": _r3(o.t_in), "end": _r3(o.t_change)}
            )
            grounding.append(
                {
                    "query": f"{_a(_name(o.new_color, o.shape))} is visible",
                    "start": _r3(o.t_change),
                    "end": _r3(o.t_out),
                }
            )
            grounding.append(
                {
                    "query": f"the {o.shape} turns {o.new_color}",
                    "start": _r3(o.t_change),
                    "end": _r3(o.t_change + 0.5),
                }
            )
            end_color = o.new_color
        else:
            grounding.append({"query": f"{_a(first)} is visible", "start": _r3(o.t_in), "end": _r3(o.t_out)})
        if o.t_resize is not None:
            verb = "grows" if o.resize > 1 else "shrinks"
            now = _name(o.color_at(o.t_resize), o.shape)
            events.append({"t": _r3(o.t_resize), "type": verb, "object": i, "factor": o.resize})
            dense.append(
                {
                    "start": _r3(o.t_resize),
                    "end": _r3(min(o.t_out, o.t_resize + 1.0)),
                    "text": f"the {now} {verb}",
                }
            )
            sentences.append((o.t_resize, f"the {now} {verb}"))
        last = _name(end_color, o.shape)
        events.append({"t": _r3(o.t_out), "type": "disappear", "object": i})
        dense.append(
            {"start": _r3(max(o.t_in, o.t_out - 0.5)), "end": _r3(o.t_out), "text": f"the {last} disappears"}
        )
        sentences.append((o.t_out, f"the {last} disappears"))
    for c in spec.cuts:
        events.append({"t": _r3(c), "type": "scene_cut"})
        dense.append({"start": _r3(c), "end": _r3(min(dur, c + 0.5)), "text": "the background changes"})
        grounding.append({"query": "the background changes", "start": _r3(c), "end": _r3(min(dur, c + 0.5))})
        sentences.append((c, "the background changes"))
    sentences.sort(key=lambda s: s[0])
    dense.sort(key=lambda d: (d["start"], d["end"], d["text"]))
    events.sort(key=lambda e: (e["t"], e["type"]))
    if len(spec.cuts) > 1:  # one query per distinct event: drop the ambiguous repeated background query
        grounding = [g for g in grounding if g["query"] != "the background changes"]
    parts = [s for _, s in sentences]
    caption = (
        (
            parts[0][0].upper()
            + parts[0][1:]
            + ("" if len(parts) == 1 else ", then " + ", then ".join(parts[1:]))
            + "."
        )
        if parts
        else "An empty moving background."
    )
    return {
        "schema": SCHEMA,
        "video": spec.filename,
        "duration": _r3(dur),
        "split": spec.split,
        "caption": caption,
        "dense_captions": dense,
        "grounding": grounding,
        "mcq": _mcqs(spec, rng),
        "events": events,
    }


def _options(rng: np.random.Generator, answer: str, pool: Sequence[str], n: int) -> tuple[list[str], int]:
    others = [p for p in pool if p != answer]
    picked = [others[i] for i in rng.permutation(len(others))[: n - 1]]
    opts = [answer, *picked]
    order = rng.permutation(len(opts))
    opts = [opts[i] for i in order]
    return opts, opts.index(answer)


def _mcqs(spec: VideoSpec, rng: np.random.Generator) -> list[dict]:
    """4- and 8-option questions with their evidence intervals; every answer is visible in the pixels."""
    dur = spec.duration
    combos = [_name(c, s) for c in COLORS for s in SHAPES]
    qs: list[dict] = []

    def add(
        question: str, answer: str, pool: Sequence[str], n: int, start: float, end: float, kind: str
    ) -> None:
        opts, idx = _options(rng, answer, pool, n)
        qs.append(
            {
                "question": question,
                "options": opts,
                "answer": int(idx),
                "start": _r3(start),
                "end": _r3(end),
                "kind": kind,
            }
        )

    shape_count = {s: sum(o.shape == s for o in spec.objects) for s in SHAPES}
    turned = [o.new_color for o in spec.objects if o.new_color]
    for o in spec.objects:
        ev_end = min(o.t_out, o.t_in + 1.0)
        if shape_count[o.shape] == 1:
            add(
                f"What colour is the {o.shape} when it appears?",
                o.color,
                list(COLORS),
                4,
                o.t_in,
                ev_end,
                "color",
            )
        add(
            f"Where does the {_name(o.color, o.shape)} appear?",
            _region(o.p0),
            REGIONS,
            4,
            o.t_in,
            ev_end,
            "position",
        )
        add(
            f"Which way does the {_name(o.color, o.shape)} move?",
            _direction(o.p0, o.p1),
            DIRECTIONS,
            4,
            o.t_in,
            o.t_out,
            "motion",
        )
        if o.t_change is not None and o.new_color and turned.count(o.new_color) == 1:
            add(
                f"Which object turns {o.new_color}?",
                _name(o.color, o.shape),
                [c for c in combos if not c.startswith(o.new_color + " ")],
                8,
                max(o.t_in, o.t_change - 1.0),
                min(o.t_out, o.t_change + 1.0),
                "change",
            )
    if spec.objects:
        first = min(spec.objects, key=lambda o: o.t_in)
        second = sorted(o.t_in for o in spec.objects)[1] if len(spec.objects) > 1 else first.t_out
        add(
            "Which object appears first?",
            _name(first.color, first.shape),
            combos,
            8,
            0.0,
            min(dur, max(second, first.t_in + 1.0)),
            "order",
        )
        n = len(spec.objects)
        pool = [str(i) for i in range(max(1, n - 5), max(9, n + 6))]  # numbers around the answer
        if spec.max_objects > 1:  # with one shape per video the count is known without looking
            add("How many shapes appear in the video?", str(n), pool, 8 if n > 3 else 4, 0.0, dur, "count")
        # Perception: one thing that is in the video against ones that never are (no binding, no timing needed).
        seen_colors = {o.color for o in spec.objects} | {o.new_color for o in spec.objects if o.new_color}
        absent_colors = [c for c in COLORS if c not in seen_colors]
        absent_shapes = [s for s in SHAPES if all(o.shape != s for o in spec.objects)]
        asked: set[str] = set()
        for o in spec.objects:
            # one shape: "which colour" is the colour question again, so only ask it with several shapes
            if len(spec.objects) > 1 and len(absent_colors) >= 3 and o.color not in asked:
                asked.add(o.color)
                until = o.t_change if o.t_change is not None else o.t_out
                add(
                    "Which colour can be seen in the video?",
                    o.color,
                    [o.color, *absent_colors],
                    4,
                    o.t_in,
                    until,
                    "color_presence",
                )
            if len(absent_shapes) >= 3 and o.shape not in asked:
                asked.add(o.shape)
                add(
                    "Which shape can be seen in the video?",
                    o.shape,
                    [o.shape, *absent_shapes],
                    4,
                    o.t_in,
                    o.t_out,
                    "shape_presence",
                )
    return qs
