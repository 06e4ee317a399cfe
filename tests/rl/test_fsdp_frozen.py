"""train.frozen=shard under FSDP2 (two processes, gloo): the frozen models (online RL's KL reference,
distill's teacher, DPO's and KTO's reference=live) are fully_shard-ed over the policy's ranks instead of
copied whole to each. Their forwards become collectives, so the run must be the same run as
train.frozen=replicate, to 1e-5; ranks about to make unequal numbers of them all stop with an error (never
a hang); and the flag is refused where it would do nothing."""

import json

import pytest
from safetensors.torch import load_file

from posttrain.commands import load_command
from posttrain.config import load_config
from posttrain.errors import ConfigError
from pt_helpers import torchrun


def _run(tmp_path, command, frozen, args):
    out = torchrun(command, f"train.output_dir={tmp_path / frozen}", "train.strategy=fsdp", f"train.frozen={frozen}",
                   *args)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / frozen / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp"
    rows = [json.loads(r) for r in (tmp_path / frozen / "metrics.jsonl").read_text().splitlines()]
    final = load_file(str(tmp_path / frozen / "final" / "model.safetensors"))
    return summary, [r for r in rows if "train/loss" in r], final


def _check_placement(summary: dict, frozen: str, name: str = "reference") -> None:
    """summary.json says where the frozen model lived: under shard each process held half its weights, and
    none of them whole as its last forward started (measured before FSDP gathers anything: the root that
    the forward before gathered was resharded after it, though a frozen model has no backward)."""
    ref = summary["frozen"]["models"][name]
    assert summary["frozen"]["mode"] == frozen and ref["sharded"] == (frozen == "shard")
    if frozen == "shard":
        assert ref["params_per_process"] < 0.6 * ref["params"] and ref["whole_per_process"] == 0
    else:
        assert ref["params_per_process"] == ref["whole_per_process"] == ref["params"]


def _same_run(runs: dict, keys) -> None:
    (_, rows_a, a), (_, rows_b, b) = runs["replicate"], runs["shard"]
    assert len(rows_a) >= 2
    for x, y in zip(rows_a, rows_b, strict=True):
        assert keys(x)
        for k in keys(x):
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_grpo_with_a_sharded_kl_reference_equals_a_replicated_one(sft_policy, tmp_path):
    args = [f"model.name_or_path={sft_policy}", "rollout.prompts_per_step=4", "rollout.group_size=4", "kl.beta=0.05",
            "rollout.max_new_tokens=12", "train.max_steps=3", "task_eval_prompts=8", "task_eval_samples=1",
            "train.progress=false", "train.threads=1", "train.lr=1e-4", "train.log_every=1",
            "rollout.engine_dtype=model"]  # fp32 sampling: bf16 rounding would turn 1e-7 reduction-order noise into flipped tokens
    runs = {f: _run(tmp_path, "grpo", f, args) for f in ("replicate", "shard")}
    for f, (summary, rows, _) in runs.items():
        _check_placement(summary, f)
        assert all(r["kl/per_token"] > 0 for r in rows[1:])  # the reference was used: the policy moved away from it
    _same_run(runs, lambda row: [k for k in row if k.startswith(("reward/", "kl", "train/loss", "train/kl"))])


@pytest.mark.slow
def test_distill_with_a_sharded_teacher_equals_a_replicated_one(sft_policy, tmp_path):
    args = ["model.name_or_path=tiny", f"teacher.name_or_path={sft_policy}", "rollout.prompts_per_step=4",
            "rollout.group_size=2", "rollout.max_new_tokens=12", "train.max_steps=2", "task_eval_prompts=8",
            "task_eval_samples=1", "train.progress=false", "train.threads=1", "train.log_every=1",
            "rollout.engine_dtype=model"]
    runs = {f: _run(tmp_path, "distill", f, args) for f in ("replicate", "shard")}
    for f, (summary, _, _) in runs.items():
        _check_placement(summary, f, "teacher")
    _same_run(runs, lambda row: [k for k in row if k.startswith(("reward/", "distill/", "train/loss"))])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dpo", "kto"])
def test_live_reference_sharded_equals_replicated(tmp_path, command):
    """DPO and KTO with reference=live; eval_holdout: the main process's evaluation runs a gathered copy of
    the sharded reference."""
    args = ["data.max_rows=40", "eval_holdout=8", "train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=2",
            "reference=live", "train.threads=1", "task_eval=false", "train.progress=false", "train.lr=1e-3",
            "train.log_every=1"]
    runs = {f: _run(tmp_path, command, f, args) for f in ("replicate", "shard")}
    for f, (summary, _, _) in runs.items():
        _check_placement(summary, f)
    # not the accuracy: at step 1 policy = reference, every reward margin is a tie that 1e-8 of float noise flips
    _same_run(runs, lambda row: [k for k in row if k.startswith("train/") and "accuracy" not in k])
    ea, eb = (runs[f][0]["final"] for f in ("replicate", "shard"))
    assert ea.keys() == eb.keys() and ea
    for k in ea:
        assert ea[k] == pytest.approx(eb[k], abs=1e-5), k


@pytest.mark.parametrize("command,overrides,says", [
    ("grpo", ["train.frozen=shard"], "train.strategy=ddp"),  # nothing is sharded without FSDP
    ("grpo", ["train.frozen=shard", "train.strategy=fsdp", "kl.beta=0", "kl.track=false"], "no KL reference"),
    ("grpo", ["train.frozen=shard", "train.strategy=fsdp", "lora.enabled=true"], "adapters off"),
    ("dpo", ["train.frozen=shard", "train.strategy=fsdp"], "reference=auto"),  # precompute frees it before training
    ("dpo", ["train.frozen=shard", "train.strategy=fsdp", "reference=live", "lora.enabled=true"], "adapters off"),
    ("sft", ["train.frozen=shard", "train.strategy=fsdp"], "keeps no frozen model"),
])
def test_frozen_shard_is_refused_where_it_would_do_nothing(command, overrides, says):
    with pytest.raises(ConfigError, match="train.frozen") as e:
        load_config(load_command(command)[0], None, overrides)
    assert says in str(e.value)


def test_frozen_shard_is_accepted_with_a_model_to_shard():
    for command, extra in (("grpo", []), ("grpo", ["lora.enabled=true", "kl.ref_model=tiny"]),
                           ("dpo", ["reference=live"]), ("kto", ["reference=live"]),
                           ("distill", ["teacher.name_or_path=tiny"])):
        cfg = load_config(load_command(command)[0], None, ["train.frozen=shard", "train.strategy=fsdp", *extra])
        assert cfg.train.frozen == "shard"


def _count_check(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from posttrain.errors import TrainingError
    from posttrain.models.forward import lockstep

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    fn = lambda mb: None  # noqa: E731
    fn.collective_device = "cpu"  # as ref_logp_fn marks a sharded model's forward
    lockstep(fn, 8)  # equal counts: no error
    try:
        lockstep(fn, 8 + rank)
        said = "no error"
    except TrainingError as e:
        said = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(said)
    dist.destroy_process_group()


def test_unequal_forward_counts_stop_every_rank_instead_of_hanging(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_count_check, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "said")), nprocs=2, join=True)
    for rank in (0, 1):
        assert "different numbers of rollouts (8 to 9)" in (tmp_path / f"said.{rank}").read_text()
