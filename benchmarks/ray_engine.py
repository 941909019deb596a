"""Films per second of ``kneepipe run`` on the local engine and on the Ray engine, on this machine.

The shared real radiographs, copied ``--copies`` times under other names into a work folder
(so the batch is large enough to time), are graded by:

* local: :func:`kneepipe.pipeline.run.run_pipeline`, the models loaded before the clock;
* ray: :func:`kneepipe.pipeline.ray_engine.run_pipeline_ray` on a Ray instance started on
  this machine (``ray.init(num_cpus=<this machine's CPUs>)``) before the clock, once per
  ``--actor-cpus`` value (each actor reserves that many CPUs, so 2 CPUs hold one actor of 2
  or two of 1). The clock includes what every Ray run pays: starting the actors and loading
  their models.

Each engine also grades the first step's films alone (``batch`` films, given as a ``.txt``
list): the difference of the two runs is the steady rate, and what the short run took
beyond its films at that rate is the fixed cost of a run (for Ray, starting its actors).
The grader keeps its trained batch-norm statistics (``grade.batch_norm=train``): with
``auto`` a shifted batch is graded again on the driver at the end, a batch-level cost that
is the same for both engines and is not per film.

The engines alternate for ``--repeats`` rounds, so a machine shared with other work slows
both alike. Each run's ``results.csv`` is compared with the local one, and the peak
resident memory of the processes running the Ray actors is sampled.

    .venv/bin/python benchmarks/ray_engine.py --copies 4 --repeats 2 --actor-cpus 2 --work /tmp/kneepipe-ray
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RADIOGRAPHS = ROOT.parent / "shared" / "data" / "radiographs"


class ActorMemory:
    """The peak summed resident memory of the processes running the actors, sampled in a thread."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            total = 0
            for process in psutil.Process().children(recursive=True):
                try:
                    if "FilmGrader" in " ".join(process.cmdline()):
                        total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_mb = max(self.peak_mb, total / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radiographs", type=Path, default=RADIOGRAPHS, help="the films to copy")
    parser.add_argument("--copies", type=int, default=4, help="copies of the 27 shared radiographs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kneepipe-ray")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument(
        "--batch-norm", default="train", help="grade.batch_norm: train keeps the batch-level regrade out of the timing"
    )
    args = parser.parse_args()

    import ray

    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.ray_engine import STEPS_PER_TASK, run_pipeline_ray
    from kneepipe.pipeline.run import load_models, run_pipeline

    raw = args.work / "raw"
    shutil.rmtree(args.work, ignore_errors=True)
    raw.mkdir(parents=True)
    for copy in range(args.copies):
        for path in sorted(args.radiographs.iterdir()):
            shutil.copy(path, raw / f"copy{copy}_{path.name}")
    names = sorted(path.name for path in raw.iterdir())
    configs = (
        load_config(PipelineConfig, overrides={"overwrite": True}),
        load_config(DetectConfig),
        load_config(GradeConfig, overrides={"batch_norm": args.batch_norm}),
    )
    first_step = args.work / "first_step.txt"
    first_step.write_text("".join(f"raw/{name}\n" for name in names[: configs[0].batch]))
    detector, grader = load_models(configs[1], configs[2])
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    print(
        f"{len(names)} films ({args.copies} copies of the shared radiographs), {cpus} CPUs, "
        f"batch {configs[0].batch}, {STEPS_PER_TASK} steps per Ray task, grade.batch_norm={args.batch_norm}"
    )
    print("| engine | round | wall s | films/s | steady films/s | start-up s | actors' peak RSS | same csv |")
    print("|---|---|---|---|---|---|---|---|")
    short = configs[0].batch
    for round_ in range(1, args.repeats + 1):
        engines = [("local", None)] + [(f"ray, actors of {n:g} CPUs", n) for n in args.actor_cpus]
        for engine, actor_cpus in engines:
            out = args.work / ("local" if actor_cpus is None else f"ray-{actor_cpus:g}")
            walls = {}
            with ActorMemory() as memory:
                for inputs, name in ((first_step, "short"), (raw, "all")):
                    started = time.perf_counter()
                    if actor_cpus is None:
                        run_pipeline(inputs, out / name, *configs, detector=detector, grader=grader)
                    else:
                        run_pipeline_ray(
                            inputs, out / name, *configs, detector=detector, grader=grader, actor_cpus=actor_cpus
                        )
                    walls[name] = time.perf_counter() - started
            steady = (len(names) - short) / (walls["all"] - walls["short"])
            local = (args.work / "local" / "all" / "results.csv").read_text()
            same = (out / "all" / "results.csv").read_text() == local
            rss = f"{memory.peak_mb:.0f} MB" if actor_cpus else ""
            print(
                f"| {engine} | {round_} | {walls['all']:.1f} | {len(names) / walls['all']:.2f} | {steady:.2f} | "
                f"{walls['short'] - short / steady:.1f} | {rss} | {same} |",
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
