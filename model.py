"""
The nanocap model: a frozen CLIP vision tower and a frozen GPT-2, joined by a small trainable bridge.

    frames [B, T, N, Dv] (CLIP last_hidden_state, T frames of N tokens; T = 1 for an image)
      |                                  |
      | mapping network (ClipCap)        | Perceiver Resampler (Flamingo), at the vision width Dv
      v                                  v
    prefix [B, P, Dt]                  latents [B, L, Dv]
      |                                  |  keys/values of every gated cross-attention block
      v                                  v
    [prefix; caption embeddings] -> (gated x-attn -> GPT-2 block) x n_layer -> LM head -> next tokens

Both bridges can be switched on or off (the ablations of the reference). The cross-attention gates start
at zero, so an untrained model is exactly GPT-2. GPT-2 is written here (nanoGPT style) rather than taken
from transformers so that the cross-attention is called explicitly and the KV cache is ours; only its
weights come from transformers.
"""
import math
import os
import re
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import EOT, IGNORE_INDEX, InputError, first_line, input_errors_exit, tokens_per_frame


def pick_device(device=''):
    """
    The device a script runs on, as a full string: `device` if given ('cpu', 'cuda', 'cuda:3', ...), else
    a GPU if there is one, else the CPU. Under torchrun, 'cuda' means this process's own GPU,
    cuda:LOCAL_RANK. A GPU is made the current device too: whatever uses "the" GPU without naming one
    (CUDA streams and graphs, some kernels) must use this one, not cuda:0 on every rank.
    """
    if not device:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f'device={device!r} is not a device ({first_line(e)})')
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise InputError(f'device={device!r}, but no CUDA GPU is available')
        if dev.index is None:
            dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        if dev.index >= torch.cuda.device_count():
            raise InputError(f'device={device!r}: there is no {dev} (this machine has '
                             f'{torch.cuda.device_count()} GPUs)')
        torch.cuda.set_device(dev)
    return str(dev)

# Architectures of the checkpoints we know by name, so that --init_from=scratch needs no download.
# Any other name (or a local directory) is read from its config.json.
GPT2_SIZES = {
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
_CLIP_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_CLIP_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
CLIP_VISION_SIZES = {
    'openai/clip-vit-base-patch32': dict(_CLIP_B, patch_size=32, image_size=224),
    'openai/clip-vit-base-patch16': dict(_CLIP_B, patch_size=16, image_size=224),
    'openai/clip-vit-large-patch14': dict(_CLIP_L, patch_size=14, image_size=224),
    'openai/clip-vit-large-patch14-336': dict(_CLIP_L, patch_size=14, image_size=336),
}


@dataclass
class CaptionerConfig:
    vision_model: str = 'openai/clip-vit-base-patch32'  # hub name or local directory of a CLIP checkpoint
    text_model: str = 'gpt2'  # hub name or local directory of a GPT-2 checkpoint
    # mapping network (ClipCap): CLIP features -> prefix tokens placed before the caption
    enable_mapper: bool = True
    mapper: str = 'mlp'  # 'mlp' or 'transformer'
    prefix_len: int = 1  # prefix tokens per image or video
    mapper_hidden: int = 512  # hidden width of the MLP mapper
    mapper_depth: int = 8  # transformer mapper: layers, heads, feed-forward width
    mapper_heads: int = 8
    mapper_ffn: int = 2048
    # Perceiver Resampler + gated cross-attention (Flamingo)
    enable_resampler_xattn: bool = True
    resampler_depth: int = 4
    num_latents: int = 64
    max_frames: int = 500  # learned time embeddings, one per frame
    heads: int = 6  # attention heads of the resampler and of the cross-attention
    dim_head: int = 64
    ff_mult: int = 1  # feed-forward width = ff_mult * model width
    xattn_every: int = 1  # a gated cross-attention block before every xattn_every-th GPT-2 block
    # several media in one sequence (Flamingo): the text after a media reads the latents of that media only
    # ('latest', Flamingo's default) or of every media before it ('earlier')
    media_attention: str = 'latest'
    # fine-tuning the language model too (ClipCap, CLIPxGPT): train the top N GPT-2 blocks and the final
    # LayerNorm; train_embeddings also trains the token and position embeddings (and so the tied LM head)
    unfreeze_layers: int = 0
    train_embeddings: bool = False


# -----------------------------------------------------------------------------
# GPT-2, nanoGPT style

@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    layer_norm_eps: float = 1e-5


def split_heads(x, n_head):
    """[B, T, n_head * d] -> [B, n_head, T, d]"""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x):
    """[B, n_head, T, d] -> [B, T, n_head * d]"""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal in GPT-2 and bidirectional in the transformer mapper."""

    def __init__(self, dim, n_head, causal):
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.c_attn = nn.Linear(dim, 3 * dim)  # q, k, v in one matrix product (GPT-2's layout)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, cache=None, layer=None):
        """x [B, T, C]; mask [B or 1, 1, T or 1, keys] (True = attend). With a KVCache (decoding), this
        call's keys and values are stored as `layer`'s, and the queries attend to all cached ones."""
        q, k, v = (split_heads(t, self.n_head) for t in self.c_attn(x).split(x.shape[-1], dim=2))
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)
        is_causal = self.causal and q.shape[2] > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.c_proj(merge_heads(y))


class KVCache:
    """
    The keys and values of every self-attention layer, for max_len positions of a caption from the start.
    The prompt fills positions 0..t-1; then each decoding step writes position `pos` in place and attends
    to all max_len positions, masking those not written yet. Every step then has the same shapes and
    reads the same memory, which is what lets a GPU replay one captured step (a CUDA graph) instead of
    launching ~400 kernels per token. `pos` is a tensor, moved in place, for the same reason.
    """

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.pos = None  # [1]: where the next token goes; None until the prompt is in
        self.written = None  # [1, max_len]: the positions a decoding step attends to

    def step_position(self):
        """Start a decoding step: its position, and the mask of the positions written so far, this one
        included (once per step, for every layer)."""
        self.written = (torch.arange(self.max_len, device=self.pos.device) <= self.pos)[None]
        return self.pos

    def update(self, layer, k, v):
        """Store one layer's new keys/values [B, H, t, D]; return the (keys, values, mask) to attend to."""
        if self.pos is None:  # the prompt: it attends (causally) to itself only
            B, H, t, D = k.shape
            self.k[layer], self.v[layer] = k.new_zeros(B, H, self.max_len, D), v.new_zeros(B, H, self.max_len, D)
            self.k[layer][:, :, :t], self.v[layer][:, :, :t] = k, v
            return k, v, None
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer], self.written

    def advance(self, n):
        """After a forward pass of n new positions."""
        if self.pos is None:
            self.pos = torch.tensor([n], device=self.k[0].device)
        else:
            self.pos.add_(n)

    def reorder(self, index):
        """Keep the batch rows `index` (beam search moves and copies hypotheses): in place, unless the
        number of rows changes."""
        for cached in (self.k, self.v):
            for layer, t in enumerate(cached):
                if len(index) == t.shape[0]:
                    t.copy_(t[index])
                else:
                    cached[layer] = t[index]


@dataclass
class MediaLayout:
    """
    Where M media go in a sequence of T text tokens (Flamingo's interleaving): media m's P prefix positions
    are inserted before text token media_at[b, m] (non-decreasing in m), so the sequence has T + M * P
    positions. Every position knows its latest media, the last one inserted at or before it (-1 before
    the first): that media's latents are what its cross-attention reads.
    """
    text_pos: torch.Tensor  # [B, T] the positions of the text tokens
    prefix_pos: torch.Tensor  # [B, M * P] the positions of the prefixes, media after media
    latest_media: torch.Tensor  # [B, T + M * P]

    @classmethod
    def of(cls, media_at, text_len, prefix_len):
        B, M = media_at.shape
        text = torch.arange(text_len, device=media_at.device)
        media_so_far = (media_at[:, None, :] <= text[None, :, None]).sum(-1)  # [B, T]
        text_pos = text + prefix_len * media_so_far
        first = media_at + prefix_len * torch.arange(M, device=media_at.device)  # each prefix's first position
        prefix_pos = (first[:, :, None] + torch.arange(prefix_len, device=media_at.device)).flatten(1)
        latest = torch.full((B, text_len + M * prefix_len), -1, device=media_at.device)
        latest.scatter_(1, text_pos, media_so_far - 1)
        media = torch.arange(M, device=media_at.device).repeat_interleave(prefix_len).expand(B, -1)
        latest.scatter_(1, prefix_pos, media)  # a prefix belongs to its own media
        return cls(text_pos, prefix_pos, latest)

    def place(self, tokens, prefix):
        """Token embeddings [B, T, C] and prefix embeddings [B, M * P, C] -> the sequence [B, T + M * P, C]
        (scattered to known positions: no mask indexing, whose result size would make a GPU sync)."""
        B, T, C = tokens.shape
        x = tokens.new_zeros(B, T + prefix.shape[1], C)
        x = x.scatter(1, self.text_pos[..., None].expand(-1, -1, C), tokens)
        return x.scatter(1, self.prefix_pos[..., None].expand(-1, -1, C), prefix)

    def text_states(self, h):
        """The hidden states [B, T, C] of the text positions of h [B, T + M * P, C]."""
        return h.gather(1, self.text_pos[..., None].expand(-1, -1, h.shape[-1]))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate='tanh'))  # GPT-2's "gelu_new"


class Block(nn.Module):
    """A pre-norm transformer block: GPT-2's, and the transformer mapper's (causal=False)."""

    def __init__(self, dim, n_head, mlp_hidden, causal=True, eps=1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, n_head, causal)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x, mask=None, cache=None, layer=None):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2: token and position embeddings, n_layer blocks, a final LayerNorm, and the LM head tied to
    the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.vocab_size
        # The token embedding is also the LM head (tied, as in GPT-2). Its rows are padded once, here, with
        # zeros to a multiple of 64 (50,257 -> 50,304), where a GPU multiplies 5 to 7x faster; the padding's
        # logits are -inf, so no padding row is ever predicted or adds anything to a softmax. The real rows
        # are drawn as nn.Embedding(V, C) would draw them, so a seed gives the same model as unpadded.
        padded = -(-V // 64) * 64
        real_rows = torch.randn(V, C)
        self.wte = nn.Embedding.from_pretrained(torch.cat([real_rows, torch.zeros(padded - V, C)]), freeze=False)
        bias = torch.zeros(padded)
        bias[V:] = -math.inf
        self.register_buffer('vocab_bias', bias, persistent=False)
        self.wpe = nn.Embedding(config.block_size, C)
        self.h = nn.ModuleList(Block(C, config.n_head, 4 * C, eps=config.layer_norm_eps)
                               for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, tokens, prefix=None, cross=None, cache=None, layout=None):
        """
        tokens [B, T] -> final hidden states [B, P + T, C], with P input embeddings [B, P, C] if given (the
        captioner's visual prefixes): before the tokens, or where a MediaLayout puts them. GPT-2 knows
        nothing of images: cross(i, x), if given, runs before block i (the captioner's gated
        cross-attention). With a KVCache: the first call (the prompt) fills it, and each later call is one
        decoding step, a token at position cache.pos.
        """
        x = self.wte(tokens)
        if cache is not None and cache.pos is not None:
            positions = cache.step_position()
        else:
            if prefix is not None:
                prefix = prefix.to(x.dtype)
                x = torch.cat([prefix, x], dim=1) if layout is None else layout.place(x, prefix)
            self.check_length(x.shape[1])
            positions = torch.arange(x.shape[1], device=x.device)
        x = x + self.wpe(positions)
        for i, block in enumerate(self.h):
            if cross is not None:
                x = cross(i, x)
            x = block(x, cache=cache, layer=i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.ln_f(x)

    def check_length(self, positions):
        if positions > self.config.block_size:
            raise InputError(f'a sequence of {positions} positions (prefix + caption) is longer than '
                             f"the language model's {self.config.block_size}")

    def lm_head(self, x):
        """Next-token logits [..., padded vocabulary] (see __init__)."""
        return F.linear(x, self.wte.weight, self.vocab_bias)


# -----------------------------------------------------------------------------
# Mapping networks (ClipCap)

def frame_token_mask(frame_mask, tokens_per_frame):
    """[B, T] mask of real frames -> [B, T * N] mask of their tokens."""
    return frame_mask.repeat_interleave(tokens_per_frame, dim=1)


class MLPMapper(nn.Module):
    """Mean of the CLIP tokens of all real frames -> MLP -> prefix_len prefix tokens."""

    def __init__(self, vision_dim, text_dim, prefix_len, hidden):
        super().__init__()
        self.prefix_len, self.text_dim = prefix_len, text_dim
        self.net = nn.Sequential(nn.Linear(vision_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, prefix_len * text_dim))

    def forward(self, frames, frame_mask):
        B, T, N, _ = frames.shape
        weight = frame_mask.to(frames.dtype)[:, :, None, None]  # padded frames count for nothing
        pooled = (frames * weight).sum(dim=(1, 2)) / (weight.sum(dim=(1, 2)) * N)
        return self.net(pooled).view(B, self.prefix_len, self.text_dim)


class TransformerMapper(nn.Module):
    """
    ClipCap's transformer mapper: learned prefix queries appended to the projected CLIP tokens, a
    bidirectional transformer over both, and the queries' outputs are the prefix. Unlike ClipCap, which
    expands the pooled CLIP vector into pseudo-tokens, it reads CLIP's own tokens (all real frames).
    """

    def __init__(self, vision_dim, text_dim, prefix_len, depth, n_head, ffn):
        super().__init__()
        self.proj = nn.Linear(vision_dim, text_dim)
        self.queries = nn.Parameter(torch.randn(prefix_len, text_dim))
        self.blocks = nn.ModuleList(Block(text_dim, n_head, ffn, causal=False) for _ in range(depth))

    def forward(self, frames, frame_mask):
        B, T, N, D = frames.shape
        P = self.queries.shape[0]
        x = torch.cat([self.proj(frames.reshape(B, T * N, D)), self.queries.expand(B, -1, -1)], dim=1)
        keep = torch.cat([frame_token_mask(frame_mask, N), frame_mask.new_ones(B, P)], dim=1)
        mask = keep[:, None, None, :]  # [B, 1, 1, keys]: no query attends to a padded frame
        for block in self.blocks:
            x = block(x, mask=mask)
        return x[:, -P:]


# -----------------------------------------------------------------------------
# Perceiver Resampler and gated cross-attention (Flamingo)

def feed_forward(dim, mult):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [frame tokens; latents]."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media, latents, mask):
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = (split_heads(t, self.heads)
                for t in self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(merge_heads(out))


class PerceiverResampler(nn.Module):
    """Any number of frames of N tokens -> a fixed set of latents, at the vision width."""

    def __init__(self, dim, depth, heads, dim_head, num_latents, max_frames, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # small, like GPT-2's position embeddings: for an image (one frame) it is the same vector on every
        # token, which tells nothing, and at std 1 it would drown weaker features after the LayerNorm
        self.time_emb = nn.Parameter(0.02 * torch.randn(max_frames, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames, frame_mask):
        B, T, N, D = frames.shape
        max_frames = self.time_emb.shape[0]
        if T > max_frames:
            raise InputError(f'{T} frames, but the resampler has time embeddings for {max_frames}')
        media = (frames + self.time_emb[:T, None]).reshape(B, T * N, D)
        L = self.latents.shape[0]
        keep = torch.cat([frame_token_mask(frame_mask, N), frame_mask.new_ones(B, L)], dim=1)
        mask = keep[:, None, None, :]
        latents = self.latents.expand(B, -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(media, latents, mask)
            latents = latents + ff(latents)
        return self.norm(latents)


class GatedCrossAttention(nn.Module):
    """Text attends to the latents; tanh gates (zero at init) scale what is added to the text stream."""

    def __init__(self, text_dim, media_dim, heads, dim_head, ff_mult):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(text_dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)  # projects from the vision width
        self.to_out = nn.Linear(inner, text_dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(text_dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def media_kv(self, latents):
        """Keys and values of the latents: computed once per image, reused at every decoding step."""
        return tuple(split_heads(t, self.heads) for t in self.to_kv(latents).chunk(2, dim=-1))

    def forward(self, x, kv, visible=None):
        """x [B, S, C] reads the latents' keys/values [B, H, M * L, d]; visible [B or 1, 1, S, M * L] (None: all)
        says which media's latents each position may read."""
        q = split_heads(self.to_q(self.norm(x)), self.heads)
        if visible is None:
            attn = F.scaled_dot_product_attention(q, *kv)
        else:
            # a position that may read no media (text before the first) gets nothing from it; its row of
            # the mask is opened only so that the softmax has something to divide by
            reads_any = visible.any(-1, keepdim=True)
            attn = F.scaled_dot_product_attention(q, *kv, attn_mask=visible | ~reads_any) * reads_any
        attn = self.to_out(merge_heads(attn))
        x = x + self.attn_gate.tanh() * attn
        return x + self.ff_gate.tanh() * self.ff(x)


# -----------------------------------------------------------------------------
# The captioner

class Captioner(nn.Module):

    def __init__(self, config: CaptionerConfig, vision: nn.Module, gpt: GPT2):
        super().__init__()
        self.config = config
        self.vision, self.gpt = vision, gpt
        vision_dim, text_dim = vision.config.hidden_size, gpt.config.n_embd
        c = config
        self.mapper = None
        if c.enable_mapper:
            if c.mapper == 'mlp':
                self.mapper = MLPMapper(vision_dim, text_dim, c.prefix_len, c.mapper_hidden)
            elif c.mapper == 'transformer':
                self.mapper = TransformerMapper(vision_dim, text_dim, c.prefix_len, c.mapper_depth,
                                                c.mapper_heads, c.mapper_ffn)
            else:
                raise InputError(f"mapper must be 'mlp' or 'transformer', not {c.mapper!r}")
        self.resampler = None
        self.xattn = nn.ModuleDict()  # keyed by the index of the GPT-2 block it runs before
        if c.enable_resampler_xattn:
            self.resampler = PerceiverResampler(vision_dim, c.resampler_depth, c.heads, c.dim_head,
                                                c.num_latents, c.max_frames, c.ff_mult)
            for i in range(0, gpt.config.n_layer, c.xattn_every):
                self.xattn[str(i)] = GatedCrossAttention(text_dim, vision_dim, c.heads, c.dim_head,
                                                         c.ff_mult)
        if c.media_attention not in ('latest', 'earlier'):
            raise InputError(f"media_attention must be 'latest' or 'earlier', not {c.media_attention!r}")
        if not 0 <= c.unfreeze_layers <= gpt.config.n_layer:
            raise InputError(f'unfreeze_layers must be in 0..{gpt.config.n_layer}, not {c.unfreeze_layers}')
        self.vision.requires_grad_(False)
        self.gpt.requires_grad_(False)
        if c.unfreeze_layers:
            for block in self.gpt.h[gpt.config.n_layer - c.unfreeze_layers:]:
                block.requires_grad_(True)
            self.gpt.ln_f.requires_grad_(True)
        if c.train_embeddings:
            self.gpt.wte.requires_grad_(True)
            self.gpt.wpe.requires_grad_(True)
        self.cpu_head = None  # oneDNN's copy of the LM head, for decoding on a CPU (see onednn_linears)

    @property
    def prefix_len(self):
        return self.config.prefix_len if self.mapper is not None else 0

    def encode_pixels(self, frames, frame_counts):
        """Run CLIP on the preprocessed frames [F, 3, H, W] of B clips, one clip after another, clip i
        frame_counts[i] frames long (an image is a clip of one frame). Returns features [B, T, N, Dv],
        zero-padded to the longest clip, and the mask of real frames [B, T]."""
        hidden = self.vision(pixel_values=frames).last_hidden_state
        features = nn.utils.rnn.pad_sequence(hidden.split(list(frame_counts)), batch_first=True)
        mask = torch.arange(features.shape[1]) < torch.tensor(frame_counts)[:, None]
        return features, mask.to(features.device)

    def encode(self, features, feature_mask=None):
        """CLIP features of one image or video per row [B, T, N, Dv] (an image may be [B, N, Dv]), or of M
        each [B, M, T, N, Dv], with the mask of real frames [B, T] or [B, M, T] -> (the prefixes
        [B, M * P, Dt] or None, {GPT-2 block index: cross-attention keys/values [B, H, M * L, d]})."""
        if features.dim() == 3:  # one image: [B, N, Dv]
            features = features[:, None]
        if features.dim() == 4:  # one media per row
            features = features[:, None]
            feature_mask = feature_mask[:, None] if feature_mask is not None else None
        B, M = features.shape[:2]
        if feature_mask is None:
            feature_mask = torch.ones(features.shape[:3], dtype=torch.bool, device=features.device)
        # every media on its own, as a batch of B * M (features are stored in float16)
        frames, frame_mask = features.flatten(0, 1).to(self.gpt.wte.weight.dtype), feature_mask.flatten(0, 1)
        prefix = None
        if self.mapper is not None:
            prefix = self.mapper(frames, frame_mask).reshape(B, M * self.prefix_len, -1)
        media_kv = {}
        if self.resampler is not None:
            latents = self.resampler(frames, frame_mask)
            media_kv = {int(i): tuple(t.unflatten(0, (B, M)).transpose(1, 2).flatten(2, 3)
                                      for t in block.media_kv(latents))
                        for i, block in self.xattn.items()}
        return prefix, media_kv

    def cross_hook(self, media_kv, visible=None):
        """GPT2.forward's `cross`: before GPT-2 block i, gated cross-attention block i, if there is one,
        reads the media (those `visible` lets each position read: see media_visibility)."""
        def cross(i, x):
            return self.xattn[str(i)](x, media_kv[i], visible) if i in media_kv else x
        return cross

    def interleaving(self, media_at, text_len):
        """The MediaLayout of media before text positions media_at [B, M] among text_len tokens, and which
        latents each of its positions reads."""
        layout = MediaLayout.of(media_at, text_len, self.prefix_len)
        return layout, self.media_visibility(layout.latest_media, media_at.shape[1])

    def media_visibility(self, latest_media, M):
        """Which latents each position reads, [B, 1, S, M * L] (True = read), from each position's latest
        media [B, S] (-1: none yet): those of that media, or of every media up to it (media_attention)."""
        media = torch.arange(M, device=latest_media.device)
        latest = latest_media[..., None]
        reads = latest == media if self.config.media_attention == 'latest' else latest >= media
        return reads.repeat_interleave(self.config.num_latents, dim=-1)[:, None]

    def forward(self, features, feature_mask, tokens, targets=None, target_positions=None, media_at=None,
                reduction='mean', float32_head=False):
        """
        features [B, T, N, Dv] (or [B, N, Dv]), feature_mask [B, T] (True = real frame, None = all),
        tokens [B, S] = <|endoftext|> + caption, targets [B, S] = caption + <|endoftext|>, IGNORE_INDEX
        on padding. Interleaved (several captions per row, each after its own media): features
        [B, M, T, N, Dv], feature_mask [B, M, T] and media_at [B, M], the text position each media
        goes before (see MediaLayout). Without targets: logits [B, S, vocab] of the caption positions
        (the prefix needs no LM head). With targets: logits [K, padded vocab] of the K positions that have
        a target, in order, and their cross-entropy: the mean, or each one's (reduction='none'). Over
        GPT-2's 50,257 words the LM head and its softmax are most of a small model's work, and a third
        of a batch padded to its longest caption is padding.
        target_positions [K]: the flat indices (into B * S) of those positions. Give them when they are
        known on the host (train.py does): finding them from `targets` on a GPU makes the CPU wait for
        the GPU (one sync per step), and gives torch.compile a shape it cannot know in advance.
        float32_head: the LM head in float32 even under autocast, as decoding runs it (SCST scores the
        samples that decoding drew with the same probabilities).
        """
        prefix, media_kv = self.encode(features, feature_mask)
        if media_at is None:  # one media per row, before the text
            h = self.gpt(tokens, prefix, self.cross_hook(media_kv))[:, self.prefix_len:]
        else:
            layout, visible = self.interleaving(media_at, tokens.shape[1])
            h = layout.text_states(self.gpt(tokens, prefix, self.cross_hook(media_kv, visible), layout=layout))
        if targets is None:
            return self.gpt.lm_head(h)[..., :self.gpt.config.vocab_size], None  # the real words'
        if target_positions is None:
            target_positions = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        h = h.reshape(-1, h.shape[-1])[target_positions]
        logits = self.float32_logits(h) if float32_head else self.gpt.lm_head(h)
        return logits, F.cross_entropy(logits.float(), targets.flatten()[target_positions], reduction=reduction)

    # decoding, one token at a time; the search strategies are the functions after this class

    def start(self, features, feature_mask, max_new_tokens, shots=None):
        """Encode the media and run the prompt [prefix; <|endoftext|>] (with few-shot examples, see
        few_shot_prompt: each example's [prefix; <|endoftext|> caption] before it), filling a KV cache for
        max_new_tokens more. Returns the next-token logits [B, vocab] and the state that step() reads."""
        B, device = features.shape[0], features.device
        if shots is None:
            prompt, media = torch.full((B, 1), EOT, dtype=torch.long, device=device), 1
        else:
            prompt, media_at = few_shot_prompt(shots[2], B, device)
            media = media_at.shape[1]
        cache = KVCache(self.gpt.config.n_layer, media * self.prefix_len + prompt.shape[1] + max_new_tokens)
        self.gpt.check_length(cache.max_len)  # fail now, not in the middle of decoding
        prefix, media_kv = self.encode(features, feature_mask)
        layout = visible = None
        if shots is not None:
            # the examples are the same for every query: encoded once, as one row of N media
            examples = self.encode(shots[0][None].to(device), shots[1][None].to(device))
            prefix, media_kv = examples_first(examples, (prefix, media_kv), B)
            layout, visible = self.interleaving(media_at, prompt.shape[1])
        h = self.gpt(prompt, prefix, self.cross_hook(media_kv, visible), cache, layout)
        if shots is not None and self.config.media_attention == 'latest':
            # the caption to write comes after the last media, the query: it reads the query's latents
            # alone, so the steps keep those (with 'earlier' it reads every media's: no mask is needed)
            latents = self.config.num_latents
            media_kv = {i: (k[:, :, -latents:].contiguous(), v[:, :, -latents:].contiguous())
                        for i, (k, v) in media_kv.items()}
        return self.float32_logits(h[:, -1]), dict(media_kv=media_kv, cache=cache)

    def step(self, token, state):
        """Feed one token per row [B] at the cache's next position; returns the next-token logits
        [B, vocab]. The same shapes and memory every step (see KVCache)."""
        h = self.gpt(token[:, None], cross=self.cross_hook(state['media_kv']), cache=state['cache'])
        return self.float32_logits(h[:, -1])

    def float32_logits(self, h):
        """Decoding's logits [B, vocab] of final hidden states [B, C], over the real words only (no
        padding), in float32 even under autocast: bfloat16 logits come in steps of 0.25 to 0.5 at typical
        sizes, coarse enough to tie or swap the best tokens and beams, so a GPU would caption differently
        from a CPU. Cross-entropy training keeps the autocast head: one row per step here, thousands there."""
        with torch.autocast(h.device.type, enabled=False):
            head = self.gpt.lm_head if self.cpu_head is None else self.cpu_head
            return head(h.float().contiguous())[:, :self.gpt.config.vocab_size]

    @torch.no_grad()
    def generate(self, features, feature_mask=None, max_new_tokens=20, decoding='greedy', beam_width=5,
                 temperature=1.0, top_k=0, top_p=1.0, length_penalty=1.0, generator=None,
                 min_new_tokens=0, shots=None):
        """
        Caption a batch of images or videos. decoding: 'greedy', 'beam' (per-image beams, scores
        normalised by length ** length_penalty) or 'sample' (temperature, top_k (0: off), top_p (1: off)).
        No caption ends before min_new_tokens tokens. shots: few-shot examples to put before every input,
        the same for each: (features [N, T, Nt, Dv], frame mask [N, T], N caption token lists), see
        few_shot_prompt. Returns one list of token ids per input, without <|endoftext|>.
        """
        check_decoding(decoding, max_new_tokens, beam_width, temperature, top_k, top_p, length_penalty,
                       min_new_tokens)
        if decoding == 'beam':
            tokens = beam_search(self, features, feature_mask, max_new_tokens, beam_width, length_penalty,
                                 min_new_tokens, shots)
        else:
            pick = (lambda logits: logits.argmax(-1)) if decoding == 'greedy' else (
                lambda logits: sample_token(logits, temperature, top_k or None, top_p if top_p < 1 else None,
                                            generator))
            tokens = greedy_or_sample(self, features, feature_mask, max_new_tokens, pick, min_new_tokens, shots)
        return [strip_eot(row) for row in tokens.tolist()]


def check_decoding(decoding='greedy', max_new_tokens=20, beam_width=5, temperature=1.0, top_k=0, top_p=1.0,
                   length_penalty=1.0, min_new_tokens=0):
    """Raise an InputError naming the first decoding setting outside its range (the scripts call this before
    they load a model)."""
    def require(ok, name, value, expected):
        if not ok:
            raise InputError(f'{name} must be {expected}, not {value!r}')
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool)
    real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    require(decoding in ('greedy', 'beam', 'sample'), 'decoding', decoding, "'greedy', 'beam' or 'sample'")
    require(whole(max_new_tokens) and max_new_tokens >= 1, 'max_new_tokens', max_new_tokens, 'at least 1')
    require(whole(min_new_tokens) and 0 <= min_new_tokens <= max_new_tokens, 'min_new_tokens', min_new_tokens,
            f'in 0..max_new_tokens ({max_new_tokens})')
    require(whole(beam_width) and beam_width >= 1, 'beam_width', beam_width, 'at least 1')
    require(real(temperature) and temperature > 0, 'temperature', temperature,
            'above 0 (decoding=greedy takes the best word)')
    require(whole(top_k) and top_k >= 0, 'top_k', top_k, 'a number of words, or 0 for all')
    require(real(top_p) and 0 < top_p <= 1, 'top_p', top_p, 'a share of the probability in (0, 1], 1 for all')
    require(real(length_penalty) and length_penalty >= 0, 'length_penalty', length_penalty,
            'at least 0 (0: scores not normalised by length)')


# -----------------------------------------------------------------------------
# generation: greedy, sampling and beam search, over Captioner.start and Captioner.step

@torch.no_grad()
def greedy_or_sample(model, features, feature_mask, max_new_tokens, pick, min_new_tokens, shots=None):
    """Token ids [B, max_new_tokens]: one token per step for every row, chosen by pick(logits) (the
    best, or a sample); rows that have ended keep emitting <|endoftext|>."""
    logits, state = model.start(features, feature_mask, max_new_tokens, shots)
    B = logits.shape[0]
    out = torch.full((B, max_new_tokens), EOT, dtype=torch.long, device=logits.device)
    ended = torch.zeros(B, dtype=torch.bool, device=logits.device)
    step = None
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits[:, EOT] = -math.inf
        token = pick(logits).masked_fill(ended, EOT)
        out[:, t] = token
        ended |= token == EOT
        if t == max_new_tokens - 1 or ended.all():
            break
        step = step or stepper(model, token, state)
        logits = step(token)
    return out


@torch.no_grad()
def beam_search(model, features, feature_mask, max_new_tokens, K, length_penalty, min_new_tokens, shots=None):
    """Token ids [B, max_new_tokens]: each input's best hypothesis of K beams, by log-probability over
    length ** length_penalty; a hypothesis ends at <|endoftext|> (the rest is <|endoftext|>)."""
    logits, state = model.start(features, feature_mask, max_new_tokens, shots)
    B, V = logits.shape
    device = logits.device
    # every image's state is copied to its K beams; at first only beam 0 is alive, so that the
    # K beams do not start as K copies of the same hypothesis
    rows = torch.arange(B, device=device).repeat_interleave(K)
    state['cache'].reorder(rows)
    # beams never move between images, so the media keys/values need no reordering after this
    state['media_kv'] = {i: (k[rows], v[rows]) for i, (k, v) in state['media_kv'].items()}
    logprobs = logits.float().log_softmax(-1)[rows]
    beam_scores = torch.full((B, K), -math.inf, device=device)
    beam_scores[:, 0] = 0.0
    beams = torch.full((B, K, max_new_tokens), EOT, dtype=torch.long, device=device)
    # the K best hypotheses that ended with <|endoftext|>, by length-normalised score
    done_beams = beams.clone()
    done_scores = torch.full((B, K), -math.inf, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # no live beam can win any more
    rank = torch.arange(2 * K, device=device)
    step = None
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logprobs[:, EOT] = -math.inf
        length_norm = (t + 1) ** length_penalty
        # the 2K best extensions: at most K of them end, so at least K stay alive
        scores = (beam_scores[:, :, None] + logprobs.view(B, K, V)).view(B, K * V)
        top_scores, top_index = scores.topk(2 * K, dim=1)
        source, token = top_index // V, top_index % V
        candidates = beams.gather(1, source[:, :, None].expand(-1, -1, max_new_tokens))
        candidates[:, :, t] = token
        # extensions by <|endoftext|> among the K best enter the pool of ended hypotheses
        ends = token == EOT
        end_scores = torch.where(ends & (rank < K) & ~finished[:, None], top_scores / length_norm,
                                 -math.inf)
        done_scores, keep = torch.cat([done_scores, end_scores], 1).topk(K, dim=1)
        done_beams = torch.cat([done_beams, candidates], 1).gather(
            1, keep[:, :, None].expand(-1, -1, max_new_tokens))
        # the K best extensions that did not end stay alive
        beam_scores, alive = top_scores.masked_fill(ends, -math.inf).topk(K, dim=1)
        beams = candidates.gather(1, alive[:, :, None].expand(-1, -1, max_new_tokens))
        # an image is finished once its worst ended hypothesis beats its best live one (as
        # transformers' beam search does, comparing at the current length)
        finished |= done_scores[:, -1] >= beam_scores[:, 0] / length_norm
        if t == max_new_tokens - 1 or finished.all():
            break
        parent = torch.arange(B, device=device)[:, None] * K + source.gather(1, alive)
        state['cache'].reorder(parent.view(-1))
        token = beams[:, :, t].reshape(-1)
        step = step or stepper(model, token, state)
        logprobs = step(token).float().log_softmax(-1)
    # at max_new_tokens, the beams still alive are hypotheses too
    live_scores = beam_scores.masked_fill(finished[:, None], -math.inf) / (t + 1) ** length_penalty
    all_scores = torch.cat([done_scores, live_scores], 1)
    best = all_scores.argmax(dim=1)
    return torch.cat([done_beams, beams], 1)[torch.arange(B, device=device), best]


def few_shot_prompt(shot_tokens, B, device):
    """
    Few-shot captioning's prompt: N example (media, caption) pairs before every query, as train.py's
    interleave packs them, from the examples' caption token lists. Returns the prompt [B, S] (each
    example's <|endoftext|> + caption, then the query's <|endoftext|>) and media_at [B, N + 1], where
    each media goes: the examples', then the query's.
    """
    spans = [[EOT, *tokens] for tokens in shot_tokens] + [[EOT]]
    prompt = torch.tensor([t for span in spans for t in span], device=device).expand(B, -1)
    starts = [sum(map(len, spans[:i])) for i in range(len(spans))]
    return prompt, torch.tensor(starts, device=device).expand(B, -1)


def examples_first(examples, queries, B):
    """The prefixes and cross-attention keys/values (Captioner.encode's) of B queries, each row after
    those of the same few-shot examples (one row of N media)."""
    (shot_prefix, shot_kv), (prefix, media_kv) = examples, queries
    rows = lambda t: t.expand(B, *t.shape[1:])
    if prefix is not None:
        prefix = torch.cat([rows(shot_prefix), prefix], dim=1)
    media_kv = {i: tuple(torch.cat([rows(example), query], dim=2) for example, query in zip(shot_kv[i], kv))
                for i, kv in media_kv.items()}
    return prefix, media_kv


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Sample one token per row from logits [B, vocab], restricted to the top_k and/or nucleus top_p."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already hold top_p of the mass (the best one stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    # inverse transform sampling: one uniform number per row, looked up in the cumulative probabilities
    # (torch.multinomial draws an exponential per word instead: on a CPU, most of a sampling step's time)
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    if cdf.device.type != 'cpu':
        # A GPU's cumsum adds in another order at every position, so its sums can step back, or move at a
        # word of probability 0: the running maximum, with those words held at 0, makes every step up a
        # word's own. (A CPU adds in order: its sums never step back. cummax there would double the time.)
        cdf = torch.where(probs > 0, cdf, 0).cummax(-1).values
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=logits.device) * total
    # u < total, or a product rounded up to it would land past the last word that has any probability
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def strip_eot(tokens):
    """Token ids up to (not including) the first <|endoftext|>."""
    return tokens[:tokens.index(EOT)] if EOT in tokens else tokens


def stepper(model, token, state):
    """model.step as a function of the next tokens [B]. On a CPU, that is all; on a GPU, the step is
    captured once as a CUDA graph and replayed."""
    if not token.is_cuda:
        return lambda next_token: model.step(next_token, state)
    with torch.cuda.device(token.device):  # streams and graphs on the model's GPU, not the current one
        return cuda_graph_step(model, token, state)


def cuda_graph_step(model, token, state):
    """
    CUDA graphs (GPU only): record one decoding step and return a function that replays it, one launch
    instead of hundreds, which is most of a step's time at small batches. A replay rewrites the same
    tensors that the capture wrote: the token is copied into the captured input, and the logits returned
    are the graph's own output, overwritten by the next replay.
    """
    static_token = token.clone()
    side = torch.cuda.Stream()  # warm up (cuBLAS workspaces, autotuning) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model.step(static_token, state)
    torch.cuda.current_stream().wait_stream(side)
    # the warm-up advanced the cache's position (GPT2.forward -> KVCache.advance): step it back, so that
    # the first replay writes that position again
    state['cache'].pos.sub_(1)
    graph = torch.cuda.CUDAGraph()
    # autocast's cast cache would outlive the capture's memory: capture without it. Thread-local
    # capture: a DataLoader's pin-memory thread may call CUDA meanwhile (sample.py)
    with torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'), cache_enabled=False,
                        enabled=torch.is_autocast_enabled('cuda')), \
            torch.cuda.graph(graph, capture_error_mode='thread_local'):
        logits = model.step(static_token, state)

    def replay(next_token):
        static_token.copy_(next_token)
        graph.replay()
        return logits
    return replay


def onednn_linears(model):
    """
    For captioning on a CPU, in place: the linear layers of GPT-2 and of the gated cross-attention become
    oneDNN's (torch.utils.mkldnn.MkldnnLinear, weights kept in oneDNN's blocked layout), and decoding's
    LM head a oneDNN copy of the tied embedding. A decoding step multiplies one to a few rows by every
    weight, so reading the weights is its limit: MKL's matrix-vector product reads them with one core,
    oneDNN's with all of them (on 2 cores: 19 against 32 GB/s). The model can then only caption, and
    only on the CPU. On a GPU, or where PyTorch was built without oneDNN, nothing changes.
    """
    from torch.utils.mkldnn import MkldnnLinear
    if model.gpt.wte.weight.device.type != 'cpu' or not torch.backends.mkldnn.is_available():
        return model
    for parent in [*model.gpt.h.modules(), *model.xattn.modules()]:
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, MkldnnLinear(child, torch.float32))
    with torch.device('meta'):  # only a holder of the tied weights: nothing to draw
        head = nn.Linear(model.gpt.config.n_embd, model.gpt.wte.num_embeddings)
    head.weight, head.bias = model.gpt.wte.weight, nn.Parameter(model.gpt.vocab_bias)
    model.cpu_head = MkldnnLinear(head, torch.float32)
    return model


# -----------------------------------------------------------------------------
# loading the pretrained parts

def quiet_transformers():
    """No progress bars or warnings from transformers' loading: our own errors say what is wrong."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def check_checkpoint_kind(name, model_types, what):
    """Fail unless `name` is a local directory or hub name whose config.json is of one of model_types.
    transformers would otherwise build a randomly initialised model from a checkpoint of another kind
    (or from a folder without one), and a run would train on noise without a word."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import PretrainedConfig
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, 'config.json')):
        raise InputError(f'{name}: no config.json in it (not a checkpoint saved by save_pretrained)')
    if not os.path.isdir(name):
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise InputError(f'{name}: no such directory (nor a model name on the Hugging Face hub)')
    try:
        config, _ = PretrainedConfig.get_config_dict(name)
    except OSError as e:  # not on the hub, no network, a broken config.json, ...
        place = 'its config.json cannot be read' if os.path.isdir(name) else \
            'no such directory, and the hub did not give it'
        raise InputError(f'{name}: {place} ({first_line(e)})')
    if config.get('model_type') not in model_types:
        raise InputError(f"{name}: a {config.get('model_type') or 'model_type-less'} checkpoint, not {what}")


def from_pretrained(model_class, name, what, ignored_prefixes=()):
    """model_class.from_pretrained(name), failing with one line unless every weight was found, of the right
    shape, and every weight of the checkpoint was used (except those starting with ignored_prefixes)."""
    try:
        # mismatched shapes are reported in `info` (and refused below), not raised as a bare RuntimeError
        model, info = model_class.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as e:  # no weights file, a truncated one, ...
        raise InputError(f'{name}: cannot load the weights of {what} ({first_line(e)})')
    unused = [k for k in info['unexpected_keys'] if not k.startswith(ignored_prefixes)]
    problems = [f'{len(keys)} {why} (e.g. {keys[0]})' for why, keys in (
        ('weights missing', sorted(info['missing_keys'])),
        ('weights of another shape', sorted(k for k, *_ in info['mismatched_keys'])),
        ('weights that are not part of it', sorted(unused))) if keys]
    if problems:
        raise InputError(f"{name}: not the weights of {what}: {'; '.join(problems)}")
    return model


def load_vision(name, pretrained=True):
    """The CLIP vision tower of a hub name or local directory (a full CLIPModel checkpoint is fine)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    quiet_transformers()
    if not pretrained and name in CLIP_VISION_SIZES:
        return CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_SIZES[name]))
    check_checkpoint_kind(name, ('clip', 'clip_vision_model'), 'a CLIP model')
    if not pretrained:
        return CLIPVisionModel(CLIPVisionConfig.from_pretrained(name))
    # a full CLIPModel checkpoint also holds the text tower and the projections: they are not needed
    return from_pretrained(CLIPVisionModel, name, 'a CLIP vision tower',
                           ignored_prefixes=('text_model.', 'text_projection.', 'visual_projection.',
                                             'logit_scale'))


# GPT-2 checkpoints store these as Conv1D weights, shaped (in, out): nn.Linear wants (out, in)
_CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def load_gpt2(name, pretrained=True):
    """Our GPT-2 with the weights of a hub name or local directory, via transformers' GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel
    quiet_transformers()
    if not pretrained and name in GPT2_SIZES:
        return GPT2(gpt_config(GPT2Config(**GPT2_SIZES[name])))
    check_checkpoint_kind(name, ('gpt2',), 'a GPT-2 model')
    if not pretrained:
        return GPT2(gpt_config(GPT2Config.from_pretrained(name)))
    hf_model = from_pretrained(GPT2LMHeadModel, name, 'GPT-2')
    model = GPT2(gpt_config(hf_model.config))
    hf_state = hf_model.state_dict()
    state = {}
    for key in model.state_dict():
        weight = hf_state['transformer.' + key]
        state[key] = weight.t() if key.endswith(_CONV1D_WEIGHTS) else weight
    # the checkpoint has vocab_size rows, ours are padded (see GPT2.__init__)
    state['wte.weight'] = F.pad(state['wte.weight'], (0, 0, 0, model.wte.num_embeddings - model.config.vocab_size))
    model.load_state_dict(state)
    return model


def gpt_config(hf_config):
    return GPTConfig(n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                     block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                     layer_norm_eps=hf_config.layer_norm_epsilon)


def build_captioner(config: CaptionerConfig, init_from='pretrained'):
    """init_from='pretrained' loads CLIP and GPT-2 weights; 'scratch' builds them with random weights."""
    if init_from not in ('pretrained', 'scratch'):
        raise InputError(f"init_from must be 'pretrained' or 'scratch', not {init_from!r}")
    pretrained = init_from == 'pretrained'
    return Captioner(config, load_vision(config.vision_model, pretrained),
                     load_gpt2(config.text_model, pretrained))


# -----------------------------------------------------------------------------
# checkpoints: only the trained weights, plus what it takes to rebuild the rest

def trainable_state(model):
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_KEYS = ('model', 'model_config', 'train_config', 'optimizer', 'scaler', 'iter_num', 'best_val_loss')


def read_checkpoint(path):
    """A checkpoint of train.py, checked to be one, its model_config made a CaptionerConfig. Loaded with
    weights_only=True, so that a checkpoint file cannot run code: one that holds other Python objects is
    refused."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: no such checkpoint')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other objects, not a torch file at all, ...
        raise InputError(f'{path}: not a readable nanocap checkpoint: {unreadable_file(path, e)}')
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise InputError(f"{path}: not a checkpoint of train.py (no {', '.join(missing)})")
    try:
        checkpoint['model_config'] = CaptionerConfig(**checkpoint['model_config'])
    except TypeError as e:  # fields of another version of nanocap
        raise InputError(f'{path}: its model_config does not fit this version of model.py ({e})')
    return checkpoint


def unreadable_file(path, error):
    """What a file is that torch.load(weights_only=True) refused, in our words: torch's own message advises
    loading it with weights_only=False, which would let the file run code. Never pass that on."""
    with open(path, 'rb') as f:
        head = f.read(64).lstrip()
    global_object = re.search(r'GLOBAL (\S+) was not an allowed global', str(error))
    if global_object:
        return (f'it holds Python objects besides tensors (such as {global_object.group(1)}), and loading those '
                f'could run code: refused')
    if head.startswith(b'PK'):
        return 'a zip archive, but not one torch.save wrote' if zipfile.is_zipfile(path) else \
            'a zip archive cut short (an interrupted save or copy?)'
    if head[:1] in (b'{', b'['):
        return 'a JSON file, not a checkpoint'
    if head[:1] == b'\x80':
        return 'a pickle, but not one torch.save wrote'
    return 'an empty file' if not head else 'not a file torch.save wrote'


def load_captioner(checkpoint_path, device='cpu'):
    """Rebuild a trained captioner from a checkpoint of train.py: the frozen parts are loaded from the
    pretrained weights named in its config, the trained ones from the file."""
    checkpoint = read_checkpoint(checkpoint_path)
    model = build_captioner(checkpoint['model_config'])
    load_trained_weights(model, checkpoint['model'], checkpoint_path)
    return model.to(device).eval(), checkpoint


def load_trained_weights(model, state, checkpoint_path):
    """Put a checkpoint's trained weights into the model, failing in one line unless they are exactly its
    trainable ones, in the same shapes."""
    if set(state) != set(trainable_state(model)):
        raise InputError(f'{checkpoint_path}: its weights do not fit the model its config describes')
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ: other vision or text widths
        raise InputError(f'{checkpoint_path}: its weights do not fit the models it names '
                         f'({str(e).splitlines()[-1].strip()})')


# -----------------------------------------------------------------------------
# parameter counts and FLOPs

def count_params(module):
    """(total, trainable) parameters; shared tensors (the tied LM head) are counted once."""
    params = {id(p): p for p in module.parameters()}.values() if module is not None else []
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def param_table(model: Captioner):
    """Rows of (part, total, trainable), the whole model last."""
    parts = [('CLIP vision', model.vision), ('GPT-2', model.gpt), ('mapper', model.mapper),
             ('resampler', model.resampler), (f'gated x-attn x{len(model.xattn)}', model.xattn),
             ('total', model)]
    return [(name, *count_params(module)) for name, module in parts]


def training_flops(model: Captioner, caption_len, frames=1, targets=None, media=1):
    """
    Matrix-product FLOPs of one training step on one sequence of caption_len text tokens after `media`
    images or videos of `frames` frames (several when interleaved), `targets` of the tokens (default
    all) through the LM head (the PaLM / nanoGPT model-FLOPs convention). Forward: 2 per
    weight per token it touches, plus attention scores and weighted sums. Backward: twice the forward
    for trained parts (input and weight gradients), once for frozen parts that still pass gradients
    back (the GPT-2 blocks and the LM head need input gradients only), none for CLIP (its features
    are precomputed). Vocabulary padding is not counted: it is not the model's work.
    """
    n = lambda module: count_params(module)[0]
    gpt = model.gpt
    M = frames * tokens_per_frame(model.vision.config)  # tokens of one media
    P, D = media * model.prefix_len, gpt.config.n_embd
    T = P + caption_len
    parts = []  # (forward FLOPs, trained?)
    for block in gpt.h:
        parts.append((2 * n(block) * T + 4 * T * T * D, block.ln_1.weight.requires_grad))
    targets = caption_len if targets is None else targets
    parts.append((2 * gpt.config.vocab_size * D * targets, gpt.wte.weight.requires_grad))
    if model.resampler is not None:
        L = model.resampler.latents.shape[0]
        for attn, ff in model.resampler.layers:
            parts.append((media * (2 * (n(attn.to_q) + n(attn.to_out) + n(ff)) * L + 2 * n(attn.to_kv) * (M + L)
                                   + 4 * L * (M + L) * attn.to_q.out_features), True))
        for block in model.xattn.values():  # every position against every media's latents (masked or not)
            parts.append((2 * (n(block.to_q) + n(block.to_out) + n(block.ff)) * T + 2 * n(block.to_kv) * L * media
                          + 4 * T * L * media * block.to_q.out_features, True))
    if isinstance(model.mapper, MLPMapper):
        parts.append((2 * n(model.mapper) * media, True))
    elif model.mapper is not None:
        depth, Q = len(model.mapper.blocks), model.prefix_len
        parts.append((media * (2 * n(model.mapper) * (M + Q) + 4 * depth * (M + Q) ** 2 * D), True))
    return sum(flops * (3 if trained else 2) for flops, trained in parts)


if __name__ == '__main__':
    # python model.py [config/x.py] [--key=value ...]: build the model and print its parameter counts
    import contextlib
    from dataclasses import asdict
    from configurator import configure
    settings = configure(dict(asdict(CaptionerConfig()), init_from='pretrained'))
    init_from = settings.pop('init_from')
    with input_errors_exit('model.py'):
        # random weights are only counted: on the meta device they take no memory and no time to draw
        with torch.device('meta') if init_from == 'scratch' else contextlib.nullcontext():
            model = build_captioner(CaptionerConfig(**settings), init_from)
    for name, total, trainable in param_table(model):
        print(f'{name:<20} {total:>14,} total {trainable:>14,} trainable')
    total, trainable = count_params(model)
    print(f'params total={total} trainable={trainable} frozen={total - trainable}')
