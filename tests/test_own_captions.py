"""prepare_coco.py on your own captions: a CSV, JSON Lines, a folder of images with .txt files beside
them, and Karpathy's Flickr split files; splits from the data, from --split, or a seeded hold-out."""
import json
import os

import pytest
from PIL import Image

import prepare_coco
from conftest import run_script, stored_features
from common import InputError


def load(path, **options):
    """{split: [(image id, file, captions)]} as prepare_coco.py reads `path`, images under 'root'."""
    splits = prepare_coco.load_captions(str(path), 'root', **options)
    return {name: [(r['id'], r['file'], r['captions']) for r in records] for name, records in splits.items()}


def write(path, text):
    path.write_text(text, encoding='utf-8')
    return path


def test_csv_with_a_split_column(tmp_path):
    path = write(tmp_path / 'captions.csv', 'image,caption,split\n'
                 'a.jpg,A dog runs.,train\n'
                 'b/c.jpg," A cat, asleep. ",val\n'
                 'a.jpg,"A dog, running ""fast"".",train\n')
    assert load(path) == {
        'train': [('a.jpg', os.path.join('root', 'a.jpg'), ['A dog runs.', 'A dog, running "fast".'])],
        'val': [('b/c.jpg', os.path.join('root', 'b/c.jpg'), ['A cat, asleep.'])]}


def test_jsonl_caption_or_captions_and_the_split_setting(tmp_path):
    path = write(tmp_path / 'captions.jsonl', '{"image": "a.jpg", "caption": "One."}\n\n'
                 '{"image": "b.jpg", "captions": ["Two.", "Three."]}\n{"image": "a.jpg", "caption": "Four."}\n')
    assert load(path, split_name='test') == {'test': [
        ('a.jpg', os.path.join('root', 'a.jpg'), ['One.', 'Four.']),
        ('b.jpg', os.path.join('root', 'b.jpg'), ['Two.', 'Three.'])]}
    with pytest.raises(InputError, match='no split column: give --split=NAME'):
        load(path)


def test_hold_out_is_by_image_seeded_and_complete(tmp_path):
    rows = ''.join(f'{i}.jpg,Caption {j} of {i}.\n' for i in range(20) for j in range(3))
    path = write(tmp_path / 'captions.csv', 'image,caption\n' + rows)
    splits = load(path, val_images=3, test_images=2, seed=7)
    assert {name: len(records) for name, records in splits.items()} == {'train': 15, 'val': 3, 'test': 2}
    images = [image for records in splits.values() for image, _, captions in records if len(captions) == 3]
    assert sorted(images) == sorted(f'{i}.jpg' for i in range(20))  # every image once, with all its captions
    assert load(path, val_images=3, test_images=2, seed=7) == splits
    held_out = lambda s: {image for name in ('val', 'test') for image, _, _ in s[name]}
    assert held_out(load(path, val_images=3, test_images=2, seed=8)) != held_out(splits)
    with pytest.raises(InputError, match='20 images, too few to hold out 10 \\+ 10'):
        load(path, val_images=10, test_images=10)


def test_folder_of_images_with_text_files(tmp_path, capsys):
    folder = tmp_path / 'mine'
    (folder / 'sub').mkdir(parents=True)
    for name in ('a.jpg', 'b.png', 'sub/d.JPG'):
        Image.new('RGB', (8, 8)).save(folder / name, format='PNG' if name.endswith('png') else 'JPEG')
    write(folder / 'a.txt', 'A red square.\n\n  A square, red.  \n')
    write(folder / 'sub' / 'd.txt', 'Dark.\n')
    write(folder / 'c.txt', 'An orphan caption.\n')
    assert load(folder, split_name='train') == {'train': [
        ('a.jpg', os.path.join('root', 'a.jpg'), ['A red square.', 'A square, red.']),
        ('sub/d.JPG', os.path.join('root', 'sub/d.JPG'), ['Dark.'])]}
    err = capsys.readouterr().err
    assert f'{folder}: 1 images have no .txt beside them and are left out: b' in err
    assert f'{folder}: 1 .txt files have no image beside them and are left out: c' in err
    (folder / 'sub' / 'd.txt').rename(folder / 'sub' / 'd.TXT')  # the text file's own name is kept
    assert load(folder, split_name='train')['train'][1][2] == ['Dark.']
    Image.new('RGB', (8, 8)).save(folder / 'a.png')
    with pytest.raises(InputError, match='would share a.txt$'):
        load(folder, split_name='train')


@pytest.mark.parametrize('name, text, message', [
    ('c.csv', 'image,text\na.jpg,x\n', 'c.csv:1: the header has no caption column'),
    ('c.csv', 'image,caption\na.jpg,x\nb.jpg,\n', 'c.csv:3: an empty caption'),
    ('c.csv', 'image,caption\na.jpg,x,extra\n', 'c.csv:2: 2 columns expected'),
    ('c.csv', 'image,caption,split\na.jpg,x,train\na.jpg,y,val\n', "c.csv:3: a.jpg is in split 'val' here, "
                                                                 "in 'train' at "),
    ('c.jsonl', '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", caption: 1}\n', 'c.jsonl:2: not JSON'),
    ('c.jsonl', '{"image": "a.jpg", "caption": "x", "captions": ["y"]}\n',
     'c.jsonl:1: expected an object with "image" and "caption" or "captions"'),
    ('c.jsonl', '{"caption": "x"}\n', 'c.jsonl:1: no image'),
    ('c.jsonl', '{"image": "a.jpg", "caption": "x", "split": "val"}\n{"image": "b.jpg", "caption": "y"}\n',
     'c.jsonl:2: no split, while '),
    ('c.csv', 'image,caption\na.jpg,x\nb.jpg,"unbalanced\nc.jpg,y\nd.jpg,z\n',
     'c.csv:3: a quote opens on this line and is never closed'),
    ('c.csv', 'image,caption\na.jpg,"two\nlines"\nb.jpg,"unbalanced\nc.jpg,y\n',
     'c.csv:4: a quote opens on this line and is never closed'),
    ('c.csv', 'image,caption\na.jpg,x\nb.jpg,"said "hi" to me"\n', 'c.csv:3: not a well-formed CSV row'),
    ('c.csv', 'image,caption,split\na.jpg,x,../elsewhere\n', "c.csv:2: the split '../elsewhere' is not a name"),
])
def test_a_malformed_row_is_named_by_file_and_line(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(InputError) as error:
        load(path)
    assert str(error.value).startswith(f'{path}:') and message in str(error.value), str(error.value)
    assert '\n' not in str(error.value)


# real COCO captions hold line breaks: val2017 has one ending "...some greens.\n", another "...ready to be cut\n."
MULTILINE = [('a.png', 'A salad with some greens.\n'), ('a.png', 'A cake ready to be cut\n.'),
             ('b.png', 'Two dogs\r\non a  couch, "asleep".'), ('b.png', 'A dog.')]


def test_captions_over_several_lines_are_one_line_in_every_format(tmp_path, tiny_clip_dir):
    """A CSV written by Python's csv module quotes a caption with line breaks over several lines (RFC 4180):
    it is prepared into the same files as the same captions in JSON Lines, each caption on one line."""
    import csv
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i, name in enumerate(('a.png', 'b.png')):
        Image.new('RGB', (40, 30), (90 * i, 20, 200)).save(folder / name)
    with open(tmp_path / 'captions.csv', 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'caption'])
        writer.writerows(MULTILINE)
    assert '"A salad with some greens.\n"' in (tmp_path / 'captions.csv').read_text()  # quoted over two lines
    write(tmp_path / 'captions.jsonl', ''.join(json.dumps(dict(image=i, caption=c)) + '\n' for i, c in MULTILINE))
    for kind in ('csv', 'jsonl'):
        assert run_script('prepare_coco.py', f'--captions={tmp_path}/captions.{kind}', f'--images={folder}',
                          f'--out_dir={tmp_path}/{kind}', f'--vision_model={tiny_clip_dir}', '--num_workers=0',
                          '--split=train') is None
    names = sorted(p.name for p in (tmp_path / 'csv').iterdir() if p.name != 'meta.json')
    assert names == ['train_captions.npy', 'train_feats.bin', 'train_images.json', 'train_tokens.bin']
    for name in names:
        assert (tmp_path / 'csv' / name).read_bytes() == (tmp_path / 'jsonl' / name).read_bytes(), name
    records = json.loads((tmp_path / 'csv' / 'train_images.json').read_text())
    assert [r['captions'] for r in records] == [['A salad with some greens.', 'A cake ready to be cut .'],
                                                ['Two dogs on a couch, "asleep".', 'A dog.']]


def test_eval_bleu_scores_your_own_captions_prepared_from_a_csv_or_json_lines(tmp_path, tiny_clip_dir, run_dir):
    """eval_bleu.py checks whether the captions file of the prepared data keeps shapes scenes: a CSV or JSON Lines
    file is not JSON, and is no reason to fail (it did, after captioning the whole split)."""
    import shutil
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i, name in enumerate(('a.png', 'b.png')):
        Image.new('RGB', (40, 30), (90 * i, 20, 200)).save(folder / name)
    write(tmp_path / 'captions.csv', 'image,caption\na.png,A purple square.\nb.png,"A red square,\non white."\n')
    write(tmp_path / 'captions.jsonl', ''.join(json.dumps(dict(image=i, caption=c)) + '\n' for i, c in MULTILINE))
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'best.pt')
    for kind in ('csv', 'jsonl'):
        assert run_script('prepare_coco.py', f'--captions={tmp_path}/captions.{kind}', f'--images={folder}',
                          f'--out_dir={tmp_path}/{kind}', f'--vision_model={tiny_clip_dir}', '--num_workers=0',
                          '--split=test') is None
        assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={tmp_path}/{kind}', '--split=test',
                          '--decoding=greedy', '--max_new_tokens=4', '--device=cpu') is None
        metrics = json.loads((tmp_path / 'metrics_test_greedy.json').read_text())
        assert metrics['items'] == 2 and 'BLEU-4' in metrics and 'pairs_right' not in metrics


def test_real_flickr8k_split_file():
    """Karpathy's dataset_flickr8k.json as it ships: no filepath, no cocoid, images in one folder."""
    path = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'schema_samples',
                        'karpathy_dataset_flickr8k_excerpt.json')
    if not os.path.isfile(path):
        pytest.skip('no ../shared beside the repository')
    shipped = json.load(open(path))['images']
    splits = prepare_coco.load_captions(path, 'Flickr8k_Dataset')
    assert {name: len(records) for name, records in splits.items()} == \
        {name: sum(im['split'] == name for im in shipped) for name in ('train', 'val', 'test')}
    first = next(r for r in splits[shipped[0]['split']] if r['id'] == shipped[0]['imgid'])
    assert first['file'] == os.path.join('Flickr8k_Dataset', shipped[0]['filename'])
    assert first['captions'] == [s['raw'].strip() for s in shipped[0]['sentences']]


def test_an_official_coco_file_holds_out_images_and_a_split_file_refuses_to(tmp_path):
    """--val_images/--test_images hold out images of an official COCO captions file as of any other (they were
    ignored without a word); Karpathy's split file names every image's split, so they are refused."""
    shared = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'schema_samples')
    coco, karpathy = (os.path.join(shared, name) for name in ('coco2014_captions_val2014_excerpt.json',
                                                              'karpathy_dataset_flickr8k_excerpt.json'))
    if not os.path.isfile(coco):
        pytest.skip('no ../shared beside the repository')
    shipped = json.load(open(coco))
    splits = load(coco, val_images=10, test_images=5, seed=3)
    assert {name: len(records) for name, records in splits.items()} == {'train': 35, 'val': 10, 'test': 5}
    captions_of = {i: [a['caption'] for a in shipped['annotations'] if a['image_id'] == i] for i in
                   (im['id'] for im in shipped['images'])}
    seen = {image: captions for records in splits.values() for image, _, captions in records}
    assert seen.keys() == captions_of.keys() and all(len(seen[i]) == len(captions_of[i]) for i in seen)
    assert load(coco, val_images=10, test_images=5, seed=3) == splits
    assert list(load(coco)) == ['val']  # no hold-out: the one split the file's name says
    for options in (dict(val_images=2), dict(split_name='train')):
        with pytest.raises(InputError, match="Karpathy's split file names the split of every image: leave out"):
            load(karpathy, **options)


def test_prepare_script_on_a_csv_with_missing_images_and_a_hold_out(tmp_path, tiny_clip_dir, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i in range(6):
        Image.new('RGB', (40, 30), (40 * i, 0, 0)).save(folder / f'{i}.png')
    rows = ''.join(f'{i}.png,Photo {i}.\n' for i in range(6)) + 'gone.png,A photo that is not there.\n'
    csv_path = write(tmp_path / 'captions.csv', 'image,caption\n' + rows)
    args = [f'--captions={csv_path}', f'--images={folder}', f"--out_dir={tmp_path / 'out'}",
            f'--vision_model={tiny_clip_dir}', '--num_workers=0', '--val_images=2', '--test_images=1']
    message = run_script('prepare_coco.py', *args)
    assert message.startswith('prepare_coco.py: 1 unusable image(s) in split ') and 'gone.png' in message
    assert run_script('prepare_coco.py', *args, '--skip_bad_images=True') is None
    held_out = prepare_coco.load_captions(str(csv_path), str(folder), val_images=2, test_images=1)
    expected = {name: sum(not r['file'].endswith('gone.png') for r in records)
                for name, records in held_out.items()}
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert {name: entry['images'] for name, entry in meta['splits'].items()} == expected
    assert sum(expected.values()) == 6 and len(held_out['val']) == 2 and len(held_out['test']) == 1
    assert len(stored_features(tmp_path / 'out' / 'train_feats.bin')) == expected['train']
    assert 'note:' not in capsys.readouterr().err
    # all of it as one test split: a note says what train.py will miss
    assert run_script('prepare_coco.py', *args[:2], f"--out_dir={tmp_path / 'test_only'}", *args[3:5],
                      '--split=test', '--skip_bad_images=True') is None
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"note: {tmp_path / 'test_only'} has no train or val split yet, which train.py needs by default (prepare "
        'them into it; of your own captions, --val_images=N holds some out)')


def test_excel_csv_and_text_that_is_not_utf8(tmp_path):
    """Excel saves CSV with a byte-order mark and \\r\\n; a file in another encoding stops in one line."""
    path = tmp_path / 'excel.csv'
    path.write_bytes('\ufeffimage,caption,split\r\na.jpg,Un café.,train\r\n'.encode('utf-8'))
    assert load(path) == {'train': [('a.jpg', os.path.join('root', 'a.jpg'), ['Un café.'])]}
    path.write_bytes('image,caption,split\na.jpg,Un café.,train\n'.encode('latin-1'))
    with pytest.raises(InputError, match=f'^{path}: not UTF-8 text'):
        load(path)


def test_one_image_is_one_record_and_settings_do_not_contradict_the_data(tmp_path):
    path = write(tmp_path / 'c.csv', 'image,caption\n./a.jpg,One.\na.jpg,Two.\nb.jpg,Three.\nc.jpg,Four.\n')
    assert load(path, split_name='train')['train'][0][2] == ['One.', 'Two.']
    with pytest.raises(InputError, match='give either --split or --val_images/--test_images, not both'):
        load(path, split_name='train', val_images=1)
    with pytest.raises(InputError, match='cannot be negative'):
        load(path, val_images=-1)
    with_splits = write(tmp_path / 's.csv', 'image,caption,split\na.jpg,One.,train\n')
    with pytest.raises(InputError, match='names the split of every image: leave out --split'):
        load(with_splits, split_name='val')
