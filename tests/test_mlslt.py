"""prepare_mlslt.py and the video path through train.py, eval_bleu.py and sample.py, on tiny synthetic
MLSLT-layout data: short mp4s of a coloured square moving left or right, written with PyAV."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

av = pytest.importorskip('av')

import media  # noqa: E402
import prepare_mlslt  # noqa: E402
from conftest import caption_text, record_generate_calls, run_script, stored_features  # noqa: E402
from decode import generate  # noqa: E402
from features import extract_features  # noqa: E402
from media import clip_preprocess  # noqa: E402
from weights import load_captioner, load_vision  # noqa: E402

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220)}
MAX_FRAMES = 6
# (split, id, colour, direction, frames): frame counts below and above MAX_FRAMES
SAMPLES = [('train', 'a1', 'red', 'right', 9), ('train', 'a2', 'green', 'left', 4),
           ('train', 'a3', 'blue', 'right', 12), ('train', 'a4', 'red', 'left', 7),
           ('dev', 'b1', 'green', 'right', 8), ('dev', 'b2', 'blue', 'left', 5),
           ('test', 'c1', 'red', 'right', 10), ('test', 'c2', 'blue', 'left', 3)]
RED = {sample_id for _, sample_id, colour, _, _ in SAMPLES if colour == 'red'}


def write_video(path, colour, direction, frames):
    """An H.264 mp4 of a square crossing a grey 48x64 picture."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('h264', rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
        for i in range(frames):
            picture = np.full((48, 64, 3), 128, dtype=np.uint8)
            x = 4 + 40 * i // max(frames - 1, 1)
            x = x if direction == 'right' else 44 - x
            picture[14:34, x:x + 16] = COLOURS[colour]
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope='session')
def mlslt_root(tmp_path_factory):
    """The SP-10 layout: <root>/<split>.json and <root>/<split>/<id>/<sign language>.mp4, two sign
    languages per id (de, en), targets in English and German."""
    root = tmp_path_factory.mktemp('mlslt')
    entries = {}
    for split, sample_id, colour, direction, frames in SAMPLES:
        for lang in ('de', 'en'):
            write_video(root / split / sample_id / f'{lang}.mp4', colour, direction, frames)
        entries.setdefault(split, []).append(dict(id=sample_id, sign_list=[
            dict(lang='en', text=f'a {colour} square moves {direction}'),
            dict(lang='de', text=f'ein Quadrat bewegt sich nach {direction}')]))
    for split, items in entries.items():
        (root / f'{split}.json').write_text(json.dumps(items))
    return root


def prepare(root, out_dir, clip_dir, *options):
    """prepare_mlslt.py's exit (None when it succeeded), run in this process."""
    return run_script('prepare_mlslt.py', f'--root={root}', f'--out_dir={out_dir}', f'--vision_model={clip_dir}',
                      f'--max_frames={MAX_FRAMES}', '--batch_size=3', '--num_workers=0', *options)


@pytest.fixture(scope='session')
def mlslt_data(tmp_path_factory, mlslt_root, tiny_clip_dir):
    out = tmp_path_factory.mktemp('mlslt_prepared')
    assert prepare(mlslt_root, out, tiny_clip_dir) is None
    return str(out)


def test_frame_indices_are_spread_evenly():
    assert media.frame_indices(10, 6).tolist() == [0, 2, 4, 5, 7, 9]
    assert media.frame_indices(4, 4).tolist() == [0, 1, 2, 3]
    assert media.frame_indices(1000, 3).tolist() == [166, 500, 833]


def test_split_file_gives_a_sample_per_id_and_sign_language(mlslt_root):
    records = prepare_mlslt.load_split(str(mlslt_root), 'dev', ['de', 'en', 'zh'], 'en')
    assert [r['id'] for r in records] == ['b1/de', 'b1/en', 'b2/de', 'b2/en']  # no zh videos
    assert records[0]['captions'] == ['a green square moves right']
    assert records[1]['file'] == os.path.join(str(mlslt_root), 'dev', 'b1', 'en.mp4')
    german = prepare_mlslt.load_split(str(mlslt_root), 'dev', ['en'], 'de')
    assert [r['captions'] for r in german] == [['ein Quadrat bewegt sich nach right'],
                                               ['ein Quadrat bewegt sich nach left']]


def test_features_frames_and_captions(mlslt_data, mlslt_root, tiny_clip_dir):
    meta = json.load(open(f'{mlslt_data}/meta.json'))
    assert (meta['media'], meta['max_frames'], meta['tokens_per_image'], meta['feature_dim']) == \
        ('video', MAX_FRAMES, 17, 32)
    # 4 training ids x 2 sign languages, each video min(frames, 6) frames
    assert meta['splits']['train'] == dict(videos=8, frames=2 * (6 + 4 + 6 + 6), captions=8)
    assert meta['splits']['test'] == dict(videos=4, frames=2 * (6 + 3), captions=4)
    index = np.load(f'{mlslt_data}/train_frames.npy')
    assert index.tolist() == [[0, 6], [6, 6], [12, 4], [16, 4], [20, 6], [26, 6], [32, 6], [38, 6]]
    # the features of train a1/en (9 frames): CLIP on its decoded frames 0, 2, 3, 5, 6, 8
    with av.open(str(mlslt_root / 'train' / 'a1' / 'en.mp4')) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    assert len(decoded) == 9
    pixels = torch.tensor(np.stack([clip_preprocess(decoded[i], 32) for i in [0, 2, 3, 5, 6, 8]]))
    with torch.no_grad():
        expected = load_vision(tiny_clip_dir)(pixel_values=pixels).last_hidden_state
    feats = stored_features(f'{mlslt_data}/train_feats.bin')
    assert torch.allclose(torch.tensor(feats[6:12].astype(np.float32)), expected, atol=2e-3)
    videos = json.load(open(f'{mlslt_data}/train_videos.json'))
    assert videos[1] == dict(file=str(mlslt_root / 'train' / 'a1' / 'en.mp4'), id='a1/en',
                             captions=['a red square moves right'])
    leftovers = [n for n in os.listdir(mlslt_data) if n.endswith(('.tmp', '.partial', '.json.partial'))]
    assert leftovers == [] and not any('.progress' in n for n in os.listdir(mlslt_data))


def test_batches_pad_videos_and_mask_the_padding(mlslt_data):
    from data import Captions
    data = Captions(mlslt_data, 'train', max_tokens=32)
    features, mask, tokens, targets, positions = data.batch(np.array([2, 0]))  # a2/de (4 frames), a1/de (6)
    # the target positions, found on the host: each sentence's tokens and its <|endoftext|>
    assert len(positions) == data.target_count(np.array([2, 0])) == (targets != -100).sum()
    assert (targets.flatten()[positions] != -100).all()
    assert features.shape == (2, 6, 17, 32) and mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert np.array_equal(features[0, :4], data.feats[12:16]) and not features[0, 4:].any()
    assert np.array_equal(features[1], data.feats[0:6])


class Interrupted(Exception):
    pass


def test_interrupted_video_extraction_resumes(tmp_path, mlslt_root, mlslt_data, tiny_clip_dir, monkeypatch):
    records = prepare_mlslt.load_split(str(mlslt_root), 'train', ['de', 'en'], 'en')
    counts = [media.count_frames(r['file']) for r in records]
    model = load_vision(tiny_clip_dir).eval()
    files = media.VideoFiles([r['file'] for r in records], counts, MAX_FRAMES, 32)
    real_forward, calls, crash = type(model).forward, [], [True]

    def crash_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and crash[0]:
            raise Interrupted
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(type(model), 'forward', crash_on_second_batch)
    out = str(tmp_path / 'train_feats.bin')
    with pytest.raises(Interrupted):
        extract_features(model, files, out, 3, 0)
    assert not os.path.exists(out)
    calls.clear()
    crash[0] = False
    extract_features(model, files, out, 3, 0)
    assert len(calls) == 2  # videos 4-6 and 7-8 (batches of 3 videos): the first batch was kept
    assert np.array_equal(np.fromfile(out, dtype=np.float16),
                          np.fromfile(f'{mlslt_data}/train_feats.bin', dtype=np.float16))


def test_bad_videos_are_named_or_skipped(tmp_path, mlslt_root, tiny_clip_dir, capsys):
    root = tmp_path / 'root'
    shutil.copytree(mlslt_root, root)
    (root / 'train' / 'a2' / 'de.mp4').write_bytes(b'not a video at all' * 10)
    (root / 'train' / 'a3' / 'en.mp4').write_bytes(b'')
    message = prepare(root, tmp_path / 'out', tiny_clip_dir, '--splits=train')
    assert message.startswith('prepare_mlslt.py: 2 unusable video(s) in split train (use '
                              '--skip_bad_videos=True to drop them): ')
    assert f"{root / 'train' / 'a2' / 'de.mp4'}: not a readable video" in message
    assert f"{root / 'train' / 'a3' / 'en.mp4'}: empty file" in message
    assert prepare(root, tmp_path / 'out', tiny_clip_dir, '--splits=train', '--skip_bad_videos=True') is None
    err = capsys.readouterr().err
    assert 'split train: skipped 2 unusable video(s) and their 2 caption(s)' in err
    assert f"{root / 'train' / 'a2' / 'de.mp4'}: skipped, not a readable video" in err  # each named
    assert f"{root / 'train' / 'a3' / 'en.mp4'}: skipped, empty file" in err
    assert [v['id'] for v in json.load(open(tmp_path / 'out' / 'train_videos.json'))] == [
        'a1/de', 'a1/en', 'a2/en', 'a3/de', 'a4/de', 'a4/en']


def test_sign_langs_text_lang_and_splits_choose_the_samples(tmp_path, mlslt_root, tiny_clip_dir):
    assert prepare(mlslt_root, tmp_path, tiny_clip_dir, '--splits=dev', '--sign_langs=en', '--text_lang=de') is None
    videos = json.load(open(tmp_path / 'dev_videos.json'))
    assert [(v['id'], v['captions']) for v in videos] == [('b1/en', ['ein Quadrat bewegt sich nach right']),
                                                          ('b2/en', ['ein Quadrat bewegt sich nach left'])]
    meta = json.load(open(tmp_path / 'meta.json'))
    assert (list(meta['splits']), meta['text_lang']) == (['dev'], 'de')


@pytest.mark.parametrize('options, message', [
    (['--max_frames=501'], 'prepare_mlslt.py: max_frames must be in 1..500'),
    (['--sign_langs=de,xx'], 'prepare_mlslt.py: sign_langs: unknown xx'),
    (['--text_lang=fr'], "prepare_mlslt.py: {root}/train.json: id a1 has no 'fr' text"),
])
def test_bad_options_fail_in_one_line(tmp_path, mlslt_root, tiny_clip_dir, options, message):
    status = prepare(mlslt_root, tmp_path / 'out', tiny_clip_dir, *options)
    assert status.startswith(message.format(root=mlslt_root)) and '\n' not in status


@pytest.fixture(scope='session')
def video_run(tmp_path_factory, mlslt_data, tiny_clip_dir, tiny_gpt2_dir):
    """A training run on the videos, evaluated on dev, long enough that its captions tell a red square from
    the others (blue from green barely, the direction not at all)."""
    out = tmp_path_factory.mktemp('video_run')
    assert run_script('train.py', 'config/train_mlslt.py', f'--out_dir={out}', f'--data_dir={mlslt_data}',
                      f'--vision_model={tiny_clip_dir}', f'--text_model={tiny_gpt2_dir}', '--num_latents=8',
                      '--resampler_depth=1', '--heads=2', '--dim_head=16', '--mapper_hidden=32', '--batch_size=8',
                      '--max_iters=120', '--eval_interval=60', '--eval_captions=4', '--eval_images=2',
                      '--learning_rate=5e-3', '--warmup_frac=0.05', '--unfreeze_layers=3', '--train_embeddings=True',
                      '--log_interval=1', '--device=cpu') is None
    return str(out)


def test_training_and_evaluation_on_videos(video_run, mlslt_data, monkeypatch):
    records = [json.loads(line) for line in open(f'{video_run}/log.jsonl')]
    losses = {r['iter']: r['loss'] for r in records if 'loss' in r}
    assert list(losses) == list(range(1, 121))
    assert losses[1] > 9.0 and losses[120] < 1  # a random GPT-2's guess, then learning
    assert [r['iter'] for r in records if 'val_bleu4' in r] == [60, 120]
    calls = record_generate_calls(monkeypatch)
    assert run_script('eval_bleu.py', f'--out_dir={video_run}', f'--data_dir={mlslt_data}', '--split=test',
                      '--decoding=greedy', '--max_new_tokens=8', '--device=cpu') is None
    monkeypatch.undo()
    captions = json.load(open(f'{video_run}/captions_test_greedy.json'))
    assert [c['id'] for c in captions] == ['c1/de', 'c1/en', 'c2/de', 'c2/en']
    assert json.load(open(f'{video_run}/metrics_test_greedy.json'))['items'] == 4
    # the videos' frames, padded to the longest, go with the mask of the real ones (as the frames table,
    # read here with numpy, counts them): whatever the trained model happens to say
    frame_counts = np.load(f'{mlslt_data}/test_frames.npy')[:, 1].tolist()
    assert [(size, None if mask is None else mask.sum(1).tolist()) for size, mask, _ in calls] == [(4, frame_counts)]
    # one batch of videos of 6 and of 3 frames: each caption is the checkpoint's for that video alone, unpadded
    # (the padding frames of the shorter ones are masked), and names red exactly for the red one
    model, _ = load_captioner(f'{video_run}/best.pt')
    feats = stored_features(f'{mlslt_data}/test_feats.bin')
    frames = np.load(f'{mlslt_data}/test_frames.npy')
    assert frames[:, 1].tolist() == [6, 6, 3, 3]
    for caption, (first, count) in zip(captions, frames):
        with torch.no_grad():
            alone = generate(model, torch.tensor(feats[first:first + count][None], dtype=torch.float32),
                                   max_new_tokens=8)[0]
        assert caption['caption'] == caption_text(alone)
        assert ('red' in caption['caption'].split()) == (caption['id'].split('/')[0] in RED), caption


def test_sample_captions_video_files(video_run, mlslt_root, tmp_path, capsys, monkeypatch):
    folder = tmp_path / 'videos'
    shutil.copytree(mlslt_root / 'test', folder)
    (folder / 'broken.mp4').write_bytes(b'\x00' * 100)
    calls = record_generate_calls(monkeypatch)
    assert run_script('sample.py', f'--out_dir={video_run}', f'--videos={folder}', f'--max_frames={MAX_FRAMES}',
                      '--decoding=greedy', '--max_new_tokens=8', '--num_workers=0', '--batch_size=4', '--device=cpu',
                      f'--html={tmp_path}/v.html') is None
    monkeypatch.undo()
    # batches of 4 files: broken.mp4, c1/de, c1/en (10 frames: MAX_FRAMES of them), c2/de (3); then c2/en; the
    # padding of the shorter ones masked
    frame_counts = [None if mask is None else mask.sum(1).tolist() for _, mask, _ in calls]
    assert frame_counts == [[MAX_FRAMES, MAX_FRAMES, 3], [3]]
    output = capsys.readouterr()
    lines = [line.split('\t')[:2] for line in output.out.splitlines()]  # path, caption (then its CLIP-S)
    paths = [str(folder / i / f'{lang}.mp4') for i in ('c1', 'c2') for lang in ('de', 'en')]
    assert [path for path, _ in lines] == paths
    assert f"{folder / 'broken.mp4'}: skipped, not a readable video" in output.err
    assert (tmp_path / 'v.html').read_text().count('<img src="data:image/jpeg;base64,') == 4
    # each caption is the model's for that video's frames, decoded and sampled as prepare_mlslt does, and
    # names red exactly for the red one
    model, _ = load_captioner(f'{video_run}/best.pt')
    for path, caption in lines:
        frames = media.read_frames(path, MAX_FRAMES, media.count_frames(path))
        pixels = torch.tensor(np.stack([clip_preprocess(f, 32) for f in frames]))
        with torch.no_grad():
            features, mask = model.encode_pixels(pixels, [len(pixels)])
            alone = generate(model, features.half(), mask, max_new_tokens=8)[0]  # stored as prepare_mlslt.py does
        assert caption == caption_text(alone)
        assert ('red' in caption.split()) == (os.path.basename(os.path.dirname(path)) in RED), (path, caption)


def test_sample_bounds_a_batch_of_videos_by_the_memory_of_its_pixels(video_run, mlslt_root, tmp_path, monkeypatch):
    """64 frames of 224 x 224 float32 pixels are 38,535,168 bytes: with 4 workers (2 batches ahead each, and the
    one being captioned) in 2 GB, 6 videos to a batch, not 256 (10 GB each). Here: 6 frames of 32 x 32, 73,728
    bytes, no workers: 0.0002 GB holds 2 of them."""
    from sample import files_per_batch
    assert files_per_batch(64, 224, 4, 256, 2.0) == 2 * 2 ** 30 // (38_535_168 * 9) == 6
    assert files_per_batch(1, 224, 4, 256, 2.0) == 256  # images: the batch size
    calls = record_generate_calls(monkeypatch)
    assert run_script('sample.py', f'--out_dir={video_run}', f"--videos={mlslt_root / 'test'}", '--max_frames=6',
                      '--decoding=greedy', '--max_new_tokens=2', '--num_workers=0', '--device=cpu',
                      '--pixels_gb=0.0002') is None
    assert [len(mask) for _, mask, _ in calls] == [2, 2]  # 4 videos


def test_videos_longer_than_the_time_embeddings_fail_in_one_line(tmp_path, mlslt_data, tiny_clip_dir,
                                                                  tiny_gpt2_dir):
    assert run_script('train.py', f'--out_dir={tmp_path}', f'--data_dir={mlslt_data}',
                      f'--vision_model={tiny_clip_dir}', f'--text_model={tiny_gpt2_dir}', '--val_split=dev',
                      '--max_frames=4', '--device=cpu') == (
        f'train.py: {mlslt_data}/meta.json does not match the model: its videos have up to 6 frames, the resampler '
        f'time embeddings for 4 (max_frames)')
