"""prepare_shards.py on img2dataset's output: tiny shards written here with tarfile in its layout
(bad samples among them), and the real shards img2dataset 1.47 wrote of 80 COCO photos, beside the
repository if there."""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

import prepare_shards
from conftest import run_script

HERE = os.path.dirname(__file__)
REAL_SHARDS = os.path.join(HERE, '..', '..', 'shared', 'data', 'coco_mini_webdataset')


def jpeg(colour, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new('RGB', size, colour).save(buffer, format='JPEG')
    return buffer.getvalue()


def write_shard(path, files):
    """A tar of (member name, bytes), in order, as img2dataset writes its webdataset shards."""
    with tarfile.open(path, 'w') as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample(key, colour, caption):
    return [(f'{key}.jpg', jpeg(colour)), (f'{key}.txt', caption.encode()),
            (f'{key}.json', json.dumps(dict(key=key, status='success', caption=caption.upper())).encode())]


def prepare(out, clip_dir, *options):
    return run_script('prepare_shards.py', f'--out_dir={out}', f'--vision_model={clip_dir}', '--num_workers=0',
                      '--batch_size=4', *options)


def split_files(out, split):
    """The bytes of a prepared split's features (its feature shards one after another, or its one file),
    tokens and caption table, and its records."""
    entry = json.load(open(os.path.join(out, 'meta.json')))['splits'][split]
    feats = [s['file'] for s in entry['feature_shards']] if 'feature_shards' in entry else [f'{split}_feats.bin']
    blobs = [b''.join(open(os.path.join(out, f), 'rb').read() for f in feats)]
    blobs += [open(os.path.join(out, f'{split}{suffix}'), 'rb').read() for suffix in ('_tokens.bin', '_captions.npy')]
    return blobs, json.load(open(os.path.join(out, f'{split}_images.json')))


def test_brace_ranges_keep_their_padding_and_lists_multiply():
    assert prepare_shards.expand_braces('cc/{00008..00011}.tar') == \
        ['cc/00008.tar', 'cc/00009.tar', 'cc/00010.tar', 'cc/00011.tar']
    assert prepare_shards.expand_braces('{a,b}/{0..1}.tar') == ['a/0.tar', 'a/1.tar', 'b/0.tar', 'b/1.tar']
    assert prepare_shards.expand_braces('plain.tar') == ['plain.tar']


@pytest.mark.skipif(not os.path.isdir(REAL_SHARDS), reason='no ../shared/data/coco_mini_webdataset beside the repository')
def test_real_shards_give_the_features_of_the_same_jpegs_in_a_folder(tmp_path, tiny_clip_dir):
    """img2dataset's own shards, read in place, against the folder + CSV route of prepare_coco.py on
    the same JPEGs unpacked: the same features, tokens and caption table, byte for byte. The one
    failed download (in the parquet and stats, not in the tar) is simply absent."""
    shard = lambda n: os.path.join(REAL_SHARDS, f'{n:05d}.tar')  # noqa: E731
    assert prepare(tmp_path / 'shards', tiny_clip_dir, f'--shards={REAL_SHARDS}', f'--val_shards={shard(1)}',
                   f'--test_shards={shard(2)}') is None
    images = tmp_path / 'images'
    images.mkdir()
    with open(tmp_path / 'captions.csv', 'w', newline='', encoding='utf-8') as f:
        rows = csv.writer(f)
        rows.writerow(['image', 'caption', 'split'])
        for n, split in ((0, 'train'), (1, 'val'), (2, 'test')):
            with tarfile.open(shard(n)) as tar:  # in the tar's order, which img2dataset does not sort
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in members:
                if name.endswith('.jpg'):
                    (images / name).write_bytes(members[name])
                    rows.writerow([name, members[name[:-4] + '.txt'].decode(), split])
    assert run_script('prepare_coco.py', f'--captions={tmp_path}/captions.csv', f'--images={images}',
                      f'--out_dir={tmp_path}/folder', f'--vision_model={tiny_clip_dir}', '--num_workers=0',
                      '--batch_size=4') is None
    meta = json.load(open(tmp_path / 'shards' / 'meta.json'))
    assert sum(entry['images'] for entry in meta['splits'].values()) == 80  # 81 URLs, one failed
    assert meta['splits']['val']['images'] == 31 and '0000109' not in str(split_files(tmp_path / 'shards', 'val')[1])
    for split in ('train', 'val', 'test'):
        ours, records = split_files(tmp_path / 'shards', split)
        theirs, folder_records = split_files(tmp_path / 'folder', split)
        assert ours == theirs, split
        assert [r['captions'] for r in records] == [r['captions'] for r in folder_records]


def test_bad_samples_are_skipped_counted_and_named(tmp_path, tiny_clip_dir, capsys):
    """Each kind of bad sample is skipped, counted on its shard's one stderr line (naming the
    first), and the run goes on; a tar cut short keeps the samples before the cut; a caption's line
    break and non-ASCII survive as one line."""
    shards = tmp_path / 'shards'
    shards.mkdir()
    write_shard(shards / '00000.tar', sample('0000000', 'red', 'Ein Café\nam  Meer — ☕ ')
                + sample('0000001', 'green', 'a green field')
                + [('0000002.jpg', jpeg('blue'))]  # no caption
                + [('0000003.jpg', jpeg('blue')), ('0000003.txt', b'  \n')]  # an empty one
                + [('0000004.jpg', b'not a jpeg'), ('0000004.txt', b'broken')]
                + [('a.b.jpg', jpeg('white')), ('a.b.txt', b'a dotted key')])
    write_shard(shards / '00001.tar', sample('0000100', 'yellow', 'a yellow wall')
                + sample('0000101', 'black', 'the night sky') + sample('0000102', 'grey', 'fog'))
    whole = (shards / '00001.tar').read_bytes()
    cut = whole.index(b'the night sky') + 4  # inside 0000101.txt: an interrupted download
    (shards / '00001.tar').write_bytes(whole[:cut])
    (shards / '00001_stats.json').write_text(json.dumps(dict(count=3, successes=3)))
    write_shard(shards / '00002.tar', sample('0000200', 'purple', 'a purple flower'))
    assert prepare(tmp_path / 'out', tiny_clip_dir, f'--shards={shards}/{{00000..00002}}.tar',
                   f'--val_shards={shards}/00002.tar') is None
    err = capsys.readouterr().err
    lines = {line.split(':')[0]: line for line in err.splitlines() if line.startswith(str(shards))}
    first = lines[f'{shards}/00000.tar']
    assert 'kept 2 samples' in first and '2 no caption, first 0000002' in first
    assert '1 an image that does not decode (UnidentifiedImageError), first 0000004.jpg' in first
    assert '1 with a dot in its key' in first and 'a.b.jpg' in first
    assert 'kept 1 samples' in lines[f'{shards}/00001.tar'] and 'cut short after 0000101.json' not in err
    assert 'cut short after 0000101.jpg (an interrupted download?): 2 of the 3 samples its _stats.json ' \
        'counts lost' in lines[f'{shards}/00001.tar']
    assert 'lost 6 samples in all' in err and '2 missing' in err
    records = json.load(open(tmp_path / 'out' / 'train_images.json'))
    assert [(r['id'], r['captions']) for r in records] == [
        ('0000000', ['Ein Café am Meer — ☕']), ('0000001', ['a green field']), ('0000100', ['a yellow wall'])]
    meta = json.load(open(tmp_path / 'out' / 'meta.json'))
    assert meta['splits']['train']['images'] == 3 and meta['splits']['val']['images'] == 1


def test_a_caption_field_and_the_files_layout_read_as_the_tar(tmp_path, tiny_clip_dir):
    """--caption_field takes each caption from the sample's .json; img2dataset's
    --output_format=files (a folder per shard) gives the same features as the tar."""
    for n in range(2):
        files = sample(f'{n}000000', 'red', f'caption {n}') + sample(f'{n}000001', 'blue', f'other {n}')
        write_shard(tmp_path / f'{n:05d}.tar', files)
        folder = tmp_path / 'files' / f'{n:05d}'
        folder.mkdir(parents=True)
        for name, data in files:
            (folder / name).write_bytes(data)
    assert prepare(tmp_path / 'from_tar', tiny_clip_dir, f'--shards={tmp_path}/*.tar', '--val_shards=1',
                   '--caption_field=caption') is None
    assert prepare(tmp_path / 'from_files', tiny_clip_dir, f'--shards={tmp_path}/files', '--val_shards=1',
                   '--caption_field=caption') is None
    for split in ('train', 'val'):
        (tar_blobs, tar_records), (file_blobs, file_records) = (split_files(tmp_path / out, split)
                                                                for out in ('from_tar', 'from_files'))
        assert tar_blobs == file_blobs
        assert [r['captions'] for r in tar_records] == [r['captions'] for r in file_records]
        assert all(c[0].isupper() for r in tar_records for c in r['captions'])  # the .json's field


@pytest.mark.parametrize('shards, expected', [
    ('{root}/empty', '{root}/empty: no shards in it'),
    ('{root}/*.tgz', 'matches no file'),
    ('{root}/missing.tar', 'no such file or folder {root}/missing.tar'),
    ('{root}/texts.tar', 'split train: no usable sample in its 1 shard(s)'),
    ('{root}/notatar.tar', '{root}/notatar.tar: not a tar'),
])
def test_shards_that_cannot_be_read_fail_in_one_line(tmp_path, tiny_clip_dir, shards, expected):
    (tmp_path / 'empty').mkdir()
    write_shard(tmp_path / 'texts.tar', [('0.txt', b'a caption without its image'), ('1.txt', b'another')])
    (tmp_path / 'notatar.tar').write_bytes(b'<html>404 not found</html>' * 40)
    exit_message = prepare(tmp_path / 'out', tiny_clip_dir, '--shards=' + shards.format(root=tmp_path))
    assert exit_message.startswith('prepare_shards.py: ') and '\n' not in exit_message
    assert expected.format(root=tmp_path) in exit_message


def test_training_on_the_shards_gives_the_losses_of_the_folder_route(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """The sharded store, read by train.py as it reads a prepared folder: the same losses, step for step, as
    the same JPEGs and captions prepared by prepare_coco.py."""
    colours = ['red', 'green', 'blue', 'yellow', 'white', 'black']
    for n in range(3):
        write_shard(tmp_path / f'{n:05d}.tar', [f for k in range(4) for f in sample(
            f'{n}{k:06d}', colours[(n + k) % 6], f'a {colours[(n + k) % 6]} picture number {k}')])
    assert prepare(tmp_path / 'shards', tiny_clip_dir, f'--shards={tmp_path}/*.tar',
                   f'--val_shards={tmp_path}/00002.tar') is None
    images = tmp_path / 'images'
    images.mkdir()
    with open(tmp_path / 'captions.csv', 'w', newline='') as f:
        rows = csv.writer(f)
        rows.writerow(['image', 'caption', 'split'])
        for n in range(3):
            with tarfile.open(tmp_path / f'{n:05d}.tar') as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in (m for m in members if m.endswith('.jpg')):
                (images / name).write_bytes(members[name])
                rows.writerow([name, members[name[:-4] + '.txt'].decode(), 'val' if n == 2 else 'train'])
    assert run_script('prepare_coco.py', f'--captions={tmp_path}/captions.csv', f'--images={images}',
                      f'--out_dir={tmp_path}/folder', f'--vision_model={tiny_clip_dir}',
                      '--num_workers=0') is None
    losses = {}
    for route in ('shards', 'folder'):
        assert run_script('train.py', f'--out_dir={tmp_path}/run_{route}', f'--data_dir={tmp_path}/{route}',
                          f'--vision_model={tiny_clip_dir}', f'--text_model={tiny_gpt2_dir}', '--max_iters=20',
                          '--batch_size=4', '--eval_interval=10', '--log_interval=1', '--num_latents=8',
                          '--resampler_depth=1', '--heads=2', '--dim_head=16', '--mapper_hidden=32',
                          '--device=cpu', '--dtype=float32') is None
        log = [json.loads(line) for line in open(tmp_path / f'run_{route}' / 'log.jsonl')]
        losses[route] = [(r['iter'], r.get('loss'), r.get('val_loss')) for r in log]
    assert len(losses['shards']) >= 20 and losses['shards'] == losses['folder']


def test_an_interrupted_run_resumes_by_shard_with_another_number_of_processes(tmp_path, tiny_clip_dir,
                                                                              monkeypatch):
    """A run that dies in the middle of its third shard (an exception there leaves the files as a kill -9
    would: nothing is cleaned up), then a rerun with 2 gloo processes: the shards done are not done again,
    the third goes on from its last batch, and the store is byte for byte that of one uninterrupted
    process. A shard whose input changed is redone, and only it. Every run on one thread, as torchrun's
    processes are: CPU matrix products on another number of threads may round differently."""
    import subprocess
    import sys

    import torch

    import features
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        interrupted_then_resumed(tmp_path, tiny_clip_dir, monkeypatch, features, subprocess, sys)
    finally:
        torch.set_num_threads(threads)


def interrupted_then_resumed(tmp_path, tiny_clip_dir, monkeypatch, features, subprocess, sys):
    for n in range(4):
        write_shard(tmp_path / f'{n:05d}.tar', [f for k in range(5) for f in sample(
            f'{n}{k:06d}', ['red', 'green', 'blue', 'white', 'black'][k], f'shard {n} sample {k}')])
    options = (f'--shards={tmp_path}/{{00000..00003}}.tar', f'--val_shards={tmp_path}/00003.tar', '--batch_size=2')
    assert prepare(tmp_path / 'whole', tiny_clip_dir, *options) is None

    extract = features.extract_features

    class DiesAtItem2:  # the third shard's images: its first batch is written, then the process dies
        def __init__(self, files):
            self.files, self.paths, self.frame_counts = files, files.paths, files.frame_counts

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            if i == 2:
                raise RuntimeError('killed')
            return self.files[i]

    def dies_in_the_third_shard(model, files, out_path, *args, **kwargs):
        return extract(model, DiesAtItem2(files) if '00002' in out_path else files, out_path, *args, **kwargs)
    monkeypatch.setattr(features, 'extract_features', dies_in_the_third_shard)
    with pytest.raises(RuntimeError, match='killed'):
        prepare(tmp_path / 'resumed', tiny_clip_dir, *options)
    monkeypatch.undo()
    feats = tmp_path / 'resumed' / 'train_feats'
    done = {p.name: p.stat().st_mtime_ns for p in feats.iterdir() if p.name.count('.') == 1}
    assert sorted(done) == ['00000.bin', '00000.json', '00001.bin', '00001.json']
    assert (feats / '00002.bin.progress0').exists()  # its first batch
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    'prepare_shards.py', *options, f"--out_dir={tmp_path / 'resumed'}",
                    f'--vision_model={tiny_clip_dir}', '--num_workers=0', '--device=cpu'],
                   check=True, capture_output=True)
    assert {name: (feats / name).stat().st_mtime_ns for name in done} == done  # not done again
    for split in ('train', 'val'):
        assert split_files(tmp_path / 'resumed', split) == split_files(tmp_path / 'whole', split)
    assert json.load(open(tmp_path / 'resumed' / 'meta.json')) == json.load(open(tmp_path / 'whole' / 'meta.json'))

    write_shard(tmp_path / '00001.tar', sample('1000000', 'white', 'a changed shard'))
    assert prepare(tmp_path / 'resumed', tiny_clip_dir, *options) is None
    after = {name: (feats / name).stat().st_mtime_ns for name in done}
    assert after['00000.bin'] == done['00000.bin'] and after['00001.bin'] != done['00001.bin']
    records = json.load(open(tmp_path / 'resumed' / 'train_images.json'))
    assert [r['captions'] for r in records if r['id'].startswith('1')] == [['a changed shard']]


def test_what_real_downloads_leave_is_read_or_named(tmp_path, tiny_clip_dir, capsys):
    """img2dataset's leavings: an empty tar (none of its downloads succeeded), a shard present only as
    its _stats.json, a tar cut on a block boundary (tarfile then ends quietly, as if whole), a notes file
    beside the shards, and shards of two downloads that both number theirs from 00000."""
    for folder in ('cc3m', 'cc12m'):
        (tmp_path / folder).mkdir()
        write_shard(tmp_path / folder / '00000.tar', sample(f'{folder}0', 'red', f'a red {folder} car')
                    + sample(f'{folder}1', 'blue', f'a blue {folder} sky'))
    write_shard(tmp_path / 'cc3m' / '00001.tar', [])  # every download of it failed
    (tmp_path / 'cc3m' / '00002_stats.json').write_text(json.dumps(dict(count=32, successes=0)))
    (tmp_path / 'cc3m' / 'notes.txt').write_text('downloaded on Monday')
    (tmp_path / 'cc3m' / '00000_stats.json').write_text(json.dumps(dict(count=4, successes=3)))
    write_shard(tmp_path / 'cc12m' / '00001.tar', sample('cc12m2', 'green', 'a green leaf')
                + sample('cc12m3', 'white', 'a white cloud'))
    cut = (tmp_path / 'cc12m' / '00001.tar').read_bytes()
    cut_at = [i for i in range(512, len(cut), 512) if cut[i:i + 8] == b'cc12m3.j'][0]
    (tmp_path / 'cc12m' / '00001.tar').write_bytes(cut[:cut_at])  # ends after sample cc12m2, on a block
    assert prepare(tmp_path / 'out', tiny_clip_dir, f'--shards={tmp_path}/{{cc3m/{{00000..00002}}.tar,cc12m}}',
                   f'--val_shards={tmp_path}/cc12m/00000.tar') is None
    err = capsys.readouterr().err
    assert f'{tmp_path}/cc3m/00002.tar: none of its downloads succeeded' in err
    assert f'{tmp_path}/cc3m/00001.tar: kept 0 samples; no samples in it' in err
    assert f'{tmp_path}/cc3m/00000.tar: kept 2 samples; 1 of the 3 samples its _stats.json counts are ' \
        'not in it' in err
    assert f'{tmp_path}/cc12m/00001.tar: kept 1 samples; cut short after cc12m2.json' in err
    meta = json.load(open(tmp_path / 'out' / 'meta.json'))
    files = [s['file'] for s in meta['splits']['train']['feature_shards']]  # two shards named 00001
    assert files == ['train_feats/cc3m_00000.bin', 'train_feats/cc12m_00001.bin', 'train_feats/cc3m_00001.bin']
    records = json.load(open(tmp_path / 'out' / 'train_images.json'))
    assert [r['captions'][0] for r in records] == ['a red cc3m car', 'a blue cc3m sky', 'a green leaf']
    assert meta['splits']['val']['images'] == 2


@pytest.mark.parametrize('options, expected', [
    (['--shards={root}/{{00003..00001}}.tar'], 'the range {{00003..00001}} runs backwards'),
    (['--shards={root}/*.tar', '--val_shards={root}/00000.tar', '--test_shards={root}/00000.tar'],
     '{root}/00000.tar: both a val and a test shard'),
    (['--shards={root}/*.tar', '--val_shards={root}/*.tar'], 'no shard left for train: all 2 shards'),
])
def test_splits_that_cannot_be_made_fail_in_one_line(tmp_path, tiny_clip_dir, options, expected):
    for n in range(2):
        write_shard(tmp_path / f'{n:05d}.tar', sample(f'{n}', 'red', 'a caption'))
    exit_message = prepare(tmp_path / 'out', tiny_clip_dir, *(o.format(root=tmp_path) for o in options))
    assert exit_message.startswith('prepare_shards.py: ') and '\n' not in exit_message
    assert expected.format(root=tmp_path) in exit_message


def test_a_store_of_many_shards_is_read_with_few_files_open(tmp_path):
    """ShardedFeatures reads rows of any of its files, as one array, with at most 64 of them open (each
    memmap holds a file descriptor; a store of CC12M has about 1,240 files, ulimit -n is often 1024)."""
    from data import ShardedFeatures
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((int(n), 3, 4)).astype(np.float16) for n in rng.integers(1, 4, size=100)]
    for i, part in enumerate(parts):
        part.tofile(tmp_path / f'{i}.bin')
    store = ShardedFeatures(str(tmp_path), 'train', [dict(file=f'{i}.bin', images=len(p)) for i, p in
                                                     enumerate(parts)], (sum(map(len, parts)), 3, 4))
    whole = np.concatenate(parts)
    rows = rng.permutation(len(whole))
    assert np.array_equal(store[rows], whole[rows]) and np.array_equal(store[5:9], whole[5:9])
    assert len(store.open) <= 64


def test_shards_read_in_worker_processes_give_the_same_store(tmp_path, tiny_clip_dir):
    """python prepare_shards.py with --num_workers=2, as a user runs it: the next shards are read and
    checked in a pool while CLIP runs, and their images decoded in DataLoader workers; the store is that
    of one process doing it all."""
    import subprocess
    import sys
    for n in range(3):
        write_shard(tmp_path / f'{n:05d}.tar', [f for k in range(3) for f in sample(
            f'{n}{k:06d}', ['red', 'green', 'blue'][k], f'shard {n} sample {k}')])
    options = [f'--shards={tmp_path}', f'--val_shards={tmp_path}/00002.tar', f'--vision_model={tiny_clip_dir}',
               '--batch_size=2', '--device=cpu']
    assert run_script('prepare_shards.py', f'--out_dir={tmp_path}/alone', '--num_workers=0', *options) is None
    subprocess.run([sys.executable, 'prepare_shards.py', f'--out_dir={tmp_path}/pool', '--num_workers=2',
                    *options], check=True, capture_output=True)
    for split in ('train', 'val'):
        assert split_files(tmp_path / 'pool', split) == split_files(tmp_path / 'alone', split)
