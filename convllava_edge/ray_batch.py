"""``batch --ray``: the same items as a Ray Data job, for when one machine is not enough.

The items not yet in the log become a dataset (``from_items``); ``map_batches`` runs them on a pool of actors,
each holding one loaded Model (``Answerer``), and each answers with ``batch.answer_line``, as the local loop
does. The driver reads the results as they stream out (``iter_rows``) and appends them to the one JSONL log:
Ray's own writers would leave a folder of files and write nothing until a block is done, where the log keeps
every finished answer across a kill and lets a rerun skip it.

Actors ask for a fraction of a CPU (``num_cpus``), not whole ones: on a small cluster whole-CPU actors and
Ray's own tasks can wait on each other for ever. How many threads an actor's Model uses is ``threads``
(default: its node's cores shared out among the pool). Paths must be readable on every node (shared storage),
and every node needs convllava-edge installed, as it is where this runs (a local cluster shares this Python).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from .batch import AnswerLog, Item, answer_line
from .runtime import RuntimeOptions
from .threads import default_threads

LOCAL_OBJECT_STORE = 256 << 20  # the items and answers are small: no need for Ray's default (30% of memory)


class Answerer:
    """A Ray Data actor: one loaded Model, answering a batch of items into their JSON lines."""

    def __init__(self, bundle: str, options, runtime: RuntimeOptions, workers: int):
        from .model import Model

        threads = runtime.threads or max(1, default_threads() // workers)  # this node's cores shared out
        self.model, self.options = Model(bundle, runtime.with_(threads=threads)), options

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        lines = [json.dumps(answer_line(self.model, Item.from_json(str(item)), self.options), ensure_ascii=False)
                 for item in batch["item"]]
        return {"line": np.asarray(lines, dtype=object)}


def start_ray(address: str | None, cpus: int | None = None) -> bool:
    """Connect to the cluster at ``address``, or start a local one on this machine's cores (no dashboard, no
    token file: RAY_AUTH_MODE=disabled unless set). True when this call started Ray (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=cpus or default_threads(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=LOCAL_OBJECT_STORE, logging_level="WARNING")
    else:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    return True


def run_on_ray(bundle: Path, items: list[Item], log: AnswerLog, options, runtime: RuntimeOptions, workers: int,
               address: str | None, advance: Callable[[dict], None], cpus_per_worker: float | None = None) -> None:
    """Answer the items not yet in ``log`` on a pool of ``workers`` actors, each running the bundle as ``runtime``
    says (its threads, when unset, are each node's cores shared out among its actors)."""
    import ray

    todo = [{"item": i.to_json()} for i in items if i.key not in log.done]  # one column: images are a list or one path
    if not todo:
        return
    started = start_ray(address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours shows the answers as they arrive
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset on the user's terminal
        cpus = cpus_per_worker or min(1.0, max(0.1, (ray.cluster_resources().get("CPU", 1) - 0.5) / workers))
        dataset = ray.data.from_items(todo).map_batches(
            Answerer, fn_constructor_kwargs={"bundle": str(bundle), "options": options, "runtime": runtime,
                                             "workers": workers},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
            max_restarts=0)  # a failing actor (out of memory) fails the job; a rerun resumes it
        for row in dataset.iter_rows():
            line = json.loads(row["line"])
            log.write(line)
            advance(line)
    finally:
        if started:
            ray.shutdown()


__all__ = ["Answerer", "run_on_ray", "start_ray"]
