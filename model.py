"""GPT-2 as a plain PyTorch module.

Everything the network is lives here: the config, causal self-attention (written out by hand,
or through `scaled_dot_product_attention`), the MLP, the residual block, the full model with
explicit initialisation, tied input/output embeddings, optional activation checkpointing, the
loss head (chunked linear + cross-entropy, so training never holds the (B, T, vocab) logits),
and import/export of GPT-2 weights in the Hugging Face layout. Generation (KV-cache slots,
sampling, batching) lives in engine.py; the model only takes a cache object and per-row
positions in `hidden_states`.

References:
  [1] Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  [2] Vaswani et al. 2017, "Attention Is All You Need".
  [3] Hendrycks & Gimpel 2016, "Gaussian Error Linear Units" (GPT-2 uses the tanh approximation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import atomic
from loss_head import IGNORE_INDEX, linear_cross_entropy
from tokenizer import EOT_TOKEN

ATTENTION_IMPLS = ("sdpa", "manual")
LOSS_IMPLS = ("chunked", "full")

# The four published GPT-2 sizes [1]; all share block_size=1024 and vocab_size=50257.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class GPTConfig:
    """Shape and behaviour of a GPT-2 model. The defaults are GPT-2 124M."""

    block_size: int = 1024  # longest context, in tokens (learned position embeddings)
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on attention weights, residual branches and embeddings
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    tie_embeddings: bool = True  # lm_head.weight is transformer.wte.weight
    gradient_checkpointing: bool = False  # recompute each Block in backward to save memory
    attention: str = "sdpa"  # "sdpa" (fused kernels) or "manual" (written out, for reading)
    loss_impl: str = "chunked"  # "chunked" (never builds the logits) or "full" (logits, then cross-entropy)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"GPTConfig.attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}"
            )
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"GPTConfig.loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A published GPT-2 size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.impl = config.attention
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). cache: None (plain causal attention over x), or an object
        whose update(layer_idx, k, v) stores the new keys/values (B, nh, T, hs) and returns
        (keys, values, mask) to attend over: keys/values (B, nh, Tk, hs) and a bool mask
        broadcastable to (B, nh, T, Tk) (True = may attend), or mask None for plain causal
        attention with T == Tk. engine.SlotCache is the one the project uses."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nh, Tk, hs), mask (B, 1, T, Tk) or None
        if self.impl == "sdpa":
            y = self._sdpa(q, k, v, mask)
        else:
            y = self._manual(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh*hs) heads side by side
        return self.resid_dropout(self.c_proj(y))

    def _manual(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
        if mask is None:  # Tq == Tk: query i attends to keys 0..i
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att.float(), dim=-1).to(q.dtype)  # softmax in fp32 [2]
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, Tq, hs)

    def _sdpa(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # training, or a prompt's first pass: Tq == Tk
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with [3]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm residual block [1, section 2.3]."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# The four matmul weights that GPT-2's checkpoints store as Conv1D, i.e. (in, out), transposed
# relative to nn.Linear's (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some Hugging Face checkpoints carry (the causal mask); they hold no learned weights.
_HF_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One Parameter, two uses: the input embedding and the output projection [1].
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter, each exactly once.

        | parameter                                   | init                           |
        |---------------------------------------------|--------------------------------|
        | wte, wpe, every Linear weight               | N(0, 0.02)                     |
        | attn.c_proj.weight, mlp.c_proj.weight       | N(0, 0.02 / sqrt(2 * n_layer)) |
        | every Linear bias                           | 0                              |
        | LayerNorm weight / bias                     | 1 / 0                          |
        | lm_head.weight                              | tied: is wte; untied: N(0, 0.02) |

        The residual projections are scaled down because each block adds two of them to the
        residual stream, so its variance grows with depth [1, section 2.3].
        """
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name == "lm_head" and self.config.tie_embeddings:
                    continue  # the same tensor as wte, initialised as an Embedding below
                is_residual_out = name.endswith("attn.c_proj") or name.endswith("mlp.c_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix counts once). non_embedding drops wpe and wte."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at context seq_len.

        6 per matmul weight (2 forward, 4 backward) plus attention scores and values:
        12 * n_layer * n_embd * T (Kaplan et al. 2020, PaLM appendix B). The lm_head matmul counts;
        the position lookup does not.
        """
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        matmul_params = self.num_params() - self.transformer.wpe.weight.numel()
        if not cfg.tie_embeddings:
            matmul_params -= self.transformer.wte.weight.numel()  # a lookup, not a matmul
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * T

    # ------------------------------------------------------------------ forward

    def hidden_states(self, idx: torch.Tensor, cache=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after ln_f.

        Without a cache, token t sits at position t (T <= block_size). The decoding engine
        passes a cache (see CausalSelfAttention.forward) and positions (B, T), each row's own
        positions (every value < block_size), so sequences of different lengths run together.
        Raises ValueError if T > block_size without positions.
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute and cache is None:
                # Keep only each block's input; recompute its inside during backward.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
        return_logits: bool | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits, or the cross-entropy loss, or both.

        idx: (B, T) int64 token ids, T <= block_size.
        targets: (B, T) int64 next-token ids; -100 marks a position that is not scored.
        reduction: "mean" (over scored positions), "sum", or "none": per-token losses (B, T), 0
            where the target is -100.
        return_logits: with targets, also return the logits (B, T, V); this takes the "full" path.
        Returns (logits (B, T, V), None) without targets. With targets: (None, loss) through the
        configured loss head (config.loss_impl), or (logits, loss) with return_logits. The loss
        is computed in fp32, also under bf16/fp16 autocast.
        Raises ValueError if T > block_size or for an unknown reduction.
        """
        h = self.hidden_states(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(h), None
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        B, T, C = h.shape
        if return_logits or self.config.loss_impl == "full":
            logits = self.lm_head(h)  # (B, T, V)
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T),
                                   ignore_index=IGNORE_INDEX, reduction=reduction)
            return (logits if return_logits else None), (loss.view(B, T) if reduction == "none" else loss)
        loss = linear_cross_entropy(h.view(B * T, C), self.lm_head.weight, targets.reshape(B * T), reduction)
        return None, (loss.view(B, T) if reduction == "none" else loss)

    # ------------------------------------------------- GPT-2 weights (HF layout)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "GPT":
        """Load GPT-2 weights saved in the Hugging Face layout.

        path: a local directory with config.json and model.safetensors (or pytorch_model.bin,
            read with weights_only=True, never unpickling code), or a hub name such as "gpt2",
            downloaded when a network is reachable.
        overrides: dropout, gradient_checkpointing, attention or loss_impl; the shape comes from config.json.
        Raises FileNotFoundError, ValueError naming an unsupported config field, or KeyError /
        ValueError naming a missing, unexpected or wrongly shaped weight.
        """
        allowed = {"dropout", "gradient_checkpointing", "attention", "loss_impl"}
        if set(overrides) - allowed:
            raise ValueError(
                f"from_pretrained can only override {sorted(allowed)}, got {sorted(set(overrides) - allowed)}"
            )
        directory = _resolve_pretrained_dir(path)
        config = config_from_hf(json.loads((directory / "config.json").read_text()), **overrides)
        model = cls(config)
        model.load_hf_state_dict(_read_weights(directory))
        return model

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face GPT-2 state dict into this model, checking every key and shape."""
        # Checkpoints saved from GPT2LMHeadModel prefix keys with "transformer."; GPT2Model doesn't.
        hf = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
        original_name = {k.removeprefix("transformer."): k for k in hf_state}
        own = self.state_dict()
        expected = set()
        for key, param in own.items():
            hf_key = key.removeprefix("transformer.")
            if key == "lm_head.weight" and self.config.tie_embeddings:
                expected.add(hf_key)  # may be stored or not; the tied wte is what counts
                continue
            expected.add(hf_key)
            if hf_key not in hf:
                raise KeyError(f"weight {key!r} is missing from the checkpoint")
            tensor = hf[hf_key]
            if key.endswith(_CONV1D_SUFFIXES):
                tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
            if tensor.shape != param.shape:
                raise ValueError(
                    f"weight {key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                    f"the model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
        unexpected = sorted(original_name[k] for k in hf if k not in expected and not k.endswith(_HF_IGNORED_SUFFIXES))
        if unexpected:
            raise KeyError(f"unexpected weight(s) in the checkpoint: {unexpected[:5]}")

    def hf_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weights under GPT2LMHeadModel's names and Conv1D layout (CPU, contiguous).

        state_dict: this model's own state dict, or an equivalent one gathered elsewhere (e.g. the
        full weights of a sharded run); defaults to self.state_dict().
        """
        out = {}
        state_dict = self.state_dict() if state_dict is None else state_dict
        for key, tensor in state_dict.items():
            if key == "lm_head.weight" and self.config.tie_embeddings:
                continue  # stored once, as transformer.wte.weight
            tensor = tensor.detach()
            if key.endswith(_CONV1D_SUFFIXES):
                tensor = tensor.t()
            out[key] = tensor.contiguous().cpu()
        return out

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        training: dict | None = None) -> None:
        """Write config.json and model.safetensors that transformers' GPT2LMHeadModel loads, and
        the files that make the directory complete for the rest of the ecosystem (hf_extras.py:
        GPT-2's tokenizer, generation_config.json, a model card).

        state_dict: as for `hf_state_dict`. training: the trainer's facts for the model card (see
        hf_extras.extra_files). Each file is published with atomic.atomic_path (temporary name,
        fsync, rename), so none is ever half-written.
        Raises ValueError for a model GPT-2's format cannot express (bias=False).
        """
        from safetensors.torch import save_file

        import hf_extras

        if not self.config.bias:
            raise ValueError("GPT-2's Hugging Face format has biases everywhere; bias=False cannot be exported")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.hf_state_dict(state_dict)
        with atomic.atomic_path(directory / "model.safetensors") as tmp:
            save_file(weights, str(tmp), metadata={"format": "pt"})
        hf_config = config_to_hf(self.config)
        atomic.write_json(directory / "config.json", hf_config)
        # Counted from what is written: under FSDP self's own parameters are only this process's shard.
        hf_extras.write_extras(directory, hf_config, sum(t.numel() for t in weights.values()), training)




# ------------------------------------------------------------ HF format helpers


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json; refuses settings this model lacks."""
    n_embd = hf["n_embd"]
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
    }
    for name, (value, ok) in unsupported.items():
        if value not in ok:
            raise ValueError(f"config.json field {name}={value!r} is not supported (expected one of {ok})")
    return GPTConfig(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=overrides.pop("dropout", hf.get("resid_pdrop", 0.0)),
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        **overrides,
    )


def config_to_hf(config: GPTConfig) -> dict:
    """A config.json that transformers reads as GPT2LMHeadModel of the same shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        # <|endoftext|> starts and ends every document; a toy vocabulary has no such id.
        "bos_token_id": EOT_TOKEN if config.vocab_size > EOT_TOKEN else None,
        "eos_token_id": EOT_TOKEN if config.vocab_size > EOT_TOKEN else None,
        "tie_word_embeddings": config.tie_embeddings,
    }


def _resolve_pretrained_dir(path: str | Path) -> Path:
    directory = Path(path)
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face GPT-2 directory?")
        return directory
    if directory.exists():
        raise FileNotFoundError(f"{directory} is a file; pass the directory that holds config.json")
    name = str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no such directory: {name}")
    # Not a local path: treat it as a hub name such as "gpt2" or "openai-community/gpt2".
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=["config.json", "model.safetensors", "pytorch_model.bin"])
        )
    except Exception as err:
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(err).__name__}). Offline, pass a local directory holding config.json and "
            f"model.safetensors (e.g. one written by save_pretrained)."
        ) from err


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_file = directory / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read weights from {safetensors_file}: {err}") from err
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read weights from {bin_file}: {err}") from err
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")
