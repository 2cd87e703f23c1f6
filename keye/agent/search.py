"""Full-text search over a local corpus (captions, subtitles, dense captions): Okapi BM25 ranking.

Why a plain ranked scan: DuckDB's `fts` extension is not bundled with the duckdb wheel and INSTALL downloads it,
which the pipeline's offline machines cannot do (checked on duckdb 2.0.1: "Failed to download extension"); and
duckdb is owned by keye/core/lineage.py (tests/unit/test_import_rules.py). The corpus of one run is thousands
of short texts, for which a scan is milliseconds. `SearchIndex.backend` says which ranking answered, so an FTS
backend can be added behind the same `search` call where it loads.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

_WORD = re.compile(r"[a-z0-9]+")
# The short English stop list of DuckDB's fts 'english' stopwords (the common function words).
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with what when where which who how does do did".split()
)


def terms(text: str) -> list[str]:
    """Lower-cased alphanumeric words without stopwords (a light plural strip: 'cars' -> 'car')."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w in STOPWORDS:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


@dataclass
class Document:
    id: str
    text: str
    source: str = ""  # e.g. "caption", "subtitle", "dense_caption"
    video: str = ""  # the video it describes, for per-video scoping
    start: float | None = None  # the time span it covers, when it has one
    end: float | None = None


@dataclass
class Hit:
    doc: Document
    score: float


@dataclass
class SearchIndex:
    """BM25 (k1 = 1.2, b = 0.75, as DuckDB's fts defaults) over `docs`."""

    docs: Sequence[Document]
    k1: float = 1.2
    b: float = 0.75
    backend: str = "bm25-scan"
    _tf: list[Counter[str]] = field(default_factory=list, init=False, repr=False)
    _df: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _avg: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._tf = [Counter(terms(d.text)) for d in self.docs]
        for tf in self._tf:
            self._df.update(tf.keys())
        self._avg = sum(sum(tf.values()) for tf in self._tf) / max(1, len(self._tf))

    def search(self, query: str, k: int = 5, video: str | None = None) -> list[Hit]:
        """The k best documents for `query` (ties broken by corpus order), optionally only those of `video`;
        documents sharing no term with the query are never returned."""
        q = Counter(terms(query))
        n = len(self.docs)
        hits = []
        for i, (doc, tf) in enumerate(zip(self.docs, self._tf, strict=True)):
            if video is not None and doc.video != video:
                continue
            length = sum(tf.values())
            score = 0.0
            for t in q:
                f = tf.get(t, 0)
                if not f:
                    continue
                idf = math.log(1 + (n - self._df[t] + 0.5) / (self._df[t] + 0.5))
                score += (
                    idf
                    * f
                    * (self.k1 + 1)
                    / (f + self.k1 * (1 - self.b + self.b * length / max(self._avg, 1e-9)))
                )
            if score > 0:
                hits.append((-score, i, Hit(doc, score)))
        return [h for _, _, h in sorted(hits, key=lambda x: (x[0], x[1]))[:k]]
