"""GPT-2 as a plain PyTorch module.

The config, causal self-attention (written out by hand, or through `scaled_dot_product_attention`),
the MLP, the residual block, and the full model: explicit initialisation, tied input/output
embeddings, optional activation checkpointing, `forward` (logits or the loss), parameter and FLOP
counts. Neighbours own the rest:
  loss_head.py     the chunked linear + cross-entropy head, so training never holds the (B, T, vocab) logits
  hf_dir.py        GPT-2 as a Hugging Face model directory (`GPT.from_pretrained` / `save_pretrained` call it)
  engine.py        generation (KV-cache slots, sampling, batching); the model only takes a cache
                   object and per-row positions in `hidden_states`

References:
  [1] Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  [2] Vaswani et al. 2017, "Attention Is All You Need".
  [3] Hendrycks & Gimpel 2016, "Gaussian Error Linear Units" (GPT-2 uses the tanh approximation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loss_head import IGNORE_INDEX, linear_cross_entropy

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
        attention with T == Tk; attention runs in the keys' dtype (a cache may keep them wider
        than x). engine.PrefillPass and engine.DecodePass are the ones the project uses."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        mask, dtype = None, q.dtype
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nh, Tk, hs), mask (B, 1, T, Tk) or None
            q = q.to(k.dtype)
        if self.impl == "sdpa":
            y = self._sdpa(q, k, v, mask)
        else:
            y = self._manual(q, k, v, mask)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh*hs) heads side by side
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


class GPT(nn.Module):
    """GPT-2: token and position embeddings, n_layer Blocks, a final LayerNorm, the lm_head."""

    # FSDP's transformer wrapping (Accelerate reads this name) puts each Block in its own unit;
    # everything else, wte and the lm_head it is tied to among it, stays in the root unit together.
    _no_split_modules = ["Block"]

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With config.tie_embeddings, make lm_head.weight the very Parameter transformer.wte.weight
        is: one Parameter, two uses, the input embedding and the output projection [1]. Moving the
        model to or from the meta device, or `to_empty`, replaces each module's Parameter on its
        own and so unties them; Accelerate calls this after FSDP2's RAM-efficient loading."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean",
                return_logits: bool | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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

    # --------------------------------------- GPT-2 weights in the HF layout (hf_dir.py)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "GPT":
        """A model from a Hugging Face GPT-2 directory or hub name (see hf_dir.load_pretrained).
        overrides: any of hf_dir.OVERRIDABLE (dropout, attention, ...; never the shape)."""
        import hf_dir

        return hf_dir.load_pretrained(path, lambda fields: cls(GPTConfig(**fields)), **overrides)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        training: dict | None = None) -> None:
        """Write a directory transformers' GPT2LMHeadModel loads; see hf_dir.save_pretrained."""
        import hf_dir

        hf_dir.save_pretrained(self, path, state_dict, training)
