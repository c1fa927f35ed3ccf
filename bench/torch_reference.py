"""A PyTorch reference of SpeechVerse, for parity checks and speed comparisons.

Built from stock parts: HF `WavLMModel` (frozen, eval mode, run under `torch.no_grad`), the same
layer combination, a torch `Conv1d + LayerNorm` downsampler mirroring
`speechverse_jax.models.downsampler.Downsampler` (frame mask applied before every conv, 'same'
padding, no activation), `pack_left` of [audio tokens ; instruction embeddings] exactly as ours,
and HF `T5ForConditionalGeneration` with peft LoRA on q and v of every self- and cross-attention
(same rank and alpha). Frozen weights have `requires_grad=False`; the optimizer is
`torch.optim.AdamW` with weight decay on matrices only and `clip_grad_norm_`, the same
hyper-parameters as `train/optimizer.make_optimizer` with a constant learning rate.

Weights move between the two sides through our flat param paths (`to_ours` / `load_ours`):

    downsampler/conv_{i}/kernel [k, in, out]     <-> downsampler.convs.{i}.weight [out, in, k]
    downsampler/norm_{i}/{scale,bias}            <-> downsampler.norms.{i}.{weight,bias}
    layer_weights/weights [L]                    <-> layer_weights.weights
    t5/{stack}/block_{i}/{self,cross}_attention/{q,v}/lora_a [in, r] <-> ....lora_A.default.weight [r, in]
    t5/.../lora_b [r, out]                       <-> ....lora_B.default.weight [out, r]

The frozen backbones are the HF folders our converters read, so both sides hold the same numbers.

The decoder-only layout (`TorchSpeechVerseDecoder`, mirroring `models/speechverse_decoder.py`):
the same WavLM, layer combination and downsampler (width = the LLM's hidden size), then per example

    [prefix ids | audio embeddings | instruction (suffix) ids | answer ids]

packed with no gaps and right padding (`pack_parts`, as our `pack_segments(left_pad=False)`),
text parts through the HF input embedding, position ids `cumsum(mask) - 1` (0 at pads), into HF
`LlamaForCausalLM` / `Qwen2ForCausalLM` with peft LoRA on `q_proj` and `v_proj` of every layer.
As ours, the LM head runs only on the positions that predict an answer token (the base model's
last hidden states gathered there, then `lm_head`), and the loss is the token-weighted mean
cross-entropy over the answer tokens (EOS included) only. LoRA paths:

    llm/layers_{i}/self_attention/{q,v}/lora_a [in, r] <-> ...layers.{i}.self_attn.{q,v}_proj.lora_A.default.weight [r, in]
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000


def pack_left(first: torch.Tensor, first_mask: torch.Tensor, second: torch.Tensor, second_mask: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per example `first[:len1] ++ second[:len2] ++ zeros` and its mask (as ours)."""
    b, n, d = first.shape
    m = second.shape[1]
    len1 = first_mask.sum(-1, keepdim=True)
    len2 = second_mask.sum(-1, keepdim=True)
    pos = torch.arange(n + m, device=first.device)[None, :]
    from_first = pos < len1
    from_second = (pos >= len1) & (pos < len1 + len2)
    idx1 = pos.clamp(0, n - 1).expand(b, -1)
    idx2 = (pos - len1).clamp(0, m - 1)
    g1 = torch.gather(first, 1, idx1[..., None].expand(-1, -1, d))
    g2 = torch.gather(second, 1, idx2[..., None].expand(-1, -1, d))
    zero = torch.zeros((), dtype=first.dtype)
    out = torch.where(from_first[..., None], g1, torch.where(from_second[..., None], g2, zero))
    return out, from_first | from_second


def pack_parts(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per example the valid items of every part, one after the other, then zeros (right padding).

    parts: (embeddings `[b, n_i, d]`, mask `[b, n_i]`), valid items first in each (as our `pack_segments`)."""
    total = sum(e.shape[1] for e, _ in parts)
    b, d = parts[0][0].shape[0], parts[0][0].shape[2]
    pos = torch.arange(total, device=parts[0][0].device)[None, :]
    out = torch.zeros((b, total, d), dtype=parts[0][0].dtype)
    start = torch.zeros((b, 1), dtype=torch.long)
    for e, m in parts:
        n = m.long().sum(-1, keepdim=True)
        inside = (pos >= start) & (pos < start + n)
        idx = (pos - start).clamp(0, e.shape[1] - 1)
        out = torch.where(inside[..., None], torch.gather(e, 1, idx[..., None].expand(-1, -1, d)), out)
        start = start + n
    return out, pos < start


class LayerCombination(nn.Module):
    """`last` | `weighted` (w init 1, `1/L sum w_l h_l`) | `softmax` over hidden_states[1:]."""

    def __init__(self, mode: str, num_layers: int):
        super().__init__()
        self.mode = mode
        if mode != "last":
            init = torch.ones if mode == "weighted" else torch.zeros
            self.weights = nn.Parameter(init(num_layers, dtype=torch.float32))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        layers = hidden_states[1:]
        if self.mode == "last":
            return layers[-1]
        w = self.weights / len(layers) if self.mode == "weighted" else torch.softmax(self.weights, 0)
        return torch.einsum("l,lbtd->btd", w, torch.stack(list(layers)))


class Downsampler(nn.Module):
    """Blocks of `Conv1d(k, stride s, padding (k-1)//2) -> LayerNorm(eps 1e-5)`, padded frames zeroed first."""

    def __init__(self, in_dim: int, features: int, strides: Sequence[int], kernel_size: int = 3):
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        dims = [in_dim] + [features] * len(self.strides)
        self.convs = nn.ModuleList(
            nn.Conv1d(dims[i], features, kernel_size, stride=s, padding=(kernel_size - 1) // 2)
            for i, s in enumerate(self.strides))
        self.norms = nn.ModuleList(nn.LayerNorm(features, eps=1e-5) for _ in self.strides)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x `[b, frames, dim]`, lengths `[b]` valid frames -> (`[b, frames', features]`, mask)."""
        zero = torch.zeros((), dtype=x.dtype)
        for conv, norm, s in zip(self.convs, self.norms, self.strides):
            mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            x = torch.where(mask[..., None], x, zero)
            x = norm(conv(x.transpose(1, 2)).transpose(1, 2))
            lengths = (lengths + s - 1) // s
        return x, torch.arange(x.shape[1])[None, :] < lengths[:, None]


class _AudioFront(nn.Module):
    """What both layouts share: frozen HF WavLM (eval mode, no grad), layer combination, downsampler."""

    def _init_front(self, wavlm_dir: str, width: int, cfg, kw) -> None:
        import transformers

        self.wavlm = transformers.WavLMModel.from_pretrained(wavlm_dir, **kw).float().eval()
        self.wavlm.requires_grad_(False)
        self.layer_weights = LayerCombination(cfg.layer_combination, cfg.wavlm.num_hidden_layers)
        self.downsampler = Downsampler(cfg.wavlm.hidden_size, width, cfg.downsample_strides, cfg.downsample_kernel)

    def train(self, mode: bool = True):
        super().train(mode)
        self.wavlm.eval()  # frozen encoder: no SpecAugment, no layerdrop, no dropout (as ours)
        return self

    def frame_lengths(self, audio_mask: torch.Tensor) -> torch.Tensor:
        return self.wavlm._get_feat_extract_output_lengths(audio_mask.sum(-1)).long()

    def encode_audio(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Frozen WavLM -> (L+1 hidden states, the last one = `last_hidden_state`, valid frames `[b]`)."""
        with torch.no_grad():
            out = self.wavlm(audio, attention_mask=audio_mask.long(), output_hidden_states=True)
        hidden = list(out.hidden_states[:-1]) + [out.last_hidden_state]
        return hidden, self.frame_lengths(audio_mask)

    def audio_tokens(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (audio embeddings `[b, n, width]`, mask `[b, n]`)."""
        hidden, lengths = self.encode_audio(audio, audio_mask)
        return self.downsampler(self.layer_weights(hidden), lengths)


class TorchSpeechVerse(_AudioFront):
    """Frozen WavLM -> layer combination -> downsampler -> frozen T5 + peft LoRA (q, v)."""

    def __init__(self, wavlm_dir: str, t5_dir: str, cfg, attn_implementation: Optional[str] = None):
        """cfg: our `SpeechVerseConfig` (shapes, strides, LoRA rank/alpha/dropout)."""
        super().__init__()
        import peft
        import transformers

        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self._init_front(wavlm_dir, cfg.t5.d_model, cfg, kw)
        # The frozen T5's dropout as ours (0 for parity). It must be set at construction: T5Attention
        # keeps the rate as a float for functional dropout, not as an nn.Dropout module.
        t5 = transformers.T5ForConditionalGeneration.from_pretrained(
            t5_dir, dropout_rate=cfg.t5.dropout_rate, **kw).float()
        rates = {m.p if isinstance(m, nn.Dropout) else m.dropout for m in t5.modules()
                 if isinstance(m, nn.Dropout) or isinstance(getattr(m, "dropout", None), float)}
        if rates != {cfg.t5.dropout_rate}:
            raise ValueError(f"T5 dropout rates {rates}, wanted {cfg.t5.dropout_rate}")
        if cfg.lora is not None:
            lora = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                   target_modules=["q", "v"], bias="none")
            t5 = peft.get_peft_model(t5, lora)  # freezes everything but lora_A / lora_B
        else:
            t5.requires_grad_(False)
        self.t5 = t5
        self.has_lora = cfg.lora is not None
        self.decoder_start_token_id = cfg.t5.decoder_start_token_id

    @property
    def hf_t5(self):
        return self.t5.get_base_model() if self.has_lora else self.t5

    def lora_params(self):
        """(our path, torch parameter) of every LoRA matrix."""
        for name, p in self.t5.named_parameters():
            path = _lora_path(name)
            if path is not None:
                yield path, p

    def forward(self, audio, audio_mask, instruction_ids, instruction_mask, decoder_input_ids, decoder_mask):
        """Teacher-forced logits `[b, t, vocab]` (same inputs as our `SpeechVerse.__call__`)."""
        audio_tokens, audio_tok_mask = self.audio_tokens(audio, audio_mask)
        text = self.hf_t5.get_input_embeddings()(instruction_ids)
        inputs, mask = pack_left(audio_tokens, audio_tok_mask, text, instruction_mask.bool())
        out = self.t5(inputs_embeds=inputs, attention_mask=mask.long(), decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=decoder_mask.long(), use_cache=False)
        return out.logits


class TorchSpeechVerseDecoder(_AudioFront):
    """Frozen WavLM -> layer combination -> downsampler -> prompt packing -> frozen HF Llama / Qwen2
    causal LM + peft LoRA (q_proj, v_proj); see the module docstring."""

    FAMILIES = ("llama", "qwen2")

    def __init__(self, wavlm_dir: str, llm_dir: str, cfg, attn_implementation: Optional[str] = None):
        """cfg: our `SpeechVerseDecoderConfig`."""
        super().__init__()
        import peft
        import transformers

        if cfg.llm.family not in self.FAMILIES:
            raise ValueError(f"the torch reference covers LLM families {self.FAMILIES}, got {cfg.llm.family!r}")
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self._init_front(wavlm_dir, cfg.llm.hidden_size, cfg, kw)
        lm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, **kw).float()
        if getattr(lm.config, "attention_dropout", 0.0):
            raise ValueError(f"{llm_dir}: attention_dropout {lm.config.attention_dropout}, ours has none")
        if cfg.lora is not None:
            from speechverse_jax.models.layers import DEFAULT_LORA_TARGETS

            if cfg.lora.target_regex != DEFAULT_LORA_TARGETS:
                raise ValueError(f"the torch reference adapts q and v only, ours targets {cfg.lora.target_regex!r}")
            lora = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                   target_modules=["q_proj", "v_proj"], bias="none")
            lm = peft.get_peft_model(lm, lora)  # freezes everything but lora_A / lora_B
        else:
            lm.requires_grad_(False)
        self.lm = lm
        self.has_lora = cfg.lora is not None

    @property
    def hf_lm(self):
        """The `*ForCausalLM` (LoRA layers injected in place when there is LoRA)."""
        return self.lm.get_base_model() if self.has_lora else self.lm

    def lora_params(self):
        for name, p in self.lm.named_parameters():
            m = _LORA_DECODER.match(name)
            if m:
                layer, proj, ab = m.groups()
                yield f"llm/layers_{layer}/self_attention/{proj}/lora_{ab.lower()}", p

    def forward(self, audio, audio_mask, prefix_ids, prefix_mask, suffix_ids, suffix_mask, answer_ids, answer_mask):
        """Teacher-forced logits `[b, A, vocab]` at the positions that predict answer token j = 0..A-1
        (same inputs and outputs as our `SpeechVerseDecoder.__call__` with `logits_at='answer'`)."""
        audio_emb, audio_tok_mask = self.audio_tokens(audio, audio_mask)
        hf = self.hf_lm
        embed = hf.get_input_embeddings()
        parts = [(embed(prefix_ids), prefix_mask.bool()), (audio_emb, audio_tok_mask),
                 (embed(suffix_ids), suffix_mask.bool()), (embed(answer_ids), answer_mask.bool())]
        inputs, mask = pack_parts(parts)
        m = mask.long()
        positions = (m.cumsum(-1) - 1).clamp(min=0) * m
        hidden = hf.model(inputs_embeds=inputs, attention_mask=m, position_ids=positions,
                          use_cache=False).last_hidden_state
        before = sum(pm.long().sum(-1) for _, pm in parts[:3])  # [b] index of the first answer token
        where = before[:, None] - 1 + torch.arange(answer_ids.shape[1])[None, :]
        picked = torch.gather(hidden, 1, where.clamp(0, hidden.shape[1] - 1)[..., None].expand(-1, -1, hidden.shape[2]))
        return hf.lm_head(picked)


# ---------------------------------------------------------------------------------------------
# Trainable params in our layout.

_LORA_TORCH = re.compile(r"(?:.*\.)?(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(SelfAttention|EncDecAttention)"
                         r"\.(q|v)\.lora_(A|B)\.default\.weight$")


_LORA_DECODER = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.(q|v)_proj\.lora_(A|B)\.default\.weight$")


def _lora_path(name: str) -> Optional[str]:
    m = _LORA_TORCH.match(name)
    if not m:
        return None
    stack, block, _, attn, proj, ab = m.groups()
    kind = "self_attention" if attn == "SelfAttention" else "cross_attention"
    return f"t5/{stack}/block_{block}/{kind}/{proj}/lora_{ab.lower()}"


def trainable_map(model: _AudioFront) -> Dict[str, Tuple[nn.Parameter, str]]:
    """Our flat path -> (torch parameter, layout) for every trainable torch parameter.

    layout: 'same', 'T' (2-D transpose) or 'conv' (ours `[k, in, out]`, torch `[out, in, k]`).
    """
    out: Dict[str, Tuple[nn.Parameter, str]] = {}
    for i, (conv, norm) in enumerate(zip(model.downsampler.convs, model.downsampler.norms)):
        out[f"downsampler/conv_{i}/kernel"] = (conv.weight, "conv")
        out[f"downsampler/conv_{i}/bias"] = (conv.bias, "same")
        out[f"downsampler/norm_{i}/scale"] = (norm.weight, "same")
        out[f"downsampler/norm_{i}/bias"] = (norm.bias, "same")
    if model.layer_weights.mode != "last":
        out["layer_weights/weights"] = (model.layer_weights.weights, "same")
    for path, p in model.lora_params():
        out[path] = (p, "T")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    mapped = {id(p) for p, _ in out.values()}
    if trainable != mapped:
        names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in mapped]
        raise ValueError(f"trainable torch params without a path of ours: {names[:10]}")
    return out


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if layout == "T":
        return value.T
    if layout == "conv":
        return np.transpose(value, (2, 1, 0))
    return value


def load_ours(model: _AudioFront, flat: Dict[str, np.ndarray]) -> None:
    """Copy our trainable params (flat paths) into the torch model; every trainable must be given."""
    mapping = trainable_map(model)
    if set(mapping) != set(flat):
        raise KeyError(f"trainable paths differ: only ours {sorted(set(flat) - set(mapping))[:5]}, "
                       f"only torch {sorted(set(mapping) - set(flat))[:5]}")
    with torch.no_grad():
        for path, (p, layout) in mapping.items():
            value = torch.from_numpy(np.array(_to_torch(flat[path], layout), np.float32, order="C"))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{path}: ours {tuple(value.shape)} vs torch {tuple(p.shape)}")
            p.copy_(value)


def to_ours(model: _AudioFront, grads: bool = False) -> Dict[str, np.ndarray]:
    """The torch trainable params (or their `.grad`) in our flat layout."""
    out = {}
    for path, (p, layout) in trainable_map(model).items():
        t = p.grad if grads else p
        value = t.detach().numpy()
        if layout == "T":
            value = value.T
        elif layout == "conv":
            value = np.transpose(value, (2, 1, 0))
        out[path] = np.array(value, np.float32, order="C", copy=True)  # never a view of the torch tensor
    return out


def adam_first_moments(model: _AudioFront, opt: torch.optim.Optimizer) -> Dict[str, np.ndarray]:
    """AdamW's `exp_avg` per trainable param in our layout (after one step: 0.1 x the clipped gradient)."""
    out = {}
    for path, (p, layout) in trainable_map(model).items():
        value = opt.state[p]["exp_avg"].detach().numpy()
        if layout == "T":
            value = value.T
        elif layout == "conv":
            value = np.transpose(value, (2, 1, 0))
        out[path] = np.array(value, np.float32, order="C", copy=True)
    return out


# ---------------------------------------------------------------------------------------------
# The step.

def make_optimizer(model: _AudioFront, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (ndim >= 2) only, as `optimizer.make_optimizer`'s mask."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)


def shift_right(targets: torch.Tensor, start: int) -> torch.Tensor:
    return torch.cat([torch.full_like(targets[:, :1], start), targets[:, :-1]], dim=1)


def torch_batch(batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """Our numpy batch (train-step format) -> torch tensors (ids int64, masks bool)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype == np.bool_:
            out[k] = torch.from_numpy(v.copy())
        elif np.issubdtype(v.dtype, np.integer):
            out[k] = torch.from_numpy(v.astype(np.int64))
        else:
            out[k] = torch.from_numpy(v.astype(np.float32))
    return out


def loss_fn(model: _AudioFront, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-weighted mean cross-entropy over target tokens (as ours: sum NLL / tokens). Decoder-only:
    the targets are the answer tokens after `[prefix | audio | instruction]`."""
    targets, mask = batch["target_ids"], batch["target_mask"]
    if isinstance(model, TorchSpeechVerseDecoder):
        logits = model(batch["audio"], batch["audio_mask"], batch["prefix_ids"], batch["prefix_mask"],
                       batch["instruction_ids"], batch["instruction_mask"], targets, mask)
    else:
        logits = model(batch["audio"], batch["audio_mask"], batch["instruction_ids"], batch["instruction_mask"],
                       shift_right(targets, model.decoder_start_token_id), mask)
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)


def train_step(model: _AudioFront, opt: torch.optim.Optimizer, batch: Dict[str, torch.Tensor],
               clip_norm: float = 1.0, keep_grads: bool = False) -> Tuple[float, float]:
    """Forward + backward + clip + AdamW. Returns (loss, global grad norm before clipping)."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    if keep_grads:  # before clipping, like the grads ours takes the norm of
        model.last_grads = to_ours(model, grads=True)
    if clip_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    opt.step()
    return float(loss.detach()), float(norm)
