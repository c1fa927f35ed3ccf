"""Regex rules mean re.fullmatch everywhere, and a rule that matches nothing fails naming it."""

import jax
import pytest

from speechverse_jax import rules
from speechverse_jax.hf_tiny import TINY_T5
from speechverse_jax.models.layers import LoRAConfig
from speechverse_jax.models.speechverse import SpeechVerseConfig, init_params
from speechverse_jax.models.t5 import T5Config
from speechverse_jax.models.wavlm import WavLMConfig
from speechverse_jax.train.config import RULES_STAGE1, RULES_STAGE2
from speechverse_jax.train.optimizer import label_params

PARAMS = {"downsampler": {"conv_0": {"kernel": 0}}, "t5": {"encoder": {"q": {"kernel": 0, "lora_a": 0}}},
          "wavlm": {"proj": {"kernel": 0}}}


def test_fullmatch_not_search():
    assert rules.matches("downsampler/.*", "downsampler/conv_0/kernel")
    assert not rules.matches("downsampler", "downsampler/conv_0/kernel")  # search would match this
    assert not rules.matches("conv_0/kernel", "downsampler/conv_0/kernel")
    assert rules.first_match([("t5/.*/lora_[ab]", "train"), ("t5/.*", "freeze")], "t5/encoder/q/lora_a") == (0, "train")


def test_param_rules_label_every_param_and_name_the_unused_rule():
    labels = label_params(PARAMS, [("t5/.*/lora_[ab]", "train"), ("downsampler/.*", "train"), ("(wavlm|t5)/.*", "freeze")])
    assert labels == {"downsampler/conv_0/kernel": "train", "t5/encoder/q/kernel": "freeze",
                      "t5/encoder/q/lora_a": "train", "wavlm/proj/kernel": "freeze"}
    with pytest.raises(ValueError, match=r"match no path.*'layer_weightz/\.\*'"):
        label_params(PARAMS, [("layer_weightz/.*", "train"), ("downsampler/.*", "train"), ("(wavlm|t5)/.*", "freeze")])
    with pytest.raises(ValueError, match="not a valid regex"):
        label_params(PARAMS, [("(", "train")])


@pytest.mark.parametrize("stage_rules", [RULES_STAGE1, RULES_STAGE2])
def test_stage_rules_fit_both_layer_combinations(stage_rules):
    """layer_weights exist only with the weighted sum; the stage rules hold for both layouts."""
    from speechverse_jax import tree
    from speechverse_jax.hf_tiny import TINY_WAVLM

    for combination in ("last", "weighted"):
        lora = LoRAConfig(rank=2) if stage_rules is RULES_STAGE2 else None
        cfg = SpeechVerseConfig(WavLMConfig.from_hf(TINY_WAVLM), T5Config.from_hf(TINY_T5),
                                layer_combination=combination, lora=lora)
        params = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
        labels = label_params(tree.unflatten({k: 0 for k in tree.flatten(params)}), stage_rules)
        assert any(v == "train" for v in labels.values())


def test_a_lora_target_that_adapts_nothing_is_an_error():
    from speechverse_jax.hf_tiny import TINY_WAVLM

    cfg = SpeechVerseConfig(WavLMConfig.from_hf(TINY_WAVLM), T5Config.from_hf(TINY_T5),
                            lora=LoRAConfig(rank=2, target_regex=r".*/self_attn/(q|v)"))
    with pytest.raises(ValueError, match=r"model.lora.target_regex.*self_attn"):
        jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
