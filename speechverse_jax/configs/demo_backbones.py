"""PLACEHOLDER (issue #15): the demo backbones recipe's config; the recipe's branch replaces this file.

    speechverse-jax demo-backbones                  # profile 'full'
    speechverse-jax demo-backbones --profile quick
"""

import ml_collections

PROFILES = ("full", "quick")


def get_config(profile="full"):
    profile = profile or "full"
    if profile not in PROFILES:
        raise ValueError(f"demo_backbones profile must be one of {list(PROFILES)}, got {profile!r}")
    config = ml_collections.ConfigDict()
    config.profile = profile
    config.out = "outputs/demo_backbones"  # output folder (--out DIR); the release lands in out/release
    config.seed = 0
    return config
