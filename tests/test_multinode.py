"""Multi-node training, for real on one machine: two ``torchrun`` launches ("nodes", one gloo
process each) meet through a c10d rendezvous on 127.0.0.1, as two hosts of a cluster would
(``scripts/slurm/train_backbone.sbatch``), and train ``train_backbone.py`` on digits.

- Same results: the two-node weights equal a one-process run of the same global batch up to float
  reduction order (a model without batch statistics), and equal a single-node two-process run bit
  for bit, BatchNorm buffers included (what BatchNorm does across processes is explained there).
- A dead node: SIGKILL one node's worker after the first checkpoint; the survivor stops within a
  bounded time with one clear line, and rerunning the same two commands resumes from that
  checkpoint and ends with the weights of a run that was never interrupted.
- A frozen node (SIGSTOP: a hung host, a network partition): the survivor stops after
  ``FCT_DIST_TIMEOUT_S``.

Every launch runs in its own session with a timeout; whatever is left is killed by process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

from fct.models import read_model_file
from helpers import REPO, digits_backbone_config, free_port, run_script

RUN_TIMEOUT_S = 240  # a whole two-epoch launch; about 20-40 s here
STOP_BOUND_S = 30  # a survivor must stop this soon after its peer is killed (it takes 2-3 s)
SILENT_TIMEOUT_S = 10  # FCT_DIST_TIMEOUT_S of the frozen-node test
LR = ["--set", "optimizer_params.lr=0.02"]  # a gentle step, as test_train's DDP test


@dataclass
class Node:
    """One torchrun launch and its log files. The agent leads its own session (start_new_session)
    and starts each worker in a session of the worker's own, so a whole "node" is the agent's
    process group plus every worker's."""

    proc: subprocess.Popen
    out: Path
    err: Path
    config: Path
    seen: set[int] = field(default_factory=set)  # worker PIDs found so far

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def workers(self) -> dict[int, int]:
        """{global rank: PID} of the training processes this launch's agent started (from /proc)."""
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if "RANK" in env:
                found[int(env["RANK"])] = int(d.name)
        self.seen.update(found.values())
        return found

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole node: the agent's process group and each worker's."""
        groups = [] if self.proc.poll() is not None else [self.proc.pid]
        self.workers()
        for pid in self.seen:  # only those still running this test's config (a PID can be reused)
            try:
                if str(self.config) in Path(f"/proc/{pid}/cmdline").read_text():
                    groups.append(pid)
            except OSError:
                pass
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL whatever is left of the node (agent and workers, stopped ones included)."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _env(extra: Optional[dict] = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra or {})}


def launch_nodes(config: Path, logs: Path, port: int, rdzv_id: str, *,
                 env: Optional[dict] = None) -> list[Node]:
    """Start the two nodes' commands, node 0 first, as on two hosts.

    On a cluster only the node named by the endpoint hosts the rendezvous store (its hostname
    matches); here both match 127.0.0.1, so ``is_host`` says which one does: node 0, as the first
    node of a SLURM job. The ranks are the rendezvous's to assign (torchrun ignores, with a
    warning, ``--node_rank`` under c10d; it is passed as a user would)."""
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
               "--rdzv-conf", f"is_host={int(node_rank == 0)}",
               "train_backbone.py", "--config", str(config), *LR]
        tag = f"node{node_rank}.{len(list(logs.glob(f'node{node_rank}.*.out')))}"
        out, err = logs / f"{tag}.out", logs / f"{tag}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=fo, stderr=fe,
                                    start_new_session=True)
        nodes.append(Node(proc, out, err, config))
    return nodes


def wait_nodes(nodes: list[Node], timeout: float) -> list[int]:
    """Every node's exit code; on a timeout every node is killed and the test fails with their logs."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail(f"the nodes did not finish within {timeout} s (a hang):\n" + _logs(nodes))
    return [n.proc.returncode for n in nodes]


def _logs(nodes: list[Node]) -> str:
    return "\n".join(f"--- node {i} (exit {n.proc.returncode})\n{n.stdout()}\n{n.stderr()[-3000:]}"
                     for i, n in enumerate(nodes))


@pytest.fixture
def cleanup():
    """Collects launched nodes; kills whatever is still running when the test ends (pass or fail)."""
    launched: list[Node] = []
    yield launched
    for node in launched:
        node.kill()


def run_two_nodes(config: Path, logs: Path, launched: list[Node], **kw) -> list[Node]:
    nodes = launch_nodes(config, logs, free_port(), uuid.uuid4().hex[:12], **kw)
    launched += nodes
    codes = wait_nodes(nodes, RUN_TIMEOUT_S)
    assert codes == [0, 0], _logs(nodes)
    return nodes


def wait_for(predicate, timeout: float, nodes: list[Node], what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n" + _logs(nodes))
        if any(n.proc.poll() is not None for n in nodes):
            pytest.fail(f"a node exited while waiting for {what}:\n" + _logs(nodes))
        time.sleep(0.05)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return read_model_file(folder / "model.pt")["state_dict"]


def epochs_logged(folder: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


def groupnorm_config(folder: Path) -> Path:
    """The digits config on a model without batch statistics: timm's resnet18 at 1/8 width with
    GroupNorm(1 group) instead of BatchNorm, at the data's 8x8 (no resize), so every sample's
    gradient is independent of the batch it shares a process with."""
    folder.mkdir(parents=True, exist_ok=True)
    p = digits_backbone_config(folder)
    p.write_text(p.read_text().replace(
        "arch_params: {arch: CifarResNet20, num_classes: 10, embedding_dim: 16, last_nonlin: true}",
        "arch_params: {arch: timm/resnet18, num_classes: 10, embedding_dim: 16, image_size: 8, "
        "arch_kwargs: {channels: [8, 16, 32, 64], stem_width: 8, norm_layer: groupnorm1}}"))
    return p


@pytest.mark.slow
def test_two_nodes_match_one_process(tmp_path, cleanup):
    """Two nodes x one process, global batch 64 (32 each) against one process with 64.

    Data order, shards and augmentation are functions of (seed, epoch, sample) and DDP averages
    the per-process mean gradients, so the two runs are the same optimisation (the gradient path
    is exact: test_train.test_ddp_gradient_path_is_exact); only the order of float sums differs
    (a weight gradient summed over 64 samples at once, or over 2 x 32 and then gloo's all-reduce).
    Measured here after 2 epochs (22 steps): 6e-9 relative (norm of the difference over the norm
    of the weights over all tensors) and 6e-8 absolute at most, the same as between two
    one-process runs with 1 and 2 intra-op threads (5e-9, 1e-7). Real faults are far above: the
    gradients summed instead of averaged (the lr doubled) 2.0e-2, each node taking the whole
    global batch (128) 1.6e-2, a shard lost (batch 32) 2.7e-2. The tolerance, 1e-6 relative and
    1e-5 on any element, leaves two orders of magnitude for other CPUs' kernels and four below
    the smallest fault."""
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_script("train_backbone.py", "--config", str(groupnorm_config(one)), *LR, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    run_two_nodes(groupnorm_config(two), tmp_path / "logs", cleanup)
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    assert not any("running_" in k for k in a)  # no batch statistics anywhere in this model
    floats = [k for k in a if a[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in floats) ** 0.5
    den = sum(float(a[k].double().norm()) ** 2 for k in floats) ** 0.5
    assert num / den < 1e-6, num / den
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    m1 = json.loads((one / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    m2 = json.loads((two / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(m1["train_loss"] - m2["train_loss"]) < 1e-4 and m1["val_top1"] == m2["val_top1"]


@pytest.fixture(scope="module")
def batchnorm_two_nodes(tmp_path_factory) -> Path:
    """An uninterrupted two-node run of the digits config (CifarResNet20, with BatchNorm), shared
    by the tests that compare with it."""
    folder = tmp_path_factory.mktemp("bn_two_nodes")
    launched: list[Node] = []
    try:
        run_two_nodes(digits_backbone_config(folder, epochs=2), folder / "logs", launched)
    finally:
        for node in launched:
            node.kill()
    return folder


@pytest.mark.slow
def test_two_nodes_equal_single_node_ddp_with_batchnorm(tmp_path, batchnorm_two_nodes):
    """With BatchNorm every process normalises with its own half of the batch (SyncBatchNorm is
    for GPUs only), so no one-process run has the same optimisation; the comparison that holds is
    with the same two processes on one node (``--standalone``): bit for bit, every parameter and
    every buffer. The BatchNorm running statistics in the file are rank 0's (DDP broadcasts rank
    0's buffers before every forward), estimated from its half-batches."""
    single = tmp_path / "single"
    single.mkdir()
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "train_backbone.py", "--config", str(digits_backbone_config(single, epochs=2)), *LR,
                   timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    a, b = weights(single), weights(batchnorm_two_nodes)
    assert a.keys() == b.keys() and any(k.endswith("running_var") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = ("time", "images_per_s", "epoch_time_s")
    lines = [[{k: v for k, v in json.loads(x).items() if k not in drop}
              for x in (f / "run" / "metrics.jsonl").read_text().splitlines()]
             for f in (single, batchnorm_two_nodes)]
    assert lines[0] == lines[1]


@pytest.mark.slow
def test_killed_node_stops_the_job_and_rerun_resumes(tmp_path, cleanup, batchnorm_two_nodes):
    """SIGKILL node 1's worker once the first checkpoint exists: the survivor stops at its next
    collective (gloo sees the connection reset) with one clear line, both launches exit non-zero
    and nothing hangs. The same two commands then resume after epoch 1 and end with the weights
    of the run that was never interrupted."""
    config = digits_backbone_config(tmp_path, epochs=2)
    port, rdzv_id = free_port(), uuid.uuid4().hex[:12]
    env = {"FCT_DIST_TIMEOUT_S": "60"}  # the bound if the reset were missed; not what stops it here
    nodes = launch_nodes(config, tmp_path / "logs", port, rdzv_id, env=env)
    cleanup += nodes
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    wait_for(checkpoint.exists, RUN_TIMEOUT_S, nodes, "the first checkpoint")
    survivor, victim = nodes[0].workers(), nodes[1].workers()
    assert len(survivor) == len(victim) == 1 and set(survivor) | set(victim) == {0, 1}, (survivor, victim)
    os.kill(next(iter(victim.values())), signal.SIGKILL)
    killed_at = time.monotonic()
    codes = wait_nodes(nodes, STOP_BOUND_S + 30)
    stopped_after = time.monotonic() - killed_at
    assert codes[0] != 0 and codes[1] != 0, _logs(nodes)
    assert stopped_after < STOP_BOUND_S, stopped_after
    errors = [line for n in nodes for line in n.stderr().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, _logs(nodes)  # the survivor's, once
    survivor_rank = next(iter(survivor))
    assert errors[0].startswith(f"error: rank {survivor_rank} of 2: a collective operation failed ("), errors
    assert "another rank or node of this job has stopped" in errors[0], errors
    assert "rerun the same command on every node to resume" in errors[0], errors
    # no traceback from the worker (torchrun prints one of its own, which fct cannot suppress)
    assert "Error: " not in nodes[0].stderr().replace("ChildFailedError: ", ""), _logs(nodes)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert not (tmp_path / "model.pt").exists()

    nodes = launch_nodes(config, tmp_path / "logs", port, rdzv_id, env=env)  # the same two commands
    cleanup += nodes
    assert wait_nodes(nodes, RUN_TIMEOUT_S) == [0, 0], _logs(nodes)
    assert f"resuming {tmp_path / 'run'} after epoch 1/2" in "".join(n.stdout() for n in nodes)
    assert epochs_logged(tmp_path) == [0, 1]
    a, b = weights(tmp_path), weights(batchnorm_two_nodes)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_frozen_node_stops_the_job_after_the_timeout(tmp_path, cleanup):
    """SIGSTOP node 1 (agent and worker: a frozen host, or one cut off by the network; no
    connection closes): the survivor waits FCT_DIST_TIMEOUT_S at its next collective, then stops
    with the same line. The frozen node never learns; under SLURM ``srun --kill-on-bad-exit=1``
    ends it."""
    nodes = launch_nodes(digits_backbone_config(tmp_path, epochs=2), tmp_path / "logs", free_port(),
                         uuid.uuid4().hex[:12], env={"FCT_DIST_TIMEOUT_S": str(SILENT_TIMEOUT_S)})
    cleanup += nodes
    wait_for((tmp_path / "run" / "checkpoint.pt").exists, RUN_TIMEOUT_S, nodes, "the first checkpoint")
    survivor_rank = next(iter(nodes[0].workers()))
    nodes[1].signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        nodes[0].proc.wait(timeout=SILENT_TIMEOUT_S + STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the survivor still waits for the frozen node:\n" + _logs(nodes))
    waited = time.monotonic() - frozen_at
    assert nodes[0].proc.returncode != 0, _logs(nodes)
    assert SILENT_TIMEOUT_S - 2 < waited < SILENT_TIMEOUT_S + STOP_BOUND_S, waited  # the timeout stopped it
    errors = [line for line in nodes[0].stderr().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, _logs(nodes)
    # gloo words the same timeout two ways, depending on which side of the pair notices first
    expected = f"error: rank {survivor_rank} of 2: a collective operation failed ("
    assert errors[0].startswith(expected), errors
    detail = errors[0][len(expected):]
    assert detail.startswith(("Timed out", "Application timeout caused pair closure")), errors
    assert f"FCT_DIST_TIMEOUT_S={SILENT_TIMEOUT_S} s" in errors[0]


@pytest.mark.slow
def test_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from fct import dist
    from fct.errors import ConfigError

    monkeypatch.delenv("FCT_DIST_TIMEOUT_S", raising=False)
    assert dist.timeout() == timedelta(seconds=1800)
    monkeypatch.setenv("FCT_DIST_TIMEOUT_S", "12.5")
    assert dist.timeout() == timedelta(seconds=12.5)
    for bad in ("ten", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("FCT_DIST_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="FCT_DIST_TIMEOUT_S=.* must be a number of seconds > 0"):
            dist.timeout()
    assert dist.peer_failure(RuntimeError("Connection closed by peer")) is None  # no process group here
