"""bench.py, run as users run it, on the tiny models: every figure is there and consistent."""
import json

import pytest

import common

from conftest import run_script
from bench import decoding_bytes
from model import CaptionerConfig, training_flops
from weights import build_captioner


def test_bench_reports_every_figure(tiny_clip_dir, tiny_gpt2_dir, capsys):
    model_options = [f'--vision_model={tiny_clip_dir}', f'--text_model={tiny_gpt2_dir}', '--num_latents=8',
                     '--resampler_depth=1', '--heads=2', '--dim_head=16', '--mapper_hidden=32']
    assert run_script('bench.py', *model_options, '--device=cpu', '--train_steps=2', '--warmup_steps=1',
                      '--gen_batch_sizes=1,3', '--new_tokens=5', '--num_images=6', '--extract_batch=4',
                      '--num_workers=0') is None
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert lines[1].startswith('measured limits: matrix products ')
    dtypes = report['dtypes']  # on a CPU that multiplies bfloat16 natively, both
    assert dtypes == (['float32', 'bfloat16'] if common.native_bfloat16('cpu') else ['float32'])
    assert [line.split('  ')[0] for line in lines[2:-1]] == (
        [f'train step, {name}' for name in dtypes] + ['greedy from features', 'beam from features'] * 2
        + ['CLIP features', 'sample.py, greedy', 'sample.py, beam'])
    assert [train['dtype'] for train in report['train']] == dtypes
    train = report['train'][0]
    assert train['batch'] == 8
    assert train['mfu'] == pytest.approx(train['tflops'] / report['limits']['float32']['matmul_tflops'])  # a CPU's
    assert train['tokens_per_s'] == pytest.approx(16 * train['captions_per_s'])
    config = CaptionerConfig(vision_model=tiny_clip_dir, text_model=tiny_gpt2_dir, num_latents=8,
                             resampler_depth=1, heads=2, dim_head=16, mapper_hidden=32)
    flops = training_flops(build_captioner(config, pretrained=False), 16) * 8
    assert train['tflops'] * 1e12 * train['ms_per_iter'] / 1000 == pytest.approx(flops)
    assert [(g['decoding'], g['batch']) for g in report['generate']] == [
        ('greedy', 1), ('beam', 1), ('greedy', 3), ('beam', 3)]
    assert all(g['captions_per_s'] > 0 for g in report['generate'])
    assert [(e['stage'], e['images']) for e in report['extract']] == [
        ('CLIP features', 6), ('sample.py, greedy', 6), ('sample.py, beam', 6)]


def test_decoding_bytes_by_hand():
    """What a decoding step reads of GPT-2 small with 12 gated cross-attention blocks, in float32."""
    import torch
    with torch.device('meta'):
        model = build_captioner(CaptionerConfig(), pretrained=False)
    blocks, ln_f, lm_head = 12 * 7_087_872, 2 * 768, 50304 * 768  # the LM head is the padded embedding
    xattn_block = 28_348_440 // 12 - 768 * 2 * 6 * 64  # but the keys/values of the media, once per image
    assert decoding_bytes(model) == 4 * (blocks + ln_f + lm_head + 12 * xattn_block)
    # in bfloat16 and int8, the matrices (every linear layer's weight, the head) at 2 and 1 bytes a number; the
    # biases, LayerNorms and gates stay float32. By hand: a GPT-2 small block has 768 x 768 x 4 (attention)
    # and 768 x 3072 x 2 (MLP); a cross-attention block, but its keys/values: 768 x 384 (queries),
    # 384 x 768 (out), 768 x 768 x 2 (feed-forward, ff_mult 1)
    matrices = 12 * (768 * 768 * 4 + 768 * 3072 * 2) + lm_head + 12 * (768 * 384 * 2 + 768 * 768 * 2)
    others = blocks + ln_f + lm_head + 12 * xattn_block - matrices
    for name, size in (('bfloat16', 2), ('int8', 1)):
        assert decoding_bytes(model, name) == size * matrices + 4 * others, name


def test_cpu_weights_other_than_float32_are_refused_off_the_cpu(tiny_clip_dir, tiny_gpt2_dir):
    """On a GPU they would change nothing, yet eval_bleu.py would name its files after them."""
    import torch
    import decode
    from common import InputError
    with torch.device('meta'):  # any device but the CPU
        model = build_captioner(CaptionerConfig(vision_model=tiny_clip_dir, text_model=tiny_gpt2_dir, num_latents=8,
                                                resampler_depth=1, heads=2, dim_head=16), pretrained=False)
    assert decode.cpu_decoding(model, 'float32') is model
    for weights in ('bfloat16', 'int8'):
        with pytest.raises(InputError, match=f"cpu_weights='{weights}' is for decoding on a CPU, not on meta"):
            decode.cpu_decoding(model, weights)
