"""The inference pipeline over a folder (docs/architecture.md): the :class:`Segmenter`'s stages
as a stream with bounded queues, so that the engine and the refinement workers overlap.

    decode (threads)  ->  engine: detect (batched), segment (per image)  ->  refine (worker
    processes)  ->  write (a thread)

One scheduling policy: each image's refinement is one task (its CRF lattices built once), at most
``2 x workers`` of them in flight (the engine waits for the oldest when the workers fall behind),
and each refined image is written as soon as it is done. Throughput follows the slower of the
engine and the refinement workers; the summary reports how busy each was.

Every output file is written atomically; an image's JSON record is written last and marks it
complete, so ``resume`` skips exactly the images whose outputs are complete, and an interrupted
run leaves no file that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .files import atomic_write_bytes, remove_temporaries
from .images import IMAGE_EXTENSIONS, ImageError, decode_image, list_images
from .outputs import is_complete, output_paths, write_image_outputs
from .report import index_entry, write_index
from .segmenter import CapReport, ImagePeaks, PredictOptions, Segmenter

log = logging.getLogger(__name__)
SAVE_CHOICES = ("masks", "overlays", "json")
STAGES = ("decode", "detect", "segment", "refine", "write")


@dataclass
class InferOptions(PredictOptions):
    """A folder run: the semantics overrides of :class:`PredictOptions`, and how the run goes."""

    batch_size: int = 4  # images per detect call (1 with the CPU's shared forward)
    crf_workers: int = 0  # refinement processes; 0: one per CPU core; 1: in this process
    save: tuple[str, ...] = SAVE_CHOICES
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
    # decode, detect, segment and write: seconds of this process's threads; refine: seconds of
    # the refinement workers, added up (on several workers, more than the wall time)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    # how busy each side was over the run: the engine (detect + segment) of the wall time, the
    # refinement of the wall time times the workers
    busy: dict[str, float] = field(default_factory=dict)
    refine_workers: int = 1
    # images on which a cap left valid peaks out: the detect graph's K outputs, --max-instances
    capped: dict[str, int] = field(default_factory=dict)
    # seconds from an image's batch entering the engine to its outputs written: median, p90, p99
    latency_s: dict[str, float] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    backend: str = ""
    bundle: str = ""

    def measure_busy(self, engines: int, refine_workers: int) -> None:
        """``busy`` from the stage seconds and the wall time: each side's seconds over the wall time
        times the engines (refinement workers) that shared them."""
        if self.seconds:
            engine = self.stage_seconds["detect"] + self.stage_seconds["segment"]
            self.busy = {"engine": engine / (self.seconds * engines),
                         "refine": self.stage_seconds["refine"] / (self.seconds * refine_workers)}


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


def prepare_run(source: str | Path, out_dir: Path, options: InferOptions,
                summary: RunSummary) -> tuple[list[InputItem], list[InputItem], tuple[str, ...]]:
    """What every runner does first: OUT made and cleared of an interrupted run's temporary
    files, the inputs listed, the complete ones skipped on ``resume`` (counted in ``summary``).
    Returns (all inputs, those to run, the outputs to save)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("instances", "classes", "overlays", "records"):
        remove_temporaries(out_dir / sub)
    _, items = collect_inputs(source)
    save = tuple(s for s in options.save if s in SAVE_CHOICES)
    summary.images = len(items)
    todo = []
    for it in items:
        if options.resume and is_complete(output_paths(out_dir, it.stem), set(save)):
            summary.skipped_complete += 1
        else:
            todo.append(it)
    return items, todo, save


def failure_reason(exc: BaseException) -> str:
    """What an image's failure says in the summary: an unreadable image's reason as it is, any
    other error with its type."""
    return str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"


def _worker_context():
    """Workers must not be forked from this process: it holds onnxruntime (and maybe CUDA)
    state and threads, and a forked copy can deadlock on a lock or condition variable taken at
    fork time (seen: a worker's garbage collector hanging in an inherited onnxruntime object).
    forkserver forks from a clean server process; spawn where that is not available."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _timed_refine(settings, rgb: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, float]:
    """Worker task: (masks, seconds)."""
    started = time.perf_counter()
    masks = settings.refine(rgb, maps)
    return masks, time.perf_counter() - started


def _inline(fn, *args) -> Future:
    """Run ``fn`` here and now, as a completed Future (the pool's interface, without a pool)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


class _StageError(Exception):
    """A failure past the engine, with the stage it happened in."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {cause}")
        self.stage, self.cause = stage, cause


@dataclass
class _Image:
    """One image on its way through the stages."""

    item: InputItem
    rgb: np.ndarray
    tensor: np.ndarray
    entered: float = 0.0  # when its batch entered the engine
    peaks: ImagePeaks | None = None


def run(bundle: Bundle, backend, source: str | Path, out_dir: str | Path, options: InferOptions) -> RunSummary:
    """Run the pipeline; returns the summary (also written to OUT/summary.json)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    segmenter = Segmenter(bundle, backend, options)
    summary = RunSummary(backend=backend.describe(), bundle=str(bundle.root))
    items, todo, save = prepare_run(source, out_dir, options, summary)

    started = time.perf_counter()
    settings = segmenter.refine_settings
    if settings.in_process:  # the CRF graph: threads sharing its onnxruntime session
        workers = options.crf_workers or 1
        pool = ThreadPoolExecutor(workers) if todo else None
    else:
        workers = options.crf_workers or os.cpu_count() or 1
        pool = ProcessPoolExecutor(workers, mp_context=_worker_context()) if workers > 1 and todo else None
    summary.refine_workers = workers
    decoder = ThreadPoolExecutor(max(1, options.decode_threads))
    writer = ThreadPoolExecutor(1)
    # Images past the engine: each one's refine-then-write chain as one Future, at most 2 x workers.
    in_flight: deque[tuple[_Image, Future]] = deque()
    latencies: list[float] = []
    capped = CapReport()
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=not options.progress)
    classes = segmenter.classes

    def fail(item: InputItem, stage: str, exc: BaseException) -> None:
        summary.failed += 1
        summary.errors.append({"file": item.file_name, "stage": stage, "reason": failure_reason(exc)})
        bar.update(1)

    def write(image: _Image, masks: np.ndarray) -> tuple[int, float, float]:
        """Writer thread: (instances, write seconds, when the outputs were complete)."""
        t0 = time.perf_counter()
        instances = segmenter.instances(image.peaks, masks)
        write_image_outputs(output_paths(out_dir, image.item.stem), image.rgb, instances, classes,
                            image.item.image_id, image.item.file_name, set(save))
        done = time.perf_counter()
        return len(instances), done - t0, done

    def chain(image: _Image, refined: Future) -> Future:
        """The refinement's result handed to the writer as soon as it is there (not when the
        engine next looks up): one Future for both, whose error says at which stage it failed."""
        finished: Future = Future()

        def on_written(written: Future) -> None:
            if written.exception() is not None:
                finished.set_exception(_StageError("write", written.exception()))
            else:
                finished.set_result((refined.result()[1], *written.result()))

        def on_refined(_: Future) -> None:
            if refined.cancelled():  # the run is being stopped
                finished.cancel()
                return
            if refined.exception() is not None:
                finished.set_exception(_StageError("refine", refined.exception()))
                return
            try:
                writer.submit(write, image, refined.result()[0]).add_done_callback(on_written)
            except RuntimeError as exc:  # the writer is shut down: interrupted
                finished.set_exception(_StageError("write", exc))

        refined.add_done_callback(on_refined)
        return finished

    def collect(limit: int) -> None:
        """Account for the finished images, waiting for the oldest while more than ``limit``."""
        while len(in_flight) > limit or (in_flight and in_flight[0][1].done()):
            image, future = in_flight.popleft()
            try:
                refine_s, count, write_s, done = future.result()
            except _StageError as exc:  # this image's failure (a broken pool too), not the run's
                fail(image.item, exc.stage, exc.cause)
                continue
            summary.stage_seconds["refine"] += refine_s
            summary.stage_seconds["write"] += write_s
            summary.completed += 1
            summary.instances += count
            summary.images_without_instances += not count
            latencies.append(done - image.entered)
            bar.update(1)

    def submit_refine(image: _Image, maps: np.ndarray) -> None:
        try:
            refined = (pool.submit(_timed_refine, segmenter.refine_settings, image.rgb, maps) if pool is not None
                       else _inline(_timed_refine, segmenter.refine_settings, image.rgb, maps))
        except Exception as exc:  # a broken pool: this image fails, as a worker failure would
            refined = Future()
            refined.set_exception(exc)
        in_flight.append((image, chain(image, refined)))
        collect(2 * workers)

    def decode(item: InputItem) -> tuple[_Image, float]:
        t0 = time.perf_counter()
        rgb = decode_image(item.path)
        return _Image(item, rgb, segmenter.preprocess(rgb)), time.perf_counter() - t0

    per_detect = segmenter.detect_batch(options.batch_size)
    try:
        queue, pending = deque(todo), deque()  # pending: decodes in flight, 2 batches ahead
        while queue or pending:
            while queue and len(pending) < 2 * options.batch_size:
                it = queue.popleft()
                pending.append((it, decoder.submit(decode, it)))
            batch = []
            while pending and len(batch) < per_detect:
                it, future = pending.popleft()
                try:
                    image, seconds = future.result()
                except ImageError as exc:
                    fail(it, "decode", exc)
                    continue
                summary.stage_seconds["decode"] += seconds
                batch.append(image)
            if not batch:
                continue
            t0 = time.perf_counter()
            for image in batch:
                image.entered = t0
            try:
                found = segmenter.detect(np.stack([image.tensor for image in batch]))
            except Exception as exc:  # the engine refused this batch: its images fail, the run goes on
                for image in batch:
                    fail(image.item, "detect", exc)
                continue
            summary.stage_seconds["detect"] += time.perf_counter() - t0
            for image, peaks in zip(batch, found):
                image.peaks = peaks
                capped.add(image.item.file_name, peaks)
                t0 = time.perf_counter()
                try:
                    maps = segmenter.segment(image.tensor, peaks)
                except Exception as exc:  # out of memory for this image's peaks, say
                    fail(image.item, "segment", exc)
                    continue
                summary.stage_seconds["segment"] += time.perf_counter() - t0
                image.tensor = None  # not needed past the engine
                submit_refine(image, maps)
        collect(0)
    finally:
        bar.close()
        decoder.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - started
    summary.capped = capped.counts()
    capped.warn(segmenter)
    if latencies:
        summary.latency_s = percentiles(latencies)
    summary.images_per_second = (summary.completed / summary.seconds) if summary.seconds else 0.0
    summary.measure_busy(engines=1, refine_workers=workers if pool else 1)
    write_predictions(out_dir, items, summary, save)
    return summary


def write_predictions(out_dir: Path, items: list[InputItem], summary: RunSummary, save: tuple[str, ...]) -> None:
    """predictions.json (COCO results: a list of instances) over every complete image of the
    input, summary.json, and index.html (the run at a glance)."""
    predictions, entries = [], []
    for it in items:
        paths = output_paths(out_dir, it.stem)
        if paths.record.is_file():
            record = json.loads(paths.record.read_text())
            predictions.extend(record["instances"])
            shown = paths.overlay if "overlays" in record.get("saved", ()) and paths.overlay.is_file() else None
            entries.append(index_entry(record, shown, out_dir))
    if "json" in save:
        atomic_write_bytes(out_dir / "predictions.json", json.dumps(predictions).encode())
    summary_dict = asdict(summary)
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary_dict, indent=2).encode())
    write_index(out_dir, summary_dict, entries)
