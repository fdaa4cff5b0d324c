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
weights come from transformers (weights.py). How a caption is decoded, token by token, is decode.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import IGNORE_INDEX  # the target of a position that is not in the loss


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
        """x [B, T, C]; mask [B or 1, 1, T or 1, keys] (True = attend). With a cache (decoding: decode.KVCache),
        this call's keys and values are stored as `layer`'s, and the queries attend to all cached ones."""
        q, k, v = (split_heads(t, self.n_head) for t in self.c_attn(x).split(x.shape[-1], dim=2))
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)
        is_causal = self.causal and q.shape[2] > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.c_proj(merge_heads(y))


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
    the token embedding. The captioner runs its blocks itself, each after a gated cross-attention."""

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
        self.head = TiedHead()  # the LM head, a layer of its own like any other (it holds no weights)

    def forward(self, tokens):
        """Plain GPT-2, text alone: tokens [B, T] -> final hidden states [B, T, C]."""
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def lm_head(self, x):
        """Next-token logits [..., padded vocabulary] (see __init__), from self.head: a layer that may be
        swapped like any other, for one with weights of its own (over the real words only)."""
        return self.head(x, self.wte.weight, self.vocab_bias)


class TiedHead(nn.Module):
    """GPT-2's LM head: the product with the token embedding's weights (tied), which it is given."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)


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
            raise ValueError(f'{T} frames, but the resampler has time embeddings for {max_frames}')
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
    """CLIP features in, caption logits out: the frozen CLIP and GPT-2 and the bridge between them (weights.py
    checks a config and builds one with pretrained weights)."""

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
                raise ValueError(f"mapper must be 'mlp' or 'transformer', not {c.mapper!r}")
        self.resampler = None
        self.xattn = nn.ModuleDict()  # keyed by the index of the GPT-2 block it runs before
        if c.enable_resampler_xattn:
            self.resampler = PerceiverResampler(vision_dim, c.resampler_depth, c.heads, c.dim_head,
                                                c.num_latents, c.max_frames, c.ff_mult)
            for i in range(0, gpt.config.n_layer, c.xattn_every):
                self.xattn[str(i)] = GatedCrossAttention(text_dim, vision_dim, c.heads, c.dim_head,
                                                         c.ff_mult)
        self.vision.requires_grad_(False)
        self.gpt.requires_grad_(False)
        if c.unfreeze_layers:
            for block in self.gpt.h[gpt.config.n_layer - c.unfreeze_layers:]:
                block.requires_grad_(True)
            self.gpt.ln_f.requires_grad_(True)
        if c.train_embeddings:
            self.gpt.wte.requires_grad_(True)
            self.gpt.wpe.requires_grad_(True)

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

    def embed(self, tokens, prefix, layout=None):
        """The input embeddings [B, P + T, C] of tokens [B, T] with the media's prefixes [B, P, C] (or None)
        before them, or where a MediaLayout puts them."""
        x = self.gpt.wte(tokens)
        if prefix is not None:
            prefix = prefix.to(x.dtype)
            x = torch.cat([prefix, x], dim=1) if layout is None else layout.place(x, prefix)
        return x

    def transformer(self, x, positions, media_kv, visible=None, cache=None):
        """GPT-2's blocks over input embeddings x [B, S, C] at `positions` [S], gated cross-attention block i
        (if there is one) before block i, reading the media's keys/values (those `visible` lets each position
        read: see media_visibility) -> final hidden states [B, S, C]. With a cache, as in PyTorch's attention:
        decode.KVCache keeps every layer's keys and values."""
        if positions.shape[0] > self.gpt.config.block_size:
            raise ValueError(f'{positions.shape[0]} positions, more than GPT-2\'s {self.gpt.config.block_size}')
        x = x + self.gpt.wpe(positions)
        for i, block in enumerate(self.gpt.h):
            if i in media_kv:
                x = self.xattn[str(i)](x, media_kv[i], visible)
            x = block(x, cache=cache, layer=i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.gpt.ln_f(x)

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
        layout, visible = self.interleaving(media_at, tokens.shape[1]) if media_at is not None else (None, None)
        x = self.embed(tokens, prefix, layout)
        h = self.transformer(x, torch.arange(x.shape[1], device=x.device), media_kv, visible)
        h = h[:, self.prefix_len:] if layout is None else layout.text_states(h)  # the text's states
        if targets is None:
            return self.gpt.lm_head(h)[..., :self.gpt.config.vocab_size], None  # the real words'
        if target_positions is None:
            target_positions = (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        h = h.reshape(-1, h.shape[-1])[target_positions]
        logits = self.float32_logits(h) if float32_head else self.gpt.lm_head(h)
        return logits, F.cross_entropy(logits.float(), targets.flatten()[target_positions], reduction=reduction)

    # decoding (decode.py), one token at a time: the prompt fills a KV cache, then each step adds a token

    def prefill(self, prompt, prefix, media_kv, cache, layout=None, visible=None):
        """The prompt [B, T] after the media's prefixes (or with several media, where layout puts them), its keys
        and values into the cache -> the next-token logits [B, vocab]."""
        x = self.embed(prompt, prefix, layout)
        h = self.transformer(x, torch.arange(x.shape[1], device=x.device), media_kv, visible, cache)
        return self.float32_logits(h[:, -1])

    def step(self, token, media_kv, cache):
        """One token per row [B] at the cache's next position -> the next-token logits [B, vocab]. The same
        shapes and memory every step (see decode.KVCache)."""
        h = self.transformer(self.gpt.wte(token[:, None]), cache.step_position(), media_kv, cache=cache)
        return self.float32_logits(h[:, -1])

    def float32_logits(self, h):
        """Decoding's logits [B, vocab] of final hidden states [B, C], over the real words only (no
        padding), in float32 even under autocast: bfloat16 logits come in steps of 0.25 to 0.5 at typical
        sizes, coarse enough to tie or swap the best tokens and beams, so a GPU would caption differently
        from a CPU. Cross-entropy training keeps the autocast head: one row per step here, thousands there."""
        with torch.autocast(h.device.type, enabled=False):
            return self.gpt.lm_head(h.float().contiguous())[:, :self.gpt.config.vocab_size]


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
    vision = model.vision.config
    # the CLIP tokens of one media: each frame's patches and class token
    media_tokens = frames * ((vision.image_size // vision.patch_size) ** 2 + 1)
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
            read = media_tokens + L  # the latents read the media's tokens and themselves
            parts.append((media * (2 * (n(attn.to_q) + n(attn.to_out) + n(ff)) * L + 2 * n(attn.to_kv) * read
                                   + 4 * L * read * attn.to_q.out_features), True))
        for block in model.xattn.values():  # every position against every media's latents (masked or not)
            parts.append((2 * (n(block.to_q) + n(block.to_out) + n(block.ff)) * T + 2 * n(block.to_kv) * L * media
                          + 4 * T * L * media * block.to_q.out_features, True))
    if isinstance(model.mapper, MLPMapper):
        parts.append((2 * n(model.mapper) * media, True))
    elif model.mapper is not None:
        depth, Q = len(model.mapper.blocks), model.prefix_len
        seq = media_tokens + Q  # the transformer mapper's sequence: the media's tokens and its queries
        parts.append((media * (2 * n(model.mapper) * seq + 4 * depth * seq ** 2 * D), True))
    return sum(flops * (3 if trained else 2) for flops, trained in parts)
