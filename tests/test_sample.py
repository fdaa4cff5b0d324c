"""sample.py, run in this process as users run it, on conftest's grounded checkpoint: pictures of coloured
shapes it names, images of every kind and mode, and files of every kind of bad input."""
import base64
import io
import json
import os
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from html import escape
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import caption_text, colour_and_shape, draw_shape, record_generate_calls, run_script, shape_scenes
from decode import generate
from weights import load_captioner
from media import clip_preprocess, load_rgb

BAD_FILES = [('empty.jpg', 'empty file'), ('truncated.jpg', 'not a readable image'),
             ('text.png', 'not a readable image'), ('bomb.png', 'too large to be a photo')]


def sample(run_dir, *options):
    """sample.py's exit (None when it succeeded), on the CPU, where the model here captions alike."""
    return run_script('sample.py', f'--out_dir={run_dir}', '--num_workers=0', '--device=cpu', *options)


def caption_alone(model, path, **options):
    """The checkpoint's caption of one image, given to generate on its own, its CLIP features in float16 as
    prepare_coco.py stores them."""
    pixels = torch.tensor(clip_preprocess(load_rgb(path), model.vision.config.image_size))[None]
    with torch.no_grad():
        features, mask = model.encode_pixels(pixels, [1])
        return caption_text(generate(model, features.half(), mask, **options)[0])


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Each colour with each shape, drawn as the checkpoint saw it in training, in a subfolder
    (shapes/<colour>_<shape>.png: eight different captions); images of every supported kind (an extension
    in capitals too) and another mode; files of each kind of bad input. Returns its root, its readable
    images (sorted) and what is drawn: {picture: (colour, shape)}."""
    root = tmp_path_factory.mktemp('images')
    (root / 'shapes').mkdir()
    drawn = {}
    for colour, shape, shift in shape_scenes('train')[:8]:
        path = root / 'shapes' / f'{colour}_{shape}.png'
        draw_shape(colour, shape, shift).save(path)
        drawn[str(path)] = colour, shape
    rng = np.random.default_rng(0)
    good = list(drawn)
    for i, ext in enumerate(['JPEG', 'png', 'webp', 'bmp', 'gif', 'tiff']):
        path = root / f'good{i}.{ext}'
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(path)
        good.append(str(path))
    Image.new('LA', (20, 20)).save(root / 'grey.png')
    good.append(str(root / 'grey.png'))
    (root / 'empty.jpg').write_bytes(b'')
    data = (root / 'good0.JPEG').read_bytes()
    (root / 'truncated.jpg').write_bytes(data[:len(data) // 3])
    (root / 'text.png').write_text('not an image')
    Image.new('1', (10_000, 10_000)).save(root / 'bomb.png')  # 100M pixels in a small file
    (root / 'notes.txt').write_text('not an image extension: ignored')
    return SimpleNamespace(root=root, readable=sorted(good), drawn=drawn)


@pytest.fixture(scope='module')
def model(run_dir):
    return load_captioner(f'{run_dir}/best.pt')[0]


@pytest.fixture(scope='module')
def captioned(run_dir, folder, tmp_path_factory):
    """One run of sample.py over the whole folder, in batches of 3, beam search of width 3, with --json and
    --html: its exit, its (path, caption) lines, its stderr, the files it wrote, and (batch size, options)
    of every call to model.generate."""
    out = tmp_path_factory.mktemp('captioned')
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        calls = record_generate_calls(patch)
        status = sample(run_dir, f'--images={folder.root}', '--batch_size=3', '--decoding=beam', '--beam_width=3',
                        '--max_new_tokens=8', f"--json={out / 'out.json'}", f"--html={out / 'out.html'}")
    columns = [line.split('\t') for line in stdout.getvalue().splitlines()]  # path, caption, its CLIP-S
    return SimpleNamespace(status=status, lines=[tuple(c[:2]) for c in columns],
                           clip_s=[float(c[2]) for c in columns], stderr=stderr.getvalue(), json=json.loads((out / 'out.json').read_text()),
                           html=(out / 'out.html').read_text(), calls=calls)


def test_each_caption_is_the_checkpoints_for_that_image_alone(captioned, folder, model):
    """No caption moves to another image: not within a batch, not across batches, not past a bad file."""
    assert captioned.status is None, captioned.stderr
    assert [path for path, _ in captioned.lines] == folder.readable  # one line each, sorted, the subfolder's too
    for path, caption in captioned.lines:
        assert caption == caption_alone(model, path, decoding='beam', beam_width=3, max_new_tokens=8), path


def test_captions_name_the_colour_and_shape_drawn(captioned, folder):
    """The same, independent of the model code: each picture's caption names what was drawn in it."""
    captions = dict(captioned.lines)
    for path, (colour, shape) in folder.drawn.items():
        assert colour_and_shape(captions[path]) == ({colour}, {shape}), (path, captions[path])


def test_unreadable_files_are_reported_and_the_rest_captioned(captioned, folder):
    assert captioned.status is None
    for name, why in BAD_FILES:
        assert f'{folder.root / name}: skipped, {why}' in captioned.stderr


def test_decoding_options_reach_generate(captioned):
    """Beam search of any width gives this checkpoint's greedy captions, so only what generate is handed
    tells whether --beam_width and --max_new_tokens were passed on."""
    assert len(captioned.calls) > 1 and max(size for size, _, _ in captioned.calls) <= 3  # --batch_size
    for _, _, options in captioned.calls:
        assert (options['decoding'], options['beam_width'], options['max_new_tokens']) == ('beam', 3, 8)


def test_json_and_html_hold_each_images_captions(captioned, folder):
    assert captioned.json == [dict(image=path, captions=[caption], clip_s=[pytest.approx(clip_s, abs=5e-4)])
                              for (path, caption), clip_s in zip(captioned.lines, captioned.clip_s)]
    figures = re.findall(r'<figure><img src="data:image/jpeg;base64,([^"]*)" alt="(.*?)"><figcaption><b>(.*?)</b>'
                         r'(.*?)</figcaption></figure>', captioned.html)
    assert [(alt, name, text) for _, alt, name, text in figures] == [
        (escape(caption), escape(os.path.basename(path)), f'<p>{escape(caption)} <small>CLIP-S {clip_s:.3f}</small></p>')
        for (path, caption), clip_s in zip(captioned.lines, captioned.clip_s)]
    # the page says which model wrote the captions, and how
    assert re.search(r'<h1>Captions by .*best\.pt: beam search, width 3</h1>', captioned.html)
    # each picture's thumbnail is that picture: nearer to it than to any other
    pictures = {path: np.asarray(load_rgb(path), dtype=np.float32) for path in folder.drawn}
    for (thumbnail, _, _, _), (path, _) in zip(figures, captioned.lines):
        if path in pictures:
            shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbnail))).convert('RGB'), dtype=np.float32)
            assert shown.shape == pictures[path].shape, path
            assert min(pictures, key=lambda p: np.abs(pictures[p] - shown).mean()) == path


@pytest.fixture(scope='module')
def greedy_lines(model, folder):
    """sample.py's lines for the shape pictures, two samples each, were sampling greedy: 5 tokens, cut
    before the last word ('a picture of a red'), so that --max_new_tokens counts too."""
    return [f'{path}\t{caption_alone(model, path, max_new_tokens=5)}' for path in sorted(folder.drawn)
            for _ in range(2)]


def sampled(run_dir, folder, capsys, *options):
    assert sample(run_dir, f'--images={folder.root}/shapes', '--decoding=sample', '--num_samples=2',
                  '--max_new_tokens=5', *options) is None
    return ['\t'.join(line.split('\t')[:2]) for line in capsys.readouterr().out.splitlines()]  # no CLIP-S


@pytest.mark.parametrize('option', ['--top_k=1', '--top_p=1e-6', '--temperature=1e-4'])
def test_sampling_left_one_choice_gives_greedy_captions(run_dir, folder, greedy_lines, capsys, option):
    """Each option alone leaves sampling the best token only, if it reaches generate (plain sampling
    differs from greedy: test_sampling_is_seeded); and each image's samples are its own."""
    assert sampled(run_dir, folder, capsys, option) == greedy_lines


def test_sampling_is_seeded(run_dir, folder, greedy_lines, capsys):
    first = sampled(run_dir, folder, capsys, '--seed=1')
    assert [line.split('\t')[0] for line in first] == [line.split('\t')[0] for line in greedy_lines]
    assert first != greedy_lines
    assert sampled(run_dir, folder, capsys, '--seed=1') == first
    assert sampled(run_dir, folder, capsys, '--seed=2') != first


@pytest.mark.parametrize('options, message', [
    (['--images=NOWHERE/*.jpg'], "sample.py: no image files found at 'NOWHERE/*.jpg'"),
    (['--checkpoint=missing.pt'], 'sample.py: {run}/missing.pt: no such checkpoint'),
    (['--num_samples=2'], 'sample.py: num_samples=2 needs decoding=sample (beam gives one caption)'),
    (['--videos=clips'], 'sample.py: give either --images=FOLDER, FILE or GLOB or --videos=FOLDER, FILE or GLOB'),
])
def test_bad_arguments_fail_in_one_line(run_dir, folder, options, message):
    assert sample(run_dir, f'--images={folder.root}', *options) == message.format(run=run_dir)


def test_no_readable_image_is_an_error(run_dir, folder):
    status = sample(run_dir, f'--images={folder.root}/[et]*.*')  # empty.jpg, text.png, truncated.jpg
    assert status == 'sample.py: none of the 3 image file(s) could be read'


def test_an_image_gets_the_caption_eval_bleu_gives_it(run_dir, data_dir, tmp_path, monkeypatch):
    """One precision policy: sample.py runs CLIP on the validation pictures and rounds the features to float16
    as prepare_coco.py stored them, then decodes as eval_bleu.py does from the stored ones. The features it
    decodes are the stored ones, to float16's rounding, and every caption is eval_bleu.py's."""
    import decode
    pictures = os.path.join(os.path.dirname(data_dir), 'val')
    decoded = []
    generate_of = decode.generate
    monkeypatch.setattr(decode, 'generate', lambda model, features, *a, **k: decoded.append(features) or
                        generate_of(model, features, *a, **k))
    out = tmp_path / 'captions.json'
    assert sample(run_dir, f'--images={pictures}', '--decoding=greedy', f'--json={out}') is None
    stored = np.fromfile(os.path.join(data_dir, 'val_feats.bin'), dtype=np.float16).reshape(decoded[0].shape)
    assert decoded[0].dtype == torch.float16
    assert np.abs(decoded[0].numpy().astype(np.float32) - stored.astype(np.float32)).max() <= 2e-3
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'best.pt')
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=val',
                      '--decoding=greedy', '--device=cpu', '--batch_size=2') is None
    by_eval = {os.path.realpath(c['file']): c['caption']
               for c in json.load(open(tmp_path / 'captions_val_greedy.json'))}
    by_sample = {os.path.realpath(r['image']): r['captions'][0] for r in json.load(open(out))}
    assert by_sample == by_eval and len(by_eval) == 4
