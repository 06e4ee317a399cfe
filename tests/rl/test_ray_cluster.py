"""launcher=ray joining an existing Ray cluster (``ray.address``) of several nodes: a head node with no CPU
for actors and two worker nodes, all on this machine (Ray's own ``ray.cluster_utils.Cluster``: one raylet and
object store per node, as on separate machines, but one network address). Each rollout worker asks for a
whole node's CPUs, so the two land on different nodes; the weights reach them over the collective group,
whose store the controller hosts on its own node, and the run equals the local launcher's.

Like the other Ray tests this runs only in a private network namespace where loopback is the only interface.
"""

import json
from pathlib import Path

import pytest

from posttrain.config import load_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

COMMON = ["train.progress=false", "train.log_every=1", "task_eval_prompts=16", "task_eval_samples=4",
          "reward=builtin_correct", "rollout.prompts_per_step=8", "rollout.group_size=4", "train.max_steps=2",
          "train.lr=1e-4"]


@pytest.fixture(scope="module")
def three_nodes():
    from ray.cluster_utils import Cluster

    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    if not {line.split(":")[0].strip() for line in lines} <= {"lo"}:
        pytest.skip("Ray binds to this machine's network address: run in a private network namespace "
                    "(scripts/test.sh does: unshare -n bash -c 'ip link set lo up; pytest -m ray')")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def _train_rows(run_dir):
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r]


def test_workers_on_two_nodes_of_a_joined_cluster_equal_the_local_launcher(three_nodes, sft_policy, tmp_path):
    from safetensors.torch import load_file

    from posttrain.algorithms.grpo import GRPOConfig, run

    def grpo(out, *extra):
        return run(load_config(GRPOConfig, None, [f"model.name_or_path={sft_policy}", f"train.output_dir={out}",
                                                  *COMMON, *extra]))

    grpo(tmp_path / "local")
    s = grpo(tmp_path / "ray", "launcher=ray", f"ray.address={three_nodes.address}", "ray.rollout_workers=2",
             "ray.cpus_per_worker=2", "ray.weight_sync=collective")
    nodes = [w["node"].split()[1] for w in s["rollout_workers"]]  # "address node-id"
    assert len(set(nodes)) == 2 and three_nodes.head_node.node_id[:8] not in nodes, nodes  # one per worker node
    # the run joined the cluster and, at its end, only disconnected: the three nodes are still alive
    assert not ray.is_initialized()
    ray.init(address=three_nodes.address)
    assert sum(n["Alive"] for n in ray.nodes()) == 3
    a, b = _train_rows(tmp_path / "local"), _train_rows(tmp_path / "ray")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "local", tmp_path / "ray"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
