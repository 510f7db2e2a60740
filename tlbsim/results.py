"""Result: the tidy DataFrames of one run, its summary, and save/load as
Parquet tables with a JSON manifest (config, seed, version, git revision)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tlbsim import __version__

TABLES = ("shootdowns", "vps", "exits", "vf")
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
    shootdowns: pd.DataFrame
    vps: pd.DataFrame
    exits: pd.DataFrame
    summary: pd.Series
    config: dict = field(default_factory=dict)
    seed: int = 0
    vf: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per PF call (empty: VF model off)

    def manifest(self) -> dict:
        return {
            "tlbsim_version": __version__,
            "git_revision": git_revision(),
            "seed": self.seed,
            "config": self.config,
            "summary": {k: (None if isinstance(v, float) and v != v else v) for k, v in self.summary.items()},
            "kind": "tlbsim-run",
            "tables": {name: f"{name}.parquet" for name in TABLES},
        }

    def save(self, directory: str | Path) -> Path:
        """Write every table and the manifest atomically (each file is
        written to a temporary name and renamed into place)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            atomic_write_parquet(getattr(self, name), directory / f"{name}.parquet")
        atomic_write_text(directory / MANIFEST, json.dumps(self.manifest(), indent=2, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Result:
        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        tables = {name: pd.read_parquet(directory / f"{name}.parquet") for name in TABLES
                  if (directory / f"{name}.parquet").exists() or name != "vf"}
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


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
