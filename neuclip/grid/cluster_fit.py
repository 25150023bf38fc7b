"""Does each stage's SLURM request fit a node of its partition? Asked of the cluster (`sinfo`) by the preflight.

A request no node can hold is not refused by every sbatch: it may be queued and pend for ever with reason
PartitionConfig (seen on the test cluster with an error sweep of cpus_per_task 2 on 1-CPU nodes). So, where
`sinfo` answers, the preflight compares each stage's per-node need (CPUs = cpus_per_task x tasks, memory,
GPUs) and node count with the partition's nodes as configured (their state does not matter: a drained node
comes back, a too-small one does not). Where `sinfo` is absent (a laptop), nothing is checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from neuclip.grid.launcher import tasks_per_node


@dataclass(frozen=True)
class Node:
    cpus: int
    mem_mb: int
    gpus: int


def parse_sinfo(text: str) -> tuple[dict[str, list[Node]], str | None]:
    """`sinfo -h -N -o '%P|%c|%m|%G'` output as {partition: nodes} and the default partition ('*')."""
    parts: dict[str, list[Node]] = {}
    default = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, cpus, mem, gres = fields
        if name.endswith("*"):
            name = default = name[:-1]
        try:
            node = Node(int(cpus.rstrip("+")), int(mem.rstrip("+")),
                        sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)))
        except ValueError:  # a field this site's sinfo fills otherwise (N/A): that node is not judged
            continue
        parts.setdefault(name, []).append(node)
    return parts, default


def cluster_nodes() -> tuple[dict[str, list[Node]], str | None] | None:
    """The cluster's partitions, or None where there is no answering SLURM here."""
    if shutil.which("sinfo") is None:
        return None
    try:
        # -a: hidden partitions too (a site may name one; sbatch judges access)
        out = subprocess.run(["sinfo", "-a", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    parts, default = parse_sinfo(out)
    return (parts, default) if parts else None


def misfit(la: dict, cluster: tuple[dict[str, list[Node]], str | None]) -> str | None:
    """Why the (site-merged) launcher section `la` cannot run on any node of its partition, or None."""
    parts, default = cluster
    names = (la.get("partition") or default or "").split(",")  # sbatch takes a list: the job runs in any of them
    missing = [n for n in names if n not in parts]
    if missing:
        return (f"partition {missing[0]!r} is not one of the cluster's ({', '.join(sorted(parts))}): set "
                "launcher.partition")
    whys = [_misfit_in(la, n, parts[n]) for n in names]
    return None if None in whys else whys[0]


def _misfit_in(la: dict, name: str, nodes: list[Node]) -> str | None:
    cpus = tasks_per_node(la) * (la["cpus_per_task"] or 1)
    need = Node(cpus, int((la["mem_gb"] or 0) * 1024), la["gpus_per_node"] or 0)
    fits = [n for n in nodes if n.cpus >= need.cpus and n.mem_mb >= need.mem_mb and n.gpus >= need.gpus]
    biggest = max(nodes, key=lambda n: (n.gpus, n.cpus, n.mem_mb))
    if not fits:
        return (f"asks each node for {need.cpus} CPU(s) (tasks x cpus_per_task), {need.mem_mb / 1024:g} GB (mem_gb) "
                f"and {need.gpus} GPU(s) (gpus_per_node), but the largest node of partition {name!r} has "
                f"{biggest.cpus} CPUs, {biggest.mem_mb / 1024:.0f} GB and {biggest.gpus} GPUs: the job would pend "
                "for ever; lower those keys for this stage (stages: in the experiment config) or pick another "
                "partition")
    if la["nodes"] > len(fits):
        return (f"asks for {la['nodes']} nodes (nodes), but partition {name!r} has {len(fits)} that can hold its "
                "per-node request")
    return None
