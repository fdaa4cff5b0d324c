"""train.py, run as users run it: python train.py / torchrun train.py, on tiny prepared data."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import load_captioner


def train_args(out_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, *options):
    return [f'--out_dir={out_dir}', f'--data_dir={data_dir}', f'--vision_model={tiny_clip_dir}',
            f'--text_model={tiny_gpt2_dir}', '--num_latents=8', '--resampler_depth=1', '--heads=2',
            '--dim_head=16', '--mapper_hidden=32', '--eval_captions=12', '--log_interval=1', '--device=cpu',
            *options]


def train(out_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, *options, ranks=1):
    """Run train.py with a tiny model; returns its log records."""
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={ranks}']
    args = train_args(out_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, *options)
    result = subprocess.run(launcher + ['train.py', *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(f'{out_dir}/log.jsonl') as f:
        return [json.loads(line) for line in f]


def train_losses(records):
    return {r['iter']: r['loss'] for r in records if 'loss' in r}


def test_tiny_model_overfits(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    records = train(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir, '--batch_size=8', '--max_iters=150',
                    '--learning_rate=3e-3', '--unfreeze_layers=3', '--train_embeddings=True',
                    '--warmup_frac=0.05', '--eval_interval=150', '--eval_bleu_images=4')
    losses = train_losses(records)
    assert losses[1] > 9.0  # a random GPT-2 over 50,257 tokens
    assert losses[150] < 0.8  # 24 captions of 3 templates x 4 colours: learnt
    evaluation = [r for r in records if 'val_loss' in r][-1]
    assert evaluation['val_loss'] < 1.0  # the same colours and templates in unseen images
    assert evaluation['val_bleu4'] > 0.5  # and greedy captions of unseen images say them


def test_resume_continues_exactly(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    import os
    import signal
    import time
    common = ['--batch_size=4', '--max_iters=40', '--eval_interval=5', '--learning_rate=2e-3',
              '--unfreeze_layers=1']
    straight = train_losses(train(tmp_path / 'a', data_dir, tiny_clip_dir, tiny_gpt2_dir, *common))
    # the same run, killed once it has written a checkpoint, then resumed
    args = train_args(tmp_path / 'b', data_dir, tiny_clip_dir, tiny_gpt2_dir, *common)
    run = subprocess.Popen([sys.executable, 'train.py', *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    while not (tmp_path / 'b' / 'ckpt.pt').exists() and run.poll() is None:
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    stopped_at = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['iter_num']
    assert stopped_at < 40
    resumed = train_losses(train(tmp_path / 'b', data_dir, tiny_clip_dir, tiny_gpt2_dir, *common,
                                 '--init_from=resume'))
    after = range(stopped_at + 1, 41)
    assert [resumed[i] for i in after] == [straight[i] for i in after]


def test_two_ddp_processes_equal_one(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    common = ['--max_iters=4', '--eval_interval=4', '--learning_rate=2e-3', '--warmup_frac=0']
    one = train_losses(train(tmp_path / 'one', data_dir, tiny_clip_dir, tiny_gpt2_dir, '--batch_size=6',
                             *common))
    two = train_losses(train(tmp_path / 'two', data_dir, tiny_clip_dir, tiny_gpt2_dir, '--batch_size=3',
                             *common, ranks=2))
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    assert np.allclose([one[i] for i in one], [two[i] for i in one], rtol=1e-5)
    weights_one = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    weights_two = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)['model']
    # Adam divides by sqrt(v), so float rounding in the all-reduced gradients can move a weight by ~1e-6;
    # a wrong shard or a wrong average moves weights by the learning rate's scale (1e-3)
    assert all(torch.allclose(weights_one[k], weights_two[k], atol=1e-5) for k in weights_one)


def test_checkpoint_holds_only_trained_weights_and_loads_alone(tmp_path, data_dir, tiny_clip_dir,
                                                               tiny_gpt2_dir):
    train(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir, '--batch_size=4', '--max_iters=2',
          '--eval_interval=2')
    checkpoint = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert {name.split('.')[0] for name in checkpoint['model']} == {'mapper', 'resampler', 'xattn'}
    assert (tmp_path / 'best.pt').exists()
    model, _ = load_captioner(str(tmp_path / 'ckpt.pt'))
    assert torch.equal(model.xattn['0'].attn_gate, checkpoint['model']['xattn.0.attn_gate'])
    assert model.generate(torch.zeros(1, 17, 32), max_new_tokens=3)  # ready to caption


@pytest.mark.parametrize('option, message', [
    ('--lerning_rate=1e-3', "config error: unknown config key 'lerning_rate' (in --lerning_rate=1e-3); "
                            "did you mean learning_rate?"),
    ('--batch_size=big', "config error: --batch_size=big: expected int, got 'big'"),
])
def test_bad_settings_fail_in_one_line(option, message):
    result = subprocess.run([sys.executable, 'train.py', option], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip() == message


def test_data_of_another_vision_model_fails_in_one_line(tmp_path, data_dir, tiny_gpt2_dir):
    from transformers import CLIPConfig, CLIPModel
    other = CLIPConfig(vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=100, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    CLIPModel(other).save_pretrained(tmp_path / 'other_clip')
    result = subprocess.run([sys.executable, 'train.py', f'--data_dir={data_dir}', f'--text_model={tiny_gpt2_dir}',
                             f"--vision_model={tmp_path / 'other_clip'}", '--device=cpu'],
                            capture_output=True, text=True)
    assert result.returncode != 0
    meta = json.load(open(f'{data_dir}/meta.json'))
    assert result.stderr.strip() == (
        f"train.py: {data_dir}/meta.json does not match the model: its features are from "
        f"{meta['vision_model']!r}, the model's vision_model is {str(tmp_path / 'other_clip')!r}; "
        f"feature_dim 32 != the vision width 24")


def test_logged_loss_after_a_resume_is_the_mean_since_the_resume(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    from conftest import run_script
    common = [*train_args(tmp_path / 'a', data_dir, tiny_clip_dir, tiny_gpt2_dir), '--batch_size=4',
              '--eval_interval=5', '--learning_rate=2e-3']
    assert run_script('train.py', *common, '--max_iters=5') is None  # a checkpoint at iteration 5
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    resume = [*common, '--max_iters=8', '--init_from=resume']
    assert run_script('train.py', *resume, '--log_interval=4') is None
    assert run_script('train.py', *resume, '--out_dir=' + str(tmp_path / 'b'), '--log_interval=1') is None
    logs = {run: train_losses([json.loads(line) for line in open(tmp_path / run / 'log.jsonl')])
            for run in 'ab'}
    assert sorted(logs['b']) == [1, 2, 3, 4, 5, 6, 7, 8]  # the resumed run went on from 6, not from 1
    assert sorted(logs['a']) == [1, 2, 3, 4, 5, 8]  # the first run logged every step, the resumed one at 8
    # the log at 8 of the run resumed at 5 covers 6..8: three steps, whichever log boundary came before
    assert logs['a'][8] == pytest.approx(np.mean([logs['b'][i] for i in (6, 7, 8)]), rel=1e-6)
