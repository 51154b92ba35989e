"""Fine-tune a model (full or LoRA; seq2seq or causal) on GSM8K-format data.

    accelerate launch --config_file configs/accelerate/cpu.yaml fine_tune/train.py --config configs/train/smoke.yaml
    accelerate launch --config_file configs/accelerate/zero3.yaml fine_tune/train.py \
        --config configs/train/flan_ul2_lora.yaml output_dir=outputs/ul2 max_steps=50

Everything after the flags is a key=value override of the recipe. The logic lives in
synthtune.train; this file only wires configuration, logging and the run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from synthtune.config import TrainConfig, load_config
from synthtune.errors import USER_ERRORS
from synthtune.train.loop import exit_status, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training recipe (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        result = train(cfg)
    except USER_ERRORS as err:  # the same ones `synthtune train` reports without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    # SIGTERM (preemption) or Ctrl-C: the loop wrote a checkpoint; the status says which signal
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main())
