"""configs/curriculum.py cut to two stages (stage1 -> stage2_warmup) for tests/test_faults.py."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))

import curriculum  # noqa: E402


def get_config(arg="wlm"):
    config = curriculum.get_config(arg)
    config.order = ["stage1", "stage2_warmup"]
    del config["stage2_multitask"]
    return config
