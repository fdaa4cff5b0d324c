import random
import subprocess
import sys

import numpy as np

import media
import prepare_shapes
from conftest import run_script
from weights import load_gpt2, load_vision


def test_every_shape_is_drawn_in_its_colour_and_cell():
    rng = random.Random(0)
    for _ in range(50):
        scene = prepare_shapes.random_scene(rng)
        assert 1 <= len(scene) <= 3 and len({s['cell'] for s in scene}) == len(scene)
        pixels = np.asarray(prepare_shapes.draw(scene, 224))
        cell = 224 / 3
        for shape in scene:
            row, col = shape['cell']
            centre = pixels[int((row + 0.5) * cell), int((col + 0.5) * cell)]
            assert tuple(centre) == prepare_shapes.COLOURS[shape['colour']]
        assert (pixels == 255).all(axis=2).mean() > 0.3  # a white background around them


def test_captions_are_five_different_paraphrases_that_describe_the_scene():
    rng = random.Random(1)
    scene = [dict(kind='circle', colour='red', size='large', cell=(0, 0)),
             dict(kind='square', colour='blue', size='small', cell=(2, 2))]
    captions = prepare_shapes.captions_for(scene, rng)
    assert len(set(captions)) == 5
    for caption in captions:
        assert caption[0].isupper() and caption.endswith('.')
        assert 'green' not in caption and 'triangle' not in caption
    one = [dict(kind='triangle', colour='yellow', size='small', cell=(1, 1))]
    for caption in prepare_shapes.captions_for(one, rng):
        assert 'yellow' in caption and 'triangle' in caption


def test_relations_and_counts():
    a = dict(kind='circle', cell=(0, 0))
    b = dict(kind='circle', cell=(2, 0))
    c = dict(kind='square', cell=(1, 2))
    assert prepare_shapes.relation(a, c) == 'to the left of'
    assert prepare_shapes.relation(a, b) == 'above' and prepare_shapes.relation(b, a) == 'below'
    assert prepare_shapes.count_phrase([a, b, c]) == 'two circles and a square'


def digest(model):
    """A short hash of every weight of a model, by name."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        h.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_the_stand_ins_are_drawn_by_their_seed_alone():
    """The demo's stand-ins are this project's draws, not transformers' initialisation (which differs between its
    versions): the hashes of the seed-1337 stand-ins, computed with transformers 4.45.2 and 5.25.0, must not move."""
    assert digest(prepare_shapes.stand_in_clip(prepare_shapes.vision_size, 1337)) == '701792bb8298764a'
    assert digest(prepare_shapes.stand_in_gpt2(1337)) == '9d10e24caad63844'
    assert digest(prepare_shapes.stand_in_gpt2(1338)) != '9d10e24caad63844'


def test_script_is_deterministic_and_writes_what_prepare_coco_would(tmp_path):
    outputs = []
    for run in ('first', 'second'):
        out = tmp_path / run
        assert run_script('prepare_shapes.py', f'--out_dir={out}', f'--features_dir={out}_clip', '--num_train=6',
                          '--num_val=2', '--num_test=2', '--num_workers=0') is None
        # the files, their paths and the paths in them with the run's name left out
        outputs.append({str(p.relative_to(tmp_path)).replace(run, ''): p.read_bytes().replace(run.encode(), b'')
                        for p in sorted(tmp_path.glob(f'{run}*/**/*')) if p.is_file()
                        and p.parent.name in (run + '_clip', 'train', 'val', 'test', run)})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6 + 2 + 2 + 3 + 3 * 4 + 1
    # its features and caption files are byte for byte what prepare_coco.py makes of the captions files
    out = tmp_path / 'first'
    for name in ('train', 'val', 'test'):
        assert run_script('prepare_coco.py', f'--captions={out}/captions_{name}.json', f'--images={out}/{name}',
                          f'--vision_model={out}/clip', f'--out_dir={tmp_path}/coco', '--num_workers=0') is None
    written = sorted(p.name for p in (tmp_path / 'first_clip').iterdir())
    assert written == sorted(p.name for p in (tmp_path / 'coco').iterdir())
    for name in written:
        assert (tmp_path / 'first_clip' / name).read_bytes() == (tmp_path / 'coco' / name).read_bytes(), name
    assert load_vision(str(out / 'clip')).config.image_size == prepare_shapes.vision_size
    assert load_gpt2(str(out / 'gpt2')).config.vocab_size == 50257


def test_stand_in_vision_features_are_centred(tmp_path):
    import torch
    subprocess.run([sys.executable, 'prepare_shapes.py', f'--out_dir={tmp_path}', f'--features_dir={tmp_path}_clip',
                    '--num_train=40', '--num_val=1', '--num_test=1'], check=True, capture_output=True)
    vision = load_vision(str(tmp_path / 'clip'))
    images = sorted((tmp_path / 'train').glob('*.png'))
    pixels = torch.tensor(np.stack([media.clip_preprocess(media.load_rgb(p), vision.config.image_size) for p in images]))
    with torch.no_grad():
        features = vision(pixel_values=pixels).last_hidden_state
    assert features.mean(dim=(0, 1)).abs().max() < 1e-4  # measured on these 40 images
    assert features.std(dim=0).mean() > 0.1  # what differs between images is still there


def test_without_the_tokenizer_files_prepare_shapes_stops_in_one_line_before_any_work(tmp_path, monkeypatch):
    """No network and no cached copy: one line saying so and how to point tiktoken at a copy, not requests'
    traceback, and nothing written."""
    import requests
    import tiktoken.registry

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(requests, 'get', offline)
    monkeypatch.setattr(tiktoken.registry, 'ENCODINGS', {})  # nothing already loaded in this process
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'empty_cache'))
    message = run_script('prepare_shapes.py', f"--out_dir={tmp_path / 'shapes'}", f"--features_dir={tmp_path / 'f'}")
    assert message == ("prepare_shapes.py: GPT-2's tokenizer files could not be downloaded (ConnectionError); without "
                       "a network, point TIKTOKEN_CACHE_DIR at a folder holding them (tiktoken's cache of a machine "
                       "that has them)")
    assert not (tmp_path / 'shapes').exists() and not (tmp_path / 'f').exists()


def test_captions_files_keep_each_pictures_scene_and_the_words_for_it(tmp_path):
    """The scene stored beside each picture is the picture's: each shape's colour at its cell's centre and its
    kind in its outline (a square fills its bounding box's corners, a triangle only the lower ones, a circle
    none); and with the words stored beside them, every (colour, shape) pair the references name is in the
    picture, where another picture's references are mostly wrong."""
    import json
    from PIL import Image
    import eval_bleu
    assert run_script('prepare_shapes.py', f"--out_dir={tmp_path / 'shapes'}", f"--features_dir={tmp_path / 'f'}",
                      '--num_train=40', '--num_val=2', '--num_test=2', '--num_workers=0') is None
    path = tmp_path / 'shapes' / 'captions_train.json'
    coco = json.loads(path.read_text())
    cell = 224 / 3
    for image in coco['images']:
        pixels = np.asarray(Image.open(tmp_path / 'shapes' / 'train' / image['file_name']).convert('RGB'))
        for shape in image['scene']:
            (row, col), r = shape['cell'], cell * (0.42 if shape['size'] == 'large' else 0.22)
            cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
            filled = lambda dx, dy: tuple(pixels[int(cy + dy * r), int(cx + dx * r)]) != (255, 255, 255)
            assert tuple(pixels[int(cy), int(cx)]) == prepare_shapes.COLOURS[shape['colour']]
            outline = (filled(-0.85, -0.85), filled(-0.85, 0.85))  # upper left, lower left corners
            assert outline == {'square': (True, True), 'triangle': (False, True), 'circle': (False, False)}[
                shape['kind']], shape
    pictures, colours, kind_of = eval_bleu.scenes(str(path))
    ids = [a['image_id'] for a in coco['annotations']]
    references = [a['caption'] for a in coco['annotations']]
    own = eval_bleu.scene_shares(references, ids, pictures, colours, kind_of)
    others = eval_bleu.scene_shares(references, [(i + 1) % 40 for i in ids], pictures, colours, kind_of)
    assert own['pairs_right'] == 1.0 and 0.5 < own['shapes_named'] < 1.0  # "two circles and a square" names none
    assert others['pairs_right'] < 0.3
    assert eval_bleu.scenes(str(tmp_path / 'f' / 'train_images.json')) is None  # captions without scenes
