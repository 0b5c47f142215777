"""Pre-flight: cheap checks on every rank, in the allocation, after the process group is up and before
the model or the data is loaded, so a bad node or a mixed environment costs seconds, not an allocation.

1. versions: each rank reports its host, Python, torch, CUDA/NCCL and package versions; ranks that
   differ stop the run with a table of who differs.
2. bandwidth: an all-reduce of recipe.preflight.allreduce_size across all ranks, reported as bus
   bandwidth the way nccl-tests does (algbw·2(n-1)/n); then one rank per node, node pairs in the
   rounds of a round-robin tournament (N nodes: N-1 rounds, each pair once, the pairs of a round at
   the same time). A node whose pairs are far below the median is named, with what to do.
3. shared filesystem: a file rank 0 writes (a random token) into output_dir is read back, identical,
   by every rank; the first rank of each node writes and removes a probe file of its own.
4. free host RAM and free disk at output_dir on each node against the planner's needs (launcher.planning.memory).

Every rank evaluates the same all-gathered facts, so all ranks reach the same verdict without a
further collective: all go on, or all raise PreflightFailed (no rank is left waiting). Rank 0 prints
the table and writes output_dir/preflight.json. `launch preflight RECIPE` (main, below) is a launch
with preflight.run=only: the same backend starts the ranks, which run the checks and exit.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import statistics
import time
from pathlib import Path

PACKAGES = ("deepspeed", "accelerate", "transformers", "peft", "bitsandbytes", "datasets")
PROBE = ".preflight-probe"
REPORT = "preflight.json"
DEFAULT_ALLREDUCE_BYTES = {"cuda": 64 * 2**20, "cpu": 4 * 2**20}
TIMED_ALLREDUCES = 3
EXCLUDE_HINT = "exclude it (Slurm: --exclude=NODE in the profile's extra_sbatch; Ray: remove it from the cluster)"


class PreflightFailed(RuntimeError):
    """A pre-flight check failed; raised on every rank with the same message (the failing nodes named)."""


# ----------------------------------------------------------------------------- on every rank
def check(recipe, plan, rank: int, world: int, device) -> list[str]:
    """Run the checks (unless recipe.preflight.run is 'never'); the sorted host names of the ranks."""
    import torch.distributed as dist

    if recipe.preflight.run == "never":
        return sorted(set(_all_gather(socket.gethostname(), world)))
    t0 = time.time()
    out = Path(recipe.output_dir)
    token = secrets.token_hex(16) if rank == 0 else None
    written = _write_probe(out, token) if rank == 0 else None  # before the gather below, which every rank passes
    gathered = _all_gather((socket.gethostname(), token), world)
    hosts, token = [host for host, _ in gathered], gathered[0][1]  # rank 0's token, now known to every rank
    nodes = list(dict.fromkeys(hosts))
    leaders = [hosts.index(node) for node in nodes]  # the first rank of each node speaks for it
    size = _parse_size(recipe.preflight.allreduce_size) or DEFAULT_ALLREDUCE_BYTES[plan.device]
    t_gathered = time.time()
    everyone = _busbw(size, world, None, device)
    t_allreduce = time.time()
    pairs = {}
    for round_pairs in rounds(len(nodes)):
        for a, b in round_pairs:  # every rank creates every group, in the same order (torch requires it)
            group = dist.new_group([leaders[a], leaders[b]])
            if rank in (leaders[a], leaders[b]):
                pairs[nodes[b] if rank == leaders[a] else nodes[a]] = _busbw(size, 2, group, device)
            dist.destroy_process_group(group)
    facts = {
        "rank": rank,
        "host": hosts[rank],
        "versions": versions(),
        "pairs": pairs,
        "shared_fs": written if rank == 0 else _read_probe(out),
        "node_probe": _node_probe(out, hosts[rank]) if rank in leaders else None,
        "ram_free": _ram_free(),
        "disk_free": shutil.disk_usage(_existing(out)).free,
    }
    t_pairs = time.time()
    every = _all_gather(facts, world)
    t_facts = time.time()
    if rank == 0 and written["ok"]:
        (out / PROBE).unlink()  # every rank has read it: the gather above returned
    need = needs(recipe, plan)
    report = evaluate(every, everyone, size, need, recipe.preflight.slow_node_factor, token)
    now = time.time()
    report["seconds"] = round(now - t0, 3)
    report["timings"] = {
        name: round(b - a, 3)
        for name, a, b in (
            ("probe_and_hosts_s", t0, t_gathered),
            ("allreduce_s", t_gathered, t_allreduce),
            ("node_pairs_s", t_allreduce, t_pairs),
            ("facts_s", t_pairs, t_facts),
            ("needs_s", t_facts, now),
        )
    }
    if rank == 0:
        from launcher.records import PreflightReport
        from launcher.train.report import show_preflight

        show_preflight(report)

        try:
            PreflightReport.model_validate(report).write(out / REPORT)
        except OSError as exc:
            print(f"preflight: cannot write {out / REPORT}: {exc}", flush=True)
    if report["failures"]:
        raise PreflightFailed("pre-flight failed: " + " | ".join(report["failures"]))
    return sorted(nodes)


def versions() -> dict[str, str]:
    """What this rank runs. launcher's version is the imported module's (what really runs here); the
    other packages' come from their installed metadata, which is cheap (no import)."""
    import importlib.metadata
    import platform

    import torch

    import launcher

    found = {"python": platform.python_version(), "torch": torch.__version__, "launcher": launcher.__version__}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def rounds(num_nodes: int) -> list[list[tuple[int, int]]]:
    """A round-robin tournament (the circle method): every pair of nodes exactly once, no node twice in a
    round, in num_nodes - 1 rounds (num_nodes when odd: one node sits each round out)."""
    ids: list[int | None] = list(range(num_nodes)) + ([None] if num_nodes % 2 else [])
    schedule = []
    for _ in range(len(ids) - 1):
        half = len(ids) // 2
        schedule.append(
            [tuple(sorted((a, b))) for a, b in zip(ids[:half], reversed(ids[half:])) if a is not None and b is not None]
        )
        ids = [ids[0], ids[-1], *ids[1:-1]]
    return schedule


def _all_gather(value, world: int) -> list:
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _busbw(num_bytes: int, num_ranks: int, group, device) -> float | None:
    """Bus bandwidth in bytes/s of an all-reduce of num_bytes among num_ranks (None for one rank)."""
    import torch
    import torch.distributed as dist

    if num_ranks < 2:
        return None
    tensor = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if tensor.is_cuda else (lambda: None)
    dist.all_reduce(tensor, group=group)  # warm-up: connections, and the peers arrive
    sync()
    start = time.perf_counter()
    for _ in range(TIMED_ALLREDUCES):
        dist.all_reduce(tensor, group=group)
    sync()
    seconds = (time.perf_counter() - start) / TIMED_ALLREDUCES
    return num_bytes / seconds * 2 * (num_ranks - 1) / num_ranks


def _write_probe(out: Path, token: str) -> dict:
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"{PROBE}.tmp"
        tmp.write_text(token)
        tmp.replace(out / PROBE)
    except OSError as exc:
        return {"ok": False, "token": None, "error": f"rank 0 cannot write {out}: {exc.strerror or exc}"}
    return {"ok": True, "token": token, "error": None}


def _read_probe(out: Path) -> dict:
    try:
        return {"ok": True, "token": (out / PROBE).read_text(), "error": None}
    except OSError as exc:
        return {
            "ok": False,
            "token": None,
            "error": f"rank 0's {out / PROBE} is not visible here: {exc.strerror or exc}",
        }


def _node_probe(out: Path, host: str) -> str | None:
    """None when this node can write and remove a file in output_dir; else why not."""
    probe = out / f"{PROBE}-{host}"
    try:
        probe.write_text(host)
        probe.unlink()
    except OSError as exc:
        return f"cannot write {probe}: {exc.strerror or exc}"
    return None


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _ram_free() -> int:
    import psutil

    return psutil.virtual_memory().available


def _parse_size(text: str | None) -> int | None:
    from launcher.config.cluster import parse_bytes

    return parse_bytes(text) if text else None


def needs(recipe, plan) -> dict:
    """Host RAM and disk each node needs, from the planner (the model's config on the meta device).
    CPU ranks keep the model states in host RAM too, so they count with the host's share."""
    from launcher.errors import RecipeError
    from launcher.planning import host_memory, memory

    try:
        shape = memory.model_shape(recipe)
    except RecipeError as exc:
        return {"ram": None, "disk": None, "why_not": exc.problems[0].message}
    est = memory.estimate(
        shape,
        recipe,
        plan.choice,
        num_nodes=plan.num_nodes,
        gpus_per_node=plan.procs_per_node,
        micro_batch=plan.micro_batch_size,
        device=plan.device,
    )
    ram = est.host_per_node if plan.device == "cuda" else max(est.host_per_node, est.per_gpu * plan.procs_per_node)
    return {"ram": ram, "disk": host_memory.disk_bytes(shape, recipe), "why_not": None}


# ----------------------------------------------------------------------------- the verdict (pure)
def evaluate(
    facts: list[dict], everyone: float | None, size: int, need: dict, slow_factor: float, token: str | None
) -> dict:
    """The report every rank computes from the same gathered facts (so all reach the same verdict)."""
    nodes = list(dict.fromkeys(f["host"] for f in facts))
    ranks = {node: [f["rank"] for f in facts if f["host"] == node] for node in nodes}
    first = {node: facts[ranks[node][0]] for node in nodes}
    failures = []

    columns = sorted({k for f in facts for k in f["versions"]}, key=lambda k: (k not in ("python", "torch"), k))
    differing = [c for c in columns if len({f["versions"].get(c) for f in facts}) > 1]
    groups: dict[tuple, list[int]] = {}
    for f in facts:
        groups.setdefault((f["host"], *(f["versions"].get(c) for c in differing)), []).append(f["rank"])
    mismatch = [{"host": key[0], "ranks": members, **dict(zip(differing, key[1:]))} for key, members in groups.items()]
    if differing:
        odd = _minority_nodes(facts, differing)
        failures.append(
            f"versions differ between ranks ({', '.join(differing)}; nodes {', '.join(odd)} differ from "
            "rank 0): install the same versions on every node (one container image, or one virtual "
            "environment on shared storage), or exclude the odd nodes"
        )

    pair_bw: dict[tuple[str, str], float] = {}
    for f in facts:
        for other, bw in f["pairs"].items():
            key = tuple(sorted((f["host"], other)))
            pair_bw[key] = min(bw, pair_bw.get(key, bw))
    per_node = {node: [bw for pair, bw in pair_bw.items() if node in pair] for node in nodes}
    node_bw = {node: statistics.median(bws) if bws else everyone for node, bws in per_node.items()}
    slowest = min(pair_bw, key=pair_bw.get) if pair_bw else None
    if len(nodes) >= 3:
        median = statistics.median(pair_bw.values())
        for node in nodes:
            if node_bw[node] < slow_factor * median:
                failures.append(
                    f"node {node}: all-reduce bus bandwidth {gbps(node_bw[node])} with its peers, "
                    f"below {slow_factor:g} x the median {gbps(median)} of all node pairs; {EXCLUDE_HINT}"
                )

    fs_bad = {}
    for f in facts:
        seen = f["shared_fs"]
        if not seen["ok"]:
            fs_bad.setdefault(f["host"], seen["error"])
        elif seen["token"] != token:
            fs_bad.setdefault(f["host"], f"rank 0's probe file reads differently here (rank {f['rank']})")
        if f["node_probe"]:
            fs_bad.setdefault(f["host"], f["node_probe"])
    for node, why in fs_bad.items():
        hint = " output_dir must be on storage shared by every node for a multi-node run." if len(nodes) > 1 else ""
        failures.append(f"node {node}: output_dir is not usable: {why}.{hint}")

    rows = []
    for node in nodes:
        f = first[node]
        for what, have in (("ram", f["ram_free"]), ("disk", f["disk_free"])):
            if need[what] is not None and have < need[what]:
                where = "free host RAM" if what == "ram" else "free disk at output_dir"
                failures.append(
                    f"node {node}: {where} {gib_or_dash(have)}, the run needs {gib_or_dash(need[what])}: free some, "
                    f"{'use another output_dir' if what == 'disk' else 'use a node with more memory'}, "
                    f"or {EXCLUDE_HINT}"
                )
        versions_ok = all(facts[r]["versions"] == facts[0]["versions"] for r in ranks[node])
        ok = versions_ok and not any(failure.startswith(f"node {node}:") for failure in failures)
        rows.append(
            {
                "node": node,
                "ranks": ranks[node],
                "versions_ok": versions_ok,
                "bus_bandwidth_GBps": _round_gb(node_bw[node]),
                "shared_fs_ok": node not in fs_bad,
                "ram_free": f["ram_free"],
                "ram_needed": need["ram"],
                "disk_free": f["disk_free"],
                "disk_needed": need["disk"],
                "ok": ok,
            }
        )
    return {
        "status": "failed" if failures else "passed",
        "failures": failures,
        "world_size": len(facts),
        "nodes": rows,
        "allreduce": {"bytes": size, "ranks": len(facts), "bus_bandwidth_GBps": _round_gb(everyone)},
        "node_pairs": [{"nodes": list(pair), "bus_bandwidth_GBps": _round_gb(bw)} for pair, bw in pair_bw.items()],
        "slowest_pair": list(slowest) if slowest else None,
        "note": None if len(nodes) > 1 else "one node: no node pairs; the all-reduce above is intra-node",
        "version_mismatch": mismatch if differing else [],
        "versions": facts[0]["versions"],
        "needs_not_estimated": need["why_not"],
        "ranks": [{k: f[k] for k in ("rank", "host", "versions", "ram_free", "disk_free")} for f in facts],
    }


def _minority_nodes(facts: list[dict], differing: list[str]) -> list[str]:
    ref = [facts[0]["versions"].get(c) for c in differing]
    return list(dict.fromkeys(f["host"] for f in facts if [f["versions"].get(c) for c in differing] != ref))


def _round_gb(bps: float | None) -> float | None:
    return None if bps is None else round(bps / 1e9, 4)


def gbps(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e9:.3g} GB/s"


def gib_or_dash(num_bytes: int | None) -> str:
    from launcher.planning.memory import gib

    return "-" if num_bytes is None else gib(num_bytes)
