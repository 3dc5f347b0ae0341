"""``iam-infer --ray``: the folder pipeline's stages as Ray Data operators, for collections larger
than one machine (docs/architecture.md).

    list inputs -> read and decode (tasks) -> engine: detect + segment (an actor pool, one GPU
    each where GPUs exist) -> dense CRF (a fixed-size pool of CPU actors) -> write (actors)

Ray Data streams between the operators with backpressure; growing past one machine is Ray's
scheduler (``--ray-address``, or ``RAY_ADDRESS``), never ours. The outputs are the local
pipeline's, written by the same functions to OUT (a path every node can write: a shared file
system): the same files, ``predictions.json`` and ``summary.json``, complete images only, each
written atomically, its record last (``--resume`` skips them). Rows travel between operators as
pickled payloads: images and activation maps differ in size from row to row.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

from .bundle import load_bundle
from .images import ImageError, decode_image
from .outputs import output_paths, write_image_outputs
from .pipeline import (
    SAVE_CHOICES,
    InferOptions,
    RunSummary,
    failure_reason,
    percentiles,
    prepare_run,
    write_predictions,
)
from .segmenter import CapReport, Segmenter

RAY_EXTRA = "pip install -e '.[ray]' (ray[data])"
CAP_COLUMNS = ("detect_full", "beyond_max_instances")  # each row's CapReport.flags, as 0/1


@dataclass
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    engine_actors: int = 0  # 0: one per GPU, else 1
    crf_actors: int = 0  # 0: the cluster's CPUs less the engine actors' (at least 1)
    engine_cpus: float = 1.0  # CPUs an engine actor reserves (and its onnxruntime threads)
    providers: tuple[str, ...] | None = None
    backend: str = "auto"
    tf32: bool = False  # CUDA provider: fp32 convolutions in TF32 (iam-infer --tf32)
    propagation: str = "auto"  # the filling's propagation: fused CPU kernel or graph (iam-infer --propagation)
    share_forward: bool | None = None  # detect on segment's forward pass (iam-infer --share-forward)


def _fail(row: dict, stage: str, exc: BaseException) -> dict:
    return {**row, "payload": b"", "error": failure_reason(exc), "stage": stage}


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [{k: batch[k][i] for k in keys} for i in range(len(batch[keys[0]]))]


def _batch(rows: list[dict]) -> dict:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def decode_stage(batch: dict) -> dict:
    """Task: read and decode each image (a failure fails that row)."""
    out = []
    for row in _rows(batch):
        t0 = time.perf_counter()
        try:
            rgb = decode_image(row["path"])
        except ImageError as exc:
            out.append(_fail(row, "decode", exc))
            continue
        out.append({**row, "payload": pickle.dumps({"rgb": rgb, "decode_s": time.perf_counter() - t0})})
    return _batch(out)


class EngineStage:
    """Actor: the bundle's engine; detect on the batch, segment each image's peaks."""

    def __init__(self, bundle_dir: str, options: InferOptions, ray_options: RayOptions, threads: int):
        from .backends import select_backend

        bundle = load_bundle(bundle_dir, verify_checksums=False)  # checked once, by run_ray
        backend = select_backend(bundle, ray_options.backend, list(ray_options.providers or []) or None,
                                 threads=threads, tf32=ray_options.tf32,
                                 propagation=ray_options.propagation, share_forward=ray_options.share_forward)
        self.segmenter = Segmenter(bundle, backend, options)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = _rows(batch)
        live = [(i, pickle.loads(r["payload"])) for i, r in enumerate(rows) if not r["error"]]
        step = self.segmenter.detect_batch(len(live))
        for start in range(0, len(live), step):
            chunk = live[start : start + step]
            t0 = time.perf_counter()
            try:
                tensors = np.stack([self.segmenter.preprocess(p["rgb"]) for _, p in chunk])
                found = self.segmenter.detect(tensors)
            except Exception as exc:  # the engine refused the batch: its images fail
                for i, _ in chunk:
                    rows[i] = _fail(rows[i], "detect", exc)
                continue
            detect_s = (time.perf_counter() - t0) / len(chunk)
            for (i, payload), tensor, peaks in zip(chunk, tensors, found):
                t0 = time.perf_counter()
                try:
                    maps = self.segmenter.segment(tensor, peaks)
                except Exception as exc:
                    rows[i] = _fail(rows[i], "segment", exc)
                    continue
                payload.update(peaks=peaks, maps=maps, detect_s=detect_s, segment_s=time.perf_counter() - t0,
                               entered=time.time())
                rows[i] = {**rows[i], "payload": pickle.dumps(payload),
                           **dict(zip(CAP_COLUMNS, map(int, CapReport.flags(peaks))))}
        return _batch(rows)


class RefineStage:
    """Actor: the dense CRF (or threshold) of each image, in its own fixed-size CPU pool."""

    def __init__(self, bundle_dir: str, options: InferOptions):
        self.settings = Segmenter(load_bundle(bundle_dir, verify_checksums=False), None, options).refine_settings

    def __call__(self, batch: dict) -> dict:
        rows = _rows(batch)
        for i, row in enumerate(rows):
            if row["error"]:
                continue
            payload = pickle.loads(row["payload"])
            t0 = time.perf_counter()
            try:
                payload["masks"] = self.settings.refine(payload["rgb"], payload.pop("maps"))
            except Exception as exc:
                rows[i] = _fail(row, "refine", exc)
                continue
            payload["refine_s"] = time.perf_counter() - t0
            rows[i] = {**row, "payload": pickle.dumps(payload)}
        return _batch(rows)


class WriteStage:
    """Actor: instances (NMS as the bundle says) and the outputs, written atomically to OUT."""

    def __init__(self, bundle_dir: str, options: InferOptions, out_dir: str):
        self.segmenter = Segmenter(load_bundle(bundle_dir, verify_checksums=False), None, options)
        self.out_dir, self.save = Path(out_dir), set(s for s in options.save if s in SAVE_CHOICES)

    def __call__(self, batch: dict) -> dict:
        out = []
        for row in _rows(batch):
            result = {"file_name": row["file_name"], "error": row["error"], "stage": row["stage"], "instances": 0,
                      "seconds": b"", **{k: row[k] for k in CAP_COLUMNS}}
            if not row["error"]:
                payload = pickle.loads(row["payload"])
                t0 = time.perf_counter()
                try:
                    instances = self.segmenter.instances(payload["peaks"], payload["masks"])
                    write_image_outputs(output_paths(self.out_dir, row["stem"]), payload["rgb"], instances,
                                        self.segmenter.classes, row["image_id"], row["file_name"], self.save)
                except Exception as exc:
                    result.update(error=failure_reason(exc), stage="write")
                else:
                    seconds = {k: payload[k] for k in ("decode_s", "detect_s", "segment_s", "refine_s")}
                    seconds.update(write_s=time.perf_counter() - t0, latency_s=time.time() - payload["entered"])
                    result.update(instances=len(instances), seconds=pickle.dumps(seconds))
            out.append(result)
        return _batch(out)


def _init_ray(address: str | None):
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(f"--ray needs Ray Data: {RAY_EXTRA}") from exc
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                 log_to_driver=False, include_dashboard=False)
    return ray


def run_ray(bundle_dir: str | Path, source: str | Path, out_dir: str | Path, options: InferOptions,
            ray_options: RayOptions | None = None) -> RunSummary:
    """The local pipeline's job on Ray Data; returns the summary (also OUT/summary.json)."""
    ray_options = ray_options or RayOptions()
    out_dir = Path(out_dir).resolve()
    bundle = load_bundle(bundle_dir)  # checked once here; the actors trust it
    summary = RunSummary(bundle=str(bundle.root))
    items, todo, save = prepare_run(source, out_dir, options, summary)
    ray = _init_ray(ray_options.address)
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    engines = ray_options.engine_actors or max(1, gpus)
    engine_args = {"num_gpus": 1} if gpus else {"num_cpus": ray_options.engine_cpus}
    # Actors hold what they reserve: the CRF actors' 0.7 CPU each, the engines', 0.1 for the writer and
    # for decode tasks, within the cluster's CPUs (each CRF actor keeps a core busy all the same).
    crf_actors = ray_options.crf_actors or max(1, int(cpus - (0 if gpus else engines * ray_options.engine_cpus)))
    threads = max(1, int(ray_options.engine_cpus))
    # A crashed actor is restarted and its batch retried: Ray Data's defaults for actor pools.
    summary.backend = f"ray ({engines} engine actor(s){', one GPU each' if gpus else ''}, {crf_actors} CRF actor(s))"
    summary.refine_workers = crf_actors
    capped = CapReport()
    if todo:
        rows = [{"path": str(it.path), "image_id": it.image_id, "file_name": it.file_name, "stem": it.stem,
                 "payload": b"", "error": "", "stage": "", **dict.fromkeys(CAP_COLUMNS, 0)} for it in todo]
        absolute = str(Path(bundle_dir).resolve())
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // max(1, options.batch_size)))
        ds = ds.map_batches(decode_stage, batch_size=options.batch_size, num_cpus=0.1)
        ds = ds.map_batches(EngineStage, fn_constructor_args=(absolute, options, ray_options, threads),
                            batch_size=options.batch_size, compute=ActorPoolStrategy(size=engines),
                            **engine_args)
        ds = ds.map_batches(RefineStage, fn_constructor_args=(absolute, options), batch_size=1,
                            compute=ActorPoolStrategy(size=crf_actors), num_cpus=0.7)
        ds = ds.map_batches(WriteStage, fn_constructor_args=(absolute, options, str(out_dir)), batch_size=1,
                            compute=ActorPoolStrategy(size=1), num_cpus=0.1)
        latencies = []
        for row in ds.iter_rows():
            capped.record(row["file_name"], *(bool(row[k]) for k in CAP_COLUMNS))
            if row["error"]:
                summary.failed += 1
                summary.errors.append({"file": row["file_name"], "stage": row["stage"], "reason": row["error"]})
                continue
            seconds = pickle.loads(row["seconds"])
            for stage in ("decode", "detect", "segment", "refine", "write"):
                summary.stage_seconds[stage] += seconds[f"{stage}_s"]
            latencies.append(seconds["latency_s"])
            summary.completed += 1
            summary.instances += int(row["instances"])
            summary.images_without_instances += not int(row["instances"])
        if latencies:
            summary.latency_s = percentiles(latencies)
    summary.seconds = time.perf_counter() - started
    summary.images_per_second = summary.completed / summary.seconds if summary.seconds else 0.0
    summary.capped = capped.counts()
    capped.warn(Segmenter(bundle, None, options))
    summary.measure_busy(engines=engines, refine_workers=crf_actors)
    summary.errors.sort(key=lambda e: e["file"])
    write_predictions(out_dir, items, summary, save)
    return summary
