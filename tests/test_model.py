import dataclasses
import itertools
import math
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import CLIPModel, GPT2LMHeadModel

from conftest import TEXT_DIM, TOKENS_PER_FRAME, VISION_DIM
import torch.nn.functional as F
from common import EOT, InputError, pick_device
from decode import KVCache, generate, onednn_linears, plain_beam_search, plain_sample, sample_token, prefill
from model import IGNORE_INDEX, CaptionerConfig, TiedHead, count_params, param_table, training_flops
from weights import build_captioner, load_captioner, load_gpt2, load_vision


def build(config, **changes):
    torch.manual_seed(0)
    return build_captioner(dataclasses.replace(config, **changes)).eval()


def open_gates(model, value=1.0):
    """Trained models have non-zero gates; at init they are 0 and the images could not matter."""
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)
    return model


def random_features(batch, frames=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, TOKENS_PER_FRAME, VISION_DIM, generator=g)


def random_tokens(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, length), generator=g)


# ----------------------------------------------------------------------------- loading and parity

@pytest.fixture(scope='module')
def sharp_gpt2_dir(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 with 10x larger MLP inputs, where GPT-2's tanh GELU and the exact GELU differ by ~2e-4
    in the logits (at init, by less than float32's error), and a LayerNorm epsilon that is not the
    default, saved with save_pretrained: parity within 1e-6 needs both right."""
    gpt2 = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    with torch.no_grad():
        for block in gpt2.transformer.h:
            block.mlp.c_fc.weight *= 10
    gpt2.config.layer_norm_epsilon = 1e-3
    path = tmp_path_factory.mktemp('sharp_gpt2')
    gpt2.save_pretrained(path)
    return str(path)


def test_gpt2_matches_transformers(tiny_config, sharp_gpt2_dir):
    """Before training, the cross-attention's gates are zero: the captioner (without a prefix) is exactly GPT-2."""
    model = build(tiny_config, text_model=sharp_gpt2_dir, enable_mapper=False)
    reference = GPT2LMHeadModel.from_pretrained(sharp_gpt2_dir).eval()
    tokens = random_tokens(3, 20)
    logits, _ = model(random_features(3), None, tokens)
    with torch.no_grad():
        expected = reference(tokens).logits
    assert logits.shape == (3, 20, 50257)
    assert (logits - expected).abs().max().item() <= 1e-6  # float32's error here: ~3e-7


def test_zero_gates_give_exactly_gpt2(tiny_config, sharp_gpt2_dir):
    model = build(tiny_config, text_model=sharp_gpt2_dir, enable_mapper=False)
    assert all(b.attn_gate.item() == 0 and b.ff_gate.item() == 0 for b in model.xattn.values())
    reference = GPT2LMHeadModel.from_pretrained(sharp_gpt2_dir).eval()
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        expected = reference(tokens).logits
    logits, _ = model(random_features(2), None, tokens)
    assert (logits - expected).abs().max().item() <= 1e-6
    # and the cross-attention is really on the path: opened gates change the logits
    logits_open, _ = open_gates(model)(random_features(2), None, tokens)
    assert (logits_open - expected).abs().max().item() > 1e-2


def test_vision_tower_loads_from_full_clip_checkpoint(tiny_config, tiny_clip_dir):
    model = build(tiny_config)
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    clips = [torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)]  # an image and a 3-frame video
    with torch.no_grad():
        expected = [clip.vision_model(pixel_values=c).last_hidden_state for c in clips]
        features, mask = model.encode_pixels(torch.cat(clips), [1, 3])
    assert features.shape == (2, 3, TOKENS_PER_FRAME, VISION_DIM)
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.allclose(features[0, :1], expected[0], atol=1e-5)
    assert torch.allclose(features[1], expected[1], atol=1e-5)
    assert features[0, 1:].abs().max() == 0  # padding


def damaged_checkpoint(source, target, damage):
    """A copy of a saved checkpoint whose weights {name: tensor} were changed by damage(weights)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(source, target)
    weights = load_file(f'{target}/model.safetensors')
    damage(weights)
    save_file(weights, f'{target}/model.safetensors', metadata={'format': 'pt'})
    return str(target)


@pytest.mark.parametrize('load, damage, words', [
    (load_vision, lambda w: w.pop('vision_model.encoder.layers.1.mlp.fc2.weight'),
     'not the weights of a CLIP vision tower: 1 weights missing (e.g. vision_model.encoder.layers.1.mlp.fc2.weight)'),
    (load_vision, lambda w: w.update({'vision_model.post_layernorm.weight': torch.ones(7)}),
     '1 weights of another shape (e.g. vision_model.post_layernorm.weight)'),
    (load_gpt2, lambda w: w.update({'transformer.h.0.attn.c_attn.lora_A': torch.ones(3)}),
     'not the weights of GPT-2: 1 weights that are not part of it (e.g. transformer.h.0.attn.c_attn.lora_A)'),
    (load_gpt2, lambda w: w.pop('transformer.h.2.ln_1.bias'), '1 weights missing (e.g. transformer.h.2.ln_1.bias)'),
])
def test_loading_incomplete_or_foreign_weights_fails(tmp_path, tiny_clip_dir, tiny_gpt2_dir, load, damage, words):
    path = damaged_checkpoint(tiny_clip_dir if load is load_vision else tiny_gpt2_dir, tmp_path / 'ckpt', damage)
    with pytest.raises(InputError) as e:
        load(path)
    assert str(e.value).startswith(f'{path}: ') and words in str(e.value)


def test_loading_another_kind_of_checkpoint_or_no_checkpoint_fails(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    with pytest.raises(InputError, match=f'^{tiny_gpt2_dir}: a gpt2 checkpoint, not a CLIP model$'):
        load_vision(tiny_gpt2_dir, pretrained=False)  # random weights are not an excuse either
    with pytest.raises(InputError, match=f'^{tiny_clip_dir}: a clip checkpoint, not a GPT-2 model$'):
        load_gpt2(tiny_clip_dir)
    with pytest.raises(InputError, match=r'^out/no/clip: no such directory \(nor a model name on the Hugging'):
        load_vision('out/no/clip')
    with pytest.raises(InputError, match=f'^{tmp_path}: no config.json in it'):
        load_gpt2(str(tmp_path))


def test_pick_device_gives_each_torchrun_rank_its_own_gpu(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: current.append(str(device)))
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert pick_device('') == 'cuda:3' and pick_device('cuda') == 'cuda:3'  # torchrun's rank 3
    assert pick_device('cuda:1') == 'cuda:1'  # a full device string is honoured
    assert current == ['cuda:3', 'cuda:3', 'cuda:1']  # and made current: CUDA graphs and streams use it
    with pytest.raises(InputError, match=r"^device='cuda:4': there is no cuda:4 \(this machine has 4 GPUs\)$"):
        pick_device('cuda:4')
    with pytest.raises(InputError, match="^device='gpu' is not a device"):
        pick_device('gpu')
    # four ranks on this machine: one GPU named for all of them would put every rank on it
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert pick_device('cuda:3') == 'cuda:3'  # its own
    with pytest.raises(InputError, match=r"^device='cuda:1' under torchrun with 4 processes on this machine: each "
                                         r"takes its own GPU, cuda:LOCAL_RANK; give device='cuda'$"):
        pick_device('cuda:1')
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    current.pop()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert pick_device('') == 'cpu' and pick_device('cpu') == 'cpu'
    with pytest.raises(InputError, match="^device='cuda:0', but no CUDA GPU is available$"):
        pick_device('cuda:0')
    assert current == ['cuda:3', 'cuda:3', 'cuda:1']


# ----------------------------------------------------------------------------- parameter counts

def meta_captioner(**changes):
    """The full-size model with random weights on the meta device: exact shapes, no memory or time."""
    with torch.device('meta'):
        return build_captioner(CaptionerConfig(**changes), pretrained=False)


def test_reference_parameter_counts():
    table = {name: (total, trainable) for name, total, trainable in param_table(meta_captioner())}
    padding = (50304 - 50257) * 768  # the LM head's vocabulary padding
    assert table == {'CLIP vision': (87_456_000, 0), 'GPT-2': (124_439_808 + padding, 0),
                     'mapper': (787_712, 787_712), 'resampler': (9_890_304, 9_890_304),
                     'gated x-attn x12': (28_348_440, 28_348_440), 'total': (250_958_360, 39_026_456)}


@pytest.mark.parametrize('changes, trainable', [
    (dict(enable_resampler_xattn=False), 787_712),
    (dict(enable_mapper=False), 38_238_744),
])
def test_ablation_parameter_counts(changes, trainable):
    total, got = count_params(meta_captioner(**changes))
    assert got == trainable
    assert total - got == 211_931_904  # CLIP vision + GPT-2 (vocabulary padded), frozen


def test_parameter_counts_when_vision_and_text_widths_differ():
    # CLIP ViT-L/14 (1024 wide) with gpt2-medium (1024) and gpt2 (768): the bridge sizes by hand
    model = meta_captioner(vision_model='openai/clip-vit-large-patch14', text_model='gpt2')
    Dv, Dt, inner = 1024, 768, 6 * 64
    mapper = (Dv * 512 + 512) + (512 * Dt + Dt)
    resampler_layer = 2 * 2 * Dv + Dv * inner + Dv * 2 * inner + inner * Dv + (2 * Dv + 2 * Dv * Dv)
    resampler = 4 * resampler_layer + 2 * Dv + 64 * Dv + 500 * Dv
    xattn = 2 * Dt + Dt * inner + Dv * 2 * inner + inner * Dt + 1 + (2 * Dt + 2 * Dt * Dt) + 1
    parts = {name: trainable for name, _, trainable in param_table(model)}
    assert parts['mapper'] == mapper
    assert parts['resampler'] == resampler
    assert parts['gated x-attn x12'] == 12 * xattn
    assert count_params(model.vision)[0] == 303_179_776  # CLIP ViT-L/14 vision tower


def test_xattn_every_and_unfreeze_layers():
    model = meta_captioner(xattn_every=4, unfreeze_layers=2)
    assert list(model.xattn) == ['0', '4', '8']
    block, ln_f = 7_087_872, 2 * 768  # one GPT-2 small block, the final LayerNorm
    assert count_params(model.gpt)[1] == 2 * block + ln_f
    assert all(p.requires_grad for p in model.gpt.h[-1].parameters())
    assert not any(p.requires_grad for p in model.gpt.h[-3].parameters())
    assert not model.gpt.wte.weight.requires_grad  # the tied LM head stays frozen
    embeddings = 50304 * 768 + 1024 * 768  # the padded vocabulary, and the positions
    assert count_params(meta_captioner(train_embeddings=True).gpt)[1] == embeddings


def test_parameter_table_prints_exact_counts():
    out = subprocess.run([sys.executable, 'bench.py', '--what=params'], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == 'params total=250958360 trainable=39026456 frozen=211931904'


def test_parameter_table_reports_bad_setting_in_one_line():
    result = subprocess.run([sys.executable, 'bench.py', '--what=params', '--mapper=lstm'],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == "bench.py: mapper must be 'mlp' or 'transformer', not 'lstm'"


# ----------------------------------------------------------------------------- training forward

def caption_batch():
    """Two captions of different lengths, the shorter padded; targets are tokens shifted by one."""
    captions = [[10, 20, 30, 40, 50], [60, 70]]
    S = max(len(c) for c in captions) + 1
    tokens = torch.full((2, S), EOT)
    targets = torch.full((2, S), IGNORE_INDEX)
    for row, caption in enumerate(captions):
        tokens[row, 1:len(caption) + 1] = torch.tensor(caption)
        targets[row, :len(caption) + 1] = torch.tensor(caption + [EOT])
    return tokens, targets


@pytest.mark.parametrize('mapper', ['mlp', 'transformer'])
def test_loss_is_cross_entropy_over_caption_tokens_only(tiny_config, mapper):
    model = open_gates(build(tiny_config, mapper=mapper))
    tokens, targets = caption_batch()
    features = random_features(2)
    logits, loss = model(features, None, tokens, targets)
    assert logits.shape == (6 + 3, 50304)  # only the positions with a target: no prefix, no padding
    all_logits, _ = model(features, None, tokens)
    assert all_logits.shape == (2, tokens.shape[1], 50257)  # every caption position, not the prefix
    has_target = targets != IGNORE_INDEX
    assert torch.allclose(logits[:, :50257], all_logits[has_target], atol=1e-5)
    assert torch.isneginf(logits[:, 50257:]).all()
    logprobs = all_logits.log_softmax(-1)
    picked = [-logprobs[b, s, targets[b, s]] for b in range(2) for s in range(tokens.shape[1])
              if has_target[b, s]]
    assert torch.allclose(loss, torch.stack(picked).mean(), atol=1e-6)
    # the same, with the target positions found on the host (as train.py gives them)
    positions = torch.tensor([s for s in range(12) if targets.flatten()[s] != IGNORE_INDEX])
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    logits_given, loss_given = model(features, None, tokens, targets, positions)
    assert torch.equal(logits_given, logits) and torch.equal(loss_given, loss)
    # whatever sits in the padded positions does not change the loss
    tokens[1, 3:] = torch.tensor([0, 123, 4567, 89][:tokens.shape[1] - 3])
    _, loss_other_padding = model(features, None, tokens, targets)
    assert torch.allclose(loss, loss_other_padding, atol=1e-6)


def test_only_trainable_parameters_get_gradients(tiny_config):
    model = open_gates(build(tiny_config, unfreeze_layers=1)).train()
    tokens, targets = caption_batch()
    _, loss = model(random_features(2), None, tokens, targets)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable = {n.split('.')[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'gpt', 'mapper', 'resampler', 'xattn'}
    assert all(n.startswith(('gpt.h.2.', 'gpt.ln_f.')) for n, p in model.named_parameters()
               if p.requires_grad and n.startswith('gpt'))


def test_padded_frames_are_masked_out(tiny_config):
    """A 2-frame video gives the same logits alone and padded to 4 frames with garbage in the padding."""
    for mapper in ['mlp', 'transformer']:
        model = open_gates(build(tiny_config, mapper=mapper))
        tokens, _ = caption_batch()
        video = random_features(2, frames=2)
        logits, _ = model(video, torch.ones(2, 2, dtype=torch.bool), tokens)
        padded = torch.cat([video, 100 * random_features(2, frames=2, seed=1)], dim=1)
        mask = torch.tensor([[True, True, False, False]] * 2)
        logits_padded, _ = model(padded, mask, tokens)
        assert (logits - logits_padded).abs().max().item() <= 1e-6  # float32's error here: ~3e-7
        logits_unmasked, _ = model(padded, None, tokens)
        assert (logits - logits_unmasked).abs().max().item() > 1e-2


def test_xattn_every_2_runs_cross_attention_before_blocks_0_and_2(tiny_config):
    model = open_gates(build(tiny_config, xattn_every=2))
    assert list(model.xattn) == ['0', '2']
    features, (tokens, _) = random_features(2), caption_batch()
    prefix, media_kv = model.encode(features)
    x = torch.cat([prefix, model.gpt.wte(tokens)], dim=1)
    x = x + model.gpt.wpe(torch.arange(x.shape[1]))
    for i, block in enumerate(model.gpt.h):
        if i in (0, 2):
            x = model.xattn[str(i)](x, media_kv[i])
        x = block(x)
    expected = (model.gpt.ln_f(x) @ model.gpt.wte.weight[:50257].T)[:, model.prefix_len:]
    logits, _ = model(features, None, tokens)
    assert (logits - expected).abs().max().item() <= 1e-6


def attention(q, k, v, heads, keep=None):
    """Multi-head attention written out: q [B, Tq, C], k and v [B, Tk, C], keep [B, Tk] (False: masked)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_resampler_and_gated_cross_attention_by_hand(tiny_config):
    """Flamingo's formulas: each frame's tokens plus its time embedding; latents attend to [frame tokens;
    latents] (padding frames masked); residual attention and feed-forward, a final LayerNorm; then text
    attends to the latents, and tanh(gate) scales what each sub-block adds."""
    model = build(tiny_config)
    resampler, block, heads = model.resampler, model.xattn['1'], tiny_config.heads
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
    video, mask = random_features(2, frames=3), torch.tensor([[True, True, False], [True, True, True]])
    media = (video + resampler.time_emb[:3, None]).flatten(1, 2)
    keep = torch.cat([mask.repeat_interleave(TOKENS_PER_FRAME, 1),
                      torch.ones(2, tiny_config.num_latents, dtype=torch.bool)], 1)
    latents = resampler.latents.expand(2, -1, -1)
    for attn, ff in resampler.layers:
        media_normed, latents_normed = attn.norm_media(media), attn.norm_latents(latents)
        k, v = attn.to_kv(torch.cat([media_normed, latents_normed], 1)).chunk(2, -1)
        latents = latents + attn.to_out(attention(attn.to_q(latents_normed), k, v, heads, keep))
        latents = latents + ff(latents)
    latents = resampler.norm(latents)
    _, media_kv = model.encode(video, mask)
    k, v = block.to_kv(latents).chunk(2, -1)
    assert (media_kv[1][0].transpose(1, 2).flatten(2) - k).abs().max().item() <= 1e-6
    assert (media_kv[1][1].transpose(1, 2).flatten(2) - v).abs().max().item() <= 1e-6
    x = torch.randn(2, 5, TEXT_DIM)
    y = x + math.tanh(0.7) * block.to_out(attention(block.to_q(block.norm(x)), k, v, heads))
    y = y + math.tanh(-0.4) * block.ff(y)
    assert (block(x, media_kv[1]) - y).abs().max().item() <= 1e-6


def test_mappers_read_every_real_frame(tiny_config):
    """The MLP mapper: tanh MLP of the mean of all real frames' tokens. The transformer mapper: prefix
    queries after the projected tokens of the real frames, through its blocks; the queries' outputs."""
    video, mask = random_features(2, frames=3), torch.tensor([[True, True, False], [True, True, True]])
    P = tiny_config.prefix_len
    mlp = build(tiny_config).mapper
    pooled = torch.stack([video[0, :2].mean((0, 1)), video[1].mean((0, 1))])
    expected = mlp.net[2](torch.tanh(mlp.net[0](pooled))).view(2, P, TEXT_DIM)
    assert (mlp(video, mask) - expected).abs().max().item() <= 1e-6
    transformer = build(tiny_config, mapper='transformer').mapper
    for i, frames in enumerate([2, 3]):
        x = torch.cat([transformer.proj(video[i, :frames].flatten(0, 1)), transformer.queries])[None]
        for block in transformer.blocks:
            x = block(x)
        assert (transformer(video, mask)[i] - x[0, -P:]).abs().max().item() <= 1e-6


def test_too_many_frames_or_positions_fail_clearly(tiny_config):
    model = build(tiny_config)
    with pytest.raises(InputError, match='7 frames, but the resampler has time embeddings for 6'):
        generate(model, random_features(1, frames=7), max_new_tokens=2)
    # the prompt is the 2 prefix tokens and <|endoftext|>: 61 new tokens fill GPT-2's 64 positions
    assert len(generate(model, random_features(1), max_new_tokens=61)[0]) <= 61
    with pytest.raises(InputError, match='^a sequence of 65 positions .* longer than the language model'):
        generate(model, random_features(1), max_new_tokens=62)


# ----------------------------------------------------------------------------- generation

@pytest.fixture
def captioner(run_dir):
    """The session's trained captioner (both bridges, gates open): its captions depend on the image and on every
    word before, and end, at 5 or 6 tokens, where it chose to. (A random tiny GPT-2 mostly repeats its last token
    whatever came before it, and almost never ends: a wrong KV cache would hardly change its captions.)"""
    return load_captioner(f'{run_dir}/best.pt')[0]


def argmax(logits):
    return logits.argmax(-1)


def test_kv_cached_greedy_equals_the_plain_loop(captioner):
    features = random_features(6)
    for max_new_tokens in (12, 8):  # all end with <|endoftext|>; some are cut at the limit
        captions = generate(captioner, features, max_new_tokens=max_new_tokens)
        assert captions == plain_sample(captioner, features, None, max_new_tokens, argmax)
        assert len({len(c) for c in captions}) > 1


def test_beam_width_one_equals_greedy(captioner):
    features = random_features(6)
    assert generate(captioner, features, decoding='beam', beam_width=1, max_new_tokens=12) == \
        generate(captioner, features, max_new_tokens=12)


class MarkovLM:
    """Stands in for the network inside generate(): the next token's log-probabilities depend on the
    last token only, over the tokens 1, 2, 3 and <|endoftext|>, so every caption can be enumerated."""
    TOKENS = [1, 2, 3, EOT]

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.full((4, 50257), -math.inf)
        self.rows[:, self.TOKENS] = 2 * torch.randn(4, 4, generator=g)
        self.slot = torch.zeros(50257, dtype=torch.long)
        self.slot[self.TOKENS] = torch.arange(4)

    def install(self, model, monkeypatch):
        import decode
        state = decode.DecodeState(media_kv={}, cache=KVCache(0, 0))
        monkeypatch.setattr(decode, 'prefill', lambda model, features, mask, n, shots=None: (self.logits(
            torch.full((features.shape[0],), EOT)), state))
        monkeypatch.setattr(model, 'step', lambda token, media_kv, cache: self.logits(token))

    def logits(self, last_token):
        return self.rows[self.slot[last_token]]

    def best_captions(self, max_new_tokens, n=1):
        """Exhaustive search of the length-normalised score that beam search approximates: the n best."""
        logprobs = self.rows.log_softmax(-1)
        scored = []
        for length in range(max_new_tokens + 1):
            for caption in itertools.product([1, 2, 3], repeat=length):
                ends = length < max_new_tokens
                sequence = [EOT, *caption] + ([EOT] if ends else [])
                score = sum(logprobs[self.slot[a], b] for a, b in zip(sequence, sequence[1:]))
                scored.append((-score / (length + ends), list(caption)))
        return [caption for _, caption in sorted(scored)[:n]]


@pytest.mark.parametrize('seed', range(20))
def test_beam_search_against_exhaustive_search(tiny_config, monkeypatch, seed):
    model = build(tiny_config)
    lm = MarkovLM(seed)
    lm.install(model, monkeypatch)
    features = random_features(1)
    # 81 beams hold every hypothesis of 4 tokens, so beam search is exact here
    assert generate(model, features, decoding='beam', beam_width=81, max_new_tokens=4)[0] == \
        lm.best_captions(4)[0]
    # and the n best of them, best first
    assert generate(model, features, decoding='beam', beam_width=81, max_new_tokens=4, n_best=5)[0] == \
        lm.best_captions(4, n=5)
    assert generate(model, features, decoding='beam', beam_width=1, max_new_tokens=6) == \
        generate(model, features, max_new_tokens=6)


@pytest.mark.parametrize('beam_width', [2, 3])
def test_beam_search_equals_the_plain_beam_search(captioner, beam_width):
    """Small beams, where pruning decides, with the real KV cache (they must follow the beams), and
    length penalties that favour short and long captions."""
    features = random_features(4)
    captions = {}
    for length_penalty in (0.0, 1.0, 3.0):
        captions[length_penalty] = generate(captioner, features, decoding='beam', beam_width=beam_width,
                                            max_new_tokens=10, length_penalty=length_penalty)
        assert captions[length_penalty] == plain_beam_search(captioner, features, None, 10, beam_width,
                                                             length_penalty)
    assert captions[0.0] != captions[3.0]


def padded_videos():
    """Videos of 1, 3 and 2 frames, and the batch [3, 3, N, Dv] of them padded to 3 frames with its mask."""
    videos = [random_features(1, frames=n, seed=n) for n in (1, 3, 2)]
    batch = torch.zeros(3, 3, TOKENS_PER_FRAME, VISION_DIM)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    for i, video in enumerate(videos):
        batch[i, :video.shape[1]] = video[0]
        mask[i, :video.shape[1]] = True
    return videos, batch, mask


@pytest.mark.parametrize('decoding', ['greedy', 'beam'])
def test_caption_is_the_same_alone_and_in_a_padded_batch(captioner, decoding):
    """Videos of 1, 3 and 2 frames, padded to 3 in one batch, against each decoded alone."""
    videos, batch, mask = padded_videos()
    together = generate(captioner, batch, mask, decoding=decoding, beam_width=3, max_new_tokens=10)
    alone = [generate(captioner, v, decoding=decoding, beam_width=3, max_new_tokens=10)[0] for v in videos]
    assert together == alone
    assert len({tuple(c) for c in together}) > 1  # each video's own frames decide its caption


@pytest.mark.parametrize('decoding', ['greedy', 'sample', 'beam'])
def test_generate_writes_what_the_plain_loops_write(captioner, decoding):
    """generate (batched, one prefill, then one position per step from the KV cache) gives the tokens of
    decode.py's plain loops (the whole sequence through forward() for every token; beam search one input
    at a time): for videos of 1, 3 and 2 frames padded to 3 in one batch, and for each alone. Sampling
    draws the same numbers from the same seed."""
    videos, batch, mask = padded_videos()

    def plain(features, mask):
        if decoding == 'beam':
            return plain_beam_search(captioner, features, mask, 10, 3)
        g = torch.Generator().manual_seed(5)
        pick = argmax if decoding == 'greedy' else lambda logits: sample_token(logits, generator=g)
        return plain_sample(captioner, features, mask, 10, pick)

    def fast(features, mask):
        return generate(captioner, features, mask, max_new_tokens=10, decoding=decoding, beam_width=3,
                        generator=torch.Generator().manual_seed(5))
    together = fast(batch, mask)
    assert together == plain(batch, mask)
    assert [fast(video, None) for video in videos] == [plain(video, None) for video in videos]
    assert len({tuple(c) for c in together}) > 1


def test_candidates_of_samples_without_a_frame_mask(captioner):
    """Samples to choose from, of inputs without a frame mask (every frame real, as generate takes None): each
    input's `count` samples are those of the input repeated count times."""
    from decode import candidates
    features = random_features(2)
    drawn = candidates(captioner, features, None, 3, decoding='sample', max_new_tokens=8,
                       generator=torch.Generator().manual_seed(4))
    flat = generate(captioner, features.repeat_interleave(3, 0), decoding='sample', max_new_tokens=8,
                    generator=torch.Generator().manual_seed(4))
    assert drawn == [flat[:3], flat[3:]]


def test_sampling(captioner):
    features = random_features(4)
    greedy = generate(captioner, features, max_new_tokens=8)
    assert generate(captioner, features, decoding='sample', top_k=1, max_new_tokens=8) == greedy
    assert generate(captioner, features, decoding='sample', top_p=1e-6, max_new_tokens=8) == greedy

    def sample(seed, **options):
        g = torch.Generator().manual_seed(seed)
        return generate(captioner, features, decoding='sample', max_new_tokens=8, generator=g, **options)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    # the temperature reaches the sampler: near 0 it is greedy, at 1 it is not
    assert sample(1, temperature=1e-6) == greedy
    assert sample(1) != greedy


# generate's settings that are not decoding settings, and values outside the range of every other one
NOT_DECODING = {'model', 'features', 'feature_mask', 'generator', 'shots'}
OUT_OF_RANGE = dict(decoding=['topk', None], max_new_tokens=[0, -1, 2.5], beam_width=[0, True],
                    temperature=[0, -1.0, math.inf], top_k=[-1, 1.5], top_p=[0, 1.5, math.nan],
                    length_penalty=[-1.0, math.inf], min_new_tokens=[-1, 21], n_best=[0, 2, 1.5])


def test_every_decoding_setting_outside_its_range_fails_in_one_line(captioner):
    """generate's parameters, walked: a new one must be listed above. Each bad value raises an InputError
    naming the setting (min_new_tokens against the default max_new_tokens of 20)."""
    import inspect
    parameters = set(inspect.signature(generate).parameters)
    assert parameters - NOT_DECODING == set(OUT_OF_RANGE)
    features = random_features(1)
    for name, values in OUT_OF_RANGE.items():
        for value in values:
            with pytest.raises(InputError, match=f'^{name} must be '):
                generate(captioner, features, **{name: value})
    assert generate(captioner, features, min_new_tokens=20, top_k=0, top_p=1.0, length_penalty=0)  # the edges


def test_sampled_first_tokens_follow_the_tempered_top_k_softmax(captioner):
    """500 first tokens of one image, sampled with top_k=3 at temperature 0.05: the 3 best tokens only,
    as often as softmax(logits / 0.05) over them says (about 0.50, 0.35, 0.15 here; at temperature 1,
    about a third each)."""
    image = random_features(1)
    with torch.no_grad():
        logits, _ = prefill(captioner, image, None, 1)
    best = logits[0].topk(3)
    expected = (best.values / 0.05).softmax(-1)
    firsts = generate(captioner, image.expand(500, -1, -1, -1), decoding='sample', top_k=3, temperature=0.05,
                                max_new_tokens=1, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([firsts.count([token]) for token in best.indices.tolist()])
    assert counts.sum() == 500
    assert (counts / 500 - expected).abs().max() < 0.05


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, 0.032, 0.012
    seen = lambda **kw: {sample_token(logits, generator=torch.Generator().manual_seed(s), **kw).item()
                         for s in range(300)}
    assert seen(top_k=2) == {0, 1}
    assert seen(top_p=0.85) == {0, 1}  # 0.636 < 0.85 <= 0.636 + 0.234
    assert seen(top_p=float(probs[:3].sum()) + 1e-3) == {0, 1, 2, 3}
    assert seen(top_k=3, temperature=1e-6) == {0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason='a GPU adds up cumulative sums in its own order')
def test_sampling_on_a_gpu_never_draws_a_word_outside_the_top_k():
    """On a GPU, cumsum's rounding differs from position to position: the cumulative probabilities must
    still give a word that top_k cut off no chance at all (256,000 draws)."""
    torch.manual_seed(0)
    logits = torch.randn(256, 50257, device='cuda') * 3
    kth_best = logits.topk(40, dim=-1).values[:, -1:]
    generator = torch.Generator('cuda').manual_seed(0)
    for _ in range(1000):
        token = sample_token(logits, top_k=40, generator=generator)
        assert (logits.gather(1, token[:, None]) >= kth_best).all()


def test_gpt2_forward_and_its_padded_lm_head_match_transformers(sharp_gpt2_dir, monkeypatch):
    """GPT-2 whole, on its own: its 50,257 words are padded to 50,304 once, in the embedding itself, so
    the real words' logits are transformers' and the padding's are -inf: it never wins, and adds
    nothing to a softmax."""
    gpt = load_gpt2(sharp_gpt2_dir)
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(sharp_gpt2_dir).eval()(tokens).logits
        monkeypatch.setattr(F, 'pad', None)  # no copy of the embedding per call
        logits = gpt.lm_head(gpt(tokens))
    assert logits.shape == (2, 12, 50304)
    assert (logits[..., :50257] - expected).abs().max().item() <= 1e-6
    assert torch.isneginf(logits[..., 50257:]).all()
    # log-probabilities near -11, where float32's step is 1e-6
    assert (logits.log_softmax(-1)[..., :50257] - expected.log_softmax(-1)).abs().max().item() <= 4e-6


def test_decoding_logits_are_float32_under_bfloat16_autocast(captioner):
    """bf16 logits come in steps of 2 ** -8 of their size: at GPT-2's typical 10 to 100 the step is 0.03 to
    0.5, which ties and reorders the best tokens; decoding must score in float32."""
    with torch.no_grad():
        captioner.gpt.wte.weight *= 100  # logits of GPT-2's real size (the tiny model's are ~0.5)
    h = torch.randn(4, captioner.gpt.config.n_embd)
    expected = h @ captioner.gpt.wte.weight[:50257].T
    assert expected.abs().mean() > 10
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits = captioner.float32_logits(h)
        first_logits, _ = prefill(captioner, random_features(2), None, max_new_tokens=3)
    assert logits.dtype == first_logits.dtype == torch.float32
    assert (logits[:, :50257] - expected).abs().max() < 1e-3  # bf16's error here: ~0.1


def test_onednn_linears_caption_as_the_plain_model(captioner):
    """sample.py and eval_bleu.py swap the CPU's linear layers for oneDNN's (a model elsewhere keeps its
    own): the same captions, greedy and beam, and the same logits within float32's error (its sums run in
    another order)."""
    import copy
    from torch.utils.mkldnn import MkldnnLinear
    elsewhere = copy.deepcopy(captioner).to('meta')  # not on a CPU: left as it is
    assert type(onednn_linears(elsewhere).gpt.head) is TiedHead
    assert not any(isinstance(m, MkldnnLinear) for m in elsewhere.modules())
    converted = onednn_linears(copy.deepcopy(captioner))
    assert sum(isinstance(m, MkldnnLinear) for m in converted.modules()) == 3 * 4 + 3 * 5 + 1  # + the LM head
    features, (tokens, _) = random_features(6), caption_batch()
    for decoding in ('greedy', 'beam'):
        assert generate(converted, features, decoding=decoding, max_new_tokens=12) == \
            generate(captioner, features, decoding=decoding, max_new_tokens=12)
    with torch.no_grad():
        expected = captioner(features[:2], None, tokens)[0]
        assert (converted(features[:2], None, tokens)[0] - expected).abs().max().item() <= 1e-5
        h = torch.randn(4, TEXT_DIM)
        expected = captioner.float32_logits(h)
        assert (converted.float32_logits(h) - expected).abs().max().item() <= 1e-5


def test_bfloat16_and_int8_weights_are_those_weights_rounded(captioner):
    """cpu_decoding's bfloat16 and int8 linear layers are the float32 ones with their weights (and inputs)
    rounded: a bfloat16 product is that of the bfloat16-rounded numbers, computed here by hand; an int8 one is
    off by no more than the rounding bound of its steps (weights in 255 steps of 2 max|w| / 255, inputs in at
    least 127 steps of their range), and by more than float32's."""
    import copy
    from decode import BFloat16Linear, cpu_decoding, int8_linear
    def int8_bound(weight, x):  # the rounding bound of the weights' and the inputs' steps, per output
        w_step, x_step = 2 * weight.abs().max() / 255, (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
        return (w_step / 2 * x.abs().sum(1, keepdim=True) + x_step / 2 * weight.abs().sum(1)
                + w_step * x_step / 4 * weight.shape[1])
    linear = torch.nn.Linear(48, 32)
    x = torch.randn(5, 48)
    by_hand = F.linear(x.bfloat16().float(), linear.weight.bfloat16().float()) + linear.bias
    assert (BFloat16Linear(linear)(x) - by_hand).abs().max() < 1e-2 * by_hand.abs().max()  # a bf16 rounding
    assert (BFloat16Linear(linear)(x) - linear(x)).abs().max() > 1e-4  # and not float32
    with torch.no_grad():
        error = (int8_linear(linear)(x) - linear(x)).abs()
    assert (error <= int8_bound(linear.weight, x)).all() and error.max() > 1e-4
    # the model's LM head too: its logits are off by no more than the rounding of the head's weights (the
    # real words' rows of the embedding) and inputs: bfloat16 rounds each of both by at most 2^-8
    features = random_features(6)
    head = captioner.gpt.wte.weight[:captioner.gpt.config.vocab_size].detach()
    h = torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    bounds = dict(bfloat16=2 * 2 ** -8 * (h.abs() @ head.abs().T), int8=int8_bound(head, h))
    for weights, swapped in (('bfloat16', BFloat16Linear), ('int8', torch.ao.nn.quantized.dynamic.Linear)):
        converted = cpu_decoding(copy.deepcopy(captioner), weights)
        assert sum(isinstance(m, swapped) for m in converted.modules()) == 3 * 4 + 3 * 5 + 1  # + the LM head
        with torch.no_grad():
            error = (converted.float32_logits(h) - captioner.float32_logits(h)).abs()
        assert (error <= bounds[weights]).all() and error.max() > 1e-4
        assert len(generate(converted, features, max_new_tokens=12)) == 6
    with pytest.raises(InputError, match="^cpu_weights must be 'float32', 'bfloat16' or 'int8', not 'int4'$"):
        cpu_decoding(captioner, 'int4')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_graph_replays_decode_as_eager_steps(captioner, monkeypatch):
    """On a GPU each decoding step is captured once and replayed; the captions must be those of eager
    steps, greedy and beam (whose reorders copy the cache in place, under the graph's feet)."""
    import copy
    import decode as decode_module
    gpu_model, features = copy.deepcopy(captioner).cuda(), random_features(6).cuda()

    def captions():
        return [generate(gpu_model, features, decoding=d, beam_width=3, max_new_tokens=12) for d in ('greedy', 'beam')]
    replayed = captions()
    monkeypatch.setattr(decode_module, 'cuda_graph_step',
                        lambda model, token, state: lambda t: model.step(t, state.media_kv, state.cache))
    assert captions() == replayed


@pytest.mark.parametrize('decoding', ['greedy', 'beam'])
def test_min_new_tokens(captioner, decoding):
    """<|endoftext|> is banned for exactly the first min_new_tokens steps, as in the slow references with
    the same ban (some of these captions are shorter without it)."""
    features = random_features(4)
    captions = generate(captioner, features, decoding=decoding, beam_width=3, max_new_tokens=12,
                                  min_new_tokens=9)
    if decoding == 'greedy':
        assert captions == plain_sample(captioner, features, None, 12, argmax, min_new_tokens=9)
    else:
        assert captions == plain_beam_search(captioner, features, None, 12, 3, min_new_tokens=9)
    assert captions != generate(captioner, features, decoding=decoding, beam_width=3, max_new_tokens=12)


def test_training_flops():
    """By hand, term by term. Forward: 2 FLOPs per weight per token it reads (LayerNorms and biases
    count as weights, as in the parameter counts), plus 4 per attention score times the attention
    width (scores and weighted sums). Frozen parts count forward + input gradients (2x), trained parts
    forward + input and weight gradients (3x); CLIP runs before training."""
    V, D, block = 50257, 768, 7_087_872  # GPT-2 small: vocabulary, width, one block's weights

    def gpt2_block(T):
        return 2 * block * T + 4 * T * T * D

    # mapping network only, 15 caption tokens + 1 prefix token: the MLP runs once per caption
    lm_head, mapper = 2 * V * D * 15, 2 * 787_712
    expected = 2 * (12 * gpt2_block(16) + lm_head) + 3 * mapper
    assert training_flops(meta_captioner(enable_resampler_xattn=False), 15) == expected
    # the LM head runs only on the positions that have a target
    fewer = training_flops(meta_captioner(enable_resampler_xattn=False), 15, targets=10)
    assert expected - fewer == 2 * 2 * V * D * 5

    def resampler_layer(Dv, M, L=64, inner=6 * 64):  # L latents read M media tokens and themselves
        ff = 2 * Dv + 2 * Dv * Dv  # LayerNorm, two bias-free linears (ff_mult 1)
        return (2 * (Dv * inner + inner * Dv + ff) * L + 2 * Dv * 2 * inner * (M + L)
                + 4 * L * (M + L) * inner)

    def xattn_block(Dv, T, L=64, inner=6 * 64):  # T text tokens read L latents
        ff = 2 * D + 2 * D * D
        return 2 * (D * inner + inner * D + ff) * T + 2 * Dv * 2 * inner * L + 4 * T * L * inner

    # the reference configuration: CLIP ViT-B/32 (768 wide, 7 x 7 patches + CLS), everything on
    reference = training_flops(meta_captioner(), 15)
    assert reference == (2 * (12 * gpt2_block(16) + lm_head)
                         + 3 * (mapper + 4 * resampler_layer(768, 50) + 12 * xattn_block(768, 16)))
    assert 16.5e9 < reference < 17.5e9  # docs/results.md's "about 17 GFLOP per caption"

    # ViT-L/14 (1024 wide, 16 x 16 patches + CLS) on a 3-frame video, the transformer mapper with 2 prefix
    # tokens, cross-attention before blocks 0, 4 and 8, the top block trained, 10 of 15 tokens with a target
    M, P, T = 3 * 257, 2, 2 + 15
    mapper_block = 4 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 2048 + 2048) + (2048 * D + D)
    mapper_weights = (1024 * D + D) + P * D + 8 * mapper_block  # projection, queries, 8 blocks
    mapper = 2 * mapper_weights * (M + P) + 4 * 8 * (M + P) ** 2 * D
    model = meta_captioner(vision_model='openai/clip-vit-large-patch14', mapper='transformer', prefix_len=P,
                           xattn_every=4, unfreeze_layers=1)
    assert training_flops(model, 15, frames=3, targets=10) == (
        2 * (11 * gpt2_block(T) + 2 * V * D * 10)
        + 3 * (gpt2_block(T) + mapper + 4 * resampler_layer(1024, M) + 3 * xattn_block(1024, T)))


@pytest.mark.parametrize('decoding', ['greedy', 'beam'])
def test_a_captured_step_is_captured_once_per_shape_and_replayed_by_later_calls(captioner, monkeypatch, decoding):
    """A GPU captures a decoding step once per shape and replays it for every later call of that shape, each
    call's cache, position and media copied into the captured tensors. The same logic, with an eager step
    as the 'capture', on a CPU: three calls of one shape and one of another capture twice, and every call
    gives the captions of a decoding of its own."""
    import decode
    captures = []

    def eager_capture(model, token, state):
        captures.append(tuple(token.shape))
        static_token = token.clone()

        def replay(next_token):  # reads and writes the captured state only, as a graph's replay does
            static_token.copy_(next_token)
            return model.step(static_token, state.media_kv, state.cache)
        return replay
    batches = [random_features(3, seed=1), random_features(3, seed=2), random_features(2, seed=3), random_features(3, seed=4)]
    expected = [generate(captioner, f, decoding=decoding, beam_width=3, max_new_tokens=10) for f in batches]
    monkeypatch.setattr(decode, 'stepper', lambda model, token, state: decode.replayed_step(
        model, token, state, eager_capture))
    got = [generate(captioner, f, decoding=decoding, beam_width=3, max_new_tokens=10) for f in batches]
    assert got == expected and len({tuple(map(tuple, c)) for c in expected}) == 4
    assert len(captures) == 2
