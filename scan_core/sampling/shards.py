"""Bookkeeping of a bulk generation run (``sampling.generate``): jobs, shards, ranks, merge.

Jobs are (class, seed) pairs, planned into shards of consecutive seeds. Each rank makes its
round-robin share of the shards and marks every finished one with a "done" file: reruns skip
those, and rank 0 waits for all of them before merging the shards into ``samples.npz``.
``run.json`` pins the run's plan, so a rerun with other flags is refused.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scan_core.files import read_json, write_npz
from scan_core.sampling.settings import SamplerSettings, with_current_names


class GenerateError(Exception):
    """A problem with the user's request; reported as one line with exit code 2."""


@dataclass(frozen=True)
class Job:
    """One image to make: class id and seed (the image draws from its own seed)."""

    class_id: int
    seed: int

    @property
    def name(self) -> str:
        return f"c{self.class_id:04d}_s{self.seed:04d}"


class RunDir:
    """Paths inside an output directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest = self.root / "run.json"
        self.npz = self.root / "samples.npz"

    def sample(self, job: Job, suffix: str) -> Path:
        return self.root / "samples" / f"{job.name}{suffix}"

    def shard(self, index: int, suffix: str) -> Path:
        return self.root / "shards" / f"shard_{index:06d}{suffix}"


def make_jobs(class_ids: list[int], seeds: list[int]) -> list[Job]:
    """Every (class, seed) pair, class-major, so consecutive seeds can share a batch."""
    jobs = [Job(int(c), int(s)) for c in class_ids for s in seeds]
    if len(set(jobs)) != len(jobs):
        raise GenerateError("repeated class/seed pairs: give each class and seed once")
    return jobs


def plan_shards(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Split jobs, in order, into batches of at most ``batch_size`` with consecutive seeds."""
    shards: list[list[Job]] = []
    for job in jobs:
        current = shards[-1] if shards else None
        if current and len(current) < batch_size and job.seed == current[0].seed + len(current):
            current.append(job)
        else:
            shards.append([job])
    return shards


def shard_indices(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process ``rank`` of ``world_size`` makes (round robin: balanced, disjoint)."""
    return list(range(rank, num_shards, world_size))


def distributed_env(environ: dict | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without them."""
    environ = os.environ if environ is None else environ
    try:
        rank, world = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError as error:
        raise GenerateError(f"bad RANK/WORLD_SIZE/LOCAL_RANK in the environment: {error}") from None
    if not 0 <= rank < world:
        raise GenerateError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local


def is_done(run_dir: RunDir, index: int, jobs: list[Job]) -> bool:
    record = read_json(run_dir.shard(index, ".done"))
    return bool(record) and record.get("jobs") == [[j.class_id, j.seed] for j in jobs]


def merge_shards(run_dir: RunDir, shards: list[list[Job]]) -> Path:
    """Write samples.npz from every shard's images, streamed (never all in memory at once)."""
    missing = [i for i, jobs in enumerate(shards) if not is_done(run_dir, i, jobs)]
    if missing:
        raise GenerateError(
            f"{len(missing)} of {len(shards)} shards are not finished (first: "
            f"{run_dir.shard(missing[0], '')}); rerun the generation, it resumes"
        )
    pieces = [np.load(run_dir.shard(i, ".npy"), mmap_mode="r") for i in range(len(shards))]
    labels = np.array([job.class_id for jobs in shards for job in jobs], dtype=np.int64)
    return write_npz(run_dir.npz, {"arr_0": pieces, "arr_1": labels})


def wait_for_shards(run_dir: RunDir, shards: list[list[Job]], timeout_s: float) -> None:
    """Rank 0 waits for the other ranks' "done" markers (files: no process group needed)."""
    deadline = time.monotonic() + timeout_s
    pending = list(range(len(shards)))
    while pending:
        pending = [i for i in pending if not is_done(run_dir, i, shards[i])]
        if pending and time.monotonic() > deadline:
            raise GenerateError(
                f"{len(pending)} shards of other ranks unfinished after {timeout_s:.0f} s; run "
                "again with --merge once they are done"
            )
        time.sleep(2.0 if pending else 0.0)


def check_manifest(run_dir: RunDir, manifest: dict) -> bool:
    """A rerun must continue the same run: refuse a directory made with other flags.

    Returns whether the manifest still has to be written (a new run).
    """
    if not run_dir.manifest.exists():
        return True
    stored = read_json(run_dir.manifest)
    if stored is None:
        raise GenerateError(f"{run_dir.manifest} is unreadable; use another --out")
    if isinstance(stored.get("settings"), dict):  # runs written before a rename or a new field
        defaults = SamplerSettings().to_dict()  # e.g. scorer "auto", what those runs did
        stored["settings"] = defaults | with_current_names(stored["settings"])
    differ = sorted(k for k in manifest if stored.get(k) != manifest[k])
    if differ:
        raise GenerateError(
            f"{run_dir.root} holds a run made with other {', '.join(differ)}; use the same "
            "flags to resume, or another --out"
        )
    return False
