"""Where this process sits in a job, from its launcher's environment (torch-free: the CLI reads it
before torch is imported, to keep ranks other than 0 quiet).

A job runs sharded whenever it was launched as several ranks: by torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) or by srun with several tasks (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the first host of the job's node list). No flag asks for it; one rank is the
ordinary, unsharded path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DistEnv", "detect_env", "expand_nodelist"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | slurm | submitit-local | env (RANK/WORLD_SIZE by hand)

    @property
    def distributed(self) -> bool:
        """Whether the job has more than one rank."""
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """A Slurm host list ("gpu[01-03,7],cpu5") as host names, in order."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if not m:
            hosts.append(group)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def _launcher(env: Any) -> str:
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_PROCID" in env:
        return "slurm"
    return "submitit-local" if "SUBMITIT_LOCAL_JOB_ID" in env else "env"


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The launcher's description of this process (torchrun's variables win over Slurm's)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                       # RANK and WORLD_SIZE also come from submitit's export in a multi-task Slurm job
                       _launcher(env))
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        job = int(env.get("SLURM_JOB_ID") or 0)
        port = int(env.get("MASTER_PORT") or 20000 + job % 40000)  # the same on every task of the job
        return DistEnv(int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"), port, "slurm")
    return DistEnv()
