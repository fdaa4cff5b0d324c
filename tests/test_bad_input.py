"""
Every input a user hands a script, broken the ways real files break: each must end the script with one
line that names the script, the file (and the entry or key) and what is wrong, and leave every good
file as it was. Any other exception is a bug: run_script lets it through, and the test fails on it.
"""
import json
import os
import pickle
import shutil

import pytest
import torch
from PIL import Image

from conftest import run_script

BAD = {}  # case name -> function(tmp_path, fixtures) -> (script, args, the file it must name, words it must say)


def case(function):
    BAD[function.__name__] = function
    return function


def coco_dataset(root, annotations=None, images=None):
    """A folder of 2 images and an official-format captions file, with these annotations/images."""
    (root / 'images').mkdir(exist_ok=True)
    for i in range(2):
        Image.new('RGB', (32, 32), (40 * i, 90, 200)).save(root / 'images' / f'{i}.png')
    images = images if images is not None else [dict(id=i, file_name=f'{i}.png') for i in range(2)]
    if annotations is None:
        annotations = [dict(id=i, image_id=i % 2, caption=f'a caption {i}') for i in range(4)]
    path = root / 'captions_train.json'
    path.write_text(json.dumps(dict(images=images, annotations=annotations)))
    return path


def prepare_args(captions, root, f):
    return 'prepare_coco.py', [f'--captions={captions}', f"--images={root / 'images'}", f"--out_dir={root / 'out'}",
                               f"--vision_model={f['tiny_clip_dir']}", '--num_workers=0', '--device=cpu']


# ----------------------------------------------------------------------------- prepare_coco.py

@case
def captions_file_missing(root, f):
    coco_dataset(root)
    return (*prepare_args(root / 'nope.json', root, f), root / 'nope.json', 'no such captions file')


@case
def captions_not_json(root, f):
    path = coco_dataset(root)
    path.write_text(path.read_text()[:-40])  # cut short
    return (*prepare_args(path, root, f), path, 'not valid JSON')


@case
def annotation_without_caption(root, f):
    path = coco_dataset(root, annotations=[dict(id=0, image_id=0, caption='a cat'), dict(id=1, image_id=1)])
    return (*prepare_args(path, root, f), path, 'annotations[1] has no caption')


@case
def annotation_without_image_id(root, f):
    path = coco_dataset(root, annotations=[dict(id=0, caption='a cat')])
    return (*prepare_args(path, root, f), path, 'annotations[0] has no image_id')


@case
def captions_of_no_listed_image(root, f):
    path = coco_dataset(root, annotations=[dict(id=0, image_id=7, caption='a cat')])
    return (*prepare_args(path, root, f), path, 'annotations[0] is a caption of image_id 7, which images[]')


@case
def image_without_file_name(root, f):
    path = coco_dataset(root, images=[dict(id=0, file_name='0.png'), dict(id=1)])
    return (*prepare_args(path, root, f), path, 'images[1] has no file_name')


@case
def karpathy_sentence_without_raw(root, f):
    coco_dataset(root)
    path = root / 'dataset_coco.json'
    path.write_text(json.dumps(dict(images=[dict(filename='0.png', split='train', sentences=[
        dict(tokens=['a', 'cat'])])])))
    return (*prepare_args(path, root, f), path, 'images[0].sentences[0] has no raw')


@case
def karpathy_image_without_split(root, f):
    coco_dataset(root)
    path = root / 'dataset_coco.json'
    path.write_text(json.dumps(dict(images=[dict(filename='0.png', sentences=[dict(raw='a cat')])])))
    return (*prepare_args(path, root, f), path, 'images[0] has no split')


@case
def images_folder_missing(root, f):
    path = coco_dataset(root)
    script, args = prepare_args(path, root, f)
    return script, [a for a in args if not a.startswith('--images')] + [f"--images={root / 'pics'}"], \
        root / 'pics', 'no such folder'


@case
def vision_model_is_a_gpt2(root, f):
    script, args = prepare_args(coco_dataset(root), root, f)
    return script, args + [f"--vision_model={f['tiny_gpt2_dir']}"], f['tiny_gpt2_dir'], \
        'a gpt2 checkpoint, not a CLIP model'


@case
def vision_model_folder_missing(root, f):
    script, args = prepare_args(coco_dataset(root), root, f)
    return script, args + [f"--vision_model={root / 'models' / 'clip'}"], root / 'models' / 'clip', \
        'no such directory (nor a model name on the Hugging Face hub)'


@case
def vision_model_without_weights(root, f):
    shutil.copytree(f['tiny_clip_dir'], root / 'clip')
    os.remove(root / 'clip' / 'model.safetensors')
    script, args = prepare_args(coco_dataset(root), root, f)
    return script, args + [f"--vision_model={root / 'clip'}"], root / 'clip', 'cannot load the weights'


@case
def existing_meta_json_broken(root, f):
    path = coco_dataset(root)
    (root / 'out').mkdir()
    (root / 'out' / 'meta.json').write_text('{"splits": ')
    return (*prepare_args(path, root, f), root / 'out' / 'meta.json', 'not valid JSON')


@case
def device_unknown(root, f):
    script, args = prepare_args(coco_dataset(root), root, f)
    return script, args + ['--device=gpu'], "device='gpu'", 'is not a device'


# ----------------------------------------------------------------------------- train.py

def train_args(data, root, f, *options):
    return 'train.py', [f'--data_dir={data}', f"--out_dir={root / 'run'}", f"--vision_model={f['tiny_clip_dir']}",
                        f"--text_model={f['tiny_gpt2_dir']}", '--device=cpu', '--max_iters=1', '--batch_size=4',
                        '--num_latents=8', '--resampler_depth=1', '--heads=2', '--dim_head=16', *options]


@case
def vision_model_other_than_the_features(root, f):
    script, args = train_args(f['data_dir'], root, f)
    return script, args + ['--vision_model=openai/clip-vit-base-patch32'], f"{f['data_dir']}/meta.json", (
        f"its features are from {f['tiny_clip_dir']!r}, not from vision_model 'openai/clip-vit-base-patch32'")


def broken_data(root, f, name, damage):
    """A copy of the prepared data with the file `name` damaged by damage(path)."""
    data = root / 'data'
    shutil.copytree(f['data_dir'], data)
    damage(data / name)
    return data, data / name


def cut_short(path):
    path.write_bytes(path.read_bytes()[:os.path.getsize(path) // 2])


@case
def meta_json_not_json(root, f):
    data, path = broken_data(root, f, 'meta.json', lambda p: p.write_text('{"vision_model": "x",'))
    return (*train_args(data, root, f), path, 'not valid JSON')


@case
def meta_json_without_splits(root, f):
    data, path = broken_data(root, f, 'meta.json', lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != 'splits'})))
    return (*train_args(data, root, f), path, 'no splits')


@case
def data_dir_missing(root, f):
    return (*train_args(root / 'nodata', root, f), root / 'nodata' / 'meta.json', 'not found')


@case
def features_cut_short(root, f):
    data, path = broken_data(root, f, 'train_feats.bin', cut_short)
    return (*train_args(data, root, f), path, 'bytes, but meta.json describes 16 x 17 x 32 float16')


@case
def features_missing(root, f):
    data, path = broken_data(root, f, 'val_feats.bin', os.remove)
    return (*train_args(data, root, f), path, 'missing')


@case
def tokens_cut_short(root, f):
    data, path = broken_data(root, f, 'train_tokens.bin', cut_short)
    return (*train_args(data, root, f), data / 'train_captions.npy', 'captions outside the')


@case
def caption_index_not_npy(root, f):
    data, path = broken_data(root, f, 'train_captions.npy', lambda p: p.write_text('not numpy'))
    return (*train_args(data, root, f), path, 'not a readable .npy table')


@case
def caption_index_of_another_split(root, f):
    data, path = broken_data(root, f, 'val_captions.npy',
                             lambda p: shutil.copy(p.parent / 'train_captions.npy', p))
    return (*train_args(data, root, f), path, 'expected int64 [12, 3]')


def resume_args(root, f, damage):
    """train.py resuming a copy of the training run whose ckpt.pt damage(path) broke, and that path."""
    shutil.copytree(f['run_dir'], root / 'run')
    damage(root / 'run' / 'ckpt.pt')
    return (*train_args(f['data_dir'], root, f, '--init_from=resume'), root / 'run' / 'ckpt.pt')


@case
def resume_from_truncated_checkpoint(root, f):
    return (*resume_args(root, f, cut_short), 'not a readable nanocap checkpoint')


def weight_of_another_shape(path):
    """One trained weight one row short, as in a checkpoint of GPT-2's unpadded vocabulary."""
    checkpoint = torch.load(path, weights_only=True)
    name = sorted(checkpoint['model'])[0]
    checkpoint['model'][name] = checkpoint['model'][name][:-1]
    torch.save(checkpoint, path)


@case
def resume_from_checkpoint_of_other_shapes(root, f):
    return (*resume_args(root, f, weight_of_another_shape),
            'its weights do not fit the model its config describes (with the CLIP and GPT-2 it names): weights 1 of '
            'another shape (e.g. ')


@case
def text_model_is_a_clip(root, f):
    script, args = train_args(f['data_dir'], root, f)
    return script, args + [f"--text_model={f['tiny_clip_dir']}"], f['tiny_clip_dir'], 'a clip checkpoint, not a GPT-2'


# ----------------------------------------------------------------------------- sample.py and eval_bleu.py

def run_copy(root, f, damage=None):
    """A copy of the training run, its best.pt damaged by damage(path)."""
    shutil.copytree(f['run_dir'], root / 'run')
    if damage:
        damage(root / 'run' / 'best.pt')
    return root / 'run', root / 'run' / 'best.pt'


def sample_args(run, root, *more):
    Image.new('RGB', (32, 32), 'red').save(root / 'red.png')
    return 'sample.py', [f'--out_dir={run}', f"--images={root / 'red.png'}", '--num_workers=0', '--device=cpu',
                         f"--json={root / 'captions.json'}", *more]


def eval_args(run, data, *more):
    return 'eval_bleu.py', [f'--out_dir={run}', f'--data_dir={data}', '--split=val', '--device=cpu',
                            '--decoding=greedy', '--max_new_tokens=3', *more]


@case
def checkpoint_truncated(root, f):
    run, path = run_copy(root, f, cut_short)
    return (*sample_args(run, root), path, 'not a readable nanocap checkpoint: a zip archive cut short')


@case
def checkpoint_not_a_zip(root, f):
    run, path = run_copy(root, f, lambda p: p.write_bytes(b'\x07' + os.urandom(1000)))
    return (*eval_args(run, f['data_dir']), path, 'not a readable nanocap checkpoint: not a file torch.save wrote')


@case
def checkpoint_empty(root, f):
    run, path = run_copy(root, f, lambda p: p.write_bytes(b''))
    return (*eval_args(run, f['data_dir']), path, 'not a readable nanocap checkpoint: an empty file')


@case
def init_from_a_json_file(root, f):
    script, args = train_args(f['data_dir'], root, f)
    captions = os.path.join(f['data_dir'], 'val_images.json')
    return script, args + [f'--init_from={captions}'], captions, 'not a readable nanocap checkpoint: a JSON file'


class Payload:
    def __reduce__(self):
        return print, ('this ran',)


@case
def checkpoint_holding_python_objects(root, f):
    run, path = run_copy(root, f, lambda p: torch.save(dict(model={}, code=Payload()), p))
    return (*eval_args(run, f['data_dir']), path, 'not a readable nanocap checkpoint: it holds Python objects '
            'besides tensors (such as print), and loading those could run code: refused')


@case
def checkpoint_of_something_else(root, f):
    run, path = run_copy(root, f, lambda p: torch.save({'state_dict': {'w': torch.zeros(2)}}, p))
    return (*sample_args(run, root), path, 'not a checkpoint of train.py (no model, model_config')


@case
def checkpoint_of_another_version(root, f):
    def damage(path):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint['model_config']['vision_pooling'] = 'mean'
        torch.save(checkpoint, path)
    run, path = run_copy(root, f, damage)
    return (*sample_args(run, root), path, "model_config has an unknown setting 'vision_pooling' (not one of this "
            "version of model.py)")


@case
def checkpoint_of_other_shapes(root, f):
    run, path = run_copy(root, f, weight_of_another_shape)
    return (*sample_args(run, root), path, 'its weights do not fit the model its config describes (with the CLIP '
            'and GPT-2 it names): weights 1 of another shape (e.g. ')


@case
def checkpoint_pickle_not_torch(root, f):
    run, path = run_copy(root, f, lambda p: p.write_bytes(pickle.dumps({'model': 1})))
    return (*sample_args(run, root), path, 'not a readable nanocap checkpoint: a pickle, but not one torch.save')


@case
def reference_captions_not_json(root, f):
    data, path = broken_data(root, f, 'val_images.json', cut_short)
    run, _ = run_copy(root, f)
    return (*eval_args(run, data), path, 'not valid JSON')


@case
def reference_captions_of_another_split(root, f):
    data, path = broken_data(root, f, 'val_images.json',
                             lambda p: shutil.copy(p.parent / 'train_images.json', p))
    run, _ = run_copy(root, f)
    return (*eval_args(run, data), path, 'expected a list of 4')


@case
def evaluated_split_missing(root, f):
    run, _ = run_copy(root, f)
    script, args = eval_args(run, f['data_dir'])
    return script, args + ['--split=test'], f"{f['data_dir']}/meta.json", "no split 'test'"


def model_folder(root, f, change):
    """A copy of the run with best/ (its model folder) whose config.json's model_config change(settings) edited."""
    run, _ = run_copy(root, f)
    path = run / 'best' / 'config.json'
    config = json.loads(path.read_text())
    change(config['model_config'])
    path.write_text(json.dumps(config))
    return run, path


@case
def model_folder_setting_of_another_type(root, f):
    run, path = model_folder(root, f, lambda c: c.update(heads='2'))
    return (*sample_args(run, root, '--checkpoint=best'), path, "model_config.heads must be a whole number, not '2'")


@case
def model_folder_setting_out_of_range(root, f):
    run, path = model_folder(root, f, lambda c: c.update(num_latents=0))
    script, args = train_args(f['data_dir'], root, f, f"--init_from={run / 'best'}")
    return script, args, path, 'model_config.num_latents must be a whole number of at least 1, not 0'


@case
def model_folder_unknown_setting(root, f):
    run, path = model_folder(root, f, lambda c: c.update(num_latent=c.pop('num_latents')))
    return (*sample_args(run, root, '--checkpoint=best'), path,
            "model_config has an unknown setting 'num_latent' (not one of this version of model.py); did you mean "
            "num_latents?")


@case
def model_folder_of_an_unknown_choice(root, f):
    run, path = model_folder(root, f, lambda c: c.update(media_attention='all'))
    return (*eval_args(run, f['data_dir'], '--checkpoint=best'), path,
            "model_config.media_attention must be 'latest' or 'earlier', not 'all'")


# ----------------------------------------------------------------------------- where a script writes

@case
def export_into_a_path_under_a_file(root, f):
    (root / 'a_file').write_text('')
    out = root / 'a_file' / 'model'
    return 'export.py', [f"--checkpoint={f['run_dir']}/best.pt", f'--out={out}'], out, f"cannot be made, {root / 'a_file'} is a file"


@case
def html_page_into_a_folder(root, f):
    run, _ = run_copy(root, f)
    (root / 'page.html').mkdir()
    script, args = sample_args(run, root, f"--html={root / 'page.html'}")
    return script, args, root / 'page.html', 'a folder, not a file to write'


@case
def json_into_a_folder_that_is_not_there(root, f):
    run, _ = run_copy(root, f)
    script, args = sample_args(run, root, f"--json={root / 'no' / 'captions.json'}")
    return script, args, root / 'no' / 'captions.json', f"no folder {root / 'no'} to write it in"


@case
def train_out_dir_is_a_file(root, f):
    script, args = train_args(f['data_dir'], root, f)
    (root / 'run').write_text('')
    return script, args, root / 'run', 'a file, not a folder to write into'


def snapshot(folder):
    """{path: bytes} of every file below folder."""
    return {os.path.join(d, n): open(os.path.join(d, n), 'rb').read()
            for d, _, names in os.walk(folder) for n in names}


@pytest.mark.parametrize('name', sorted(BAD))
def test_bad_input_fails_in_one_line_naming_the_file(name, tmp_path, tiny_clip_dir, tiny_gpt2_dir, data_dir,
                                                      run_dir, capsys):
    fixtures = dict(tiny_clip_dir=tiny_clip_dir, tiny_gpt2_dir=tiny_gpt2_dir, data_dir=data_dir, run_dir=run_dir)
    script, args, culprit, words = BAD[name](tmp_path, fixtures)
    before = snapshot(tmp_path)
    message = run_script(script, *args)
    assert isinstance(message, str), f'{script} exited with {message!r}: it should have failed in one line'
    assert '\n' not in message and message.startswith(f'{script}: '), message
    assert str(culprit) in message and words in message, message
    assert 'weights_only' not in message and 'code execution' not in message  # torch's advice to load unsafely
    capsys.readouterr()
    # nothing good was touched: the only files that may appear are those of a run that never started
    after = snapshot(tmp_path)
    assert {p: after[p] for p in before if p in after} == before
    assert not [p for p in after if p not in before and not p.endswith('log.jsonl')], after.keys() - before.keys()


# ----------------------------------------------------------------------------- decoding and batching settings

# the settings of sample.py and eval_bleu.py that have no range to check: names, paths, switches and seeds
UNRANGED = {'out_dir', 'checkpoint', 'images', 'videos', 'json', 'html', 'device', 'seed', 'shots_data', 'shots_split',
            'data_dir', 'split', 'official', 'shots_seed'}
# every other setting, with values outside its range (as written on the command line: 1e999 is infinity)
OUT_OF_RANGE = {'decoding': ['topk'], 'beam_width': ['0', '-1'], 'max_new_tokens': ['0', '-1'],
                'temperature': ['0', '-0.5', '1e999'], 'top_k': ['-1'], 'top_p': ['0', '1.5', '-0.1'],
                'num_samples': ['0'], 'batch_size': ['0'], 'num_workers': ['-1'], 'max_frames': ['0'], 'shots': ['-1'],
                'max_items': ['-1'], 'pixels_gb': ['0', '-1.5'], 'cpu_weights': ['int4', 'float16'],
                'rerank': ['blip']}


def settings_of(script):
    """The settings a script takes (its module's plain lower-case globals, as configurator reads them)."""
    import importlib
    from configurator import is_setting
    module = importlib.import_module(script.removesuffix('.py'))
    return {k for k, v in vars(module).items() if is_setting(k, v) and not isinstance(getattr(module, k), type)}


@pytest.mark.parametrize('script', ['sample.py', 'eval_bleu.py'])
def test_every_decoding_and_batching_setting_is_checked_before_anything_loads(script, tmp_path):
    """Each value outside its setting's range stops the script with one line naming the setting, before it
    loads a model (there is none to load here). A new setting must be listed above, ranged or not."""
    settings = settings_of(script)
    assert settings - UNRANGED - set(OUT_OF_RANGE) == set(), 'a new setting: give its bad values here'
    checked = sorted(settings - UNRANGED)
    assert len(checked) >= (9 if script == 'sample.py' else 5)
    for name in checked:
        for value in OUT_OF_RANGE[name]:
            message = run_script(script, f'--out_dir={tmp_path}/no_run', f'--{name}={value}')
            assert isinstance(message, str) and message.startswith(f'{script}: {name} must be '), (name, message)
            assert '\n' not in message, message
