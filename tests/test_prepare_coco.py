import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import features
import media
import prepare_coco
from common import InputError
from conftest import run_script, stored_features
from weights import load_vision


def save_image(path, size=(40, 30), color=(200, 30, 30), seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2] = color
    Image.fromarray(pixels).save(path)
    return path


def coco_file(tmp_path, image_files, name='captions_train2017.json'):
    """An official-format captions file: image i gets 5 captions, the first one 6, and an extra image
    without any caption is listed too (it must be left out)."""
    images = [dict(id=100 + i, file_name=f, height=30, width=40) for i, f in enumerate(image_files)]
    images.append(dict(id=999, file_name='uncaptioned.jpg', height=1, width=1))
    annotations = [dict(id=k, image_id=100 + i, caption=f' Image {i} caption {j}. \n')
                   for k, (i, j) in enumerate((i, j) for i in range(len(image_files))
                                              for j in range(6 if i == 0 else 5))]
    path = tmp_path / name
    path.write_text(json.dumps(dict(info={}, licenses=[], images=images, annotations=annotations)))
    return str(path)


def test_official_coco_format(tmp_path, capsys):
    path = coco_file(tmp_path, ['b.jpg', 'a.jpg'])
    splits = prepare_coco.load_captions(path, 'root')
    assert f'{path}: 1 of its 3 images have no caption and are left out: uncaptioned.jpg' in capsys.readouterr().err
    assert list(splits) == ['train']
    assert [(r['id'], r['file'], len(r['captions'])) for r in splits['train']] == \
        [(100, os.path.join('root', 'b.jpg'), 6), (101, os.path.join('root', 'a.jpg'), 5)]
    assert splits['train'][0]['captions'][0] == 'Image 0 caption 0.'
    val = prepare_coco.load_captions(coco_file(tmp_path, ['a.jpg'], 'captions_val2014.json'), 'r')
    assert list(val) == ['val']


def test_karpathy_format(tmp_path):
    def image(i, split):
        return dict(filepath='val2014', filename=f'{i}.jpg', imgid=i, split=split, cocoid=1000 + i,
                    sentids=[i], sentences=[dict(tokens=['a'], raw=f'A {i}.', imgid=i, sentid=i)])
    path = tmp_path / 'dataset_coco.json'
    path.write_text(json.dumps(dict(dataset='coco', images=[
        image(0, 'train'), image(1, 'restval'), image(2, 'val'), image(3, 'test')])))
    splits = prepare_coco.load_captions(str(path), 'coco')
    assert {k: [r['id'] for r in v] for k, v in splits.items()} == \
        {'train': [1000, 1001], 'val': [1002], 'test': [1003]}
    assert splits['val'][0]['file'] == os.path.join('coco', 'val2014', '2.jpg')


def test_real_coco2014_excerpt_parses():  # Flickr8k's: in test_own_captions.py
    shared = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'schema_samples')
    if not os.path.isdir(shared):
        pytest.skip('no ../shared beside the repository')
    coco = prepare_coco.load_captions(os.path.join(shared, 'coco2014_captions_val2014_excerpt.json'), '.')
    assert len(coco['val']) == 50 and sum(len(r['captions']) for r in coco['val']) == 260


def test_wrong_schema_fails_in_one_line(tmp_path):
    path = tmp_path / 'other.json'
    path.write_text(json.dumps(dict(images=[dict(id=1)])))
    with pytest.raises(InputError, match=r'other.json: expected the official COCO captions format') as e:
        prepare_coco.load_captions(str(path), '.')
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('size', [(40, 30), (30, 97), (224, 224), (640, 427)])
def test_preprocessing_matches_clip_image_processor(tmp_path, size):
    from transformers import CLIPImageProcessor
    image = Image.open(save_image(tmp_path / 'x.png', size))
    expected = CLIPImageProcessor()(images=image, return_tensors='np')['pixel_values'][0]
    ours = media.clip_preprocess(image.convert('RGB'))
    assert ours.shape == (3, 224, 224)
    assert np.abs(ours - expected).max() <= 1e-5


def test_every_mode_becomes_rgb(tmp_path):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    modes = {'L': 'png', 'LA': 'png', 'P': 'png', 'RGBA': 'png', 'CMYK': 'jpg', 'I;16': 'png'}
    for mode, ext in modes.items():
        path = tmp_path / f'{mode.replace(";", "")}.{ext}'
        base.convert(mode).save(path)
        image = media.load_rgb(path)
        assert image.mode == 'RGB' and image.size == (30, 20), mode
    sixteen = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    sixteen.save(tmp_path / 'bright16.png')
    assert np.asarray(media.load_rgb(tmp_path / 'bright16.png')).max() == 255  # scaled, not clipped


# What a viewer shows of stored pixels [rows, columns, 3] for each EXIF orientation, as the EXIF spec defines
# them: where the stored first row and first column belong.
UPRIGHT = {1: lambda a: a,  # as stored
           2: lambda a: a[:, ::-1],  # mirrored left to right
           3: lambda a: a[::-1, ::-1],  # turned 180 degrees
           4: lambda a: a[::-1],  # mirrored top to bottom
           5: lambda a: a.transpose(1, 0, 2),  # first row on the left, first column on top
           6: lambda a: np.rot90(a, -1),  # turned 90 degrees clockwise
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # first row on the right, first column at the bottom
           8: lambda a: np.rot90(a)}  # turned 90 degrees counter-clockwise


@pytest.mark.parametrize('ext, tolerance', [('png', 0), ('jpg', 8)])
def test_exif_orientation_is_applied(tmp_path, ext, tolerance):
    """Every orientation, on six blocks of different colours (no symmetry maps it onto itself), in PNG
    (lossless: exact) and JPEG (5 levels off on average, at the blocks' edges; a wrong turn is 100 off)."""
    colours = np.array([[(250, 0, 0), (0, 250, 0), (0, 0, 250)], [(250, 250, 0), (0, 250, 250), (250, 0, 250)]],
                       dtype=np.uint8)
    stored = colours.repeat(16, axis=0).repeat(16, axis=1)  # 32 x 48 pixels
    for orientation, upright in UPRIGHT.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f'{orientation}.{ext}'
        Image.fromarray(stored).save(path, exif=exif)
        shown = np.asarray(media.load_rgb(path), dtype=np.int16)
        expected = upright(stored).astype(np.int16)
        assert shown.shape == expected.shape and np.abs(shown - expected).mean() <= tolerance, orientation


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    files = [save_image(folder / f'{i}.jpg', (40 + 9 * i, 30), seed=i).name for i in range(5)]
    return coco_file(tmp_path, files), str(folder)


def run_prepare(dataset, out_dir, clip_dir, **options):
    splits = prepare_coco.load_captions(*dataset)
    return features.write_image_splits(splits, str(out_dir), load_vision(clip_dir), clip_dir, batch_size=2,
                                   workers=0, skip_bad=options.get('skip_bad', False))


def test_features_and_captions_round_trip(tmp_path, dataset, tiny_clip_dir):
    import tiktoken
    meta = run_prepare(dataset, tmp_path / 'out', tiny_clip_dir)
    assert meta['splits'] == {'train': dict(images=5, captions=26)}
    feats = stored_features(tmp_path / 'out' / 'train_feats.bin')
    assert len(feats) == 5
    records = prepare_coco.load_captions(*dataset)['train']
    pixels = torch.tensor(np.stack([media.clip_preprocess(media.load_rgb(r['file']), 32)
                                    for r in records]))
    with torch.no_grad():
        expected = load_vision(tiny_clip_dir)(pixel_values=pixels).last_hidden_state
    assert torch.allclose(torch.tensor(feats.astype(np.float32)), expected, atol=2e-3)
    tokens = np.fromfile(tmp_path / 'out' / 'train_tokens.bin', dtype=np.uint16)
    index = np.load(tmp_path / 'out' / 'train_captions.npy')
    assert index.shape == (26, 3)
    assert index[:, 2].tolist() == [0] * 6 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
    encoder = tiktoken.get_encoding('gpt2')
    offset, length, image = index[7]
    assert encoder.decode(tokens[offset:offset + length].tolist()) == records[image]['captions'][1]
    assert not any(name.endswith(('.tmp', '.partial', '.progress')) for name in os.listdir(tmp_path / 'out'))


class Interrupted(Exception):
    pass


def test_interrupted_extraction_resumes(tmp_path, dataset, tiny_clip_dir, monkeypatch):
    run_prepare(dataset, tmp_path / 'clean', tiny_clip_dir)
    real_model_call = type(load_vision(tiny_clip_dir)).forward
    calls, crash = [], [True]

    def crash_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and crash[0]:
            raise Interrupted
        return real_model_call(self, *args, **kwargs)
    monkeypatch.setattr(type(load_vision(tiny_clip_dir)), 'forward', crash_on_second_batch)
    with pytest.raises(Interrupted):
        run_prepare(dataset, tmp_path / 'resumed', tiny_clip_dir)
    assert not os.path.exists(tmp_path / 'resumed' / 'train_feats.bin')  # nothing half-written in place
    calls.clear()
    crash[0] = False
    run_prepare(dataset, tmp_path / 'resumed', tiny_clip_dir)
    assert len(calls) == 2  # images 3-4 and 5: the first batch was not redone
    clean = (tmp_path / 'clean' / 'train_feats.bin').read_bytes()
    assert (tmp_path / 'resumed' / 'train_feats.bin').read_bytes() == clean


def test_bad_images_are_named_or_skipped(tmp_path, dataset, tiny_clip_dir):
    captions_path, folder = dataset
    os.remove(os.path.join(folder, '0.jpg'))  # missing
    open(os.path.join(folder, '1.jpg'), 'w').close()  # empty
    data = open(os.path.join(folder, '2.jpg'), 'rb').read()
    open(os.path.join(folder, '2.jpg'), 'wb').write(data[:len(data) // 2])  # truncated
    open(os.path.join(folder, '3.jpg'), 'w').write('not an image')
    with pytest.raises(InputError) as e:
        run_prepare(dataset, tmp_path / 'out', tiny_clip_dir)
    message = str(e.value)
    assert message.startswith('4 unusable image(s) in split train')
    for name, why in [('0.jpg', 'missing'), ('1.jpg', 'empty file'), ('2.jpg', 'not a readable image'),
                      ('3.jpg', 'not a readable image')]:
        assert f'{os.path.join(folder, name)}: {why}' in message
    meta = run_prepare(dataset, tmp_path / 'out', tiny_clip_dir, skip_bad=True)
    assert meta['splits'] == {'train': dict(images=1, captions=5)}


def test_torchrun_ranks_share_the_work(tmp_path, dataset, tiny_clip_dir):
    """Two gloo ranks, each extracting a slice into the same files, write what one process writes
    (the features up to float rounding: the ranks batch the images differently)."""
    import subprocess
    import sys
    captions_path, folder = dataset
    run_prepare(dataset, tmp_path / 'ranks1', tiny_clip_dir)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    'prepare_coco.py', f'--captions={captions_path}', f'--images={folder}',
                    f"--out_dir={tmp_path / 'ranks2'}", f'--vision_model={tiny_clip_dir}', '--num_workers=0',
                    '--batch_size=2', '--device=cpu'],
                   check=True, capture_output=True)
    outputs = {ranks: {name: (tmp_path / f'ranks{ranks}' / name).read_bytes() for name in
                       ('train_tokens.bin', 'train_captions.npy', 'train_images.json')} for ranks in (1, 2)}
    feats1, feats2 = (stored_features(tmp_path / f'ranks{ranks}' / 'train_feats.bin') for ranks in (1, 2))
    assert outputs[1] == outputs[2]
    assert (np.abs(feats2.reshape(5, -1)).sum(1) > 0).all()  # every rank wrote its slice
    assert np.allclose(feats1, feats2, atol=2e-3)


def test_splits_from_separate_runs_share_meta_json(tmp_path, dataset, tiny_clip_dir):
    train_captions, folder = dataset
    val_captions = coco_file(tmp_path, ['0.jpg', '1.jpg'], 'captions_val2017.json')
    out_dir = tmp_path / 'out'

    def run(captions_path, vision_model):
        return run_script('prepare_coco.py', f'--captions={captions_path}', f'--images={folder}',
                          f'--out_dir={out_dir}', f'--vision_model={vision_model}', '--num_workers=0')
    assert run(train_captions, tiny_clip_dir) is None
    assert run(val_captions, tiny_clip_dir) is None
    meta = json.loads((out_dir / 'meta.json').read_text())
    assert {k: (v['images'], v['captions']) for k, v in meta['splits'].items()} == \
        {'train': (5, 26), 'val': (2, 11)}
    assert (meta['tokens_per_image'], meta['feature_dim'], meta['vision_model']) == (17, 32, tiny_clip_dir)
    assert run(val_captions, str(tmp_path / 'other_clip')) == (
        f"prepare_coco.py: {out_dir / 'meta.json'} holds features of {tiny_clip_dir!r} (format 1); use another "
        f"--out_dir for {str(tmp_path / 'other_clip')!r}")
