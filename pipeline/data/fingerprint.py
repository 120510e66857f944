"""A dataset's fingerprint, saved in every diffusion checkpoint, so `--resume` notices when the
images under a run changed.

A folder is fingerprinted by its image files' sorted relative names and sizes: not their
modification times (copying a folder to or from Google Drive changes them) and not their bytes
(hashing a large folder at every start would cost minutes). So the same files moved to another
path (Drive → the Colab VM's local disk) have the same fingerprint. The built-in synthetic set is
fingerprinted by the settings that draw it; a prepare-data cache (a .npz, or a folder holding
dataset.npz, which is what gets loaded then) by its bytes, which the same frames and settings
always reproduce (a cache is one file: hashing it costs about a second per GB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.common.config import DataConfig
from pipeline.common.files import sha256_file
from pipeline.data.folders import list_image_files
from pipeline.data.prepared import cache_file, read_labels

SHOWN = 3  # file names shown per kind of change


def dataset_fingerprint(data: DataConfig) -> dict:
    """{'path', 'count', 'sha256'} of the dataset `data` names, plus what the sha256 covers:
    'settings' (synthetic: count, seed, defects, image size, channels), 'cache' (a prepare-data
    cache: its file name; the hash is of its bytes) or 'files' (a folder: one
    'relative/name<TAB>size' line per image file)."""
    if data.path == "synthetic":
        settings = {"count": data.synthetic_count, "seed": data.seed, "defects": data.synthetic_defects,
                    "image_size": data.image_size, "channels": data.channels}
        text = json.dumps(settings, sort_keys=True)
        return {"path": data.path, "count": data.synthetic_count, "sha256": _sha256(text), "settings": settings}
    prepared = cache_file(data.path)
    if prepared is not None:
        return {"path": data.path, "count": len(read_labels(prepared)), "sha256": sha256_file(prepared),
                "cache": prepared.name}
    folder = Path(data.path)
    files = list_image_files(folder, report_skipped=False)  # loading the images reports them
    text = "".join(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}\n" for p in files)
    return {"path": data.path, "count": len(files), "sha256": _sha256(text), "files": text}


def dataset_changes(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, as short phrases; empty when the images are the same
    (wherever they now are)."""
    if saved["sha256"] == now["sha256"]:
        return []
    changes = []
    if saved["path"] != now["path"]:
        changes.append(f"data.path {saved['path']!r} → {now['path']!r}")
    if saved["count"] != now["count"]:
        changes.append(f"{saved['count']} → {now['count']} images")
    if "settings" in saved and "settings" in now:
        changes += [f"synthetic {key} {value!r} → {now['settings'].get(key)!r}"
                    for key, value in saved["settings"].items() if key != "count" and now["settings"].get(key) != value]
    if "files" in saved and "files" in now:
        changes += _file_changes(_sizes(saved["files"]), _sizes(now["files"]))
    return changes or ["the image files differ"]


def _file_changes(old: dict[str, int], new: dict[str, int]) -> list[str]:
    """'added …', 'removed …', 'changed size …', each naming the first few files."""
    groups = (("added", sorted(new.keys() - old.keys())), ("removed", sorted(old.keys() - new.keys())),
              ("changed size", sorted(k for k in old.keys() & new.keys() if old[k] != new[k])))
    return [f"{what} {_first_few(names)}" for what, names in groups if names]


def _first_few(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _sizes(listing: str) -> dict[str, int]:
    pairs = (line.rsplit("\t", 1) for line in listing.splitlines())
    return {name: int(size) for name, size in pairs}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
