"""`identity-check`: are generated irises distinct identities, and not copies of training eyes?

Every image of a set (a folder, or a prepare-data cache: `dataset.npz` or a folder holding one) is
reduced to Daugman's iris code (`pipeline.check.iris_code`: rubber sheet, log-Gabor phase bits and
a mask of the usable ones) in a process pool. An image without a code stays a row with its reason:
  unreadable               the file does not decode as an image
  no pupil                 circularity-check's measurement finds no dark pupil
  no iris boundary         … finds no limbus around it
  too little iris visible  under a quarter of the code's bits are usable (lids, lashes, glints)
Images of different sizes are compared all the same (every code has the `identity.grid` shape),
but the summary says so: a smaller iris fills the grid with fewer pixels.

Two codes are compared by the fractional Hamming distance HD over the bits both masks allow, least
over ±`identity.max_shift` angular shifts (`pipeline.check.hamming`). Reported:
  impostor distribution    of the generated images (and, with a reference, of the real ones): HDs
                           of pairs of different images. All n(n − 1)/2 pairs, or when they are more
                           than `identity.max_pairs`, all pairs within the groups of a seeded random
                           partition of the images, the group size chosen so that at most max_pairs
                           pairs are compared: every image takes part in about 2·max_pairs/n pairs,
                           and each group is compared in one vectorised call. Mean p, standard
                           deviation σ (population), min, Daugman's degrees of freedom
                           N = p(1 − p)/σ², and the pairs below the near-copy threshold (one eye
                           twice).
  nearest training image   of each generated one (with training images): least HD over all of them,
                           and a near-copy when below `identity.near_copy_hd` (Daugman's 0.32).
With `identity.rescale` the HDs are Daugman's rescaled HD = 0.5 − (0.5 − HD_raw)·√(n / n_typ), n
the bits compared: a score from fewer bits than usual is pulled towards 0.5, so a small overlap
cannot pass for a match. Daugman's n_typ = 911 is the typical overlap of his 2048-bit code; a
(16, 256) code of a 128 px eye overlaps in some 6000 correlated bits, and 911 would stretch every
score away from 0.5 (impostors down to 0.2). So n_typ is the median bits compared over the
reference set's impostor pairs (else the generated ones, else the nearest-training pairs), one value
for the whole run (`typical_bits` in summary.json), the same for every run against one reference: a
typical pair keeps its raw HD, and an exact copy with
more usable bits than that scores a little below 0.

With more than one worker the processes come from a fork server, which imports the caller's main
module: scripts calling this need the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import identity_report as report
from pipeline.check.folder import find_images, read_image
from pipeline.check.hamming import degrees_of_freedom, pairwise_hamming, rescaled_hd
from pipeline.check.iris_code import IrisCode, code_image
from pipeline.common.config import CircularityConfig, IdentityConfig
from pipeline.common.errors import UserError
from pipeline.common.pool import chunked_map, resolve_workers
from pipeline.data.prepared import cache_file, read_cache
from pipeline.identity_report import Scores

log = logging.getLogger(__name__)

UNREADABLE = "unreadable"
REASONS = (UNREADABLE, "no pupil", "no iris boundary", "too little iris visible")
NEAREST_BLOCK = 256  # generated codes compared with the whole training set per call


@dataclass
class ImageSet:
    """The images of one set: files under a folder, or the pixels (N, C, H, W) of a prepare-data
    cache (`names` then its labels' files)."""

    label: str  # generated | train | reference
    path: Path
    names: list[str]
    pixels: np.ndarray | None = None

    def source(self, i: int) -> Path | np.ndarray:
        """Image i as its file, or as HW / HWC pixels from the cache."""
        if self.pixels is None:
            return self.path / self.names[i]
        chw = self.pixels[i]
        return chw[0] if chw.shape[0] == 1 else np.transpose(chw, (1, 2, 0))

    def image(self, i: int) -> np.ndarray:
        """Image i's pixels (HW / HWC); ValueError when its file does not decode."""
        return _pixels(self.source(i))


def _pixels(source: Path | np.ndarray) -> np.ndarray:
    """An image's pixels from its file (decoded; ValueError when it does not) or as they are."""
    return read_image(source) if isinstance(source, Path) else source


@dataclass
class CodedSet:
    """A set's rows for codes.csv (one per image) and its usable codes, with their images' indices."""

    images: ImageSet
    rows: list[dict]
    codes: list[IrisCode]
    index: list[int]

    @property
    def files(self) -> list[str]:
        """The file (or cache label) of each code."""
        return [self.images.names[i] for i in self.index]

    @property
    def sizes(self) -> Counter:
        """How many readable images have each size, as 'WxH'."""
        return Counter(f"{r['width']}x{r['height']}" for r in self.rows if r["reason"] != UNREADABLE)

    def tile(self, k: int) -> tuple[np.ndarray, str]:
        """Code k's image and a caption naming its set and file."""
        return self.images.image(self.index[k]), f"{self.images.label}: {self.files[k]}"


def check_settings(cfg: IdentityConfig) -> None:
    """UserError for settings no comparison could be made with."""
    if len(cfg.grid) != 2 or min(cfg.grid) < 2:
        raise UserError(f"identity.grid is [rings, angles], each >= 2, got {cfg.grid}")
    if not 0 <= cfg.max_shift < cfg.grid[1] // 2:
        raise UserError(f"identity.max_shift must be >= 0 and below half the angles ({cfg.grid[1] // 2}), "
                        f"got {cfg.max_shift}")
    if not 0.0 < cfg.near_copy_hd < 1.0:
        raise UserError(f"identity.near_copy_hd is a Hamming distance between 0 and 1, got {cfg.near_copy_hd}")
    if cfg.max_pairs < 1:
        raise UserError(f"identity.max_pairs must be >= 1, got {cfg.max_pairs}")
    resolve_workers(cfg.workers)


def open_set(label: str, path: Path, exclude: tuple[Path, ...] = ()) -> ImageSet:
    """A folder of images (searched recursively) or a prepare-data cache; UserError when missing or empty."""
    cache = cache_file(path)
    if cache is None:
        files = find_images(path, exclude)
        return ImageSet(label, path, [p.relative_to(path).as_posix() for p in files])
    data = read_cache(cache)
    if not len(data.images):
        raise UserError(f"no images in {cache}")
    return ImageSet(label, cache, [str(lab.get("file", f"{i:06d}")) for i, lab in enumerate(data.labels)], data.images)


def _code(task: tuple[str, Path | np.ndarray], circularity: CircularityConfig, grid: tuple[int, int]) -> dict:
    """One image (its name, and its file or pixels) → its codes.csv row and its code (None if unusable)."""
    name, source = task
    try:
        img = _pixels(source)
        code, reason = code_image(img, circularity, grid)
    except (ValueError, OSError) as exc:
        log.warning("unreadable image %s: %s", name, exc)
        return {"file": name, "width": 0, "height": 0, "usable": False, "reason": UNREADABLE,
                "usable_bits": 0, "code": None}
    return {"file": name, "width": int(img.shape[1]), "height": int(img.shape[0]), "usable": code is not None,
            "reason": reason, "usable_bits": 0 if code is None else 2 * int(np.count_nonzero(code.mask)),
            "code": code}


def code_set(images: ImageSet, cfg: IdentityConfig, circularity: CircularityConfig) -> CodedSet:
    """Every image's iris code, in the images' order (whatever the number of workers); UserError
    when none is usable."""
    tasks = [(name, images.source(i)) for i, name in enumerate(images.names)]
    work = functools.partial(_code, circularity=circularity, grid=tuple(cfg.grid))
    rows: list[dict] = []
    with tqdm(total=len(tasks), unit="img", desc=f"coding {images.label}", disable=None, leave=False) as bar:
        for results in chunked_map(work, tasks, resolve_workers(cfg.workers), preload=("pipeline.identity",)):
            rows += results
            bar.update(len(results))
    index = [i for i, r in enumerate(rows) if r["usable"]]
    codes = [rows[i].pop("code") for i in index]
    for r in rows:
        r.pop("code", None)
    if not codes:
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(r["reason"] for r in rows).items())
        raise UserError(f"no usable iris in the {len(rows)} image(s) of {images.path} ({reasons})")
    return CodedSet(images, rows, codes, index)


def impostor_groups(n: int, max_pairs: int, seed: int) -> list[np.ndarray]:
    """Which codes are compared with each other: all n in one group when n(n − 1)/2 ≤ max_pairs;
    else a seeded random partition into groups of at most g = ⌊2·max_pairs / n⌋ + 1 (sorted
    indices), so that at most max_pairs pairs lie within them (down to max_pairs pairs of two)."""
    if n * (n - 1) // 2 <= max_pairs:
        return [np.arange(n)]
    size = 2 * max_pairs // n + 1
    perm = np.random.default_rng(seed).permutation(n)
    if size < 2:
        return [np.sort(perm[k : k + 2]) for k in range(0, 2 * max_pairs, 2)]
    return [np.sort(g) for g in np.array_split(perm, -(-n // size))]


def impostor_scores(codes: list[IrisCode], cfg: IdentityConfig, label: str) -> Scores:
    """The HDs of every pair within each of `impostor_groups` (a < b in file order per group)."""
    parts = []
    groups = impostor_groups(len(codes), cfg.max_pairs, cfg.seed)
    for group in tqdm(groups, unit="group", desc=f"comparing {label}", disable=None if len(groups) > 1 else True,
                      leave=False):
        hd, bits = pairwise_hamming([codes[i] for i in group], None, cfg.max_shift)
        i, j = np.triu_indices(len(group), 1)
        parts.append((group[i], group[j], hd[i, j], bits[i, j]))
    return Scores(*(np.concatenate(p) for p in zip(*parts, strict=True)))


def nearest_scores(codes: list[IrisCode], train: list[IrisCode], max_shift: int) -> Scores:
    """For each code, the training code of least raw HD (and the most bits among ties); b = -1 and
    NaN where no training code has a bit in common with it."""
    best, raw, bits = [], [], []
    starts = range(0, len(codes), NEAREST_BLOCK)
    for start in tqdm(starts, unit="block", desc="nearest training", disable=None if len(starts) > 1 else True,
                      leave=False):
        hd, count = pairwise_hamming(codes[start : start + NEAREST_BLOCK], train, max_shift)
        key = np.where(np.isnan(hd), np.inf, hd - count * 1e-12)  # least HD, then most bits
        k = np.argmin(key, axis=1)
        rows = np.arange(len(k))
        found = np.isfinite(key[rows, k])
        best.append(np.where(found, k, -1))
        raw.append(hd[rows, k])
        bits.append(np.where(found, count[rows, k], 0))
    return Scores(np.arange(len(codes)), np.concatenate(best), np.concatenate(raw), np.concatenate(bits))


def typical_bits(*scores: Scores | None) -> float | None:
    """The median bits compared of the first of `scores` with any pair compared (None: none has)."""
    for s in scores:
        if s is not None and np.any(s.bits > 0):
            return float(np.median(s.bits[s.bits > 0]))
    return None


def report_hd(scores: Scores | None, typical: float | None) -> None:
    """Set `scores.hd`: Daugman's rescaled HD with n_typ = `typical`, or the raw HD when None."""
    if scores is not None:
        scores.hd = scores.raw.copy() if typical is None else rescaled_hd(scores.raw, scores.bits, typical)


def hd_stats(scores: Scores, threshold: float) -> dict:
    """mean, std (population), min and degrees of freedom N = p(1 − p)/σ² of the reported HDs (pairs
    with no bit in common left out), and how many lie below `threshold`."""
    h = scores.hd[np.isfinite(scores.hd)]
    out = {"n_pairs": int(len(scores.hd)), "n_no_common_bits": int(len(scores.hd) - h.size),
           "mean": None, "std": None, "min": None, "dof": None, "n_below_near_copy_hd": int(np.sum(h < threshold))}
    if h.size:
        out.update(mean=float(h.mean()), std=float(h.std()), min=float(h.min()))
    if h.size > 1 and h.std() > 0:
        out["dof"] = degrees_of_freedom(h)
    return out


def _set_summary(coded: CodedSet) -> dict:
    rows = coded.rows
    return {"source": str(coded.images.path), "kind": "folder" if coded.images.pixels is None else "cache",
            "n_images": len(rows), "n_usable": len(coded.codes),
            "unusable": {reason: sum(r["reason"] == reason for r in rows) for reason in REASONS},
            "sizes": dict(coded.sizes.most_common()),
            "median_usable_bits": float(np.median([r["usable_bits"] for r in rows if r["usable"]]))}


def _impostor_summary(coded: CodedSet, scores: Scores | None, cfg: IdentityConfig) -> dict | None:
    if scores is None:
        return None
    n = len(coded.codes)
    stats = hd_stats(scores, cfg.near_copy_hd)
    stats["all_pairs"] = stats["n_pairs"] == n * (n - 1) // 2
    if stats["min"] is not None:
        k = int(np.nanargmin(scores.hd))
        stats["closest"] = {"a": coded.files[scores.a[k]], "b": coded.files[scores.b[k]], "hd": float(scores.hd[k])}
    return stats


def _nearest_summary(gen: CodedSet, train: CodedSet, scores: Scores, cfg: IdentityConfig) -> dict:
    found = scores.b >= 0
    hd = scores.hd[found]
    near = int(np.sum(hd < cfg.near_copy_hd))
    order = scores.order()[: min(5, int(found.sum()))]
    return {"n_generated": len(scores.a), "n_training": len(train.codes), "n_compared": int(found.sum()),
            "min_hd": float(hd.min()) if hd.size else None, "median_hd": float(np.median(hd)) if hd.size else None,
            "n_near_copies": near, "near_copy_share": near / len(scores.a),
            "closest": [{"file": gen.files[k], "train_file": train.files[scores.b[k]], "hd": float(scores.hd[k])}
                        for k in order]}


def _notes(sets: list[CodedSet], cfg: IdentityConfig) -> list[str]:
    """A note when the sets' images are not all of one size."""
    sizes = sum((coded.sizes for coded in sets), Counter())
    if len(sizes) < 2:
        return []
    listed = ", ".join(f"{size} ×{n}" for size, n in sizes.most_common())
    return [f"images of {len(sizes)} sizes ({listed}): their codes share the {cfg.grid[0]}x{cfg.grid[1]} grid and "
            "are compared, but a smaller iris fills it with fewer pixels (coarser, more correlated bits)"]


def check_identity(generated: Path, train: Path | None, reference: Path | None, tmp: Path, cfg: IdentityConfig,
                   circularity: CircularityConfig, exclude: tuple[Path, ...] = ()) -> dict:
    """Code the sets, compare them and write every output into the (empty, existing) folder `tmp`;
    return the summary (also summary.json). UserError for a missing or empty set, or one without a
    usable iris."""
    check_settings(cfg)
    start = time.perf_counter()
    gen = code_set(open_set("generated", generated, exclude), cfg, circularity)
    trained = code_set(open_set("train", train, exclude), cfg, circularity) if train else None
    ref = code_set(open_set("reference", reference, exclude), cfg, circularity) if reference else None
    coded = [s for s in (gen, trained, ref) if s is not None]
    n_images = sum(len(s.rows) for s in coded)
    gen_pairs = impostor_scores(gen.codes, cfg, "generated") if len(gen.codes) > 1 else None
    ref_pairs = impostor_scores(ref.codes, cfg, "reference") if ref and len(ref.codes) > 1 else None
    nearest = nearest_scores(gen.codes, trained.codes, cfg.max_shift) if trained else None
    # n_typ from the reference's own pairs when there is one: every set of the run, and every run with
    # that reference, is then rescaled alike (from the generated pairs, it would move with the model).
    typical = typical_bits(ref_pairs, gen_pairs, nearest) if cfg.rescale else None
    for scores in (gen_pairs, ref_pairs, nearest):
        report_hd(scores, typical)
    seconds = time.perf_counter() - start
    summary = {
        "generated": {**_set_summary(gen), "impostor": _impostor_summary(gen, gen_pairs, cfg)},
        "train": _set_summary(trained) if trained else None,
        "reference": {**_set_summary(ref), "impostor": _impostor_summary(ref, ref_pairs, cfg)} if ref else None,
        "nearest_training": _nearest_summary(gen, trained, nearest, cfg) if trained else None,
        "hd": "rescaled" if typical is not None else "raw", "typical_bits": typical,
        "near_copy_hd": cfg.near_copy_hd, "notes": _notes(coded, cfg),
        "seconds": seconds, "images_per_second": n_images / seconds if seconds > 0 else None,
        "workers": resolve_workers(cfg.workers), "config": dataclasses.asdict(cfg),
    }
    _write(tmp, summary, gen, trained, ref, gen_pairs, ref_pairs, nearest, cfg)
    return summary


def _write(tmp: Path, summary: dict, gen: CodedSet, trained: CodedSet | None, ref: CodedSet | None,
           gen_pairs: Scores | None, ref_pairs: Scores | None, nearest: Scores | None, cfg: IdentityConfig) -> None:
    """codes.csv, pairs.csv, nearest.csv, summary.json, histograms.png and closest.png into `tmp`."""
    report.write_codes_csv(tmp / "codes.csv", [(s.images.label, s.rows) for s in (gen, trained, ref) if s])
    impostors = [(s.images.label, s.files, p) for s, p in ((gen, gen_pairs), (ref, ref_pairs)) if p is not None]
    report.write_pairs_csv(tmp / "pairs.csv", impostors)
    if nearest is not None:
        report.write_nearest_csv(tmp / "nearest.csv", gen.files, trained.files, nearest, cfg.near_copy_hd)
    report.write_summary(tmp / "summary.json", summary)
    groups = {f"{label} impostor pairs": p.hd for label, _, p in impostors}
    if nearest is not None:
        groups["generated → nearest training"] = nearest.hd
    report.plot_hd_histograms(tmp / "histograms.png", groups, cfg.near_copy_hd, summary["hd"])
    if nearest is not None or gen_pairs is not None:
        scores, right = (nearest, trained) if nearest is not None else (gen_pairs, gen)
        title = f"closest {'generated / training' if nearest is not None else 'generated'} pairs, {summary['hd']} HD"
        report.write_closest_sheet(tmp / "closest.png", _closest(scores, gen, right), cfg.near_copy_hd, title)


def _closest(scores: Scores, left: CodedSet, right: CodedSet) -> list[tuple]:
    """The `report.CLOSEST_COUNT` compared pairs of least HD: ((image, caption), (image, caption), HD)."""
    return [(left.tile(scores.a[k]), right.tile(scores.b[k]), float(scores.hd[k]))
            for k in scores.order()[: report.CLOSEST_COUNT] if scores.b[k] >= 0]
