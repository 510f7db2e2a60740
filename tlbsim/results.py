"""Result: the tidy DataFrames of one run, its summary, and save/load as
Parquet tables with a JSON manifest (config, seed, version, git revision)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tlbsim import __version__

TABLES = ("shootdowns", "vps", "exits", "vf", "partitions")
OPTIONAL_TABLES = ("vf", "partitions")  # a run saved before they existed loads without them
MANIFEST = "manifest.json"


def git_revision(cwd: str | Path | None = None) -> str:
    """The git revision of the tlbsim source tree, or "unknown"."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        if out.returncode != 0 or not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Result:
    """One run's tables and summary. A run simulated with ``spill_dir`` (runner.simulate) has its
    shootdown table on disk only: ``shootdowns`` holds just the columns the summary needed and
    ``shootdowns_file`` the whole table, which ``save`` moves into place."""

    shootdowns: pd.DataFrame
    vps: pd.DataFrame
    exits: pd.DataFrame
    summary: pd.Series
    config: dict = field(default_factory=dict)
    seed: int = 0
    vf: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per PF call (empty: VF model off)
    shootdowns_file: Path | None = None  # the whole shootdown table, when it was spilled
    partitions: pd.DataFrame = field(default_factory=pd.DataFrame)  # one summary row per guest partition

    def table_names(self) -> tuple[str, ...]:
        """The tables this run writes: ``vf`` only when the VF model was on (``vf.count`` > 0)."""
        vf_on = bool((self.config.get("vf") or {}).get("count", 0)) or len(self.vf) > 0
        return tuple(name for name in TABLES if name != "vf" or vf_on)

    def manifest(self) -> dict:
        return {
            "tlbsim_version": __version__,
            "git_revision": git_revision(),
            "seed": self.seed,
            "config": self.config,
            "summary": {k: (None if isinstance(v, float) and v != v else v) for k, v in self.summary.items()},
            "kind": "tlbsim-run",
            "tables": {name: f"{name}.parquet" for name in self.table_names()},
        }

    def save(self, directory: str | Path) -> Path:
        """Write every table (``table_names``: no vf.parquet without VFs) and the manifest atomically
        (each file is written to a temporary name and renamed into place)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = self.table_names()
        for name in set(TABLES) - set(names):  # an earlier run's (--force): it is not this run's table
            (directory / f"{name}.parquet").unlink(missing_ok=True)
        for name in names:
            if name == "shootdowns" and self.shootdowns_file is not None:
                target = directory / "shootdowns.parquet"
                source = Path(self.shootdowns_file)
                if source.resolve() == target.resolve():
                    continue
                if source.parent.resolve() == directory.resolve():  # its own directory: moved into place
                    os.replace(source, target)
                    self.shootdowns_file = target
                else:  # elsewhere: copied (the spilled file stays the Result's own)
                    atomic_copy(source, target)
                continue
            atomic_write_parquet(getattr(self, name), directory / f"{name}.parquet")
        atomic_write_text(directory / MANIFEST, json.dumps(self.manifest(), indent=2, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Result:
        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        tables = {name: pd.read_parquet(directory / f"{name}.parquet") for name in TABLES
                  if (directory / f"{name}.parquet").exists() or name not in OPTIONAL_TABLES}
        return cls(summary=pd.Series(manifest["summary"], dtype=object), config=manifest["config"],
                   seed=manifest["seed"], **tables)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: mode of the files we write: what open() would give (0666 less the umask), not mkstemp's 0600
FILE_MODE = 0o666 & ~_umask()


def writable_directory(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove it writable now (before a long run), or raise OSError."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".tlbsim-probe.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)
    return directory


def manifest_kind(manifest: Path) -> str | None:
    """The ``kind`` a tlbsim manifest.json declares ("?" if it declares none), or None if it cannot be
    read as one."""
    import json

    from tlbsim.config import ConfigError, read_text

    try:
        return json.loads(read_text(manifest, "manifest")).get("kind", "?")
    except (ConfigError, ValueError, AttributeError):
        return None


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temporary files a run killed while writing into ``directory`` (or its
    ``replication-R/``) left behind: only names tlbsim gives its own temporary files (a spilled
    shootdown table, an atomic write of a table or manifest, a writability probe)."""
    directory = Path(directory)
    names = [*(f"{t}.parquet" for t in TABLES), "replications.parquet", MANIFEST]
    patterns = [".shootdowns.partial.*.tmp", ".tlbsim-probe.*.tmp", *(f".{n}.*.tmp" for n in names)]
    removed = []
    for folder in [directory, *sorted(directory.glob("replication-*"))]:
        for pattern in patterns:
            for f in folder.glob(pattern):
                if f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
                    removed.append(f)
    return removed


@contextmanager
def _replacing(path: Path):
    """A temporary file beside ``path`` for the caller to write: on success it replaces ``path``
    (with FILE_MODE), on any failure it goes and ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with _replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    with _replacing(path) as tmp:
        df.to_parquet(tmp, index=False)


def atomic_copy(source: Path, path: Path) -> None:
    with _replacing(path) as tmp:
        shutil.copyfile(source, tmp)


class ShootdownSpill:
    """The I/O half of a spilled run (records.ShootdownRecorder's ``spill``): each chunk of rows the
    recorder hands over becomes a row group of a hidden Parquet file in ``directory``; ``finish``
    adds the columns a late deferred flush could still change and writes the table, row group by
    row group, under a temporary name (``path``), so memory holds one row group at a time.
    ``discard`` removes what it wrote (a run that failed)."""

    def __init__(self, directory: str | Path, rows_per_group: int = 1 << 16):
        self.rows_per_group = rows_per_group  # rows the recorder hands over at a time (one row group each)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=directory, prefix=".shootdowns.partial.", suffix=".tmp")
        os.close(fd)
        fd, final = tempfile.mkstemp(dir=directory, prefix=".shootdowns.parquet.", suffix=".tmp")
        os.close(fd)
        self.partial, self.path = Path(partial), Path(final)
        self._writer = None

    def __call__(self, columns: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from tlbsim.records import column

        if self._writer is not None and not len(columns["id"]):
            return  # the last, empty remainder
        table = pa.Table.from_pandas(pd.DataFrame({c: column(v) for c, v in columns.items()}, copy=False),
                                     preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.partial, table.schema)
        self._writer.write_table(table)

    def finish(self, patched: dict, column_order, summary_columns) -> tuple[Path, pd.DataFrame]:
        """Write the whole table (columns in ``column_order``; ``patched``: name -> array of every
        row) to ``self.path``, one row group at a time, and return it with a frame of the
        ``summary_columns`` of every row (gathered on the way: the table is not read twice)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is not None:
            self._writer.close()
        source = pq.ParquetFile(self.partial)
        patched = {c: np.frombuffer(v, dtype=np.float64) for c, v in patched.items()}
        total = source.metadata.num_rows
        gathered: dict[str, np.ndarray] = {}  # summary column -> its values (or codes) for every row
        categories: dict[str, dict[str, int]] = {}  # categorical summary column -> value -> code
        writer, start = None, 0
        try:
            for i in range(source.num_row_groups):
                table = source.read_row_group(i).replace_schema_metadata(None)
                n = table.num_rows
                for c, values in patched.items():
                    table = table.append_column(c, pa.array(values[start:start + n]))
                table = table.select(list(column_order))
                if writer is None:
                    writer = pq.ParquetWriter(self.path, table.schema)
                writer.write_table(table)
                for c in summary_columns:
                    _gather(table.column(c).to_pandas(), c, gathered, categories, start, total)
                start += n
        finally:
            if writer is not None:
                writer.close()
            source.close()
        self.partial.unlink(missing_ok=True)
        os.chmod(self.path, FILE_MODE)
        columns = {c: (pd.Categorical.from_codes(gathered[c], categories=list(categories[c])) if c in categories
                       else gathered[c]) if c in gathered else np.array([]) for c in summary_columns}
        pa.default_memory_pool().release_unused()
        return self.path, pd.DataFrame(columns, copy=False)

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.partial.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def _gather(values: pd.Series, name: str, gathered: dict, categories: dict, start: int, total: int) -> None:
    """Put one row group's ``values`` of a column at rows ``start``.. of a preallocated array (one
    copy of the column in memory, not a list of chunks and their concatenation); a categorical's
    codes are renumbered into one category list kept in first-seen order."""
    import numpy as np

    n = len(values)
    if isinstance(values.dtype, pd.CategoricalDtype):
        table = categories.setdefault(name, {})
        remap = np.array([table.setdefault(v, len(table)) for v in values.cat.categories], dtype=np.int8)
        codes = values.cat.codes.to_numpy()
        if name not in gathered:
            gathered[name] = np.empty(total, dtype=np.int8)
        gathered[name][start:start + n] = np.where(codes < 0, -1, remap[codes]) if len(remap) else codes
        return
    array_ = values.to_numpy()
    if name not in gathered:
        gathered[name] = np.empty(total, dtype=array_.dtype)
    gathered[name][start:start + n] = array_
