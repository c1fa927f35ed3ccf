"""`speechverse-jax prepare DATASET SRC OUT`: manifests for a public corpus from its downloaded layout.

    speechverse-jax prepare librispeech /data/LibriSpeech data/librispeech --config.options.splits=train-clean-100

`get_config(dataset)` lists the recipe's options with their defaults under `options`
(`--option KEY=VALUE` is short for `--config.options.KEY=VALUE`).
"""

import inspect

import ml_collections

from speechverse_jax.data.prepare import RECIPES, recipe_name


def get_config(dataset=None):
    config = ml_collections.ConfigDict(dict(dataset=dataset or "", src="", out="", options={}))
    if dataset:
        recipe = RECIPES[recipe_name(dataset)]
        options = {}
        for name, p in inspect.signature(recipe).parameters.items():
            if name in ("src_dir", "out_dir"):
                continue
            default = p.default
            # None / list defaults: a string the recipe's own parser reads ('' = the recipe's default)
            options[name] = "" if default is None or isinstance(default, (list, tuple, dict)) else default
        config.options = options
    return config
