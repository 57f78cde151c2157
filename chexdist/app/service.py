"""The app's model: loaded once per process, run in a bounded pool of worker threads.

Each worker thread holds its own copy of the model (copied in memory from the one load), because
Grad-CAM puts hooks on the model for the length of a call and a forward pass of another request
must not feed them. The pool has `workers` threads and admits at most `queue` waiting requests
beyond them; more get 503 at once instead of piling up. Predictions and overlays come from
`chexdist.evaluation.predict.predict_files`, so the API gives what `chexdist predict` gives.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from chexdist.app.card import model_card
from chexdist.app.uploads import UploadError
from chexdist.evaluation.cam import NO_EVIDENCE
from chexdist.evaluation.inference import load_run
from chexdist.labels import canonical_name


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _named(text: str, path: Path, name: str) -> str:
    """A message about the private temp file, naming the upload instead (no server paths leak)."""
    return text.replace(str(path), name)


class ModelService:
    def __init__(self, run: str | os.PathLike, workers: int = 1, queue: int = 64):
        if workers < 1 or queue < 0:
            raise UploadError(400, f"workers {workers} must be >= 1 and queue {queue} >= 0")
        self.loaded = load_run(run)
        self.card = model_card(self.loaded)
        self.labels = list(self.loaded.info["labels"])
        self.workers = workers
        torch.set_num_threads(max(1, _cpus() // workers))
        self._local = threading.local()
        self._claim = threading.Lock()
        self._claimed = False
        self._models: list[torch.nn.Module] = [self.loaded.model]
        self._admission = threading.BoundedSemaphore(workers + queue)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chexdist-infer")

    def _run(self):
        """This worker thread's own LoadedRun (the first worker uses the loaded model itself)."""
        mine = getattr(self._local, "run", None)
        if mine is None:
            with self._claim:
                first, self._claimed = not self._claimed, True
            mine = self.loaded if first else dataclasses.replace(self.loaded, model=copy.deepcopy(self.loaded.model))
            self._local.run = mine
            self._models.append(mine.model)
        return mine

    async def submit(self, fn, *args) -> Any:
        if not self._admission.acquire(blocking=False):
            raise UploadError(503, "server busy: too many requests waiting; retry shortly")
        try:
            return await asyncio.wrap_future(self._pool.submit(fn, *args))
        finally:
            self._admission.release()

    def predict(self, path: Path, name: str) -> dict[str, Any]:
        """`chexdist predict --format json` for one file, with the upload's name as `image`."""
        from chexdist.evaluation.predict import predict_files

        result = predict_files(self._run(), [path], batch_size=1, progress=False)
        if result.failures:
            raise UploadError(422, _named(result.failures[0]["error"], path, name))
        for record in result.records:
            record["image"] = name
        return {"predictions": result.records, "failures": []}

    def cam(self, path: Path, name: str, out: Path, finding: str | None) -> dict[str, Any]:
        """Overlays (PNG data URLs) of the positive findings, or of `finding`; findings whose map is
        all zero are listed with the reason instead of drawn."""
        from chexdist.evaluation.predict import predict_files

        if finding:
            try:
                finding = canonical_name(finding, where="finding")
            except Exception as exc:
                raise UploadError(422, str(exc)) from None
        result = predict_files(self._run(), [path], batch_size=1, progress=False, cam_dir=out, cam_finding=finding or None)
        if result.failures:
            raise UploadError(422, _named(result.failures[0]["error"], path, name))
        record = result.records[0]
        wanted = [finding] if finding else record["positive"]
        overlays = []
        for target in wanted:
            file = next((p for p in record["cam"] if p.endswith(f"_{target}.png")), None)
            if file is not None:
                data = base64.b64encode(Path(file).read_bytes()).decode("ascii")
                overlays.append({"finding": target, "probability": record["probabilities"][target],
                                 "png": f"data:image/png;base64,{data}"})
        return {
            "image": name,
            "target_layer": self.card["cam_layer"],
            "overlays": overlays,
            "no_evidence": [{"finding": f, "message": NO_EVIDENCE} for f in record["cam_empty"]],
            "positive": record["positive"],
        }

    def hook_count(self) -> int:
        """Hooks on the workers' models: 0 between requests (Grad-CAM's are released after each call);
        /healthz reports it, so a leak shows without a profiler."""
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for model in list(self._models) for m in model.modules())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
