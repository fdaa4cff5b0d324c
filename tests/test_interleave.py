"""Flamingo's interleaved media: several images in one sequence, each text reading its own; few-shot captioning."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import tiktoken
import torch

import model as model_module
from conftest import VISION_DIM, record_generate_calls, run_script
from common import EOT
from data import IGNORE_INDEX, Captions, FewShotExamples, Shots
from decode import few_shot_prompt, generate, prefill
from model import MediaLayout
from weights import build_captioner
from test_train import logs, train_args, train_losses

TOKENS = 17  # CLIP tokens per frame of the tiny vision model


def captioner_of(config, **changes):
    torch.manual_seed(0)
    model = build_captioner(dataclasses.replace(config, **changes))
    torch.manual_seed(1)  # gates away from zero and the cross-attention 10x stronger, so that the media decide
    for block in model.xattn.values():
        torch.nn.init.normal_(block.attn_gate, std=0.5)
        torch.nn.init.normal_(block.ff_gate, std=0.5)
        with torch.no_grad():
            block.to_out.weight *= 10
    return model.eval()


@pytest.fixture
def captioner(tiny_config):
    return captioner_of(tiny_config)


def images(count):
    return torch.randn(count, 1, TOKENS, VISION_DIM)  # [B, T=1, N, Dv]


def test_one_media_per_row_is_the_single_media_model(captioner):
    """The interleaving machinery with one media before the text (a layout, a visibility mask) gives the
    logits of the plain path, which the other tests hold to transformers' GPT-2 and a hand-written
    Flamingo."""
    features, tokens = images(3), torch.randint(0, 50257, (3, 7))
    with torch.no_grad():
        plain, _ = captioner(features, None, tokens)
        interleaved, _ = captioner(features[:, None], None, tokens, media_at=torch.zeros(3, 1, dtype=torch.long))
    assert (interleaved - plain).abs().max() < 1e-5


@pytest.mark.parametrize('mapper', ['mlp', 'transformer'])
def test_each_row_of_interleaved_media_is_read_as_alone(tiny_config, mapper):
    """Two rows of two images and captions: each row's logits are those of the row on its own, and other
    images in the other row change nothing in it (no row reads another's media)."""
    captioner = captioner_of(tiny_config, mapper=mapper)
    media, tokens = images(4).view(2, 2, 1, TOKENS, VISION_DIM), torch.randint(0, 50257, (2, 9))
    media_at = torch.tensor([[0, 4], [0, 6]])
    other = media.clone()
    other[1] = torch.randn_like(other[1])
    with torch.no_grad():
        both, _ = captioner(media, None, tokens, media_at=media_at)
        alone = [captioner(media[r:r + 1], None, tokens[r:r + 1], media_at=media_at[r:r + 1])[0] for r in range(2)]
        with_other, _ = captioner(other, None, tokens, media_at=media_at)
    assert all((both[r] - alone[r][0]).abs().max() < 1e-5 for r in range(2))
    assert torch.equal(with_other[0], both[0]) and (with_other[1] - both[1]).abs().max() > 1e-3


def test_the_first_video_of_a_row_and_its_caption_are_read_as_alone(captioner):
    """Two videos of 2 and 3 frames (padded to 3) with their captions in one row: the first caption's logits
    are those of its video and caption alone (causal text, and it reads its own video only)."""
    videos = torch.randn(1, 2, 3, TOKENS, VISION_DIM)
    frames = torch.tensor([[[True, True, False], [True, True, True]]])
    tokens = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        packed, _ = captioner(videos, frames, tokens, media_at=torch.tensor([[0, 4]]))
        alone, _ = captioner(videos[:, 0], frames[:, 0], tokens[:, :4])
        other_video, _ = captioner(videos[:, 1], frames[:, 1], tokens[:, :4])
    assert (packed[:, :4] - alone).abs().max() < 1e-5
    assert (alone - other_video).abs().max() > 1e-3


def cross_attention_weights(captioner, monkeypatch, *inputs, **options):
    """Run the captioner with a written-out attention that records the weights of every gated
    cross-attention's call."""
    recorded, inside = [], []
    cross_attention = model_module.GatedCrossAttention.forward

    def recorded_cross_attention(self, *args):
        inside.append(self)
        try:
            return cross_attention(self, *args)
        finally:
            inside.pop()

    def attention(q, k, v, attn_mask=None, is_causal=False):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if is_causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        weights = scores.softmax(-1)
        if inside:
            recorded.append(weights)
        return weights @ v
    monkeypatch.setattr(model_module.F, 'scaled_dot_product_attention', attention)
    monkeypatch.setattr(model_module.GatedCrossAttention, 'forward', recorded_cross_attention)
    with torch.no_grad():
        captioner(*inputs, **options)
    return recorded


@pytest.mark.parametrize('media_attention', ['latest', 'earlier'])
def test_a_caption_reads_the_latents_of_its_own_image(tiny_config, monkeypatch, media_attention):
    """Two (image, caption) pairs in a row: in every cross-attention layer, the second caption's weights on
    the first image's latents are exactly zero (Flamingo's default), or not, when text may read every
    earlier media; the first caption never reads the second image."""
    captioner = captioner_of(tiny_config, media_attention=media_attention)
    tokens = torch.randint(0, 50257, (2, 9))
    media_at = torch.tensor([[0, 4], [0, 6]])  # the second caption starts at token 4 in row 0, 6 in row 1
    weights = cross_attention_weights(captioner, monkeypatch, images(4).view(2, 2, 1, TOKENS, VISION_DIM), None,
                                      tokens, media_at=media_at)
    assert len(weights) == len(captioner.xattn)
    L, P = tiny_config.num_latents, tiny_config.prefix_len
    for w in weights:  # [B, heads, positions, 2 * L]
        for row, second in enumerate((4, 6)):
            first_caption, second_caption = slice(0, P + second), slice(2 * P + second, None)
            assert (w[row, :, first_caption, L:] == 0).all()
            on_first_image = w[row, :, second_caption, :L]
            if media_attention == 'latest':
                assert (on_first_image == 0).all()
            else:
                assert (on_first_image > 0).all()


def test_text_before_the_first_image_is_unchanged_by_any_image(captioner):
    """Text, then an image, then more text: the logits of the text before the image are the same whatever the
    image (its cross-attention adds nothing), those after it are not."""
    tokens = torch.randint(0, 50257, (1, 8))
    media_at = torch.tensor([[5]])
    with torch.no_grad():
        logits = [captioner(image[None], None, tokens, media_at=media_at)[0] for image in images(2)[:, None]]
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0][:, :5], logits[1][:, :5])
    assert (logits[0][:, 5:] - logits[1][:, 5:]).abs().max() > 1e-3


def test_media_layout_places_every_prefix_before_its_text():
    layout = MediaLayout.of(torch.tensor([[0, 3], [2, 2]]), text_len=5, prefix_len=2)
    # row 0: P0 P0 t0 t1 t2 P1 P1 t3 t4; row 1: t0 t1 P0 P0 P1 P1 t2 t3 t4
    assert layout.text_pos.tolist() == [[2, 3, 4, 7, 8], [0, 1, 6, 7, 8]]
    assert layout.prefix_pos.tolist() == [[0, 1, 5, 6], [2, 3, 4, 5]]
    assert layout.latest_media.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1], [-1, -1, 0, 0, 1, 1, 1, 1, 1]]


def test_packed_captions_are_each_a_target_once_and_the_prefixes_never(data_dir):
    """Six captions packed three to a sequence: read in order, the targets are each caption (as its image's
    references say it, tokenized here) and its <|endoftext|>, one after another; each caption's media goes
    before its first token, and no target falls on a prefix position."""
    data = Captions(data_dir, 'train', 48)
    ids = np.array([5, 17, 2, 30, 11, 8])
    features, mask, tokens, targets, positions, media_at = data.interleaved_batch(ids, 3)
    assert features.shape[:2] == (2, 3) and mask.shape[:2] == (2, 3)
    assert np.array_equal(features[1, 2], data.features(data.media_index[ids[5:]])[0][0])
    encoder = tiktoken.get_encoding('gpt2')
    references = data.records()
    flat_targets = targets.ravel()[positions]
    for row in range(2):
        row_targets = flat_targets[positions // targets.shape[1] == row].tolist()
        captions = encoder.decode(row_targets).split('<|endoftext|>')
        assert captions[-1] == '' and len(captions) == 4
        for caption, i in zip(captions, ids[3 * row:3 * row + 3]):
            assert caption in references[data.media_index[i]]['captions']
        assert all(tokens[row, at] == EOT for at in media_at[row])
        assert media_at[row, 0] == 0 and all(np.diff(media_at[row]) > 0)
    assert (targets != IGNORE_INDEX).sum() == data.target_count(ids)
    layout = MediaLayout.of(torch.from_numpy(media_at), tokens.shape[1], prefix_len=3)
    in_sequence = layout.text_pos.flatten()[torch.from_numpy(positions)]
    rows = torch.from_numpy(positions // targets.shape[1])
    for row in range(2):
        assert not set(in_sequence[rows == row].tolist()) & set(layout.prefix_pos[row].tolist())


def recomputed_greedy(captioner, features, shots, max_new_tokens):
    """Greedy decoding without a KV cache: the whole prompt and caption so far through forward() at each step."""
    B = len(features)
    prompt, media_at = few_shot_prompt(shots.tokens, B, 'cpu')
    # [B, N + 1, T, Nt, Dv]: the examples, then the query
    media = torch.cat([shots.features.expand(B, *shots.features.shape), features[:, None]], dim=1)
    tokens = prompt
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits, _ = captioner(media, None, tokens, media_at=media_at)
        tokens = torch.cat([tokens, logits[:, -1:, :50257].argmax(-1)], dim=1)
    return tokens[:, prompt.shape[1]:].tolist()


@pytest.mark.parametrize('media_attention, mapper', [('latest', 'mlp'), ('earlier', 'transformer')])
def test_few_shot_decoding_with_the_cache_equals_recomputing(tiny_config, media_attention, mapper):
    captioner = captioner_of(tiny_config, media_attention=media_attention, mapper=mapper)
    shots = Shots(images(2), torch.ones(2, 1, dtype=torch.bool), [[64, 2266, 6333], [32, 4171]])
    features = images(3)
    expected = recomputed_greedy(captioner, features, shots, 6)
    with torch.no_grad():
        logits, state = prefill(captioner, features, None, 6, shots)
        got = [logits.argmax(-1)]
        for _ in range(5):
            got.append(captioner.step(got[-1], state.media_kv, state.cache).argmax(-1))
    assert torch.stack(got, 1).tolist() == expected
    # the examples change the captions: without them, the same model says something else
    assert generate(captioner, features, max_new_tokens=6) != generate(captioner, features, max_new_tokens=6,
                                                                                shots=shots)


@pytest.mark.parametrize('media_attention', ['latest', 'earlier'])
def test_few_shot_beam_search_of_width_one_is_greedy(tiny_config, media_attention):
    """Beam search keeps each beam's media through its reordering: with one beam it is greedy decoding,
    here with examples of two frames (one masked out) before images of one."""
    captioner = captioner_of(tiny_config, media_attention=media_attention)
    shots = Shots(torch.randn(2, 2, TOKENS, VISION_DIM).half(), torch.tensor([[True, False], [True, True]]),
                  [[64, 2266, 6333], [32, 4171]])
    features = images(6)
    greedy = generate(captioner, features, max_new_tokens=6, shots=shots)
    assert generate(captioner, features, max_new_tokens=6, shots=shots, decoding='beam', beam_width=1) == greedy
    assert greedy != greedy[::-1]  # the images still differ: a beam reading another row's media would show


def test_few_shot_prompt_is_laid_out_as_training_packs_captions(tiny_config, data_dir):
    """Decoding with two (image, caption) examples before a query reads the same sequence as training's packing
    of those three captions: laid out by hand, and then the query's caption fed token by token gets the
    training forward's logits at every one of its targets."""
    prompt, media_at = few_shot_prompt([[5, 6], [7]], 2, 'cpu')
    assert prompt.tolist() == [[EOT, 5, 6, EOT, 7, EOT]] * 2 and media_at.tolist() == [[0, 3, 5]] * 2
    captioner = captioner_of(tiny_config)
    data = Captions(data_dir, 'train', 48)
    ids = np.array([5, 17, 2])
    batch = [torch.from_numpy(a) for a in data.interleaved_batch(ids, 3)]
    features, mask, tokens, targets, positions, media_at = batch
    with torch.no_grad():
        trained, _ = captioner(*batch[:5], media_at=media_at)
    n = data.lengths[ids[2]] + 1  # the query's targets: its caption and <|endoftext|>, the last of the packing
    spans = [tokens[0, media_at[0, j] + 1:media_at[0, j + 1]].tolist() for j in range(2)]
    query = tokens[0, media_at[0, 2] + 1:media_at[0, 2] + n]
    shots = Shots(features[0, :2], mask[0, :2], spans)
    with torch.no_grad():
        logits, state = prefill(captioner, features[:, 2], mask[:, 2], int(n), shots)
        decoded = [logits]
        for token in query:
            decoded.append(captioner.step(token[None], state.media_kv, state.cache))
    assert (torch.cat(decoded) - trained[-n:, :50257]).abs().max() < 1e-4


def test_few_shot_examples_are_fixed_by_the_seed_and_never_the_query(data_dir):
    examples = FewShotExamples(data_dir, 'train', 2, seed=5)
    again = FewShotExamples(data_dir, 'train', 2, seed=5)
    assert list(examples.media) == list(again.media) and len(examples.media) == 3
    assert list(FewShotExamples(data_dir, 'train', 2, seed=6).media) != list(examples.media)
    assert examples.chosen(lambda media, record: False) == (0, 1)
    first = examples.media[0]
    assert examples.chosen(lambda media, record: media == first) == (1, 2)
    data = Captions(data_dir, 'train', 48)
    encoder = tiktoken.get_encoding('gpt2')
    for tokens, media in zip(examples.tokens, examples.media):  # each example with one of its captions
        assert encoder.decode(tokens) in data.records()[media]['captions']
    features, mask, tokens = examples.shots_of((1, 2), 'cpu')
    assert np.array_equal(features.numpy(), data.features(examples.media[1:])[0]) and tokens == examples.tokens[1:]


def test_eval_bleu_few_shot_puts_the_examples_before_every_image(run_dir, data_dir, monkeypatch, tmp_path):
    """eval_bleu.py --shots=2 on the training split itself: every image gets two examples, never itself."""
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'best.pt')
    calls = record_generate_calls(monkeypatch)
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=train',
                      '--shots=2', '--shots_seed=5', '--device=cpu', '--batch_size=64') is None
    # the 16 training images: the two that are examples get the third example in their place
    sizes = sorted(batch for batch, _, _ in calls)
    assert sizes == [1, 1, 14]
    for _, _, options in calls:
        assert len(options['shots'][2]) == 2
    with open(tmp_path / 'captions_train_beam5_2shot.json') as f:
        assert len(json.load(f)) == 16


def test_eval_bleu_examples_of_another_split_are_never_mistaken_for_the_query(run_dir, data_dir, monkeypatch,
                                                                              tmp_path):
    """Examples from the training split, queries from val: a val image whose index in its split is that of an
    example in its own is not that example, so all four val images get the same two examples, in one batch."""
    seed = next(s for s in range(100) if set(FewShotExamples(data_dir, 'train', 2, s).media[:2]) & {0, 1, 2, 3})
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'best.pt')
    calls = record_generate_calls(monkeypatch)
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=val', '--shots=2',
                      '--shots_split=train', f'--shots_seed={seed}', '--device=cpu', '--decoding=greedy') is None
    examples = FewShotExamples(data_dir, 'train', 2, seed)
    assert [batch for batch, _, _ in calls] == [4]
    assert calls[0][2]['shots'][2] == examples.tokens[:2]


def test_interleaved_training_accumulates_like_one_batch(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    """interleave=2: 8 captions a step as 4 sequences in one batch, and in 2 accumulated micro batches: the
    same losses and weights (the loss is over all the captions' targets of the step)."""
    common = ['--max_iters=3', '--eval_interval=3', '--learning_rate=2e-3', '--warmup_frac=0']
    for name, options in {'one': ['--batch_size=8', '--interleave=2'],
                          'accumulated': ['--batch_size=4', '--gradient_accumulation_steps=2', '--interleave=2'],
                          'not_packed': ['--batch_size=8']}.items():
        assert run_script('train.py', *train_args(tmp_path / name, data_dir, tiny_clip_dir, tiny_gpt2_dir),
                          *common, *options) is None
    losses = {run: train_losses(logs(tmp_path / run)) for run in ('one', 'accumulated', 'not_packed')}
    assert losses['one'].keys() == {1, 2, 3} and losses['one'][1] > 5
    # the same captions, packed: each caption after the one before it, which changes its loss
    assert abs(losses['one'][1] - losses['not_packed'][1]) > 1e-3
    assert np.allclose([losses['accumulated'][i] for i in (1, 2, 3)], [losses['one'][i] for i in (1, 2, 3)],
                       rtol=1e-5)
    weights = [torch.load(tmp_path / run / 'ckpt.pt', weights_only=True)['model'] for run in ('one', 'accumulated')]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])


def test_bad_interleave_settings_fail_in_one_line(run_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, tmp_path):
    assert run_script('train.py', '--interleave=3', '--batch_size=32') == \
        'train.py: interleave=3 must be at least 1 and divide batch_size=32'
    longest = int(Captions(data_dir, 'train', 48).lengths.max())
    assert run_script('train.py', *train_args(tmp_path / 'long', data_dir, tiny_clip_dir, tiny_gpt2_dir),
                      '--interleave=16', '--batch_size=16', '--max_iters=1') == \
        (f'train.py: interleave=16 x (prefix 1 + <|endoftext|> + longest caption {longest}) = {16 * (longest + 2)} '
         "positions > the language model's 64: lower interleave or max_caption_tokens")
    shutil.copytree(run_dir, tmp_path / 'run')
    assert run_script('train.py', f"--out_dir={tmp_path / 'run'}", '--init_from=resume', '--interleave=2') == \
        f"train.py: {tmp_path / 'run'}/ckpt.pt: a run with interleave=1; resume it with the same"
    assert run_script('eval_bleu.py', f'--out_dir={run_dir}', f'--data_dir={data_dir}', '--shots=-1',
                      '--device=cpu') == 'eval_bleu.py: shots must be at least 0, not -1'
    assert run_script('eval_bleu.py', f'--out_dir={run_dir}', f'--data_dir={data_dir}', '--shots=16',
                      '--device=cpu') == (f"eval_bleu.py: {data_dir}: split 'train' has 16 images, too few for 16 "
                                          'examples and a stand-in')


def test_sample_few_shot_never_gives_a_file_itself_as_its_example(run_dir, data_dir, monkeypatch, capsys):
    """sample.py --shots=1 on the training pictures, with the examples from their own prepared split: the
    picture that is the example gets the next candidate instead; the others all get the first."""
    examples = FewShotExamples(data_dir, 'train', 1, seed=5)
    calls = record_generate_calls(monkeypatch)
    images = examples.records[0]['file'].rsplit('/', 1)[0]
    assert run_script('sample.py', f'--out_dir={run_dir}', f'--images={images}', '--shots=1',
                      f'--shots_data={data_dir}', '--seed=5', '--num_workers=0', '--device=cpu') is None
    assert sorted((size, options['shots'][2][0]) for size, _, options in calls) == \
        sorted([(1, examples.tokens[1]), (15, examples.tokens[0])])
    assert len(capsys.readouterr().out.splitlines()) == 16
