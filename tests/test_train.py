"""train.py, run as users run it: python train.py / torchrun train.py, on tiny prepared data."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tiktoken
import torch
from torch import nn

from conftest import RUN_OPTIONS, caption_text, colour_and_shape, run_script
from common import EOT
from data import Captions
from decode import generate
from weights import load_captioner, load_vision
from weights import save_checkpoint


def train_args(out_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, *options):
    return [f'--out_dir={out_dir}', f'--data_dir={data_dir}', f'--vision_model={tiny_clip_dir}',
            f'--text_model={tiny_gpt2_dir}', '--num_latents=8', '--resampler_depth=1', '--heads=2',
            '--dim_head=16', '--mapper_hidden=32', '--eval_captions=12', '--log_interval=1', '--device=cpu',
            '--dtype=float32', *options]  # float32: these runs are compared to float32's rounding


def train(out_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, *options, ranks=1):
    """Run train.py with a tiny model; returns its log records."""
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}']
    args = train_args(out_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir, *options)
    result = subprocess.run(launcher + ['train.py', *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return logs(out_dir)


def logs(out_dir):
    with open(f'{out_dir}/log.jsonl') as f:
        return [json.loads(line) for line in f]


def train_losses(records):
    return {r['iter']: r['loss'] for r in records if 'loss' in r}


def test_tiny_model_overfits_and_its_captions_name_their_own_picture(run_dir, data_dir):
    """Guards against a model that never sees its pictures (features zeroed, dropped or mixed up): it
    learns the captions' language, 'a picture of a ...', but names the same colour and shape for all."""
    model, _ = load_captioner(f'{run_dir}/ckpt.pt')
    train_data = Captions(data_dir, 'train', 48)
    features, mask = train_data.features(np.arange(16))
    captions = generate(model, torch.from_numpy(features).float(), torch.from_numpy(mask), max_new_tokens=12)
    for tokens, record in zip(captions, train_data.records()):
        said = caption_text(tokens)
        assert colour_and_shape(said) == colour_and_shape(record['captions'][0]), (record['file'], said)
    log = logs(run_dir)
    losses = train_losses(log)
    assert losses[1] > 9.0  # a random GPT-2 over 50,257 tokens
    assert losses[150] < 0.3  # 48 captions of 3 templates: only the template is left to guess
    evaluation = [r for r in log if 'val_loss' in r][-1]
    assert evaluation['val_loss'] < 0.5  # the same templates and colours in unseen pictures
    assert evaluation['val_bleu4'] > 0.5  # and greedy captions of unseen pictures say them


@pytest.mark.parametrize('objective', ['xe', 'scst'])
def test_resume_continues_exactly(objective, tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir, run_dir):
    """Killed and resumed, a run logs the losses of an uninterrupted one and ends with its weights and
    optimiser state. With SCST, that takes sampling the same captions again: their loss is a function of
    them."""
    import os
    import signal
    import time
    common = ['--batch_size=4', '--max_iters=40', '--eval_interval=5', '--learning_rate=2e-3',
              '--unfreeze_layers=1', '--dtype=auto']  # bfloat16 autocast where the CPU has it, as the quick start
    if objective == 'scst':  # from a model whose samples differ in reward, so that it learns
        common = ['--batch_size=2', '--max_iters=40', '--eval_interval=5', '--learning_rate=1e-3', '--objective=scst',
                  '--scst_samples=3', '--eval_images=2', f'--init_from={run_dir}/ckpt.pt']
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
    (tmp_path / 'b' / 'log.jsonl').unlink()  # the resumed run's log alone
    resumed = train_losses(train(tmp_path / 'b', data_dir, tiny_clip_dir, tiny_gpt2_dir, *common,
                                 '--init_from=resume'))
    # it went on from the checkpoint (a run that started over would log the same losses from 1)
    assert sorted(resumed) == list(range(stopped_at + 1, 41))
    assert [resumed[i] for i in resumed] == [straight[i] for i in resumed]
    ends = [torch.load(tmp_path / run / 'ckpt.pt', weights_only=True) for run in 'ab']
    assert ends[0]['model'].keys() == ends[1]['model'].keys()
    assert all(torch.equal(ends[0]['model'][k], ends[1]['model'][k]) for k in ends[0]['model'])
    moments = [[s[k] for s in end['optimizer']['state'].values() for k in ('exp_avg', 'exp_avg_sq')]
               for end in ends]
    assert len(moments[0]) == 2 * len(ends[0]['model']) and all(map(torch.equal, *moments))


def test_accumulated_and_ddp_micro_batches_equal_one_batch(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    """8 captions per step: in one batch, in 2 accumulated micro batches of 4, and on 2 ranks of 2
    accumulated micro batches each: the same losses and the same weights."""
    common = ['--max_iters=4', '--eval_interval=4', '--learning_rate=2e-3', '--warmup_frac=0']
    runs = {'one': ['--batch_size=8'], 'accumulated': ['--batch_size=4', '--gradient_accumulation_steps=2']}
    for name, options in runs.items():
        assert run_script('train.py', *train_args(tmp_path / name, data_dir, tiny_clip_dir, tiny_gpt2_dir),
                          *common, *options) is None
    train(tmp_path / 'ddp', data_dir, tiny_clip_dir, tiny_gpt2_dir, '--batch_size=2',
          '--gradient_accumulation_steps=2', *common, ranks=2)
    losses = {run: train_losses(logs(tmp_path / run)) for run in ('one', 'accumulated', 'ddp')}
    assert losses['one'].keys() == {1, 2, 3, 4}
    for run in ('accumulated', 'ddp'):
        assert losses[run].keys() == losses['one'].keys()
        assert np.allclose([losses[run][i] for i in range(1, 5)], [losses['one'][i] for i in range(1, 5)],
                           rtol=1e-5), run
        weights = torch.load(tmp_path / run / 'ckpt.pt', weights_only=True)['model']
        reference = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
        # Adam divides by sqrt(v), so float rounding in summed gradients can move a weight by ~1e-6; a
        # wrong shard, a wrong average or a missed micro batch moves weights by the learning rate (1e-3)
        assert all(torch.allclose(weights[k], reference[k], atol=1e-5) for k in reference), run


def test_optimizer_steps_follow_the_schedule_the_decay_groups_and_the_clip(
        tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir, monkeypatch):
    """Watch every AdamW step of a real run: its learning rate, which weights it decays, the gradient
    norm it gets."""
    import weights as weights_module
    built, steps = [], []
    build = weights_module.build_captioner
    monkeypatch.setattr(weights_module, 'build_captioner', lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    adamw_step = torch.optim.AdamW.step

    def watched_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None]
        steps.append(dict(lr=[group['lr'] for group in optimizer.param_groups],
                          decay={id(p): group['weight_decay'] for group in optimizer.param_groups
                                 for p in group['params']},
                          grad_norm=torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()))
        return adamw_step(optimizer, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, 'step', watched_step)
    max_lr, min_lr, total, warmup = 1e-3, 1e-4, 10, 3
    assert run_script('train.py', *train_args(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir),
                      '--batch_size=4', f'--max_iters={total}', f'--eval_interval={total}',
                      f'--learning_rate={max_lr}', f'--min_lr={min_lr}', f'--warmup_frac={warmup / total}',
                      '--grad_clip=0.05', '--weight_decay=0.1', '--unfreeze_layers=1') is None
    # linear warm-up over 3 steps to max_lr, then half a cosine from max_lr down towards min_lr
    expected = [max_lr * (it + 1) / warmup if it < warmup else
                min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (it - warmup) / (total - warmup))) / 2
                for it in range(total)]
    assert expected[:4] == pytest.approx([max_lr / 3, 2 * max_lr / 3, max_lr, max_lr])
    assert [step['lr'] for step in steps] == [pytest.approx([lr, lr], rel=1e-12) for lr in expected]
    # weight decay on the weight matrices of linear layers only: no embeddings, latents, queries, norms,
    # biases or gates
    model = built[0]
    linear_weights = {f'{name}.weight' for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name, p in trainable.items() if steps[0]['decay'].get(id(p)) == 0.1} == \
        linear_weights & trainable.keys()
    assert {name for name, p in trainable.items() if steps[0]['decay'].get(id(p)) == 0.0} == \
        trainable.keys() - linear_weights
    assert any(name.startswith('gpt.h.2.') for name in linear_weights & trainable.keys())  # unfrozen too
    # every step's gradient is clipped to norm 0.05 (unclipped, it is far above: see the first loss)
    assert [step['grad_norm'] for step in steps] == [pytest.approx(0.05, rel=1e-4)] * total


def test_long_captions_are_cut_and_still_end(data_dir):
    """max_caption_tokens=5: <|endoftext|> + the caption's first 4 tokens in, those 4 + <|endoftext|> out."""
    data = Captions(data_dir, 'train', 5)
    encoder = tiktoken.get_encoding('gpt2')
    ids = np.arange(len(data))
    _, _, tokens, targets, positions = data.batch(ids)
    references = [c for record in data.records() for c in record['captions']]  # in caption order
    for caption, row, target in zip(references, tokens, targets):
        words = encoder.encode(caption)
        assert len(words) > 4
        assert row.tolist() == [EOT] + words[:4]
        assert target.tolist() == words[:4] + [EOT]
    assert positions.tolist() == list(range(5 * len(ids)))  # every position has a target
    assert Captions(data_dir, 'train', 48).batch(ids[:1])[2][0].tolist() == [EOT] + encoder.encode(references[0])


@pytest.fixture(scope='module')
def overfit_run(tmp_path_factory, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    """A run whose validation loss falls, then rises: its validation captions name every picture's colour wrong
    (red for green, ...), so the better it learns the training captions the worse it does on them."""
    root = tmp_path_factory.mktemp('overfit')
    shutil.copytree(data_dir, root / 'data')
    captions = json.load(open(os.path.join(os.path.dirname(data_dir), 'captions_val.json')))
    wrong = {'red': 'green', 'green': 'blue', 'blue': 'yellow', 'yellow': 'red'}
    for annotation in captions['annotations']:
        annotation['caption'] = ' '.join(wrong.get(w, w) for w in annotation['caption'].split())
    (root / 'captions_val.json').write_text(json.dumps(captions))
    assert run_script('prepare_coco.py', f"--captions={root / 'captions_val.json'}",
                      f"--images={os.path.join(os.path.dirname(data_dir), 'val')}", f"--out_dir={root / 'data'}",
                      f'--vision_model={tiny_clip_dir}', '--num_workers=0') is None
    assert run_script('train.py', *train_args(root / 'run', root / 'data', tiny_clip_dir, tiny_gpt2_dir,
                                              '--batch_size=8', '--max_iters=150', '--eval_interval=25',
                                              '--learning_rate=5e-3', '--warmup_frac=0.05', '--unfreeze_layers=3',
                                              '--train_embeddings=True')) is None
    return root / 'run'


def test_best_checkpoint_is_the_lowest_validation_loss(overfit_run):
    evaluations = {r['iter']: r['val_loss'] for r in logs(overfit_run) if 'val_loss' in r}
    best_iter = min(evaluations, key=evaluations.get)
    assert best_iter != max(evaluations)  # the run's validation loss rose at the end: best.pt stayed behind
    best, last = (torch.load(f'{overfit_run}/{name}', weights_only=True) for name in ('best.pt', 'ckpt.pt'))
    assert best['iter_num'] == best_iter and last['iter_num'] == max(evaluations)
    assert best['best_val_loss'] == last['best_val_loss'] == pytest.approx(evaluations[best_iter], rel=1e-6)
    assert not torch.equal(best['model']['xattn.0.attn_gate'], last['model']['xattn.0.attn_gate'])


def test_logged_validation_scores_are_those_of_the_checkpoint(run_dir, data_dir):
    """The last evaluation's val_loss is the mean cross-entropy per target token over every validation
    caption (not a mean of batch means, not of training captions), and val_bleu4 and val_cider are
    eval_bleu's BLEU-4 and CIDEr-D of the greedy captions of the validation pictures."""
    import eval_bleu
    last = [r for r in logs(run_dir) if 'val_loss' in r][-1]
    model, _ = load_captioner(f'{run_dir}/ckpt.pt')  # written right after that evaluation
    val = Captions(data_dir, 'val', 48)
    features, mask, tokens, targets, _ = (torch.from_numpy(a) for a in val.batch(np.arange(len(val))))
    with torch.no_grad():
        _, loss = model(features, mask, tokens, targets)
    assert last['val_loss'] == pytest.approx(loss.item(), rel=1e-5)
    pictures = val.features(np.arange(4))
    captions = [caption_text(c) for c in generate(model, *(torch.from_numpy(a) for a in pictures), max_new_tokens=30)]
    references = [r['captions'] for r in val.records()]
    expected = eval_bleu.score(captions, references)
    assert last['val_bleu4'] == pytest.approx(expected['BLEU-4'], rel=1e-9)
    assert last['val_cider'] == pytest.approx(expected['CIDEr-D'], rel=1e-9)


def test_checkpoint_holds_only_trained_weights_and_loads_alone(run_dir, tiny_clip_dir):
    checkpoint = torch.load(f'{run_dir}/ckpt.pt', weights_only=True)
    model, _ = load_captioner(f'{run_dir}/ckpt.pt')
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert checkpoint['model'].keys() == trained.keys()
    assert {name.split('.')[0] for name in trained} == {'gpt', 'mapper', 'resampler', 'xattn'}  # no CLIP
    assert all(torch.equal(trained[name], checkpoint['model'][name]) for name in trained)
    # the frozen vision tower comes from the pretrained checkpoint the config names
    clip = load_vision(tiny_clip_dir).state_dict()
    assert all(torch.equal(tensor, clip[name]) for name, tensor in model.vision.state_dict().items())


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, dict(weights=torch.ones(1000)))
    with pytest.raises(Exception):  # a lambda cannot be pickled: the save fails after it has begun
        save_checkpoint(path, dict(weights=torch.zeros(1000), broken=lambda: 0))
    assert torch.equal(torch.load(path, weights_only=True)['weights'], torch.ones(1000))


@pytest.mark.parametrize('option, message', [
    ('--lerning_rate=1e-3', "config error: unknown config key 'lerning_rate' (in --lerning_rate=1e-3); "
                            "did you mean learning_rate?"),
    ('--batch_size=big', "config error: --batch_size=big: expected int, got 'big'"),
    # counts that would divide by zero, or never end the loop
    ('--batch_size=0', 'train.py: batch_size must be at least 1, not 0'),
    ('--gradient_accumulation_steps=0', 'train.py: gradient_accumulation_steps must be at least 1, not 0'),
    ('--max_iters=-1', 'train.py: max_iters must be at least 0, not -1'),
    ('--epochs=-2', 'train.py: epochs must be at least 0, not -2'),
    ('--eval_interval=0', 'train.py: eval_interval must be at least 1, not 0'),
    ('--log_interval=0', 'train.py: log_interval must be at least 1, not 0'),
])
def test_bad_settings_fail_in_one_line(option, message):
    assert run_script('train.py', option) == message


def test_data_of_another_vision_model_fails_in_one_line(tmp_path, data_dir, tiny_gpt2_dir):
    from transformers import CLIPConfig, CLIPModel
    other = CLIPConfig(vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=100, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    CLIPModel(other).save_pretrained(tmp_path / 'other_clip')
    message = run_script('train.py', f'--data_dir={data_dir}', f'--text_model={tiny_gpt2_dir}',
                         f"--vision_model={tmp_path / 'other_clip'}", '--device=cpu')
    meta = json.load(open(f'{data_dir}/meta.json'))
    assert message == (
        f"train.py: {data_dir}/meta.json: its features are from {meta['vision_model']!r}, not from vision_model "
        f"{str(tmp_path / 'other_clip')!r} (leave --vision_model out to train on them, or prepare the data with that "
        f"vision model)")


@pytest.mark.parametrize('script', ['train.py', 'bench.py'])
def test_the_model_settings_are_listed_once_in_model_py(script, capsys):
    """The model's settings are CaptionerConfig's fields: neither script copies them (train.py sets only the
    vision model's default), --help lists each with model.py's own line, and an override is checked against
    the field's type like any setting's."""
    import ast
    import dataclasses
    from model import CaptionerConfig
    names = [f.name for f in dataclasses.fields(CaptionerConfig)]
    assigned = {target.id for node in ast.parse(open(script).read()).body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    assert assigned & set(names) == ({'vision_model'} if script == 'train.py' else set())
    assert run_script(script, '--help') == 0
    out = capsys.readouterr().out
    model_lines = [line.strip() for line in open('model.py') if line.strip().split(':')[0] in names]
    assert len(model_lines) == len(names) and all(out.count(line) == 1 for line in model_lines)
    assert run_script(script, '--heads=many') == "config error: --heads=many: expected int, got 'many'"


def test_the_vision_model_is_the_one_that_made_the_features(tmp_path, data_dir, tiny_gpt2_dir):
    """Without --vision_model, train.py takes the CLIP that data_dir/meta.json names (no hub name is looked for)."""
    assert run_script('train.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', f'--text_model={tiny_gpt2_dir}',
                      '--num_latents=8', '--resampler_depth=1', '--heads=2', '--dim_head=16', '--max_iters=1',
                      '--batch_size=4', '--eval_captions=4', '--device=cpu') is None
    with open(f'{data_dir}/meta.json') as f:
        made_by = json.load(f)['vision_model']
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model_config']['vision_model'] == made_by


def test_resuming_a_finished_run_says_so(tmp_path, run_dir, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    shutil.copytree(run_dir, tmp_path / 'run')
    message = run_script('train.py', f"--out_dir={tmp_path / 'run'}", f'--data_dir={data_dir}',
                         f'--vision_model={tiny_clip_dir}', f'--text_model={tiny_gpt2_dir}', *RUN_OPTIONS,
                         '--init_from=resume')
    path = tmp_path / 'run' / 'ckpt.pt'
    assert message == (f'train.py: {path}: the run is finished (150 of 150 iterations); to train further, resume '
                       f'with more --epochs or --max_iters, or start a new run from it with --init_from={path} '
                       f'--out_dir=ANOTHER')


def test_logged_loss_after_a_resume_is_the_mean_since_the_resume(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
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


def test_logged_mfu_is_each_ranks_flops_against_its_own_gpu():
    """Under torchrun, every rank counts the FLOPs of its own micro batches on its own GPU: 8 ranks at 40% of
    their peaks log 40%, not 8 x 40%. (A window of 2 steps, 3 s, 1.2e15 FLOPs of one rank, a peak of 1e15.)"""
    import train
    window = train.Window(start=time.time() - 3.0, loss=torch.tensor(4.0), scst=torch.zeros(3), iters=2,
                          flops=1.2e15, captions=64)
    record = window.record(iter_num=2, lr=1e-4, peak=1e15, scst=False)
    assert record['mfu'] == pytest.approx(1.2e15 / 3.0 / 1e15, rel=0.01)


def test_resuming_in_float16_a_run_saved_in_another_dtype(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    """A float32 (or bfloat16) checkpoint has no gradient scale: resumed in float16, the scale starts afresh
    (GradScaler.load_state_dict refuses the empty state a disabled scaler saved)."""
    common = train_args(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir, '--batch_size=4', '--eval_interval=2')
    assert run_script('train.py', *common, '--max_iters=2', '--dtype=float32') is None
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['scaler'] == {}
    assert run_script('train.py', *common, '--max_iters=4', '--dtype=float16', '--init_from=resume') is None
    resumed = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert resumed['iter_num'] == 4 and resumed['scaler']['scale'] > 0


def test_start_up_says_the_device_and_what_dtype_auto_chose(tmp_path, data_dir, tiny_clip_dir, tiny_gpt2_dir):
    """One line at start-up: the device, and the dtype with the reason auto chose it. On a CPU, bfloat16 exactly
    when the CPU's flags (read here from /proc/cpuinfo, not from torch) show AVX512-BF16 or AMX."""
    args = train_args(tmp_path / 'run', data_dir, tiny_clip_dir, tiny_gpt2_dir, '--max_iters=2', '--eval_interval=2')
    auto = subprocess.run([sys.executable, 'train.py', *args, '--dtype=auto'], capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr[-3000:]
    flags = set(open('/proc/cpuinfo').read().split()) if os.path.exists('/proc/cpuinfo') else set()
    if flags & {'avx512_bf16', 'amx_bf16'}:
        expected = 'training on cpu in bfloat16: dtype=auto (this CPU multiplies bfloat16 natively)'
    else:
        expected = 'training on cpu in float32: dtype=auto (this CPU has no native bfloat16 (AVX512-BF16 or AMX))'
    assert auto.stdout.splitlines()[0] == expected
    chosen = subprocess.run([sys.executable, 'train.py', *args, '--dtype=float32', f"--out_dir={tmp_path / 'b'}"],
                            capture_output=True, text=True)
    assert chosen.stdout.splitlines()[0] == 'training on cpu in float32: dtype=float32'


def test_no_eta_until_the_pace_is_steady():
    """The first windows are warm-up, several times slower than the rest: an ETA from them is a fright. None is
    shown until two windows in a row run at one pace; from then on, each window's pace gives one."""
    import train
    paces, shown = [], []
    for seconds in (9.0, 3.0, 1.1, 1.0, 1.5):  # 10 iterations a window: warm-up, then a steady pace
        window = train.Window(start=time.time() - seconds, loss=torch.tensor(4.0), scst=torch.zeros(3), iters=10)
        record = window.record(iter_num=10 * (len(paces) + 1), lr=1e-4, peak=None, scst=False)
        shown.append(train.progress_line(record, total_iters=1250, paces=paces).rpartition(', ')[2])
    assert shown[:3] == ['0 captions/s'] * 3  # no ETA: 900, 300, 110 ms/iter are no steady pace
    assert shown[3:] == ['ETA 2.0 min', 'ETA 3.0 min']  # 1,210 iterations left at 100 ms, then 1,200 at 150 ms
