"""sample.py, run as users run it, on a checkpoint of a short tiny training run."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image

from model import load_captioner
from prepare_coco import clip_preprocess, load_rgb


def sample(run_dir, *options):
    return subprocess.run([sys.executable, 'sample.py', f'--out_dir={run_dir}', '--num_workers=0', *options],
                          capture_output=True, text=True)


@pytest.fixture
def folder(tmp_path):
    """Readable images of every supported kind, and files of each kind of bad input."""
    rng = np.random.default_rng(0)
    good = []
    for i, ext in enumerate(['jpg', 'png', 'webp', 'bmp', 'gif', 'tiff']):
        path = tmp_path / f'good{i}.{ext}'
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(path)
        good.append(str(path))
    Image.new('LA', (20, 20)).save(tmp_path / 'sub_grey.png')  # another mode
    good.append(str(tmp_path / 'sub_grey.png'))
    (tmp_path / 'empty.jpg').write_bytes(b'')
    data = open(good[0], 'rb').read()
    (tmp_path / 'truncated.jpg').write_bytes(data[:len(data) // 3])
    (tmp_path / 'text.png').write_text('not an image')
    Image.new('1', (10_000, 10_000)).save(tmp_path / 'bomb.png')  # 100M pixels in a small file
    (tmp_path / 'notes.txt').write_text('not an image extension: ignored')
    return tmp_path, sorted(good)


def test_captions_every_readable_image_and_reports_the_rest(run_dir, folder, tmp_path):
    path, good = folder
    result = sample(run_dir, f'--images={path}', '--decoding=greedy', '--max_new_tokens=8', '--batch_size=3',
                    f"--json={tmp_path / 'out.json'}", f"--html={tmp_path / 'out.html'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split('\t')[0] for line in lines] == good  # one line each, sorted
    for name, why in [('empty.jpg', 'empty file'), ('truncated.jpg', 'not a readable image'),
                      ('text.png', 'not a readable image'), ('bomb.png', 'too large to be a photo')]:
        assert f'{path / name}: skipped, {why}' in result.stderr
    assert json.loads((tmp_path / 'out.json').read_text()) == [
        dict(image=line.split('\t')[0], captions=[line.split('\t')[1]]) for line in lines]
    page = (tmp_path / 'out.html').read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == len(good)
    # the captions are the model's for each image (no mix-up across batches)
    model, _ = load_captioner(f'{run_dir}/best.pt')
    encoder = tiktoken.get_encoding('gpt2')
    for image, line in zip(good, lines):
        pixels = torch.tensor(clip_preprocess(load_rgb(image), 32))[None]
        tokens = model.generate(*model.encode_pixels(pixels, [1]), max_new_tokens=8)[0]
        assert line.split('\t')[1] == ' '.join(encoder.decode(tokens).split())


def test_sampling_options(run_dir, folder):
    path, good = folder
    options = [f'--images={path}/good*', '--decoding=sample', '--num_samples=3', '--max_new_tokens=6',
               '--top_k=50', '--temperature=1.5']
    first = sample(run_dir, *options, '--seed=1')
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 3 * 6
    assert sample(run_dir, *options, '--seed=1').stdout == first.stdout
    assert sample(run_dir, *options, '--seed=2').stdout != first.stdout


@pytest.mark.parametrize('options, message', [
    (['--images=NOWHERE/*.jpg'], "sample.py: no image files found at 'NOWHERE/*.jpg'"),
    (['--checkpoint=missing.pt'], 'sample.py: {run}/missing.pt: no such checkpoint'),
    (['--num_samples=2'], 'sample.py: num_samples=2 needs decoding=sample (beam gives one caption)'),
    (['--videos=clips'], 'sample.py: give either --images=FOLDER, FILE or GLOB or --videos=FOLDER, FILE or GLOB'),
])
def test_bad_arguments_fail_in_one_line(run_dir, folder, options, message):
    path, _ = folder
    result = sample(run_dir, f'--images={path}', *options)
    assert result.returncode != 0
    assert result.stderr.strip() == message.format(run=run_dir)


def test_no_readable_image_is_an_error(run_dir, folder):
    path, _ = folder
    result = sample(run_dir, f'--images={path}/[et]*.*')  # empty.jpg, text.png, truncated.jpg
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == 'sample.py: none of the 3 image file(s) could be read'
