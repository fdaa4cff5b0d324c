"""A trained model shared as a folder without pickle (model.safetensors + config.json): written by train.py and
export.py, read by sample.py, eval_bleu.py and train.py --init_from, and refused in one line when it does not fit."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_script
from decode import generate
from weights import load_captioner


@pytest.fixture
def folder(tmp_path, run_dir):
    """export.py's folder of the session's best.pt."""
    assert run_script('export.py', f'--checkpoint={run_dir}/best.pt', f"--out={tmp_path / 'shared'}") is None
    return tmp_path / 'shared'


def test_the_folder_holds_the_trained_weights_alone_and_captions_as_the_checkpoint(folder, run_dir):
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    checkpoint = torch.load(f'{run_dir}/best.pt', weights_only=True)
    weights = load_file(folder / 'model.safetensors')  # safetensors' own reader: tensors only
    assert weights.keys() == checkpoint['model'].keys()
    assert all(torch.equal(weights[k], checkpoint['model'][k]) for k in weights)
    config = json.loads((folder / 'config.json').read_text())
    assert config['model_config'] == checkpoint['model_config']  # which names the frozen CLIP and GPT-2
    features = torch.randn(5, 1, 17, 32)
    from_pt, from_folder = load_captioner(f'{run_dir}/best.pt')[0], load_captioner(str(folder))[0]
    for decoding in ('greedy', 'beam'):
        assert generate(from_folder, features, decoding=decoding, max_new_tokens=12) == \
            generate(from_pt, features, decoding=decoding, max_new_tokens=12)


def test_train_writes_the_folder_beside_best_pt_and_scripts_read_it(run_dir, folder, data_dir, tmp_path):
    best = torch.load(f'{run_dir}/best.pt', weights_only=True)['model']
    written = load_file(f'{run_dir}/best/model.safetensors')
    assert written.keys() == best.keys() and all(torch.equal(written[k], best[k]) for k in best)
    shutil.copytree(folder, tmp_path / 'run' / 'best')
    assert run_script('eval_bleu.py', f"--out_dir={tmp_path / 'run'}", '--checkpoint=best', f'--data_dir={data_dir}',
                      '--split=val', '--decoding=greedy', '--max_new_tokens=4', '--device=cpu') is None
    assert json.loads((tmp_path / 'run' / 'metrics_val_greedy_best.json').read_text())['items'] == 4


def damaged(folder, change):
    weights = load_file(folder / 'model.safetensors')
    change(weights)
    save_file(weights, folder / 'model.safetensors')
    return folder


@pytest.mark.parametrize('change, words', [
    (lambda w: w.pop('xattn.0.attn_gate'), 'weights 1 missing (e.g. xattn.0.attn_gate)'),
    (lambda w: w.update(extra=torch.zeros(3)), 'weights 1 that are not part of it (e.g. extra)'),
    (lambda w: w.update({'xattn.0.attn_gate': torch.zeros(2)}),
     "weights 1 of another shape (e.g. xattn.0.attn_gate: [2], the model's [1])"),
])
def test_a_folder_of_missing_extra_or_misshaped_weights_fails_in_one_line(folder, change, words, tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(images / 'one.png')
    caption = [f'--out_dir={folder.parent}', '--checkpoint=shared', f'--images={images}', '--device=cpu',
               '--max_new_tokens=3']
    assert run_script('sample.py', *caption) is None  # whole, it loads and captions
    damaged(folder, change)
    message = run_script('sample.py', *caption)
    assert message.startswith(f'sample.py: {folder}: its weights do not fit') and words in message
    assert '\n' not in message


def test_a_config_naming_other_backbones_than_the_weights_fit_fails_in_one_line(folder, tmp_path, data_dir):
    """config.json names a GPT-2 of another width than the one the weights were trained with."""
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64)).save_pretrained(tmp_path / 'wide')
    config = json.loads((folder / 'config.json').read_text())
    config['model_config']['text_model'] = str(tmp_path / 'wide')
    (folder / 'config.json').write_text(json.dumps(config))
    message = run_script('train.py', f'--init_from={folder}', f"--out_dir={tmp_path / 'out'}", f'--data_dir={data_dir}',
                         '--device=cpu')
    assert message.startswith(f'train.py: {folder}: its weights do not fit the model its config describes (with the '
                              'CLIP and GPT-2 it names): weights ') and 'of another shape (e.g. ' in message


def test_not_a_model_folder_fails_in_one_line(folder, tmp_path):
    (tmp_path / 'a_file').write_text('')
    assert run_script('export.py', f'--checkpoint={folder}', f"--out={tmp_path / 'a_file'}") == \
        f"export.py: {tmp_path / 'a_file'}: a file, not a folder to write into"
    (folder / 'config.json').unlink()
    assert run_script('export.py', f'--checkpoint={folder}', f"--out={tmp_path / 'x'}") == \
        f'export.py: {folder}: not a nanocap model folder (no config.json)'
    (folder / 'config.json').write_text('{"format": "other"}')
    assert run_script('train.py', f'--init_from={folder}', f"--out_dir={tmp_path / 'out'}", '--device=cpu') == \
        f'train.py: {folder}/config.json: not the config.json of a nanocap model (no format "nanocap", model_config)'
    (folder / 'config.json').write_text(json.dumps(dict(format='nanocap', model_config={})))
    (folder / 'model.safetensors').write_bytes(b'\x00' * 10)
    message = run_script('train.py', f'--init_from={folder}', f"--out_dir={tmp_path / 'out'}", '--device=cpu')
    assert message.startswith(f'train.py: {folder}/model.safetensors: not a readable safetensors file (')


def test_the_model_card_says_what_the_model_is_what_it_learnt_from_and_how_it_scored(run_dir, data_dir, tmp_path):
    """best/README.md: the hub's metadata (library, task, the frozen models as base models where they are hub
    names), the data, the validation scores with train.py's command, and eval_bleu.py's scores with its own. The
    front matter is read back by PyYAML (which transformers depends on), as the hub reads it."""
    import yaml
    shutil.copytree(run_dir, tmp_path / 'run')
    card = (tmp_path / 'run' / 'best' / 'README.md').read_text()
    front, body = card.split('---\n')[1:3]
    meta = yaml.safe_load(front)
    assert meta['library_name'] == 'nanocap' and meta['pipeline_tag'] == 'image-to-text'
    assert meta['tags'] == ['image-captioning', 'clipcap', 'flamingo']
    assert 'base_model' not in meta  # the tiny stand-ins are local folders, not hub models
    config = json.loads((tmp_path / 'run' / 'best' / 'config.json').read_text())
    checkpoint = torch.load(f'{run_dir}/best.pt', weights_only=True)
    assert config['training']['iter_num'] == checkpoint['iter_num']
    assert f"On `{data_dir}`: train 16 images, 48 captions, val 4 images, 12 captions." in body
    assert f"Saved at iteration {checkpoint['iter_num']}; validation then: val_loss {checkpoint['best_val_loss']:.4f}" \
        in body
    assert '\n    python train.py --out_dir=' in body  # the command that trained it
    assert run_script('eval_bleu.py', f"--out_dir={tmp_path / 'run'}", f'--data_dir={data_dir}', '--split=val',
                      '--decoding=greedy', '--max_new_tokens=6', '--device=cpu') is None
    metrics = json.loads((tmp_path / 'run' / 'metrics_val_greedy.json').read_text())
    card = (tmp_path / 'run' / 'best' / 'README.md').read_text()
    assert f"| val_greedy | {100 * metrics['BLEU-1']:.2f} |" in card and '- val_greedy: `python eval_bleu.py --out_dir=' in card
    # a copy of the folder keeps its record: what it learnt from and how it scored
    assert run_script('export.py', f"--checkpoint={tmp_path / 'run' / 'best'}", f"--out={tmp_path / 'copy'}") is None
    assert (tmp_path / 'copy' / 'README.md').read_text().split('## Training')[1] == card.split('## Training')[1]
    # a model of hub checkpoints names them as its base models
    from weights import write_model_card
    config['model_config'].update(vision_model='openai/clip-vit-base-patch32', text_model='gpt2')
    write_model_card(tmp_path, config)
    meta = yaml.safe_load((tmp_path / 'README.md').read_text().split('---\n')[1])
    assert meta['base_model'] == ['openai/clip-vit-base-patch32', 'gpt2']
