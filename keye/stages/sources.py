"""Where videos come from: a folder, a glob, an fsspec URL, a manifest file, or the embedded synthetic set.

Remote files (any fsspec URL that is not local) are copied into the workspace cache first, so decoding and
hashing always read a local file and a re-run does not download again.
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from keye.core.atomic import atomic_dir, atomic_path
from keye.core.config import IngestSettings, PathSource, SyntheticSource
from keye.core.workspace import Workspace

MANIFEST_SUFFIXES = {".txt", ".jsonl", ".csv", ".lst"}


class SourceError(ValueError):
    """A source that cannot be read at all (as opposed to a bad video inside it, which is rejected and recorded)."""


@dataclass(frozen=True)
class FileRef:
    """A local file to ingest; size and mtime make cache keys change when the file changes."""

    path: str
    size: int
    mtime_ns: int
    source: str
    problem: str | None = None  # why it cannot be read (a symlink loop, permission denied): ingest rejects it


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _ref(path: str, source: str) -> FileRef:
    """A listed entry as a FileRef; one that cannot be read carries the reason instead of failing the listing."""
    problem = entry_problem(path)
    if problem is not None:
        return FileRef(os.path.abspath(path), -1, 0, source, problem)
    if not os.path.exists(path):  # listed in a manifest but missing: kept, ingest records it as rejected
        return FileRef(str(Path(path).resolve()), -1, 0, source)
    st = os.stat(path)
    return FileRef(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, source)


def _wanted(path: str, settings: IngestSettings) -> bool:
    return Path(path).suffix.lower() in {e.lower() for e in settings.extensions}


def entry_problem(path: str) -> str | None:
    """Why a listed path cannot be ingested (a reason for its rejection), or None when it is a readable file or a
    plain missing file (ingest words that one itself). Never raises: one bad entry must not stop the others."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link points back to itself through other links)"
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied: cannot reach the file ({e.strerror})"
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            return f"broken symlink: its target {os.readlink(path)!r} does not exist"
        if isinstance(e, FileNotFoundError):
            return None
        return f"cannot stat the file: {e.strerror or e}"
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            return "permission denied: cannot list the folder"
        return None
    if not os.access(path, os.R_OK):
        return "permission denied: cannot read the file"
    return None


def _loops(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def list_folder(root: Path, settings: IngestSettings, recursive: bool) -> list[str]:
    """Video files under `root`, plus the entries that look like videos or folders but cannot be read (symlink
    loops, broken links, unreadable folders), which are kept so that ingest records them as rejected."""
    found: list[str] = []

    def unreadable(e: OSError) -> None:
        if e.filename and os.path.abspath(e.filename) != os.path.abspath(root):
            found.append(e.filename)
        elif e.filename:
            raise SourceError(f"source {root}: cannot list the folder: {e.strerror or e}") from e

    for dirpath, dirs, names in os.walk(root, onerror=unreadable):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            f = os.path.join(dirpath, name)
            if os.path.isfile(f):
                if _wanted(f, settings):
                    found.append(f)
            elif _wanted(f, settings) or _loops(f):
                found.append(f)  # a link that loops or dangles: reported, not silently skipped
        if not recursive:
            for d in list(dirs):
                if not os.access(os.path.join(dirpath, d), os.R_OK | os.X_OK):
                    found.append(os.path.join(dirpath, d))
            dirs.clear()
    return found


def _manifest_entries(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f'{path}:{i}: not valid JSON ({e}); each line needs {{"path": ...}}') from e
            if "path" not in row:
                raise SourceError(f"{path}:{i}: missing field 'path'")
            out.append(str(row["path"]))
        return out
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "path" not in rows[0]:
            raise SourceError(f"{path}: the CSV needs a 'path' column (found {list(rows[0])})")
        return [r["path"] for r in rows if r.get("path")]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _fetch_remote(url: str, ws: Workspace) -> str:
    """Copy once per (URL, remote size/mtime/etag): a changed remote file is fetched again, an unchanged one not."""
    import fsspec

    name = Path(url.split("?")[0]).name or "video"
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    stamp = [info.get(k) for k in ("size", "mtime", "LastModified", "ETag", "created", "etag")]
    key = hashlib.sha256(json.dumps([url, stamp], default=str).encode()).hexdigest()[:16]
    dest = ws.cache / "remote" / key / name
    if dest.exists():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fsspec.open(url, "rb") as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return str(dest)


def _expand_url(url: str, settings: IngestSettings, ws: Workspace) -> list[str]:
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    found: list[str] = []
    for p in paths:
        if fs.isdir(p):
            found += [f for f in fs.find(p) if _wanted(f, settings)]
        else:
            found.append(p)
    if protocol in ("file", "local"):
        return found
    return [_fetch_remote(f"{protocol}://{p}" if "://" not in p else p, ws) for p in sorted(found)]


def list_path_source(src: PathSource, settings: IngestSettings, ws: Workspace) -> list[FileRef]:
    """Expand one user source into local files (sorted, so runs are deterministic)."""
    spec = src.path
    label = spec
    if _is_url(spec):
        files = _expand_url(spec, settings, ws)
    else:
        p = Path(spec.removeprefix("file://")).expanduser()
        if any(ch in spec for ch in "*?["):
            files = [f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f) or _loops(f)]
        elif p.is_dir():
            files = list_folder(p, settings, src.recursive)
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            base = p.parent
            files = []
            for entry in _manifest_entries(p):
                if _is_url(entry):
                    files += _expand_url(entry, settings, ws)
                else:
                    e = Path(entry).expanduser()
                    files.append(str(e if e.is_absolute() else base / e))
        elif p.is_file():
            files = [str(p)]
        else:
            raise SourceError(
                f"source {spec!r} does not exist: give an existing folder, a glob, an fsspec URL or a manifest "
                f"file ({', '.join(sorted(MANIFEST_SUFFIXES))})"
            )
    return [_ref(f, label) for f in sorted(set(files))]


def synthetic_dir(src: SyntheticSource, ws: Workspace) -> Path:
    """The set's folder, named by everything that changes its files (a set is generated once per name)."""
    from keye.datasets.synthetic import GENERATOR_VERSION

    name = f"synthetic-v{GENERATOR_VERSION}-seed{src.seed}-n{src.n_videos}-long{src.n_long}"
    defaults = SyntheticSource.model_fields
    if src.heldout_fraction != defaults["heldout_fraction"].default:
        name += f"-heldout{src.heldout_fraction:g}"
    if src.max_objects != defaults["max_objects"].default:
        name += f"-objects{src.max_objects}"
    if src.color_changes != defaults["color_changes"].default:
        name += "-nocolorchange"
    return ws.videos / name


def materialise_synthetic(src: SyntheticSource, ws: Workspace) -> Path:
    """Generate the synthetic set once; a crash mid-generation leaves only a temp dir that is discarded."""
    from keye.datasets.synthetic import generate_dataset

    final = synthetic_dir(src, ws)
    if final.is_dir():
        return final
    with atomic_dir(final) as tmp:
        generate_dataset(
            tmp, **src.model_dump(exclude={"kind"})
        )  # every field of the source is a generator setting
    return final


def materialise_probe(src: SyntheticSource, n_probe: int, ws: Workspace) -> Path:
    """The eval's grounding probe for a synthetic source (keye.datasets.synthetic.probe_specs), generated once into
    `<its set folder>-probe<n>`; a crash mid-generation leaves only a temp dir that is discarded."""
    from keye.datasets.synthetic import probe_specs, write_specs

    set_dir = synthetic_dir(src, ws)
    final = set_dir.with_name(f"{set_dir.name}-probe{n_probe}")
    if final.is_dir():
        return final
    specs = probe_specs(src.n_videos, n_probe, src.seed, src.max_objects, src.color_changes)
    with atomic_dir(final) as tmp:
        write_specs(tmp, specs)
    return final


def list_sources(sources: list, settings: IngestSettings, ws: Workspace) -> list[FileRef]:
    files: list[FileRef] = []
    for src in sources:
        if isinstance(src, SyntheticSource):
            d = materialise_synthetic(src, ws)
            files += list_path_source(PathSource(path=str(d)), settings, ws)
        else:
            files += list_path_source(src, settings, ws)
    seen: set[str] = set()
    unique = []
    for f in files:
        if f.path not in seen:
            seen.add(f.path)
            unique.append(f)
    return unique
