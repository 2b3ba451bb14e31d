"""`python -m course_utils <command>`.

    doctor    check that this machine is ready for the course (--warm: also fill the SmolLM2 cache)
    prepare   convert SmolLM2 into its warm cache now (once, ~20 s)
    distributed  train the lab model on several ranks (DDP, FSDP or LoRA under DDP) and compare with one process;
              run it directly (it spawns the ranks) or under `accelerate launch` / `torchrun` (notebook 10)

A CourseError is printed as one line on stderr (exit status 2), no traceback.
"""

import argparse
import sys

from course_utils.errors import CourseError


def _doctor(args) -> int:
    from course_utils.tools import doctor

    return doctor.main(warm=args.warm)


def _prepare(args) -> int:
    from course_utils import smollm2

    folder = smollm2.prepare(force=args.force)
    print(f"SmolLM2 is ready in {folder}")
    return 0


def _distributed(args) -> int:
    import os

    import torch
    import torch.distributed as dist

    from course_utils import distributed, launching
    from course_utils.data import load_task
    from course_utils.models import load_model
    from course_utils.training import chat_batches

    if any(os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true" for kind in ("FSDP", "DEEPSPEED")):
        raise CourseError("This command wraps the model itself (--strategy ddp, fsdp or ddp_lora): launch it with "
                          "configs/accelerate/ddp_cpu.yaml or ddp_gpus.yaml, or with torchrun, not an FSDP or DeepSpeed config.")
    _, tok = load_model("lab", device="cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by accelerate launch or torchrun
    world_size = int(os.environ["WORLD_SIZE"]) if launched else args.world_size
    stream = chat_batches(tok, load_task(args.task, "train"), batch_size=world_size * args.rows_per_rank, seed=args.seed)
    job = distributed.Job(args.strategy, [next(stream) for _ in range(args.steps)], steps=args.steps, lr=args.lr,
                          dtype=torch.float64)
    if launched:
        backend = launching.default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        result = distributed.run_job(job)
        dist.barrier()
        dist.destroy_process_group()
        results = [result] if result["rank"] == 0 else []
    else:
        results = [r[0] for r in launching.launch(distributed.run_jobs, [job], world_size=world_size)]
    if results:
        single = distributed.train_single(job)
        gap = max((results[0]["weights"][k] - single["weights"][k]).abs().max().item() for k in single["weights"])
        print(f"{args.strategy} on {world_size} ranks ({results[0]['distributed_type']}), {args.steps} steps, float64: "
              f"largest weight difference from one process {gap:.1e}")
        print(f"rank 0 held {results[0]['held']} bytes; sent per step (collective inputs) {results[0]['sent_per_step']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils", description="Helpers for the fine-tuning course.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser("doctor", help="check that this machine is ready for the course")
    doctor.add_argument("--warm", action="store_true", help="first convert SmolLM2 into its cache if it is cold")
    doctor.set_defaults(run=_doctor)
    prepare = commands.add_parser("prepare", help="convert SmolLM2 into its warm cache now (once, ~20 s)")
    prepare.add_argument("--force", action="store_true", help="rebuild the cache even if it looks fine")
    prepare.set_defaults(run=_prepare)
    scale = commands.add_parser("distributed", help="the lab model on several ranks against one process (notebook 10)")
    scale.add_argument("--strategy", default="ddp", help="ddp, fsdp or ddp_lora")
    scale.add_argument("--world-size", type=int, default=2, help="ranks to spawn (ignored under accelerate launch/torchrun)")
    scale.add_argument("--steps", type=int, default=4)
    scale.add_argument("--rows-per-rank", type=int, default=4)
    scale.add_argument("--lr", type=float, default=1e-3)
    scale.add_argument("--task", default="describe")
    scale.add_argument("--seed", type=int, default=0)
    scale.set_defaults(run=_distributed)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
