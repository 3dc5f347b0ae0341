"""The inference pipeline over a folder (DESIGN.md, "The runtime pipeline"):

decode + resize (threads) -> detect (batched) -> select peaks -> segment (per image, peaks in
chunks) -> refine (dense CRF) + write, in a process pool (overlapping a GPU engine; between
engine calls, on every core, for an engine on the CPU).

Every output file is written atomically; an image's JSON record is written last and marks it
complete, so ``resume`` skips exactly the images whose outputs are complete, and an interrupted
run leaves no file that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle, CRFSpec
from .images import IMAGE_EXTENSIONS, ImageError, decode_image, list_images, preprocess
from .outputs import Instance, atomic_write_bytes, is_complete, output_paths, write_image_outputs
from .peaks import peak_input_coordinates, select_peaks
from .refine import CRFSchedule, refine_instances

log = logging.getLogger(__name__)
SAVE_CHOICES = ("masks", "overlays", "json")


@dataclass
class InferOptions:
    batch_size: int = 4
    refine: str = "crf"  # crf | threshold | none
    crf_workers: int = 0  # 0: one per CPU core
    # CRF on the image scaled to this longer side, but for its last crf_full_iterations (see
    # refine.CRFSchedule); 0: full resolution, the reference's masks.
    crf_max_side: int = 0
    crf_full_iterations: int = 1
    # Where the CRF runs: "input" (the network's input frame, the reference's) or "image" (the
    # photo's resolution, capped at crf_photo_max_side); default: the bundle's.
    crf_frame: str | None = None
    crf_photo_max_side: int = 1024
    max_peaks: int | None = None  # per image; default: the bundle's
    score_threshold: float | None = None  # class score threshold; default: the bundle's
    peak_threshold: float | None = None
    mask_threshold: float | None = None  # without CRF; default: the bundle's
    # same-class masks overlapping more than this: the lower score is dropped; default: the
    # bundle's; a value > 1 keeps every instance (the reference: no NMS)
    nms_iou: float | None = None
    # Peaks per segment call (bounds memory) where the bundle's filling uses running statistics;
    # with batch statistics an image's peaks go through in one call (up to max_peaks).
    peak_chunk: int = 8
    save: tuple[str, ...] = SAVE_CHOICES
    # Refine image i while the engine runs image i+1 (None: only when the engine is on a GPU). An
    # engine on the CPU already uses every core; overlapping would stall both, so there a batch is
    # refined on all workers at once, between engine calls: whole images per worker when the batch
    # has at least one image per worker (each image's CRF lattices built once), else each image's
    # instances split across the workers.
    overlap_refine: bool | None = None
    resume: bool = False
    decode_threads: int = 2
    progress: bool = True


@dataclass
class InputItem:
    path: Path
    image_id: str  # path relative to INPUT without extension (with it, if two inputs share a stem)
    file_name: str  # path relative to INPUT
    stem: str  # output name, unique


@dataclass
class RunSummary:
    images: int = 0
    completed: int = 0
    skipped_complete: int = 0
    failed: int = 0
    instances: int = 0
    images_without_instances: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("decode", "detect", "segment", "refine", "write"), 0.0))
    # seconds from an image's batch entering the engine to its outputs written: median, p90, p99
    latency_s: dict[str, float] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    backend: str = ""
    bundle: str = ""


def percentiles(samples: list[float]) -> dict[str, float]:
    """Median, p90 and p99 of a non-empty list (p90/p99: the nearest-rank sample)."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p90": pick(0.9), "p99": pick(0.99)}


def collect_inputs(source: str | Path) -> tuple[Path, list[InputItem]]:
    """A folder (recursive, sorted), one image file, or a .txt file listing paths (one per line,
    relative to the list's folder or absolute)."""
    source = Path(source)
    if source.is_dir():
        root, paths = source, list_images(source)
    elif source.is_file() and source.suffix.lower() == ".txt":
        root = source.parent
        paths = []
        for line in source.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                p = Path(line.strip())
                paths.append(p if p.is_absolute() else root / p)
    elif source.is_file() or source.suffix.lower() in IMAGE_EXTENSIONS:
        root, paths = source.parent, [source]
    else:
        raise FileNotFoundError(f"input not found: {source}")
    items = []
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:
            rel = Path(p.name)
        items.append(InputItem(p, rel.with_suffix("").as_posix(), rel.as_posix(), rel.with_suffix("").as_posix()))
    counts: dict[str, int] = {}
    for it in items:
        counts[it.image_id] = counts.get(it.image_id, 0) + 1
    for it in items:
        if counts[it.image_id] > 1:  # a.jpg and a.png: keep the extension to tell them apart
            it.image_id = it.file_name
            it.stem = it.file_name.replace(".", "_")
    return root, items


def _warn_if_capped(item: InputItem, values: np.ndarray, count: int, detect_k: int, peak_threshold: float,
                    valid: int, chosen: int) -> None:
    """Say when a cap kept valid peaks out: the detect graph's K outputs were full with peaks
    above the threshold (more may exist), or --max-peaks left some unsegmented."""
    if count == detect_k and detect_k and values[detect_k - 1] > peak_threshold:
        log.warning("%s: the detect graph's %d peak outputs are full; valid peaks beyond them are not used "
                    "(export with a larger --max-peaks)", item.file_name, detect_k)
    if chosen < valid:
        log.warning("%s: %d valid peaks, the %d highest segmented (--max-peaks)", item.file_name, valid, chosen)


def _decode(item: InputItem, size, mean, std):
    started = time.perf_counter()
    rgb = decode_image(item.path)
    return rgb, preprocess(rgb, size, mean, std), time.perf_counter() - started


def _nms(instances: list[Instance], iou: float | None) -> list[Instance]:
    """Same-class duplicates (mask IoU > ``iou``) and empty masks removed, highest score first;
    ``iou`` None (or > 1): every instance kept, as the reference."""
    if iou is None or iou > 1:
        return list(instances)
    kept: list[Instance] = []
    for ins in sorted(instances, key=lambda i: -i.score):
        area = ins.mask.sum()
        if area == 0:
            continue
        duplicate = False
        for k in kept:
            if k.class_index == ins.class_index:
                inter = np.logical_and(k.mask, ins.mask).sum()
                if inter / (area + k.mask.sum() - inter) > iou:
                    duplicate = True
                    break
        if not duplicate:
            kept.append(ins)
    return kept


def refine_and_write(rgb: np.ndarray, maps: np.ndarray, meta: list[tuple[int, float, float, tuple[int, int]]],
                     method: str, crf: CRFSpec, mask_threshold: float, nms_iou: float, out_dir: str, stem: str,
                     image_id: str, file_name: str, classes: list[str], save: tuple[str, ...],
                     schedule: CRFSchedule | None = None):
    """Worker: masks for one image's activation maps, duplicates removed, outputs written.
    Returns (records, refine seconds, write seconds)."""
    started = time.perf_counter()
    masks = refine_instances(rgb, maps, method, crf, mask_threshold, schedule)
    refined = time.perf_counter()
    return write_masks(rgb, masks, meta, nms_iou, out_dir, stem, image_id, file_name, classes, save, refined - started)


def write_masks(rgb: np.ndarray, masks: np.ndarray, meta: list[tuple[int, float, float, tuple[int, int]]],
                nms_iou: float, out_dir: str, stem: str, image_id: str, file_name: str, classes: list[str],
                save: tuple[str, ...], refine_seconds: float):
    """One image's refined masks -> duplicates removed, outputs written; as refine_and_write."""
    started = time.perf_counter()
    instances = _nms([Instance(c, s, cs, p, m) for (c, s, cs, p), m in zip(meta, masks)], nms_iou)
    records = write_image_outputs(output_paths(Path(out_dir), stem), rgb, instances, classes, image_id, file_name,
                                  set(save))
    return records, refine_seconds, time.perf_counter() - started


def _refine_across(pool: ProcessPoolExecutor, workers: int, rgb: np.ndarray, maps: np.ndarray, meta, method: str,
                   crf: CRFSpec, mask_threshold: float, nms_iou: float, out_dir: str, stem: str, image_id: str,
                   file_name: str, classes: list[str], save: tuple[str, ...], schedule: CRFSchedule) -> Future:
    """One image's instances refined on every worker at once, then written here; a completed
    Future like refine_and_write's."""
    started = time.perf_counter()
    try:
        chunks = np.array_split(np.arange(len(maps)), max(1, min(workers, len(maps))))
        parts = [pool.submit(refine_instances, rgb, maps[c], method, crf, mask_threshold, schedule)
                 for c in chunks]
        masks = np.concatenate([part.result() for part in parts])
    except Exception as exc:
        future: Future = Future()
        future.set_exception(exc)
        return future
    return _run_inline(write_masks, rgb, masks, meta, nms_iou, out_dir, stem, image_id, file_name, classes, save,
                       time.perf_counter() - started)


def _run_inline(fn, *args) -> Future:
    """Run ``fn`` here and now, as a completed Future (the pool's interface, without a pool)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _worker_context():
    """Workers must not be forked from this process: it holds onnxruntime (and maybe CUDA)
    state and threads, and a forked copy can deadlock on a lock or condition variable taken at
    fork time (seen: a worker's garbage collector hanging in an inherited onnxruntime object).
    forkserver forks from a clean server process; spawn where that is not available."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _clean_temporaries(out_dir: Path) -> None:
    for sub in ("instances", "classes", "overlays", "records"):
        for tmp in (out_dir / sub).rglob(".*.tmp") if (out_dir / sub).is_dir() else []:
            tmp.unlink(missing_ok=True)


def run(bundle: Bundle, backend, source: str | Path, out_dir: str | Path, options: InferOptions) -> RunSummary:
    """Run the pipeline; returns the summary (also written to OUT/summary.json)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out_dir)
    m = bundle.manifest
    _, items = collect_inputs(source)
    summary = RunSummary(images=len(items), backend=backend.describe(), bundle=str(bundle.root))
    save = tuple(s for s in options.save if s in SAVE_CHOICES)
    max_peaks = options.max_peaks or m.peaks.max_peaks
    class_threshold = m.peaks.class_threshold if options.score_threshold is None else options.score_threshold
    peak_threshold = m.peaks.peak_threshold if options.peak_threshold is None else options.peak_threshold
    mask_threshold = m.filling.mask_threshold if options.mask_threshold is None else options.mask_threshold
    nms_iou = m.peaks.nms_iou if options.nms_iou is None else options.nms_iou
    crf = m.crf if options.crf_frame is None else dataclasses.replace(m.crf, frame=options.crf_frame)
    # With batch statistics the filling network normalises an image's peaks together, as the
    # reference does: they must go through in one call.
    peak_chunk = max_peaks if m.filling.normalization == "batch" else options.peak_chunk
    crm_size = (m.input.size[0] // m.peaks.stride, m.input.size[1] // m.peaks.stride)
    todo = []
    for it in items:
        if options.resume and is_complete(output_paths(out_dir, it.stem), set(save)):
            summary.skipped_complete += 1
        else:
            todo.append(it)

    started = time.perf_counter()
    workers = options.crf_workers or os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers, mp_context=_worker_context()) if workers > 1 and todo else None
    decoder = ThreadPoolExecutor(max(1, options.decode_threads))
    in_flight: deque[tuple[InputItem, Future]] = deque()
    submit = pool.submit if pool is not None else _run_inline
    overlap = options.overlap_refine if options.overlap_refine is not None else backend.device == "gpu"
    schedule = CRFSchedule(options.crf_max_side, options.crf_full_iterations, options.crf_photo_max_side)
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=not options.progress)

    entered: dict[str, float] = {}  # stem -> when its batch entered the engine
    latencies: list[float] = []

    def finish(item: InputItem, result, time_scale: float = 1.0) -> None:
        latencies.append(time.perf_counter() - entered.pop(item.stem, started))
        try:
            records, refine_s, write_s = result.result()
            refine_s, write_s = refine_s * time_scale, write_s * time_scale
        except Exception as exc:  # a worker failure is this image's failure, not the run's
            summary.failed += 1
            summary.errors.append({"file": item.file_name, "stage": "refine/write", "reason": f"{type(exc).__name__}: {exc}"})
        else:
            summary.completed += 1
            summary.instances += len(records)
            summary.images_without_instances += not records
            summary.stage_seconds["refine"] += refine_s
            summary.stage_seconds["write"] += write_s
        bar.update(1)

    def drain(limit: int) -> None:
        while len(in_flight) > limit or (in_flight and in_flight[0][1].done()):
            item, result = in_flight.popleft()
            finish(item, result)

    def refine_whole_images(jobs: list[tuple[InputItem, tuple]]) -> None:
        """A batch's images, one task each, on all workers at once. The stage times count wall
        time: the workers' own refine and write seconds are scaled to the batch's wall time."""
        t0 = time.perf_counter()
        futures = []
        for it, args in jobs:
            try:
                futures.append((it, pool.submit(refine_and_write, *args)))
            except Exception as exc:  # a broken pool: this image fails, as a worker failure would
                failed: Future = Future()
                failed.set_exception(exc)
                futures.append((it, failed))
        wait([f for _, f in futures])
        busy = sum(sum(f.result()[1:]) for _, f in futures if f.exception() is None)
        scale = (time.perf_counter() - t0) / busy if busy > 0 else 1.0
        for it, f in futures:
            finish(it, f, scale)

    try:
        queue = deque(todo)
        pending = deque()  # decode futures, prefetched ahead of the engine

        def refill():
            while queue and len(pending) < 2 * options.batch_size:
                it = queue.popleft()
                pending.append((it, decoder.submit(_decode, it, m.input.size, m.input.mean, m.input.std)))

        refill()
        while pending:
            batch = []
            while pending and len(batch) < options.batch_size:
                it, fut = pending.popleft()
                try:
                    rgb, tensor, secs = fut.result()
                    summary.stage_seconds["decode"] += secs
                    batch.append((it, rgb, tensor))
                except ImageError as exc:
                    summary.failed += 1
                    summary.errors.append({"file": it.file_name, "stage": "decode", "reason": str(exc)})
                    bar.update(1)
            refill()
            if not batch:
                continue
            t0 = time.perf_counter()
            entered.update((it.stem, t0) for it, _, _ in batch)
            det = backend.detect(np.stack([b[2] for b in batch]))
            summary.stage_seconds["detect"] += time.perf_counter() - t0
            whole_images = []  # (item, refine arguments), refined together after the batch's segment calls
            for i, (it, rgb, tensor) in enumerate(batch):
                valid = select_peaks(det["class_scores"][i], det["peak_coords"][i], det["peak_values"][i],
                                     int(det["peak_counts"][i]), class_threshold, peak_threshold, m.peaks.max_peaks)
                chosen = valid[:max_peaks]
                _warn_if_capped(it, det["peak_values"][i], int(det["peak_counts"][i]), m.peaks.max_peaks, peak_threshold,
                                len(valid), len(chosen))
                coords = det["peak_coords"][i][chosen]
                maps = np.zeros((0, *m.input.size), dtype=np.float32)
                if len(chosen):
                    t0 = time.perf_counter()
                    parts = [backend.segment(tensor[None], np.ascontiguousarray(coords[s : s + peak_chunk]))["iam"]
                             for s in range(0, len(coords), peak_chunk)]
                    summary.stage_seconds["segment"] += time.perf_counter() - t0
                    maps = np.concatenate(parts).astype(np.float32)
                yx = peak_input_coordinates(coords, crm_size, m.peaks.upsample_factor, m.peaks.stride)
                scale = np.array([rgb.shape[0] / m.input.size[0], rgb.shape[1] / m.input.size[1]])
                meta = [(int(c[0]), float(det["peak_values"][i][j]), float(det["class_scores"][i][c[0]]),
                         tuple(int(v) for v in np.clip(p * scale, 0, np.array(rgb.shape[:2]) - 1)))
                        for j, c, p in zip(chosen, coords, yx)]
                args = (rgb, maps, meta, options.refine, crf, mask_threshold, nms_iou, str(out_dir),
                        it.stem, it.image_id, it.file_name, list(m.classes), save, schedule)
                if overlap or pool is None or options.refine != "crf":
                    in_flight.append((it, submit(refine_and_write, *args)))
                    drain(2 * workers)
                elif len(batch) >= workers:
                    whole_images.append((it, args))
                else:
                    in_flight.append((it, _refine_across(pool, workers, *args)))
                    drain(0)
            if whole_images:
                refine_whole_images(whole_images)
        drain(0)
    finally:
        bar.close()
        decoder.shutdown(wait=False, cancel_futures=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - started
    if latencies:
        summary.latency_s = percentiles(latencies)
    summary.images_per_second = (summary.completed / summary.seconds) if summary.seconds else 0.0
    write_predictions(out_dir, items, summary, save)
    return summary


def write_predictions(out_dir: Path, items: list[InputItem], summary: RunSummary, save: tuple[str, ...]) -> None:
    """predictions.json (COCO results: a list of instances) over every complete image of the
    input, and summary.json."""
    predictions = []
    for it in items:
        record = output_paths(out_dir, it.stem).record
        if record.is_file():
            predictions.extend(json.loads(record.read_text())["instances"])
    if "json" in save:
        atomic_write_bytes(out_dir / "predictions.json", json.dumps(predictions).encode())
    atomic_write_bytes(out_dir / "summary.json", json.dumps(asdict(summary), indent=2).encode())
