"""DuckDB lineage store: every artifact from source video to trained checkpoint, and the edges between them.

The only module that imports duckdb. Only the orchestrating process writes (it holds the workspace lock, see
keye.core.workspace); workers return records. Connections are short-lived so that read-only readers (`keye lineage`,
`keye verify`) can open the file between writes. Every write is idempotent (ids are content- or input-derived and
inserts ignore existing keys), so a re-run after a crash adds exactly what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from keye.core import lineage_snapshot as snapshot
from keye.core.workspace import Workspace, WorkspaceLock, holds_lock

SCHEMA_VERSION = 1
# stages whose checkpoints branch off the mainline (flows/steps.py): never the newest checkpoint a later stage reads
BRANCH_STAGES: tuple[str, ...] = ("agent_rl",)
# agent_rl's held-out comparison beside its final/ (the eval and the summary read it)
AGENT_EVAL_FILE = "agent_eval.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS videos (
    video_id TEXT PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT, status TEXT NOT NULL, reason TEXT,
    duration DOUBLE, fps DOUBLE, width INTEGER, height INTEGER, codec TEXT, container TEXT, rotation INTEGER,
    n_video_streams INTEGER, n_audio_streams INTEGER, bytes BIGINT, source TEXT, ingested_at TIMESTAMP,
    CHECK (status IN ('ok', 'rejected')), CHECK ((status = 'ok') = (reason IS NULL)));
CREATE TABLE IF NOT EXISTS video_paths (
    video_id TEXT NOT NULL, path TEXT NOT NULL, first_seen TIMESTAMP, PRIMARY KEY (video_id, path));
CREATE TABLE IF NOT EXISTS clips (
    clip_id TEXT PRIMARY KEY, video_id TEXT NOT NULL, idx INTEGER NOT NULL, start_s DOUBLE NOT NULL,
    end_s DOUBLE NOT NULL, status TEXT NOT NULL DEFAULT 'ok', reason TEXT, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS captions (
    caption_id TEXT PRIMARY KEY, clip_id TEXT NOT NULL, backend TEXT NOT NULL, model TEXT, prompt_version TEXT,
    status TEXT NOT NULL, reason TEXT, caption TEXT, record JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS shards (
    shard_id TEXT PRIMARY KEY, shardset_id TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    n_samples INTEGER NOT NULL, bytes BIGINT NOT NULL, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS shard_members (
    shard_id TEXT NOT NULL, key TEXT NOT NULL, clip_id TEXT NOT NULL, caption_id TEXT, PRIMARY KEY (shard_id, key));
CREATE TABLE IF NOT EXISTS packs (
    pack_id TEXT PRIMARY KEY, packset_id TEXT NOT NULL, n_samples INTEGER, tokens BIGINT, fill DOUBLE, meta JSON);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id TEXT PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT, stage TEXT, step BIGINT, run_id TEXT,
    meta JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS evals (
    eval_id TEXT NOT NULL, bench TEXT NOT NULL, checkpoint_id TEXT, kind TEXT, metrics JSON, path TEXT,
    created_at TIMESTAMP, PRIMARY KEY (eval_id, bench));
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, path TEXT, sha256 TEXT, config_hash TEXT,
    status TEXT NOT NULL, meta JSON, created_at TIMESTAMP, completed_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS set_members (set_id TEXT NOT NULL, member_id TEXT NOT NULL, PRIMARY KEY (set_id, member_id));
CREATE TABLE IF NOT EXISTS edges (
    src_id TEXT NOT NULL, dst_id TEXT NOT NULL, relation TEXT NOT NULL, PRIMARY KEY (src_id, dst_id, relation));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, parent_run_id TEXT, prefect_flow_run_id TEXT,
    mlflow_run_id TEXT, status TEXT NOT NULL, config JSON, started_at TIMESTAMP, ended_at TIMESTAMP);
CREATE OR REPLACE VIEW nodes AS
    SELECT video_id AS id, 'video' AS kind, path AS label FROM videos
    UNION ALL SELECT clip_id, 'clip', video_id || ' [' || round(start_s, 2) || 's-' || round(end_s, 2) || 's]' FROM clips
    UNION ALL SELECT caption_id, 'caption', backend || ':' || coalesce(model, '') FROM captions
    UNION ALL SELECT shard_id, 'shard', path FROM shards
    UNION ALL SELECT pack_id, 'pack', packset_id FROM packs
    UNION ALL SELECT checkpoint_id, 'checkpoint', path FROM checkpoints
    UNION ALL SELECT DISTINCT eval_id, 'eval', path FROM evals
    UNION ALL SELECT artifact_id, kind, coalesce(path, name) FROM artifacts
    UNION ALL SELECT run_id, 'run', name FROM runs;
"""


def make_id(prefix: str, *parts: Any) -> str:
    """Deterministic id from its inputs: the same inputs give the same id in every run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return prefix + hashlib.sha256(blob).hexdigest()[:16]


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _as_dict(rec: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(rec) and not isinstance(rec, type):
        return dataclasses.asdict(rec)
    return dict(rec)


class LineageError(RuntimeError):
    pass


class Lineage:
    """Read/write access to `<workspace>/lineage.duckdb`.

    Writers must hold the workspace lock (the pipeline flow takes it); `read_only=True` opens for readers.
    """

    def __init__(self, workspace: Workspace | str | Path, read_only: bool = False):
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
        self.path = self.workspace.lineage_db
        self.read_only = read_only
        self._pinned: duckdb.DuckDBPyConnection | None = None
        if read_only:
            if not self.path.exists():
                raise LineageError(
                    f"no lineage store at {self.path}: run `keye run` or `keye ingest` with --workspace "
                    f"{self.workspace.root} first"
                )
        else:
            self.workspace.root.mkdir(parents=True, exist_ok=True)
            with self._con(publish=True) as con:
                con.execute(_SCHEMA)
                con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    # -- plumbing ---------------------------------------------------------------------------------------------
    @contextmanager
    def _con(self, publish: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection. Readers get the published snapshot (keye.core.lineage_snapshot); a writer's
        connection with `publish` checkpoints and re-publishes the snapshot after it closes, under the lock."""
        if self.read_only and self._pinned is not None:
            yield self._pinned
            return
        if not self.read_only and not holds_lock(self.workspace):
            # Standalone use (tests, library calls): take the lock for the duration of the write.
            with WorkspaceLock(self.workspace):
                with self._open(publish) as con:
                    yield con
            return
        with self._open(publish) as con:
            yield con

    @contextmanager
    def _open(self, publish: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        try:
            con = snapshot.open_reader(self.path) if self.read_only else snapshot.open_writer(self.path)
        except (duckdb.IOException, snapshot.LineageBusy) as e:
            raise LineageError(f"cannot open {self.path}{' read-only' if self.read_only else ''}: {e}") from e
        try:
            yield con
            if publish:
                con.execute("CHECKPOINT")
        finally:
            con.close()
        if publish:
            snapshot.publish(self.path)

    @contextmanager
    def pinned(self) -> Iterator[Lineage]:
        """Readers: every query inside sees one and the same snapshot (e.g. a node and its up/downstream)."""
        if not self.read_only or self._pinned is not None:
            yield self
            return
        with self._open(False) as con:
            self._pinned = con
            try:
                yield self
            finally:
                self._pinned = None

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic write: all rows of a batch land together or not at all (and readers see them together)."""
        if self.read_only:
            raise LineageError("this Lineage was opened read-only")
        with self._con(publish=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self._con() as con:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description] if cur.description else []
            rows = cur.fetchall()
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else None

    # -- videos and clips -------------------------------------------------------------------------------------
    def record_videos(
        self, records: Iterable[Any], source: str | None = None, members_of: str | None = None
    ) -> None:
        """Videos (ok or rejected) with their paths and clips. Same sha256 under two paths: one video, two paths.

        With `members_of`, the videos and their clips join that VideoSet in the same transaction, so a crash
        never leaves a video recorded without its clips or set membership.
        """
        now = _now()
        with self.transaction() as con:
            for rec in map(_as_dict, records):
                con.execute(
                    """INSERT OR REPLACE INTO videos VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [
                        rec["video_id"],
                        rec["path"],
                        rec.get("sha256"),
                        rec["status"],
                        rec.get("reason"),
                        rec.get("duration"),
                        rec.get("fps"),
                        rec.get("width"),
                        rec.get("height"),
                        rec.get("codec"),
                        rec.get("container"),
                        rec.get("rotation"),
                        rec.get("n_video_streams"),
                        rec.get("n_audio_streams"),
                        rec.get("bytes"),
                        source,
                        now,
                    ],
                )
                con.execute(
                    "INSERT OR IGNORE INTO video_paths VALUES (?, ?, ?)", [rec["video_id"], rec["path"], now]
                )
                for i, (start, end) in enumerate(rec.get("clips") or []):
                    clip_id = clip_id_for(rec["video_id"], start, end)
                    con.execute(
                        "INSERT OR IGNORE INTO clips VALUES (?, ?, ?, ?, ?, 'ok', NULL, ?)",
                        [clip_id, rec["video_id"], i, float(start), float(end), now],
                    )
                    con.execute(
                        "INSERT OR IGNORE INTO edges VALUES (?, ?, 'clip_of')", [rec["video_id"], clip_id]
                    )
                    if members_of:
                        con.execute("INSERT OR IGNORE INTO set_members VALUES (?, ?)", [members_of, clip_id])
                if members_of:
                    con.execute(
                        "INSERT OR IGNORE INTO set_members VALUES (?, ?)", [members_of, rec["video_id"]]
                    )

    def add_video_paths(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Further paths of content already recorded (the same video found twice)."""
        now = _now()
        with self.transaction() as con:
            for video_id, path in pairs:
                con.execute("INSERT OR IGNORE INTO video_paths VALUES (?, ?, ?)", [video_id, path, now])

    def videoset_summary(self, videoset_id: str) -> dict[str, Any]:
        """Counts for the end-of-stage summary: ok/rejected videos, clips, hours, and rejections by reason."""
        members = "(SELECT member_id FROM set_members WHERE set_id = ?)"
        row = self.query(
            f"""SELECT count(*) FILTER (WHERE status = 'ok') AS videos_ok,
                       count(*) FILTER (WHERE status = 'rejected') AS videos_rejected,
                       coalesce(sum(duration) FILTER (WHERE status = 'ok'), 0) AS seconds_ok
                FROM videos WHERE video_id IN {members}""",
            [videoset_id],
        )[0]
        row["clips"] = self.scalar(f"SELECT count(*) FROM clips WHERE clip_id IN {members}", [videoset_id])
        row["rejections"] = {
            r["reason"]: r["n"]
            for r in self.query(
                f"""SELECT reason, count(*) AS n FROM videos WHERE status = 'rejected' AND video_id IN {members}
                    GROUP BY reason ORDER BY n DESC""",
                [videoset_id],
            )
        }
        return row

    def videos(self, status: str | None = None) -> list[dict[str, Any]]:
        if status:
            return self.query("SELECT * FROM videos WHERE status = ? ORDER BY video_id", [status])
        return self.query("SELECT * FROM videos ORDER BY video_id")

    # -- captions ---------------------------------------------------------------------------------------------
    def record_captions(self, records: Iterable[Any]) -> None:
        now = _now()
        with self.transaction() as con:
            for rec in map(_as_dict, records):
                con.execute(
                    "INSERT OR IGNORE INTO captions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        rec["caption_id"],
                        rec["clip_id"],
                        rec["backend"],
                        rec.get("model"),
                        rec.get("prompt_version"),
                        rec.get("status", "ok"),
                        rec.get("reason"),
                        rec.get("caption"),
                        json.dumps(rec.get("record")) if rec.get("record") is not None else None,
                        now,
                    ],
                )
                con.execute(
                    "INSERT OR IGNORE INTO edges VALUES (?, ?, 'captioned')",
                    [rec["clip_id"], rec["caption_id"]],
                )

    def existing_ids(self, table: str, column: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        rows = self.query(f"SELECT {column} AS id FROM {table} WHERE {column} IN (SELECT unnest(?))", [ids])
        return {r["id"] for r in rows}

    # -- shards -----------------------------------------------------------------------------------------------
    def record_shard(self, shardset_id: str, shard: dict[str, Any], members: list[dict[str, Any]]) -> None:
        """A finished shard and its members, in one transaction (after the tar is renamed into place)."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    shard["shard_id"],
                    shardset_id,
                    str(shard["path"]),
                    shard["sha256"],
                    shard["n_samples"],
                    shard["bytes"],
                    _now(),
                ],
            )
            for m in members:
                con.execute(
                    "INSERT OR IGNORE INTO shard_members VALUES (?, ?, ?, ?)",
                    [shard["shard_id"], m["key"], m["clip_id"], m.get("caption_id")],
                )
                con.execute(
                    "INSERT OR IGNORE INTO edges VALUES (?, ?, 'in_shard')", [m["clip_id"], shard["shard_id"]]
                )
                if m.get("caption_id"):
                    con.execute(
                        "INSERT OR IGNORE INTO edges VALUES (?, ?, 'in_shard')",
                        [m["caption_id"], shard["shard_id"]],
                    )
            con.execute(
                "INSERT OR IGNORE INTO edges VALUES (?, ?, 'part_of')", [shard["shard_id"], shardset_id]
            )
            con.execute("INSERT OR IGNORE INTO set_members VALUES (?, ?)", [shardset_id, shard["shard_id"]])

    def shards(self, shardset_id: str | None = None) -> list[dict[str, Any]]:
        if shardset_id:
            return self.query("SELECT * FROM shards WHERE shardset_id = ? ORDER BY path", [shardset_id])
        return self.query("SELECT * FROM shards ORDER BY path")

    # -- generic artifacts, sets, edges, runs -----------------------------------------------------------------
    def artifact(self, artifact_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM artifacts WHERE artifact_id = ?", [artifact_id])
        return rows[0] if rows else None

    def latest_artifact(self, kind: str) -> str:
        """Id of the newest complete artifact of a kind: the input of a stage run on its own."""
        rows = self.query(
            "SELECT artifact_id FROM artifacts WHERE kind = ? AND status = 'complete' ORDER BY completed_at DESC LIMIT 1",
            [kind],
        )
        if not rows:
            raise LineageError(
                f"no complete {kind} in {self.path}: run the stage that makes it first (see `keye run --stages`)"
            )
        return rows[0]["artifact_id"]

    def input_of_kind(self, artifact_id: str, kind: str) -> str:
        """The input artifact of a kind that `artifact_id` was built from (e.g. a PackSet's ShardSet)."""
        rows = self.query(
            """SELECT a.artifact_id FROM edges e JOIN artifacts a ON a.artifact_id = e.src_id
               WHERE e.dst_id = ? AND e.relation = 'input_of' AND a.kind = ? ORDER BY a.completed_at DESC""",
            [artifact_id, kind],
        )
        if not rows:
            raise LineageError(f"{artifact_id} has no recorded {kind} input in {self.path}")
        return rows[0]["artifact_id"]

    def begin_artifact(
        self,
        artifact_id: str,
        kind: str,
        name: str,
        config_hash: str,
        inputs: list[str],
        path: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Register an artifact being built (status 'building'); inputs become edges. Idempotent."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR IGNORE INTO artifacts VALUES (?, ?, ?, ?, NULL, ?, 'building', ?, ?, NULL)",
                [artifact_id, kind, name, path, config_hash, json.dumps(meta or {}), _now()],
            )
            for src in inputs:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'input_of')", [src, artifact_id])

    def complete_artifact(
        self,
        artifact_id: str,
        members: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        sha256: str | None = None,
    ) -> None:
        with self.transaction() as con:
            for m in members or []:
                con.execute("INSERT OR IGNORE INTO set_members VALUES (?, ?)", [artifact_id, m])
            con.execute(
                """UPDATE artifacts SET status = 'complete', completed_at = ?, sha256 = coalesce(?, sha256)
                   WHERE artifact_id = ?""",
                [_now(), sha256, artifact_id],
            )
            if meta is not None:
                con.execute(
                    "UPDATE artifacts SET meta = ? WHERE artifact_id = ?", [json.dumps(meta), artifact_id]
                )

    def members(self, set_id: str) -> list[str]:
        return [
            r["member_id"]
            for r in self.query(
                "SELECT member_id FROM set_members WHERE set_id = ? ORDER BY member_id", [set_id]
            )
        ]

    def add_edges(self, edges: Iterable[tuple[str, str, str]]) -> None:
        with self.transaction() as con:
            for src, dst, rel in edges:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, ?)", [src, dst, rel])

    def start_run(
        self,
        run_id: str,
        kind: str,
        name: str,
        parent_run_id: str | None = None,
        prefect_flow_run_id: str | None = None,
        mlflow_run_id: str | None = None,
        config: Any = None,
    ) -> None:
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, NULL)",
                [
                    run_id,
                    kind,
                    name,
                    parent_run_id,
                    prefect_flow_run_id,
                    mlflow_run_id,
                    json.dumps(config, default=str),
                    _now(),
                ],
            )
            if parent_run_id:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'stage_of')", [run_id, parent_run_id])

    def end_run(
        self, run_id: str, status: str, outputs: list[str] | None = None, inputs: list[str] | None = None
    ) -> None:
        with self.transaction() as con:
            con.execute("UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?", [status, _now(), run_id])
            for a in inputs or []:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'input_of')", [a, run_id])
            for a in outputs or []:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'produced')", [run_id, a])

    # -- checkpoints and evals ---------------------------------------------------------------------------------
    def record_checkpoint(
        self,
        checkpoint_id: str,
        path: str,
        sha256: str,
        stage: str | None,
        step: int | None,
        run_id: str | None,
        inputs: list[str],
        meta: dict[str, Any] | None = None,
        teachers: Iterable[str] = (),
    ) -> None:
        """A checkpoint directory and what it came from (its training run, packs, and the checkpoint it started at:
        `trained_into` edges). `teachers` (a distillation's frozen teachers) get `taught` edges, so the checkpoint a
        post-trained one started from (parent_checkpoint) is never one of its teachers."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [checkpoint_id, str(path), sha256, stage, step, run_id, json.dumps(meta or {}), _now()],
            )
            for src in inputs:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'trained_into')", [src, checkpoint_id])
            for src in teachers:
                con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'taught')", [src, checkpoint_id])

    def parent_checkpoint(self, checkpoint_id: str, stages: Iterable[str]) -> dict[str, Any] | None:
        """The checkpoint this one was trained from (checkpoint_id, path, stage), when this one was made by one of
        `stages`: what a post-training stage (video_rl, ...) is compared with."""
        rows = self.query(
            """SELECT p.checkpoint_id, p.path, p.stage FROM checkpoints c
               JOIN edges e ON e.dst_id = c.checkpoint_id AND e.relation = 'trained_into'
               JOIN checkpoints p ON p.checkpoint_id = e.src_id
               WHERE c.checkpoint_id = ? AND c.stage IN (SELECT unnest(?))
               ORDER BY p.created_at DESC LIMIT 1""",
            [checkpoint_id, list(stages)],
        )
        return rows[0] if rows else None

    def checkpoint(self, checkpoint_id: str) -> dict[str, Any] | None:
        """The recorded checkpoint (checkpoint_id, path, stage), or None."""
        rows = self.query(
            "SELECT checkpoint_id, path, stage FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id]
        )
        return rows[0] if rows else None

    def child_checkpoint(self, checkpoint_id: str, stage: str) -> dict[str, Any] | None:
        """The newest checkpoint that `stage` trained from this one (checkpoint_id, path), or None."""
        rows = self.query(
            """SELECT c.checkpoint_id, c.path FROM checkpoints c
               JOIN edges e ON e.dst_id = c.checkpoint_id AND e.relation = 'trained_into'
               WHERE e.src_id = ? AND c.stage = ? ORDER BY c.created_at DESC LIMIT 1""",
            [checkpoint_id, stage],
        )
        return rows[0] if rows else None

    def latest_checkpoint_path(self) -> str:
        """The newest checkpoint of the mainline: a branch stage's (BRANCH_STAGES) is not what a later stage run
        alone should build on."""
        marks = ", ".join("?" for _ in BRANCH_STAGES)
        rows = self.query(
            "SELECT path FROM checkpoints WHERE stage IS NOT NULL AND stage NOT IN "
            f"({marks}) ORDER BY created_at DESC LIMIT 1",
            list(BRANCH_STAGES),
        )
        if not rows:
            raise LineageError(f"no trained checkpoint in {self.path}: run the train stage first")
        return rows[0]["path"]

    def checkpoint_id_for(self, path: str | Path, sha256: str) -> str:
        """The recorded checkpoint at `path` with that content, or a new row for a checkpoint from elsewhere."""
        rows = self.query(
            "SELECT checkpoint_id FROM checkpoints WHERE path = ? AND sha256 = ?",
            [str(Path(path).resolve()), sha256],
        )
        if rows:
            return rows[0]["checkpoint_id"]
        ckpt_id = make_id("k", sha256)
        self.record_checkpoint(ckpt_id, str(Path(path).resolve()), sha256, None, None, None, [])
        return ckpt_id

    def record_evals(
        self, eval_id: str, checkpoint_id: str, results: dict[str, dict[str, Any]], path: str
    ) -> None:
        with self.transaction() as con:
            for bench, metrics in results.items():
                con.execute(
                    "INSERT OR REPLACE INTO evals VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        eval_id,
                        bench,
                        checkpoint_id,
                        metrics.get("kind"),
                        json.dumps(metrics, default=str),
                        path,
                        _now(),
                    ],
                )
            con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'evaluated_by')", [checkpoint_id, eval_id])

    def evals_of(self, eval_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM evals WHERE eval_id = ? ORDER BY bench", [eval_id])

    def previous_eval_metrics(self, checkpoint_id: str, benches: list[str]) -> dict[str, dict[str, Any]]:
        """Metrics of the most recent eval of another checkpoint, per bench (the report's "vs previous")."""
        rows = self.query(
            """SELECT bench, metrics FROM evals WHERE checkpoint_id <> ? AND bench IN (SELECT unnest(?))
               QUALIFY row_number() OVER (PARTITION BY bench ORDER BY created_at DESC) = 1""",
            [checkpoint_id, benches],
        )
        return {r["bench"]: json.loads(r["metrics"]) for r in rows}

    # -- walking the graph ------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> dict[str, Any]:
        """An id, or a path (video, shard, checkpoint, artifact), to its node row."""
        rows = self.query("SELECT * FROM nodes WHERE id = ?", [ref])
        if rows:
            return rows[0]
        p = str(Path(ref).expanduser().resolve()) if not ref.startswith(("s3:", "gs:", "http")) else ref
        for sql in (
            "SELECT video_id AS id FROM video_paths WHERE path = ? OR path = ?",
            "SELECT shard_id AS id FROM shards WHERE path = ? OR path = ?",
            "SELECT checkpoint_id AS id FROM checkpoints WHERE path = ? OR path = ?",
            "SELECT artifact_id AS id FROM artifacts WHERE path = ? OR path = ?",
        ):
            hit = self.query(sql, [ref, p])
            if hit:
                return self.query("SELECT * FROM nodes WHERE id = ?", [hit[0]["id"]])[0]
        prefix = (
            self.query("SELECT * FROM nodes WHERE id LIKE ? LIMIT 2", [ref + "%"]) if len(ref) >= 6 else []
        )
        if len(prefix) == 1:
            return prefix[0]
        raise LineageError(
            f"{ref!r} is not a known artifact id or path in {self.path} "
            "(ids look like v…, c…, k…, s…; paths must be given as recorded)"
        )

    def _walk(self, node_id: str, upstream: bool) -> list[dict[str, Any]]:
        a, b = ("src_id", "dst_id") if upstream else ("dst_id", "src_id")
        return self.query(
            f"""WITH RECURSIVE walk(id, depth) AS (
                    SELECT ?::TEXT, 0
                    UNION
                    SELECT e.{a}, w.depth + 1 FROM edges e JOIN walk w ON e.{b} = w.id WHERE w.depth < 64)
                SELECT n.id, n.kind, n.label, min(w.depth) AS depth FROM walk w JOIN nodes n ON n.id = w.id
                WHERE w.id <> ? GROUP BY n.id, n.kind, n.label ORDER BY depth, n.kind, n.id""",
            [node_id, node_id],
        )

    def upstream(self, ref: str) -> list[dict[str, Any]]:
        """Everything `ref` came from (e.g. a shard's clips, captions and source videos)."""
        return self._walk(self.resolve(ref)["id"], upstream=True)

    def downstream(self, ref: str) -> list[dict[str, Any]]:
        """Everything that used `ref` (e.g. the clips, shards, packs and checkpoints a video fed)."""
        return self._walk(self.resolve(ref)["id"], upstream=False)

    # -- crash recovery ------------------------------------------------------------------------------------
    def mark_killed(self, reason: str, keep: set[str]) -> list[dict[str, Any]]:
        """Runs left `running` by a dead process (all but `keep`) -> `killed`, the reason in `run_notes`."""
        with self.transaction() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS run_notes "
                "(run_id TEXT NOT NULL, note TEXT NOT NULL, reason TEXT, noted_at TIMESTAMP)"
            )
            rows = con.execute(
                "SELECT run_id, kind, name, mlflow_run_id FROM runs WHERE status = 'running' ORDER BY started_at"
            ).fetchall()
            cols = ("run_id", "kind", "name", "mlflow_run_id")
            stale = [dict(zip(cols, r, strict=True)) for r in rows if r[0] not in keep]
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            for r in stale:
                con.execute(
                    "UPDATE runs SET status = 'killed', ended_at = ? WHERE run_id = ?", [now, r["run_id"]]
                )
                con.execute("INSERT INTO run_notes VALUES (?, 'killed', ?, ?)", [r["run_id"], reason, now])
        return stale

    # -- what `keye verify` reads ---------------------------------------------------------------------------
    def shard_member_keys(self, shard_id: str) -> list[str]:
        """The sample keys lineage says a shard holds, sorted."""
        rows = self.query("SELECT key FROM shard_members WHERE shard_id = ? ORDER BY key", [shard_id])
        return [r["key"] for r in rows]

    def hashed_checkpoints(self) -> list[dict[str, Any]]:
        """Final checkpoints with the sha256 recorded when they were written."""
        return self.query(
            "SELECT checkpoint_id, path, sha256 FROM checkpoints WHERE sha256 IS NOT NULL ORDER BY checkpoint_id"
        )

    def table_rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of one artifact table (for comparing two workspaces)."""
        if table not in ("videos", "clips", "captions"):
            raise ValueError(f"table_rows: {table!r} is not an artifact table")
        return self.query(f"SELECT * FROM {table}")

    # -- what the stages read and write (the SQL of the stages lives here, nowhere else) --------------------
    def clip_rows(self, videoset_id: str) -> list[dict[str, Any]]:
        """The 'ok' clips of a VideoSet with their video's path and format, in video and clip order."""
        return self.query(
            """SELECT c.clip_id, c.video_id, c.start_s, c.end_s, v.path, v.fps, v.width, v.height
               FROM clips c JOIN videos v USING (video_id)
               WHERE c.clip_id IN (SELECT member_id FROM set_members WHERE set_id = ?) AND c.status = 'ok'
               ORDER BY c.video_id, c.idx""",
            [videoset_id],
        )

    def paths_of_videos(self, video_ids: list[str]) -> dict[str, list[str]]:
        """video_id -> every path its content was found at, sorted."""
        rows = self.query(
            """SELECT video_id, list(path ORDER BY path) AS paths FROM video_paths
               WHERE video_id IN (SELECT unnest(?)) GROUP BY video_id""",
            [sorted(set(video_ids))],
        )
        return {r["video_id"]: r["paths"] for r in rows}

    def caption_counts(self, captionset_id: str) -> dict[str, int]:
        """status -> number of captions in a CaptionSet."""
        rows = self.query(
            """SELECT status, count(*) AS n FROM captions
               WHERE caption_id IN (SELECT member_id FROM set_members WHERE set_id = ?) GROUP BY status""",
            [captionset_id],
        )
        return {r["status"]: r["n"] for r in rows}

    def captioned_clip_rows(self, captionset_id: str) -> list[dict[str, Any]]:
        """Clips with an 'ok' caption in a CaptionSet: caption record, clip span, source video."""
        return self.query(
            """SELECT k.caption_id, k.record, c.clip_id, c.start_s, c.end_s, v.video_id, v.sha256, v.path
               FROM captions k JOIN clips c USING (clip_id) JOIN videos v ON v.video_id = c.video_id
               WHERE k.caption_id IN (SELECT member_id FROM set_members WHERE set_id = ?) AND k.status = 'ok'""",
            [captionset_id],
        )

    def completion_of(self, ids: list[str]) -> list[dict[str, Any]]:
        """(id, status, ts) of artifacts and evals among ids: when (and whether) each was completed."""
        return self.query(
            """SELECT artifact_id AS id, status, completed_at AS ts FROM artifacts WHERE artifact_id IN (SELECT unnest(?))
               UNION ALL SELECT eval_id, 'complete', max(created_at) FROM evals WHERE eval_id IN (SELECT unnest(?))
               GROUP BY eval_id""",
            [ids, ids],
        )

    def producer_mlflow_run(self, artifact_id: str, other_than: str) -> str | None:
        """The MLflow run of the (first) stage run, other than `other_than`, that produced the artifact."""
        rows = self.query(
            """SELECT r.mlflow_run_id FROM edges e JOIN runs r ON r.run_id = e.src_id
               WHERE e.relation = 'produced' AND e.dst_id = ? AND r.run_id <> ? ORDER BY r.started_at LIMIT 1""",
            [artifact_id, other_than],
        )
        return rows[0]["mlflow_run_id"] if rows else None

    def record_packs(self, packset_id: str, packs: list[dict[str, Any]]) -> None:
        """One row per pack (pack_id, n_samples, tokens, fill, shard_ids), its shards -> pack edges and the
        pack -> PackSet edge."""
        with self.transaction() as con:
            for p in packs:
                con.execute(
                    "INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, ?, NULL)",
                    [p["pack_id"], packset_id, p["n_samples"], p["tokens"], p["fill"]],
                )
                for shard_id in p["shard_ids"]:
                    con.execute(
                        "INSERT OR IGNORE INTO edges VALUES (?, ?, 'packed_into')", [shard_id, p["pack_id"]]
                    )
                con.execute(
                    "INSERT OR IGNORE INTO edges VALUES (?, ?, 'part_of')", [p["pack_id"], packset_id]
                )


def video_id_for(sha256: str | None, path: str) -> str:
    """A video is its content: the same bytes under two paths are one video."""
    return "v" + (sha256[:16] if sha256 else hashlib.sha256(f"path:{path}".encode()).hexdigest()[:16])


def clip_id_for(video_id: str, start: float, end: float) -> str:
    return make_id("c", video_id, round(float(start), 3), round(float(end), 3))
