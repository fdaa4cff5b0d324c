"""
Decoding: how a trained captioner writes a caption, one token at a time. It calls the model
(model.py's Captioner) and never the other way round.

    generate(model, features, mask, decoding='greedy' | 'beam' | 'sample', ...) -> a token list per image

First the idea, plain: a caption starts as <|endoftext|>; the whole sequence so far goes through the
model, and the logits of its last position choose the next token (the best one, a sample, or for
beam search the best extensions of a few hypotheses); until <|endoftext|> comes again. Then the same
loops as generate runs them, batched, from a prompt (with few-shot examples, each example's
[prefix; <|endoftext|> caption] before it) that goes through the model once, and what the scripts
call to caption a batch. Then, each apart, what makes them fast: the KV cache, a step replayed as a
CUDA graph on a GPU, drawing a sample with one number per row, and the CPU's linear layers. The
argument checks come last.
"""
import math
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import EOT, InputError, decode_caption, decoding_autocast, gpt2_tokenizer
from data import Shots

# -----------------------------------------------------------------------------
# The idea, plain: the whole sequence through the model for every new token. A test proves that
# generate gives the same tokens (in float32: under autocast, forward's LM head is not float32).

@torch.no_grad()
def plain_sample(model, features, feature_mask, max_new_tokens, pick, min_new_tokens=0):
    """One caption (a token list) per input: at every step, the next token of every row chosen by
    pick(logits [B, vocab]) (the best one, or a sample), until each row has ended with
    <|endoftext|> or has max_new_tokens tokens. <|endoftext|> is banned for min_new_tokens."""
    B, device = features.shape[0], features.device
    tokens = torch.full((B, 1), EOT, device=device)  # every caption starts after <|endoftext|>
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits, _ = model(features, feature_mask, tokens)  # [B, t + 1, vocab]
        logits = logits[:, -1].float()  # the next token's
        if t < min_new_tokens:
            logits[:, EOT] = -math.inf
        # every row picks, an ended one too (a sample draws one number per row, as generate's
        # does), and a row that ended says <|endoftext|> again
        token = pick(logits).masked_fill(ended, EOT)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        ended |= token == EOT
        if ended.all():
            break
    return [strip_eot(row[1:]) for row in tokens.tolist()]


@torch.no_grad()
def plain_beam_search(model, features, feature_mask, max_new_tokens, K, length_penalty=1.0,
                      min_new_tokens=0):
    """
    One caption per input, the best of K hypotheses by log-probability / length ** length_penalty,
    one input at a time. At every step, of the 2K best extensions of the live hypotheses, those
    among the K best that end with <|endoftext|> join the K best ended ones, and the K best others
    stay alive. An input is done once its K-th best ended hypothesis scores at least as well as its
    best live one (at the current length); at max_new_tokens, the live ones count too.
    """
    captions = []
    for i in range(features.shape[0]):
        live, ended = [([], 0.0)], []  # (tokens, log-probability), (tokens, normalised score)
        for t in range(max_new_tokens):
            n = len(live)
            media = features[i:i + 1].expand(n, *features.shape[1:])
            mask = None if feature_mask is None else feature_mask[i:i + 1].expand(n, -1)
            logits, _ = model(media, mask, torch.tensor([[EOT] + tokens for tokens, _ in live],
                                                        device=features.device))
            logprobs = logits[:, -1].float().log_softmax(-1)
            if t < min_new_tokens:
                logprobs[:, EOT] = -math.inf
            extensions = [(tokens + [token], score + logprob)
                          for (tokens, score), row in zip(live, logprobs)
                          for logprob, token in zip(*(x.tolist() for x in row.topk(2 * K)))]
            best = sorted(extensions, key=lambda e: -e[1])[:2 * K]
            norm = (t + 1) ** length_penalty
            ended += [(tokens[:-1], score / norm) for tokens, score in best[:K] if tokens[-1] == EOT]
            ended = sorted(ended, key=lambda e: -e[1])[:K]
            # at most one of a hypothesis' extensions ends, so at least K of the 2K live on
            live = [(tokens, score) for tokens, score in best if tokens[-1] != EOT][:K]
            if len(ended) == K and ended[-1][1] >= live[0][1] / norm:
                break
        else:  # max_new_tokens reached: the live hypotheses count too
            ended += [(tokens, score / norm) for tokens, score in live]
        captions.append(max(ended, key=lambda e: e[1])[0])
    return captions


def strip_eot(tokens):
    """Token ids up to (not including) the first <|endoftext|>."""
    return tokens[:tokens.index(EOT)] if EOT in tokens else tokens


# -----------------------------------------------------------------------------
# generate: the same loops, batched, from a prompt that goes through the model once, and then one
# position per step (the KV cache below keeps the rest)

@torch.no_grad()
def generate(model, features, feature_mask=None, max_new_tokens=20, decoding='greedy', beam_width=5,
             temperature=1.0, top_k=0, top_p=1.0, length_penalty=1.0, generator=None, min_new_tokens=0,
             shots: Shots = None, n_best=1):
    """
    Caption a batch of images or videos: features [B, T, N, Dv] (or [B, N, Dv]) with the mask of real frames
    [B, T]. decoding: 'greedy', 'beam' (per-image beams, scores normalised by length ** length_penalty) or
    'sample' (temperature, top_k (0: off), top_p (1: off), drawn with `generator`). No caption ends before
    min_new_tokens tokens. shots: few-shot examples to put before every input, the same for each (see
    few_shot_prompt). Returns one list of token ids per input, without <|endoftext|>; with n_best > 1 (beam
    search), each input's n_best best hypotheses, best first.
    """
    check_decoding(decoding, max_new_tokens, beam_width, temperature, top_k, top_p, length_penalty,
                   min_new_tokens, n_best)
    if decoding == 'beam':
        tokens = beam_search(model, features, feature_mask, max_new_tokens, beam_width, length_penalty,
                             min_new_tokens, shots, n_best)
        hypotheses = [[strip_eot(row) for row in image] for image in tokens.tolist()]
        return [image[0] for image in hypotheses] if n_best == 1 else hypotheses
    else:
        pick = (lambda logits: logits.argmax(-1)) if decoding == 'greedy' else (
            lambda logits: sample_token(logits, temperature, top_k or None, top_p if top_p < 1 else None,
                                        generator))
        tokens = greedy_or_sample(model, features, feature_mask, max_new_tokens, pick, min_new_tokens, shots)
    return [strip_eot(row) for row in tokens.tolist()]


# -----------------------------------------------------------------------------
# what the scripts call: a batch's candidates, and its captions as text (reranked by CLIP-S)

def candidates(model, features, feature_mask, count, shots=None, **options):
    """`count` captions (token lists) of each input to choose from (caption_batch): the beam's
    n-best (count: at most the beam width), or `count` samples (decoding='sample')."""
    if options.get('decoding') == 'beam':
        best = generate(model, features, feature_mask, shots=shots, n_best=count, **options)
        return best if count > 1 else [[hypothesis] for hypothesis in best]
    repeat = lambda t: None if t is None else t.repeat_interleave(count, 0)  # each input, count times
    flat = generate(model, repeat(features), repeat(feature_mask), shots=shots, **options)
    return [flat[i * count:(i + 1) * count] for i in range(len(features))]


def caption_batch(model, features, feature_mask, options, samples=1, shots=None, scorer=None,
                  rerank=False):
    """
    Captions (text) of a batch of images or videos, as sample.py, eval_bleu.py and train.py's
    validation write them: for each input, dict(captions=[str], clip_s=[float] or None), its captions
    (`samples` of them; reranked beam search: the beam's n-best) and, with a scorer (a
    clipscore.ClipScorer), their CLIP-S. With rerank, the best of them by CLIP-S alone (the first of
    equals), and its candidates, their CLIP-S and the one chosen. options: generate's decoding
    settings; shots: few-shot examples before every input.
    """
    count = options['beam_width'] if rerank and options['decoding'] == 'beam' else samples
    with decoding_autocast(features.device.type):
        tokens = candidates(model, features, feature_mask, count, shots, **options)
    encoder = gpt2_tokenizer()
    texts = [[decode_caption(encoder, t) for t in row] for row in tokens]
    if scorer is None:
        return [dict(captions=row, clip_s=None) for row in texts]
    results = []
    for row, clip_s in zip(texts, scorer.candidate_scores(features, feature_mask, texts)):
        if not rerank:
            results.append(dict(captions=row, clip_s=clip_s))
            continue
        best = max(range(len(row)), key=lambda j: (clip_s[j], -j))  # the first of equals
        results.append(dict(captions=[row[best]], clip_s=[clip_s[best]], candidates=row,
                            candidates_clip_s=clip_s, chosen=best))
    return results


def warn_if_all_empty(captions, script):
    """One line on stderr when every caption is empty: the scores are then all zero, and would say nothing of why."""
    if captions and not any(caption.strip() for caption in captions):
        print(f'{script}: all {len(captions):,} captions are empty: the model ends every caption at once. A language '
              f'model that knows no words (a random stand-in GPT-2) cannot learn to write while frozen: train it too '
              f'(--unfreeze_layers=ITS_LAYERS --train_embeddings=True, as config/train_shapes.py does)', file=sys.stderr)


# -----------------------------------------------------------------------------
# the prompt through the model once: the state each step reads

@dataclass
class DecodeState:
    """What each step reads: the media's cross-attention keys/values {GPT-2 block: (k, v)}, computed once from
    the images, and the KV cache of the text so far, which each step adds to."""
    media_kv: dict
    cache: 'KVCache'


def prefill(model, features, feature_mask, max_new_tokens, shots=None):
    """Encode the media and run the prompt through the model, filling a KV cache with room for max_new_tokens
    more. Returns the next-token logits [B, vocab] and the DecodeState that every step reads."""
    B, device = features.shape[0], features.device
    if shots is None:
        prompt, media = torch.full((B, 1), EOT, dtype=torch.long, device=device), 1
    else:
        prompt, media_at = few_shot_prompt(shots.tokens, B, device)
        media = media_at.shape[1]
    check_fits(model, features, shots, media * model.prefix_len + prompt.shape[1] + max_new_tokens)
    cache = KVCache(model.gpt.config.n_layer, media * model.prefix_len + prompt.shape[1] + max_new_tokens)
    prefix, media_kv = model.encode(features, feature_mask)
    layout = visible = None
    if shots is not None:
        # the examples are the same for every query: encoded once, as one row of N media
        examples = model.encode(shots.features[None].to(device), shots.mask[None].to(device))
        prefix, media_kv = examples_first(examples, (prefix, media_kv), B)
        layout, visible = model.interleaving(media_at, prompt.shape[1])
    logits = model.prefill(prompt, prefix, media_kv, cache, layout, visible)
    if shots is not None and model.config.media_attention == 'latest':
        # the caption to write comes after the last media, the query: it reads the query's latents
        # alone, so the steps keep those (with 'earlier' it reads every media's: no mask is needed)
        latents = model.config.num_latents
        media_kv = {i: (k[:, :, -latents:].contiguous(), v[:, :, -latents:].contiguous())
                    for i, (k, v) in media_kv.items()}
    return logits, DecodeState(media_kv, cache)


# -----------------------------------------------------------------------------
# greedy and sampling: one token per step for every row

@torch.no_grad()
def greedy_or_sample(model, features, feature_mask, max_new_tokens, pick, min_new_tokens, shots=None):
    """Token ids [B, max_new_tokens]: one token per step for every row, chosen by pick(logits) (the
    best, or a sample); rows that have ended keep emitting <|endoftext|>."""
    logits, state = prefill(model, features, feature_mask, max_new_tokens, shots)
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


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Sample one token per row from logits [B, vocab], tempered, restricted to the top_k and/or
    nucleus top_p: from the distribution torch.multinomial would draw from (draw_token, below,
    draws faster)."""
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
    return draw_token(logits.softmax(-1), generator)


# -----------------------------------------------------------------------------
# beam search

@torch.no_grad()
def beam_search(model, features, feature_mask, max_new_tokens, K, length_penalty, min_new_tokens, shots=None,
                n_best=1):
    """Token ids [B, n_best, max_new_tokens]: each input's n_best best hypotheses of K beams, by log-probability
    over length ** length_penalty; a hypothesis ends at <|endoftext|> (the rest is <|endoftext|>)."""
    logits, state = prefill(model, features, feature_mask, max_new_tokens, shots)
    B, V = logits.shape
    device = logits.device
    # every image's state is copied to its K beams; at first only beam 0 is alive, so that the
    # K beams do not start as K copies of the same hypothesis
    rows = torch.arange(B, device=device).repeat_interleave(K)
    state.cache.reorder(rows)
    # beams never move between images, so the media keys/values need no reordering after this
    state.media_kv = {i: (k[rows], v[rows]) for i, (k, v) in state.media_kv.items()}
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
        state.cache.reorder(parent.view(-1))
        token = beams[:, :, t].reshape(-1)
        step = step or stepper(model, token, state)
        logprobs = step(token).float().log_softmax(-1)
    # at max_new_tokens, the beams still alive are hypotheses too
    live_scores = beam_scores.masked_fill(finished[:, None], -math.inf) / (t + 1) ** length_penalty
    all_scores = torch.cat([done_scores, live_scores], 1)
    best = all_scores.sort(dim=1, descending=True, stable=True).indices[:, :n_best]  # ties: the first, as argmax
    return torch.cat([done_beams, beams], 1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))


# -----------------------------------------------------------------------------
# the few-shot prompt: examples before every query

def few_shot_prompt(shot_tokens, B, device):
    """
    Few-shot captioning's prompt: N example (media, caption) pairs before every query, as train.py's
    interleave packs them (data.Captions.interleaved_batch), from the examples' caption token lists.
    Returns the prompt [B, S] (each example's <|endoftext|> + caption, then the query's <|endoftext|>)
    and media_at [B, N + 1], where each media goes: the examples', then the query's.
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


# -----------------------------------------------------------------------------
# Speed: the KV cache. Without it, each step would run the whole caption so far through every
# layer again (as the plain loops do): it keeps every layer's keys and values, and a step computes
# one position's.

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


# -----------------------------------------------------------------------------
# Speed: CUDA graphs. At small batches, launching a step's ~400 kernels one by one takes longer
# than running them: on a GPU, one step is captured once and replayed.

def stepper(model, token, state):
    """model.step as a function of the next tokens [B]. On a CPU, that is all; on a GPU, the step is
    captured as a CUDA graph, once for each shape, and replayed."""
    if not token.is_cuda:
        return lambda next_token: model.step(next_token, state.media_kv, state.cache)
    with torch.cuda.device(token.device):  # streams and graphs on the model's GPU, not the current one
        return replayed_step(model, token, state, cuda_graph_step)


# The steps captured so far, {model: {shapes: (the state captured, its replay)}}: capturing syncs the device and
# empties the allocator's cache (and on some torch versions collects garbage), which once per evaluation batch or
# SCST micro step would cost more than the replays save. A model's captured steps go with it.
CAPTURED = weakref.WeakKeyDictionary()


def replayed_step(model, token, state, capture):
    """model.step replayed from a capture(model, token, state) of the same shapes if there is one, else a new
    one. A replay reads and writes the tensors the capture did, so a later decoding's state is copied into
    those, and decodes on in them (the model's weights, changed in place by an optimiser, are read anew)."""
    shapes = (tuple(token.shape), torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda'),
              [(k.shape, k.dtype) for k in state.cache.k],
              [(i, k.shape, k.dtype) for i, (k, _) in state.media_kv.items()])
    captured = CAPTURED.setdefault(model, {})
    key = repr(shapes)
    if key not in captured:
        captured[key] = state, capture(model, token, state)
    static, replay = captured[key]
    if static is not state:
        for layer, (k, v) in enumerate(zip(state.cache.k, state.cache.v)):
            static.cache.k[layer].copy_(k)
            static.cache.v[layer].copy_(v)
        static.cache.pos.copy_(state.cache.pos)
        for i, (k, v) in state.media_kv.items():
            static.media_kv[i][0].copy_(k)
            static.media_kv[i][1].copy_(v)
        state.cache, state.media_kv = static.cache, static.media_kv
    return replay


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
        model.step(static_token, state.media_kv, state.cache)
    torch.cuda.current_stream().wait_stream(side)
    # the warm-up advanced the cache's position (Captioner.transformer -> KVCache.advance): step it back, so
    # that the first replay writes that position again
    state.cache.pos.sub_(1)
    graph = torch.cuda.CUDAGraph()
    # autocast's cast cache would outlive the capture's memory: capture without it. Thread-local
    # capture: a DataLoader's pin-memory thread may call CUDA meanwhile (sample.py)
    with torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'), cache_enabled=False,
                        enabled=torch.is_autocast_enabled('cuda')), \
            torch.cuda.graph(graph, capture_error_mode='thread_local'):
        logits = model.step(static_token, state.media_kv, state.cache)

    def replay(next_token):
        static_token.copy_(next_token)
        graph.replay()
        return logits
    return replay


# -----------------------------------------------------------------------------
# Speed: drawing a token. torch.multinomial draws an exponential number per word: on a CPU, most
# of a sampling step's time. One uniform number per row, looked up in the cumulative
# probabilities (inverse transform sampling), draws from the same distribution.

def draw_token(probs, generator=None):
    """One token per row of probs [B, vocab], drawn with one uniform number per row."""
    cdf = probs.cumsum(-1)
    if cdf.device.type != 'cpu':
        # A GPU's cumsum adds in another order at every position, so its sums can step back, or move at a
        # word of probability 0: the running maximum, with those words held at 0, makes every step up a
        # word's own. (A CPU adds in order: its sums never step back. cummax there would double the time.)
        cdf = torch.where(probs > 0, cdf, 0).cummax(-1).values
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    # u < total, or a product rounded up to it would land past the last word that has any probability
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


# -----------------------------------------------------------------------------
# Speed: the CPU's weights. A decoding step reads every weight once for one to a few rows: fewer
# bytes, read with all the cores, make faster steps.

def cpu_decoding(model, weights='float32'):
    """
    For captioning on a CPU, in place: the linear layers of GPT-2 and of the gated cross-attention, and
    the LM head (a copy of the tied embedding's real words), keep their weights as `weights`. A decoding step
    multiplies one to a few rows by every weight, so reading the weights is its limit: fewer bytes, faster
    steps. 'float32': in oneDNN's layout (onednn_linears); 'bfloat16': half the bytes (BFloat16Linear);
    'int8': a quarter, PyTorch's dynamic quantization (each row of activations quantized on the fly). The
    model can then only caption, and only on the CPU. On a GPU (float32 only) or without oneDNN, nothing changes.
    """
    check_cpu_weights(weights)
    if model.gpt.wte.weight.device.type != 'cpu':
        if weights != 'float32':  # it would change nothing, yet name the results as if it had
            raise InputError(f'cpu_weights={weights!r} is for decoding on a CPU, not on '
                             f'{model.gpt.wte.weight.device}')
        return model
    if not torch.backends.mkldnn.is_available():
        return model
    if weights == 'float32':
        return onednn_linears(model)
    convert = BFloat16Linear if weights == 'bfloat16' else int8_linear
    for parent in [*model.gpt.h.modules(), *model.xattn.modules()]:
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, convert(child))
    head = nn.Linear(model.gpt.config.n_embd, model.gpt.config.vocab_size, bias=False)
    head.weight = nn.Parameter(model.gpt.wte.weight[:model.gpt.config.vocab_size].detach())  # the real words'
    model.gpt.head = OwnHead(convert(head))
    return model


class BFloat16Linear(nn.Module):
    """A linear layer with bfloat16 weights, float32 in and out: the product runs in bfloat16 (oneDNN, with
    float32 sums), the LayerNorms and the residual stream stay float32."""

    def __init__(self, linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


def int8_linear(linear):
    """PyTorch's dynamically quantized linear layer: int8 weights, scaled per layer, activations quantized
    row by row as they come."""
    import warnings
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():  # torch.ao's quantization asks its users to move to the torchao package
        warnings.simplefilter('ignore')
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


def onednn_linears(model):
    """
    For captioning on a CPU, in place: the linear layers of GPT-2 and of the gated cross-attention become
    oneDNN's (torch.utils.mkldnn.MkldnnLinear, weights kept in oneDNN's blocked layout), and the LM
    head a oneDNN copy of the tied embedding. A decoding step multiplies one to a few rows by every
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
    model.gpt.head = OwnHead(MkldnnLinear(head, torch.float32))
    return model


class OwnHead(nn.Module):
    """An LM head with weights of its own, a converted copy of the tied embedding's, in the place of
    model.py's TiedHead: the tied weights it is given are not read."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x, weight, bias):
        return self.linear(x)


# -----------------------------------------------------------------------------
# argument checks: each bad setting fails in one line, before any work

def check_decoding(decoding='greedy', max_new_tokens=20, beam_width=5, temperature=1.0, top_k=0, top_p=1.0,
                   length_penalty=1.0, min_new_tokens=0, n_best=1):
    """Raise an InputError naming the first decoding setting outside its range (the scripts call this before
    they load a model: a typo should not cost a minute of loading)."""
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
    require(whole(n_best) and 1 <= n_best <= (beam_width if decoding == 'beam' else 1), 'n_best', n_best,
            f'in 1..beam_width ({beam_width}) with decoding=beam, 1 with another')


def check_fits(model, features, shots, positions):
    """Fail in one line, before any work, unless the media's frames fit the resampler's time embeddings and
    the prompt and caption fit GPT-2's positions."""
    frames = [features.shape[-3] if features.dim() >= 4 else 1] + ([shots.features.shape[1]] if shots else [])
    if model.resampler is not None and max(frames) > model.config.max_frames:
        raise InputError(f'{max(frames)} frames, but the resampler has time embeddings for {model.config.max_frames}')
    if positions > model.gpt.config.block_size:
        raise InputError(f'a sequence of {positions} positions (prefix + caption) is longer than the language '
                         f"model's {model.gpt.config.block_size}")


def check_cpu_weights(weights):
    if weights not in ('float32', 'bfloat16', 'int8'):
        raise InputError(f"cpu_weights must be 'float32', 'bfloat16' or 'int8', not {weights!r}")
