"""course_utils.launching, course_utils.distributed, course_utils.distributed_checks and course_utils.sharding (notebook 10), with real 2-process runs."""

import re
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig

from course_utils import distributed as D
from course_utils import distributed_checks as DC
from course_utils.errors import CourseError
from course_utils.launching import check_world_size, launch, usable_cores
from course_utils.memory import BIG, LAYER_LINEARS, architecture, estimate_memory
from course_utils.paths import REPO_ROOT
from course_utils.sharding import (SHARDING, communication_bytes, estimate_rank_memory, parameter_groups,
                                   quant_state_bytes, shard_numel)

needs_two_cores = pytest.mark.skipif(usable_cores() < 2, reason="two ranks need two CPU cores")


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model

    return load_model("lab", device="cpu")


@pytest.fixture(scope="module")
def batches(lab):
    from course_utils.data import load_task
    from course_utils.training import chat_batches

    stream = chat_batches(lab[1], load_task("describe", "train"), batch_size=4, seed=3)
    return [next(stream) for _ in range(2)]


def ring_bytes(sent: dict, w: int) -> float:
    """Bytes a rank sends per step with ring collectives, from the counted collective inputs."""
    return (2 * (w - 1) / w * sent.get("allreduce", 0) + (w - 1) * sent.get("all_gather_single", 0)
            + (w - 1) / w * sent.get("reduce_scatter_single", 0))


def lab_batches(lab, rows, count=2, seed=3):
    from course_utils.data import load_task
    from course_utils.training import chat_batches

    stream = chat_batches(lab[1], load_task("describe", "train"), batch_size=rows, seed=seed)
    return [next(stream) for _ in range(count)]


@needs_two_cores
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_one_process_and_the_estimator(lab, world_size):
    """2 ranks, and 3 (oversubscribed on 2 cores): 3 splits the lab model's 653 embedding rows and 128-wide norms
    unevenly, and makes the ring factors (W - 1) / W differ from 1."""
    batches = lab_batches(lab, rows=2 * world_size)
    targets = LAYER_LINEARS
    jobs = [D.Job("ddp", batches, steps=2, dtype=torch.float64), D.Job("fsdp", batches, steps=2),
            D.Job("ddp_lora", batches, steps=2, lora_rank=4), D.Job("fsdp", batches, steps=2, dtype=torch.float64),
            D.Job("manual", batches, steps=2, dtype=torch.float64), D.Job("ddp", batches, steps=2),
            (DC.zero3_linear_against_fsdp, (10, 6, 3, 0)),  # 10 rows: 5, 5 at W = 2; 4, 4, 2 (+2 padding) at W = 3
            (DC.accelerate_fsdp_groups, (str(REPO_ROOT / "configs/accelerate/fsdp.yaml"),)),
            D.Job("ddp", batches, steps=2, dtype=torch.float64, normalise="rank mean")]
    per_rank = launch(D.run_jobs, jobs, world_size=world_size, backend="gloo", oversubscribe=True)
    ddp, fsdp, lora, fsdp64, manual, ddp32, zero3, groups, trap = ([rank[i] for rank in per_rank] for i in range(9))
    single = D.train_single(jobs[0])
    assert_close(ddp[0]["first_gradients"], single["first_gradients"])
    assert_close(ddp[0]["weights"], single["weights"])
    assert_close(ddp[0]["weights"], ddp[-1]["weights"], rtol=0, atol=0)
    assert_close(fsdp64[0]["weights"], single["weights"])
    assert_close(manual[0]["weights"], ddp[0]["weights"])  # all_reduce_gradients by hand = accelerate's DDP
    assert manual[0]["sent_per_step"] == ddp[0]["sent_per_step"]
    for got in zero3:  # Zero3Linear = fully_shard on one layer, and the rows of the one-process gradient
        assert_close(got["ours"], got["fsdp"], rtol=0, atol=0)
        assert_close(got["ours_grad"], got["fsdp_grad"])
        assert_close(got["ours_grad"], got["whole_grad"])
        assert not got["padding_grad"].any()
        assert_close(got["x_grad_ours"], got["x_grad_fsdp"])
        assert_close(got["x_grad_ours"], got["x_grad_one"])
        assert got["gathers"] == {"ours": 2, "fsdp": 2}  # the weight gathered again in backward, not saved
        assert got["saved_bytes"] == got["x_bytes"] + got["piece_bytes"]
    for r in range(world_size):  # shard_fully's groups are accelerate's fsdp2_prepare_model's under fsdp.yaml
        assert fsdp[r]["groups"] == groups[r] and any(not reshard for _, reshard in groups[r])
    with pytest.raises(AssertionError):  # the trap: the model's own loss, DDP's own averaging hook
        assert_close(trap[0]["weights"], single["weights"])
    assert [len(got["padding_grad"]) for got in zero3] == ([0, 0] if world_size == 2 else [0, 0, 2])
    config = lab[0].config
    for r in fsdp:
        est = estimate_rank_memory(config, world_size=world_size, strategy="full", rank=r["rank"], batch_size=2 * world_size)
        assert (r["held"]["parameters"], r["held"]["gradients"], r["held"]["optimizer"], r["held"]["buckets"]) == \
            (est.weights, est.gradients, est.optimizer, 0), r["rank"]
        assert ring_bytes(r["sent_per_step"], world_size) == \
            pytest.approx(sum(communication_bytes(config, world_size=world_size, strategy="full").values()), rel=1e-12)
    for r in ddp32:  # DDP's buckets: a second copy of the gradients, as the estimator counts
        est = estimate_rank_memory(config, world_size=world_size, rank=r["rank"], batch_size=2 * world_size)
        assert (r["held"]["parameters"], r["held"]["gradients"], r["held"]["optimizer"], r["held"]["buckets"]) == \
            (est.weights, est.gradients, est.optimizer, est.buckets) and est.buckets == est.gradients, r["rank"]
    for r in (*fsdp, *ddp32, *lora):  # the bytes written to the sockets: gloo's algorithms (its reduce-scatter is an
        if r["written_per_step"] is not None:  # all-reduce of the whole input), plus headers
            gloo = ring_bytes({**r["sent_per_step"], "reduce_scatter_single": 0}, world_size) + \
                2 * (world_size - 1) / world_size * r["sent_per_step"].get("reduce_scatter_single", 0)
            assert 0 <= r["written_per_step"] / gloo - 1 < 0.05, (r["name"], r["written_per_step"], gloo)
    assert len({r["held"]["optimizer"] for r in fsdp}) > 1 or world_size == 2  # uneven pieces at W = 3
    formula = communication_bytes(config, world_size=world_size, method="lora", lora_rank=4, lora_targets=targets)
    assert ring_bytes(lora[0]["sent_per_step"], world_size) == pytest.approx(sum(formula.values()), rel=1e-12)
    assert all(r["tokens_agree"] for r in (*ddp, *fsdp, *lora, *fsdp64, *manual, *ddp32))


def test_the_per_rank_mean_is_not_the_global_loss(lab, batches):
    model = lab[0]
    batch = batches[0]
    counts = [D.label_tokens(D.rank_rows(batch, r, 2)) for r in range(2)]
    assert counts[0] != counts[1]  # describe's answers differ in length
    with torch.no_grad():
        whole = D.token_loss(model, batch, D.label_tokens(batch))
        right = sum(D.rank_loss(model, batch, r, 2) for r in range(2))
        trap = sum(D.rank_loss(model, batch, r, 2, "rank mean") for r in range(2)) / 2
    assert_close(right, whole)
    assert abs(trap - whole) > 1e-4
    with torch.no_grad():  # the model's own loss on a rank's rows is that per-rank mean: the trap a script walks into
        assert_close(D.users_loss(model, D.rank_rows(batch, 0, 2)), D.rank_loss(model, batch, 0, 2, "rank mean"))


def test_one_rank_is_the_single_device_estimate():
    cfg = BIG["Llama-2-7B"]
    for strategy in SHARDING:
        assert estimate_rank_memory(cfg, world_size=1, strategy=strategy, batch_size=2).as_dict() == \
            estimate_memory(cfg, batch_size=2).as_dict()


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_strategy_shards_what_it_names(method):
    cfg = BIG["Llama-2-13B"]
    kw = dict(method=method, dtype=torch.bfloat16, batch_size=8, seq_len=256, gradient_checkpointing=True)
    none = estimate_rank_memory(cfg, world_size=8, strategy="none", **kw)
    for strategy, parts in SHARDING.items():
        est = estimate_rank_memory(cfg, world_size=8, strategy=strategy, **kw)
        for part in ("weights", "gradients", "optimizer", "master"):
            if part in parts and getattr(none, part):
                assert getattr(est, part) < getattr(none, part), (strategy, part)
            elif part not in parts:
                assert getattr(est, part) == getattr(none, part), (strategy, part)
        assert est.activations == none.activations


def test_ddp_buckets_are_a_second_copy_of_the_gradients():
    cfg = BIG["Llama-2-7B"]
    for method in ("full", "lora"):
        kw = dict(method=method, dtype=torch.bfloat16, batch_size=8)
        ddp = estimate_rank_memory(cfg, world_size=8, **kw)
        view = estimate_rank_memory(cfg, world_size=8, bucket_view=True, **kw)
        assert ddp.buckets == ddp.gradients > 0 and view.buckets == 0
        assert ddp.peak - view.peak == ddp.buckets and ddp.total - view.total == ddp.buckets
        for strategy in ("optimizer", "gradients", "full"):  # DeepSpeed's and FSDP's own buffers are not DDP's
            assert getattr(estimate_rank_memory(cfg, world_size=8, strategy=strategy, **kw), "buckets", 0) == 0
    assert not hasattr(estimate_rank_memory(cfg, world_size=1, batch_size=1), "buckets")  # one process: no DDP


def test_zero3_of_evenly_divisible_tensors_is_a_sixteenth_over_16_ranks():
    cfg = BIG["Llama-2-7B"]  # every tensor's first dimension divisible by 16
    full = estimate_rank_memory(cfg, dtype=torch.bfloat16, world_size=16, strategy="full", batch_size=16)
    one = estimate_memory(cfg, dtype=torch.bfloat16, batch_size=1)
    assert full.weights * 16 == one.weights and full.gradients * 16 == one.gradients
    assert full.master * 16 == one.master  # 16 bytes a parameter / 16 ranks (ZeRO-3)


def test_shard_numel_pads_like_torch_chunk():
    assert shard_numel((653, 128), 2) == 327 * 128
    assert shard_numel((653, 128), 2, 1, padded=False) == 326 * 128
    assert [shard_numel((3,), 4, r, padded=False) for r in range(4)] == [1, 1, 1, 0]
    assert [len(c) for c in torch.chunk(torch.zeros(10), 4)] == [shard_numel((10,), 4, r, padded=False) for r in range(4)]


def test_communication_formula():
    cfg = BIG["Llama-2-7B"]
    n = estimate_memory(cfg).detail["parameters"]
    for w in (2, 4, 8):
        ddp = sum(communication_bytes(cfg, world_size=w, dtype=torch.bfloat16).values())
        assert ddp == 2 * (w - 1) / w * 2 * n
        assert sum(communication_bytes(cfg, world_size=w, strategy="gradients", dtype=torch.bfloat16).values()) == ddp
        # ZeRO-3's 1.5x, less one gather of the tail group (final norm and untied head), kept gathered through backward
        tail = 2 * sum(torch.Size(s).numel() for s, gathers in parameter_groups(cfg) if gathers == 1)
        assert tail == 2 * (4096 + 32000 * 4096)
        full = sum(communication_bytes(cfg, world_size=w, strategy="full", dtype=torch.bfloat16).values())
        assert full == pytest.approx(1.5 * ddp - (w - 1) / w * tail, rel=1e-12)


def test_fsdp_leaves_qlora_quantisation_state_whole():
    """The packed 4-bit weights split over the ranks; absmax and the code tables (not parameters) do not."""
    cfg = BIG["Llama-2-7B"]
    state = sum(quant_state_bytes(o * i) for o, i in architecture(cfg)[1].values())
    kw = dict(method="qlora", dtype=torch.bfloat16, lora_rank=16, lora_targets=LAYER_LINEARS, strategy="full")
    w8, w16 = (estimate_rank_memory(cfg, world_size=w, batch_size=w, **kw).weights for w in (8, 16))
    assert w8 - state == 2 * (w16 - state)  # every piece halves, the state stays


@pytest.mark.parametrize("call, words", [
    (lambda: estimate_rank_memory(BIG["Llama-2-7B"], world_size=3, batch_size=8), "split evenly"),
    (lambda: estimate_rank_memory(BIG["Llama-2-7B"], world_size=2, strategy="zero2"), "none, optimizer, gradients, full"),
    (lambda: estimate_rank_memory(BIG["Llama-2-7B"], world_size=2, batch_size=2, rank=2), "between 0 and"),
    (lambda: estimate_rank_memory(BIG["Llama-2-7B"], world_size=0), "world_size"),
    (lambda: check_world_size(10_000), "more processes"),
    (lambda: check_world_size(2, batch_rows=5), "multiple of 2"),
    (lambda: launch(D.run_jobs, [], world_size=10_000), "more processes"),
    (lambda: communication_bytes(BIG["Llama-2-7B"], world_size=2, strategy="ddp"), "unknown"),
])
def test_bad_input_says_what_to_do(call, words):
    with pytest.raises(CourseError, match=re.escape(words)):
        call()


def test_bad_job_input(batches):
    with pytest.raises(CourseError, match="multiple of 3"):
        D.rank_rows(batches[0], 0, 3)
    with pytest.raises(CourseError, match="normalise"):
        D.rank_loss(None, batches[0], 0, 2, "per token")
    with pytest.raises(CourseError, match="ddp, fsdp, ddp_lora"):
        D.Job("zero3", batches)
    with pytest.raises(CourseError, match="steps=0 must be a whole number >= 1"):
        D.Job("ddp", batches, steps=0)


def test_the_command_refuses_an_fsdp_accelerate_config():
    import os

    env = dict(os.environ, ACCELERATE_USE_FSDP="true")
    out = subprocess.run([sys.executable, "-m", "course_utils", "distributed"], capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 2 and "ddp_cpu.yaml" in out.stderr


def test_what_accelerate_derives_from_the_configs():
    fsdp = DC.launch_environment(REPO_ROOT / "configs/accelerate/fsdp.yaml")
    assert fsdp["FSDP_VERSION"] == "2" and fsdp["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    assert fsdp["FSDP_RESHARD_AFTER_FORWARD"] == "true" and fsdp["ACCELERATE_MIXED_PRECISION"] == "bf16"
    ddp = DC.launch_environment(REPO_ROOT / "configs/accelerate/ddp_gpus.yaml")
    assert ddp["multi_gpu"] == "True" and "ACCELERATE_USE_FSDP" not in ddp


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))
    kinds = {f.name: str(load_config_from_file(str(f)).distributed_type) for f in files}
    assert kinds == {"ddp_cpu.yaml": "DistributedType.MULTI_CPU", "ddp_gpus.yaml": "DistributedType.MULTI_GPU",
                     "fsdp.yaml": "DistributedType.FSDP"}


@needs_two_cores
def test_accelerate_launch_with_the_shipped_cpu_config():
    """The README's command: accelerate launch starts the ranks, the course's code trains on them."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    out = subprocess.run([*accelerate, "--config_file", str(REPO_ROOT / "configs/accelerate/ddp_cpu.yaml"), "-m",
                          "course_utils", "distributed", "--steps", "2"], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r"ddp on 2 ranks \(DistributedType.MULTI_CPU\).*one process ([0-9.e+-]+)", out.stdout)
    assert match and float(match.group(1)) < 1e-12, out.stdout


def test_scaling_the_loss_by_w_is_exact_only_for_powers_of_two(lab):
    """Notebook 10's caution: Trainer-style W x loss with averaged gradients meets LlamaRMSNorm's float32 rounding
    unless W is a power of two, while shares of the global mean with summed gradients stay exact."""
    model = lab[0].double()
    try:
        def grads(losses):
            model.zero_grad()
            for loss in losses:
                loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        for w in (2, 3):
            batch = lab_batches(lab, rows=2 * w, count=1)[0]
            whole = grads([D.token_loss(model, batch, D.label_tokens(batch))])
            summed = grads([D.rank_loss(model, batch, r, w) for r in range(w)])
            scaled = grads([w * D.rank_loss(model, batch, r, w) for r in range(w)])
            scaled = {n: g / w for n, g in scaled.items()}
            # Relative to each tensor's largest gradient: float64 rounding stays far below 1e-12, float32's does not
            def gap(got):
                return max(((got[n] - whole[n]).abs().max() / whole[n].abs().max()).item() for n in whole)

            assert gap(summed) < 1e-12
            assert (gap(scaled) < 1e-12) == (w == 2), (w, gap(scaled))
    finally:
        model.float()


def test_an_older_torch_gets_the_collectives_2_13_names():
    """Catches notebook 10 stopping on a machine's own older torch (2.11 on the H200: AttributeError
    all_gather_single), and a count that misses FSDP's gathers there (it calls the old name)."""
    from types import SimpleNamespace

    from course_utils import torch_compat

    calls = []
    old = SimpleNamespace(all_gather_into_tensor=lambda out, inp: calls.append(("gather", inp)),
                          reduce_scatter_tensor=lambda out, inp: calls.append(("scatter", inp)))
    torch_compat.install(old)
    assert torch_compat.library_name(old, "all_gather_single") == "all_gather_into_tensor"
    old.all_gather_single(None, 1)
    old.all_gather_into_tensor = lambda out, inp: calls.append(("counted", inp))  # a counting wrapper on the old name
    old.all_gather_single(None, 2)  # the course's call reaches it too
    assert calls == [("gather", 1), ("counted", 2)]
    import torch.distributed as dist  # the pinned torch: its own names, untouched

    assert torch_compat.library_name(dist, "all_gather_single") == "all_gather_single"
    assert not getattr(dist.all_gather_single, "course_forwarder", False)
