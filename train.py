"""Train a LLaVA model: `python train.py --config PATH [--workdir DIR] [--set KEY=VALUE ...]`.

Megatron-LM `pretrain_vlm.py` flags are accepted as aliases for config keys (see README, "Megatron flags").
Rerunning with the same workdir resumes from its newest checkpoint. Exit status: 0 done, 2 config error,
75 preempted (SIGTERM: a checkpoint of the current step was saved; run the same command again to resume).
"""
from __future__ import annotations

import argparse
import sys

from llava_jax.cli import add_megatron_flags, megatron_overrides
from llava_jax.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML run config (default: the CPU demo)")
    parser.add_argument("--workdir", default=None, help="where config, metrics and checkpoints go "
                        "(default: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set train.steps=100 model.dtype=bfloat16 (repeatable)")
    add_megatron_flags(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    megatron, workdir = megatron_overrides(args)
    try:
        config = load_config(args.config, megatron + args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from llava_jax.train.loop import train   # after config errors are reported: importing jax takes a while
    from llava_jax.train.preemption import PREEMPTED_EXIT_CODE
    try:
        summary = train(config, args.workdir or workdir or default_workdir(args.config))
    except ConfigError as e:   # settings that only fail against the devices (mesh shape, batch split)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return PREEMPTED_EXIT_CODE if summary["preempted"] else 0


def default_workdir(config_path: str) -> str:
    import os
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


if __name__ == "__main__":
    from llava_jax.host_malloc import reexec_with_host_malloc
    reexec_with_host_malloc()
    sys.exit(main())
