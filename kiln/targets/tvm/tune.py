"""MetaSchedule tuning of a model's TIR functions, with a persistent database, trial and wall-clock budgets.

MetaSchedule alone would run new trials on every call, even when its database already holds schedules for every
task. kiln tunes task by task instead:

* tasks whose workload the database already holds are skipped, and once a tuning has finished or spent its
  budget (``kiln_tuning.json`` in the database directory), a later compile with the same database runs zero
  trials (the report says how many tasks were reused); a tuning that was killed resumes with the tasks left;
* the trial budget is split evenly over the remaining tasks (at least ``MIN_TRIALS_PER_TASK`` each, so a small
  budget tunes the first tasks properly rather than every task badly), and tuning stops between tasks once the
  wall-clock budget is spent; untuned tasks keep kiln's default schedules (:func:`relax_build.default_rules`);
* before a task's trials, its default schedule is measured the same way and committed to the database
  (:func:`_seed_default`), so the trials have to beat it: a small budget cannot make a model slower than untuned;
* every task logs a progress line (``kiln`` logger): index, name, trials, seconds, best latency.

Measurement runs locally, or on RPC servers registered with a tracker (:class:`RpcSpec`): the tracker hands each
candidate to a free server of the given key, so tuning scales with the number of servers and can target boards
and phones the compiler does not run on.

The database lives under the kiln cache, one directory per (target, model, trial and time budget):
``<cache>/tvm/<key>/`` with MetaSchedule's ``database_workload.json`` and ``database_tuning_record.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, describe
from kiln.targets.tvm import relax_build

logger = logging.getLogger("kiln")

MIN_TRIALS_PER_TASK = 8
#: Written into the database directory once a tuning finished (or spent its budget): later compiles run no trials.
DONE_FILE = "kiln_tuning.json"
#: Most candidates an evolutionary search round keeps (MetaSchedule's 512 cost minutes per task on 2 cores);
#: a task tuned with few trials keeps 4 per trial.
POPULATION = 128
#: Seconds one candidate may take to build (this machine is often shared; a build takes well under a second idle).
BUILD_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class RpcSpec:
    """Where candidates run: an RPC tracker and the key its servers registered under."""

    host: str
    port: int
    key: str
    timeout_s: int = 60

    @classmethod
    def parse(cls, text: str, key: str) -> RpcSpec:
        """``HOST:PORT`` (the tracker) with the servers' ``key``."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise KilnError(f"rpc tracker {text!r}: expected HOST:PORT")
        if not key:
            raise KilnError("tuning over RPC needs the servers' key (option rpc_key)")
        return cls(host, int(port), key)

    def check_reachable(self) -> None:
        """KilnError at once if nothing listens at the tracker's address (TVM's own client retries for a minute)."""
        try:
            socket.create_connection((self.host, self.port), timeout=5).close()
        except OSError as e:
            raise KilnError(f"RPC tracker {self.host}:{self.port}: cannot connect ({e.strerror or e})") from None

    def servers(self) -> int:
        """Free servers of this key on the tracker (KilnError if the tracker cannot be reached)."""
        from tvm import rpc

        try:
            summary = rpc.connect_tracker(self.host, self.port).summary()
        except Exception as e:
            raise KilnError(f"RPC tracker {self.host}:{self.port}: {describe(e)}") from None
        return int(summary.get("queue_info", {}).get(self.key, {}).get("free", 0))


def database_dir(cache: Path, target: Any, model_key: str, trials: int, time_budget_s: float) -> Path:
    """The database directory for this target, model and budget."""
    budget = {"trials": trials, "time_budget_s": time_budget_s}
    text = json.dumps({"target": str(target), "model": model_key, **budget}, sort_keys=True)
    return cache / "tvm" / hashlib.sha256(text.encode()).hexdigest()[:16]


def open_database(directory: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    directory.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(directory), module_equality="structural")


def _runner(rpc: RpcSpec | None) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50))
    servers = rpc.servers()
    if servers < 1:
        raise KilnError(f"RPC tracker {rpc.host}:{rpc.port} has no free server with key {rpc.key!r}")
    config = ms.runner.RPCConfig(
        tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key, session_timeout_sec=rpc.timeout_s
    )
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=servers)


@functools.cache
def _builder() -> Any:
    """A builder whose workers import TVM's tensor intrinsics once, outside the per-build timeout.

    MetaSchedule's default build imports ``tvm.s_tir.tensor_intrin`` in the worker on its first build; that import
    parses every intrinsic with TVMScript and took 60-80 s here, so with the default 30 s timeout every build of a
    fresh worker is killed and retried forever. One builder serves every tuning of the process, paying that once
    per worker. Workers: half the cores (one on the 2-core machines here; on a 16-core GPU machine one worker built
    16 CUDA candidates in about 2 minutes).
    """
    from tvm.s_tir import meta_schedule as ms

    def load_intrinsics() -> None:  # runs in the worker; defined here so it pickles by value
        import tvm.s_tir.tensor_intrin  # noqa: F401

    workers = max(1, (os.cpu_count() or 2) // 2)
    return ms.builder.LocalBuilder(max_workers=workers, timeout_sec=BUILD_TIMEOUT_S, initializer=load_intrinsics)


def tune(
    mod: Any,
    target: Any,
    database: Any,
    work_dir: Path,
    *,
    trials: int,
    time_budget_s: float = 0.0,
    rpc: RpcSpec | None = None,
) -> dict[str, Any]:
    """Tune the TIR functions of legalized ``mod`` into ``database``; returns what was done (for the report)."""
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    tasks = ms.relax_integration.extract_tasks(mod, target)
    done_file = work_dir / DONE_FILE
    todo = [] if done_file.exists() else [t for t in tasks if not database.has_workload(t.dispatched[0])]
    stats: dict[str, Any] = {
        "tasks": len(tasks),
        "reused_tasks": len(tasks) - len(todo),
        "tuned_tasks": 0,
        "trials": 0,
        "defaults_seeded": 0,
        "defaults_kept": 0,
        "database": str(work_dir),
        "measured_on": "local" if rpc is None else f"rpc {rpc.host}:{rpc.port} key {rpc.key}",
    }
    if not todo:
        stats["seconds"] = time.perf_counter() - start
        return stats
    # Heaviest first: the task weight counts how often the function is called.
    todo.sort(key=lambda t: -t.weight)
    per_task = max(MIN_TRIALS_PER_TASK, trials // len(todo))
    runner = _runner(rpc)
    builder = _builder()
    budget_left = trials
    for index, task in enumerate(todo, 1):
        elapsed = time.perf_counter() - start
        if budget_left < 1 or (time_budget_s and elapsed >= time_budget_s):
            logger.info("tuning: budget spent after %d of %d tasks (%.0f s)", index - 1, len(todo), elapsed)
            break
        n = min(per_task, budget_left)
        population = min(POPULATION, max(16, 4 * n))
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=population // 4
        )
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task], str(work_dir / "logs"), strategy=strategy
        )
        if not contexts:
            continue
        task_start = time.perf_counter()
        try:
            seeded = _seed_default(task.dispatched[0], target, database, builder, runner)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(work_dir / "logs"),
                max_trials_global=n,
                max_trials_per_task=n,
                num_trials_per_iter=min(n, 16),
                builder=builder,
                runner=runner,
                database=database,
            )
        except Exception as e:
            raise KilnError(f"MetaSchedule failed on task {task.task_name}: {describe(e)}") from None
        budget_left -= n
        stats["tuned_tasks"] += 1
        stats["trials"] += n
        record = database.query_tuning_record(task.dispatched[0], target, "main")
        best = _best_ms(record)
        logger.info(
            "tuning task %d/%d %s: %d trials, %.1f s, best %s (kiln's default schedule: %s)",
            index,
            len(todo),
            task.task_name,
            n,
            time.perf_counter() - task_start,
            f"{best:.3f} ms" if best is not None else "none",
            f"{seeded:.3f} ms" if seeded is not None else "none",
        )
        if seeded is not None:
            stats["defaults_seeded"] += 1
            stats["defaults_kept"] += int(best is not None and best >= seeded)
    stats["seconds"] = time.perf_counter() - start
    done_file.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _seed_default(workload: Any, target: Any, database: Any, builder: Any, runner: Any) -> float | None:
    """Measure the schedule kiln applies untuned (:func:`relax_build.default_rules`) and commit it to ``database``
    as a tuning record: the search then has to beat it, and a task whose trials find nothing faster keeps it.

    Without this, a small budget made a model slower than untuned: MetaSchedule's best of 16 trials on a 64x256 @
    256x512 matmul ran at 32 GFLOPS, kiln's rule at about 100. Returns the measured milliseconds, or None where no
    rule applies or the measurement failed (the search then starts from nothing, as before).
    """
    from tvm.s_tir import meta_schedule as ms

    func = workload["main"]
    sch = next((s for s in (r.apply(func, target, False) for r in relax_build.default_rules(target)) if s), None)
    if sch is None:
        return None
    args_info = ms.arg_info.ArgInfo.from_prim_func(func)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg:
        logger.info("kiln's default schedule failed to build for tuning: %s", built.error_msg.splitlines()[0])
        return None
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])
    result = future.result()
    if result.error_msg or not result.run_secs:
        return None
    record = ms.database.TuningRecord(
        sch.trace, database.commit_workload(workload), [float(t) for t in result.run_secs], target, args_info
    )
    database.commit_tuning_record(record)
    return _best_ms(record)


def _best_ms(record: Any) -> float | None:
    if record is None or not record.run_secs:
        return None
    secs = [float(s) for s in record.run_secs]
    return 1e3 * sum(secs) / len(secs) if all(math.isfinite(s) for s in secs) else None
