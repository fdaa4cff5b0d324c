"""Tiny stand-ins for the pretrained checkpoints, saved in the real layout (nothing is downloaded),
and tiny prepared data."""
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from prepare_shapes import centre_vision_features, draw_weights, save_clip_tokenizer

VISION_DIM, TEXT_DIM = 32, 48  # different on purpose: the bridge must project between them
TOKENS_PER_FRAME = 17  # CLS + (32 / 8) ** 2 patches


@pytest.fixture(scope='session')
def tiny_clip_dir(tmp_path_factory):
    """A full CLIPModel checkpoint (vision and text towers), as every real CLIP on the hub is."""
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        vision_config=dict(hidden_size=VISION_DIM, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=16)
    path = tmp_path_factory.mktemp('tiny_clip')
    clip = draw_weights(CLIPModel(config), seed=0)  # drawn here: the same whatever transformers' version
    clip.save_pretrained(path)
    # as the demo's stand-in: a random ViT's features share one offset that buries the pictures' differences
    pictures = tmp_path_factory.mktemp('centring')
    for i, scene in enumerate(shape_scenes('train')):
        draw_shape(*scene).save(pictures / f'{i}.png')
    centre_vision_features(clip, path, sorted(map(str, pictures.iterdir())))
    save_clip_tokenizer(path, bos=0, eos=1)  # for CLIPScore's text tower, as the real checkpoints carry theirs
    return str(path)


@pytest.fixture(scope='session')
def tiny_gpt2_dir(tmp_path_factory):
    """A GPT2LMHeadModel checkpoint with GPT-2's real vocabulary, so <|endoftext|> is token 50256."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=3, n_head=4, n_embd=TEXT_DIM, n_positions=64, vocab_size=50257)
    path = tmp_path_factory.mktemp('tiny_gpt2')
    draw_weights(GPT2LMHeadModel(config), seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_config(tiny_clip_dir, tiny_gpt2_dir):
    """A small bridge over the tiny checkpoints; tests change fields with dataclasses.replace."""
    from model import CaptionerConfig
    return CaptionerConfig(vision_model=tiny_clip_dir, text_model=tiny_gpt2_dir, mapper_hidden=24,
                           mapper_depth=2, mapper_heads=4, mapper_ffn=64, prefix_len=2,
                           resampler_depth=2, num_latents=8, max_frames=6, heads=2, dim_head=16)


COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220), 'yellow': (230, 220, 20)}
SHAPES = ('square', 'dot')
TEMPLATES = ('a picture of a {colour} {shape}', 'there is a {colour} {shape} here', 'one {shape} that is {colour}')


def colour_and_shape(text):
    """The colours and the shapes a caption names, as two sets: ({'red'}, {'dot'}) for 'a picture of a red dot'."""
    words = set(text.split())
    return words & set(COLOURS), words & set(SHAPES)


def caption_text(tokens):
    """GPT-2 tokens as sample.py and eval_bleu.py write a caption: one line, single spaces."""
    import tiktoken
    return ' '.join(tiktoken.get_encoding('gpt2').decode(tokens).split())


def draw_shape(colour, shape, shift):
    """A 32 x 32 picture of one coloured shape on white, moved by `shift` pixels from the centre."""
    image = Image.new('RGB', (32, 32), 'white')
    box = [4, 4, 28, 28] if shape == 'square' else [12, 12, 20, 20]
    ImageDraw.Draw(image).rectangle([box[0] + shift, box[1] + shift, box[2] + shift, box[3] + shift],
                                    fill=COLOURS[colour])
    return image


def shape_scenes(split):
    """(colour, shape, shift): every colour with every shape twice in training, moved apart; in validation
    each colour once, in between."""
    combos = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    if split == 'train':
        return [(c, s, shift) for shift in (-3, 3) for c, s in combos]
    return [(c, s, 0) for i, (c, s) in enumerate(combos) if i % 2 == i // 4]


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory, tiny_clip_dir):
    """prepare_coco.py's output for 16 training and 4 validation pictures of one coloured shape each, with
    3 captions that name both."""
    root = tmp_path_factory.mktemp('tiny_data')
    for split in ('train', 'val'):
        (root / split).mkdir()
        images, annotations = [], []
        for i, (colour, shape, shift) in enumerate(shape_scenes(split)):
            draw_shape(colour, shape, shift).save(root / split / f'{i}.png')
            images.append(dict(id=i, file_name=f'{i}.png'))
            for template in TEMPLATES:
                annotations.append(dict(id=len(annotations), image_id=i,
                                        caption=template.format(colour=colour, shape=shape)))
        (root / f'captions_{split}.json').write_text(json.dumps(dict(images=images, annotations=annotations)))
        assert run_script('prepare_coco.py', f'--captions={root}/captions_{split}.json', f'--images={root}/{split}',
                          f'--out_dir={root}/prepared', f'--vision_model={tiny_clip_dir}', '--num_workers=0') is None
    return str(root / 'prepared')


RUN_OPTIONS = ('--num_latents=8', '--resampler_depth=1', '--heads=2', '--dim_head=16', '--mapper_hidden=32',
               '--batch_size=8', '--max_iters=150', '--eval_interval=50', '--eval_images=4',
               '--learning_rate=5e-3', '--warmup_frac=0.05', '--unfreeze_layers=3', '--train_embeddings=True',
               '--log_interval=1', '--device=cpu', '--dtype=float32')  # tests compare it to float32's rounding


@pytest.fixture(scope='session')
def run_dir(tmp_path_factory, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    """A training run on data_dir long enough that its captions tell the pictures apart: its checkpoints
    and log.jsonl. Trained once per session, shared by the tests of training, captioning and evaluation."""
    out = tmp_path_factory.mktemp('run')
    assert run_script('train.py', f'--out_dir={out}', f'--data_dir={data_dir}', f'--vision_model={tiny_clip_dir}',
                      f'--text_model={tiny_gpt2_dir}', *RUN_OPTIONS) is None
    return str(out)


def record_generate_calls(monkeypatch):
    """Make decode.generate record every call as (batch size, frame mask, options); returns the record."""
    import decode
    calls, generate = [], decode.generate

    def recorded_generate(model, features, feature_mask=None, *args, **options):
        calls.append((len(features), feature_mask, options))
        return generate(model, features, feature_mask, *args, **options)
    monkeypatch.setattr(decode, 'generate', recorded_generate)
    return calls


def stored_features(path):
    """A <split>_feats.bin file read as the on-disk format defines it, without data.py: float16
    [images or frames, TOKENS_PER_FRAME, VISION_DIM]."""
    return np.fromfile(path, dtype=np.float16).reshape(-1, TOKENS_PER_FRAME, VISION_DIM)


def run_script(script, *args):
    """Run `python script args` in this process, without an interpreter's start-up: returns what the
    script exited with (None when it ran to its end). Any exception but SystemExit propagates, so a
    traceback fails the test that ran it."""
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
    return None
