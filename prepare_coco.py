"""
Precompute the frozen CLIP features of a captioning dataset once, into memory-mapped files, so that
training never runs CLIP. Reads the official COCO captions files, Karpathy's split files (COCO,
Flickr8k, Flickr30k), and your own captions: a CSV with a header (image,caption[,split]), JSON Lines
({"image": ..., "caption": ...} or {"image": ..., "captions": [...]}, optional "split"), or a folder of
images, each with a same-named .txt beside it (one caption per line):

    python prepare_coco.py --captions=coco/dataset_coco.json --images=coco --out_dir=data/coco
    python prepare_coco.py --captions=coco/annotations/captions_val2017.json --images=coco/val2017 \
        --out_dir=data/coco_val2017
    python prepare_coco.py --captions=mine/captions.csv --images=mine --val_images=100 --test_images=100 \
        --out_dir=data/mine

Your own captions get their split from a split column or field, else from --split=NAME, else from a
seeded hold-out of --val_images and --test_images images (the rest is train). An official COCO captions
file is one split (named by --split, or by its file name), or held out the same way; Karpathy's split files
name every image's split, and refuse all three.

Writes per split, each file atomically (temp file + rename):
  <split>_feats.bin      float16 [images, tokens, width]: CLIP's last_hidden_state of each image
  <split>_tokens.bin     uint16: the GPT-2 BPE tokens of every caption, one after another
  <split>_captions.npy   int64 [captions, 3]: (token offset, token count, image index) of each caption
  <split>_images.json    each image's file and raw captions (the references for evaluation)
  meta.json              vision model, shapes, dtypes, counts, tokenizer, sources, format version
An interrupted run resumes where it stopped.
"""
import csv
import json
import os
import random
import re
import sys
from contextlib import contextmanager

from common import (InputError, check_writable, gpt2_tokenizer, input_errors_exit, pick_device,
                    read_json, write_json)
from data import FORMAT_VERSION, one_line
from features import write_image_splits
from media import IMAGE_EXTENSIONS
from weights import load_vision

# -----------------------------------------------------------------------------
captions = ''  # the captions: a COCO or Karpathy JSON file, a .csv, a .jsonl, or a folder of images + .txt
images = ''  # the folder the captions' image paths are relative to
out_dir = 'data/coco'
split = ''  # the split of a file that holds one (default for official COCO files: 'train' or 'val' from its name)
val_images = 0  # captions without a split (yours, or an official COCO file): hold out this many images for val ...
test_images = 0  # ... and this many for test, chosen at random (seeded); the rest is train
seed = 1337
vision_model = 'openai/clip-vit-base-patch32'  # hub name or local directory
batch_size = 64
num_workers = min(4, os.cpu_count() or 1)  # image decoding processes
device = ''  # default: cuda when available, else cpu
skip_bad_images = False  # drop unreadable images (and their captions) instead of stopping
# -----------------------------------------------------------------------------

# ----------------------------------------------------------------------------- caption files

def load_captions(path, image_root, split_name='', val_images=0, test_images=0, seed=1337):
    """{split: [{'file': path, 'id': image id, 'captions': [str, ...]}, ...]} from any supported format."""
    own = folder_rows if os.path.isdir(path) else csv_rows if path.lower().endswith('.csv') else \
        jsonl_rows if path.lower().endswith('.jsonl') else None
    if own:
        return own_splits(own(path), image_root, path, split_name, val_images, test_images, seed)
    data = read_json(path)
    if data is None:
        raise InputError(f'{path}: no such captions file')
    images_list = data.get('images') if isinstance(data, dict) else None
    if isinstance(images_list, list) and isinstance(data.get('annotations'), list):
        records = coco_images(data, image_root, path)
        if not (val_images or test_images):  # one split: the file's
            return {split_name or split_from_name(path): records}
        assign_splits(records, path, split_name, val_images, test_images, seed)  # held out of the file's images
        return by_split(records)
    if isinstance(images_list, list) and all(isinstance(im, dict) and 'sentences' in im for im in images_list):
        if split_name or val_images or test_images:
            raise InputError(f"{path}: Karpathy's split file names the split of every image: leave out --split, "
                             f'--val_images and --test_images')
        return karpathy_images(images_list, image_root, path)
    raise InputError(f'{path}: expected the official COCO captions format (images[] with id/file_name, '
                     f'annotations[] with image_id/caption) or Karpathy\'s split file (images[] with '
                     f'filename, split and sentences[].raw)')


# Your own captions: each reader yields (image path relative to --images, caption, split or None, where)

def csv_rows(path):
    with open_text(path) as f:
        reader = csv.DictReader(f, strict=True)  # strict: a stray quote is an error, not a merged row
        missing = [c for c in ('image', 'caption') if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}:1: the header has no {' or '.join(missing)} column "
                             f"(expected image,caption and optionally split)")
        while True:
            where = f'{path}:{reader.line_num + 1}'  # the line the row starts on (a quoted caption may span lines)
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if 'unexpected end of data' in str(e):  # a quote that opens here runs to the end of the file
                    raise InputError(f'{where}: a quote opens on this line and is never closed')
                raise InputError(f'{where}: not a well-formed CSV row ({e})')
            if None in row.values() or None in row:
                raise InputError(f'{where}: {len(reader.fieldnames)} columns expected')
            yield from own_row(row.get('image'), [row['caption']], row.get('split'), 'split' in row, where)


def jsonl_rows(path):
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            where = f'{path}:{number}'
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f'{where}: not JSON ({e})')
            if not isinstance(item, dict) or ('caption' in item) == ('captions' in item):
                raise InputError(f'{where}: expected an object with "image" and "caption" or "captions"')
            texts = item['captions'] if 'captions' in item else [item['caption']]
            if not isinstance(texts, list):
                raise InputError(f'{where}: "captions" is not a list')
            yield from own_row(item.get('image'), texts, item.get('split'), 'split' in item, where)




def folder_rows(folder):
    """Every image below folder with a same-named .txt beside it; the others, and .txt files without an
    image, are named on stderr and left out."""
    images, texts = {}, {}  # file name without its extension -> file name
    for directory, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(os.path.relpath(os.path.join(directory, name), folder))
            if ext.lower() in IMAGE_EXTENSIONS:
                if stem in images:
                    raise InputError(f'{folder}: {images[stem]} and {stem + ext} would share {stem}.txt')
                images[stem] = stem + ext
            elif ext.lower() == '.txt':
                texts[stem] = stem + ext
    name_left_out(folder, 'images have no .txt beside them', sorted(images.keys() - texts.keys()))
    name_left_out(folder, '.txt files have no image beside them', sorted(texts.keys() - images.keys()))
    for stem in sorted(images.keys() & texts.keys()):
        txt = os.path.join(folder, texts[stem])
        with open_text(txt) as f:
            lines = [line.strip() for line in f if line.strip()]
        yield from own_row(images[stem], lines, None, False, txt)


@contextmanager
def open_text(path):
    """A text file of captions, read as UTF-8 (a byte-order mark, as Excel writes, is skipped)."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: no such captions file')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            yield f
    except UnicodeDecodeError as e:
        raise InputError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8')


def name_left_out(source, what, names):
    """Say on stderr how many entries of `source` are left out, and which: nothing goes silently."""
    if names:
        print(f"{source}: {len(names):,} {what} and are left out: {', '.join(names[:5])}"
              + (', ...' if len(names) > 5 else ''), file=sys.stderr)


def own_row(image, texts, split_name, has_split, where):
    """A row, checked, as one (image, caption, split or None, where) per caption."""
    if not isinstance(image, str) or not image.strip():
        raise InputError(f'{where}: no image')
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError(f'{where}: an empty caption')
    if has_split and not (isinstance(split_name, str) and SPLIT_NAME.fullmatch(split_name.strip())):
        raise InputError(f'{where}: the split {split_name!r} is not a name of letters, digits, _ and -')
    return [(os.path.normpath(image.strip()), one_line(t), split_name.strip() if has_split else None, where)
            for t in texts]


SPLIT_NAME = re.compile(r'[A-Za-z0-9_-]+')  # it becomes part of file names


def own_splits(rows, image_root, path, split_name, val_images, test_images, seed):
    """Rows -> {split: records}, an image's captions gathered in one record, in the order first seen."""
    records = {}
    for image, caption, row_split, where in rows:
        record = records.setdefault(image, dict(file=os.path.join(image_root, image), id=image, captions=[],
                                                split=row_split, where=where))
        if row_split != record['split']:
            raise InputError(f"{where}: {image} is in split {row_split!r} here, in {record['split']!r} at "
                             f"{record['where']}")
        record['captions'].append(caption)
    if not records:
        raise InputError(f'{path}: no captions')
    records = list(records.values())
    with_split = [r for r in records if r['split'] is not None]
    if with_split and len(with_split) < len(records):
        without = next(r for r in records if r['split'] is None)
        raise InputError(f"{without['where']}: no split, while {with_split[0]['where']} has one")
    if with_split and (split_name or val_images or test_images):
        raise InputError(f'{path} names the split of every image: leave out --split, --val_images and '
                         f'--test_images')
    if not with_split:
        assign_splits(records, path, split_name, val_images, test_images, seed)
    for record in records:
        del record['where']
    return by_split(records)


def by_split(records):
    """{split: its records}, each record's 'split' taken out of it."""
    splits = {}
    for record in records:
        splits.setdefault(record.pop('split'), []).append(record)
    return splits


def assign_splits(records, path, split_name, val_images, test_images, seed):
    if split_name and (val_images or test_images):
        raise InputError('give either --split or --val_images/--test_images, not both')
    if val_images < 0 or test_images < 0:
        raise InputError('--val_images and --test_images count images: they cannot be negative')
    if split_name:
        for record in records:
            record['split'] = split_name
        return
    if not val_images and not test_images:
        raise InputError(f'{path}: no split column: give --split=NAME, or --val_images=N and/or '
                         f'--test_images=N to hold out that many images')
    if val_images + test_images >= len(records):
        raise InputError(f'{path}: {len(records)} images, too few to hold out {val_images} + {test_images}')
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    for rank, i in enumerate(order):
        records[i]['split'] = 'test' if rank < test_images else 'val' if rank < test_images + val_images \
            else 'train'


def split_from_name(path):
    name = os.path.basename(path)
    for candidate in ('train', 'val', 'test'):
        if candidate in name:
            return candidate
    raise InputError(f'{path}: cannot tell the split from the file name; give it with --split=NAME')


def field(item, key, kind, where):
    """item[key], which must be of type `kind`; `where` names the item for the error."""
    if not isinstance(item, dict) or not isinstance(item.get(key), kind):
        raise InputError(f'{where} has no {key} ({kind.__name__ if isinstance(kind, type) else "str or int"})')
    return item[key]


def coco_images(data, image_root, path):
    files = {field(im, 'id', (int, str), f'{path}: images[{i}]'):
             field(im, 'file_name', str, f'{path}: images[{i}]') for i, im in enumerate(data['images'])}
    by_id = {}
    for i, annotation in enumerate(data['annotations']):
        where = f'{path}: annotations[{i}]'
        image_id = field(annotation, 'image_id', (int, str), where)
        if image_id not in files:
            raise InputError(f'{where} is a caption of image_id {image_id!r}, which images[] does not list')
        by_id.setdefault(image_id, []).append(one_line(field(annotation, 'caption', str, where)))
    if not by_id:
        raise InputError(f'{path}: no captions (annotations[] is empty)')
    name_left_out(path, f'of its {len(files):,} images have no caption',
                  sorted(name for i, name in files.items() if i not in by_id))
    records = [dict(file=os.path.join(image_root, files[i]), id=i, captions=captions) for i, captions in by_id.items()]
    return sorted(records, key=lambda r: r['id'])


def karpathy_images(images_list, image_root, path):
    splits = {}
    for i, im in enumerate(images_list):
        where = f'{path}: images[{i}]'
        name = field(im, 'split', str, where)
        name = 'train' if name == 'restval' else name  # train = train + restval
        sentences = field(im, 'sentences', list, where)
        captions = [one_line(field(s, 'raw', str, f'{where}.sentences[{j}]')) for j, s in enumerate(sentences)]
        if not captions:
            raise InputError(f'{where} has no sentences')
        splits.setdefault(name, []).append(dict(
            file=os.path.join(image_root, im.get('filepath', ''), field(im, 'filename', str, where)),
            id=im.get('cocoid', im.get('imgid')), captions=captions))
    return splits


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    import torch
    # under torchrun, every rank extracts its own slice of each split
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world > 1:
        torch.distributed.init_process_group('gloo')  # only to coordinate: barriers and the bad list
    meta_path = os.path.join(out_dir, 'meta.json')
    with input_errors_exit('prepare_coco.py'):
        if not captions or not images:
            raise InputError('give --captions=FILE and --images=FOLDER')
        if not os.path.isdir(images):
            raise InputError(f'{images}: no such folder (--images)')
        check_writable(out_dir)
        gpt2_tokenizer()  # its files, before any work
        dev = pick_device(device)  # under torchrun: this rank's own GPU
        # splits prepared by earlier runs into the same folder stay listed, if they are compatible
        meta = read_json(meta_path) or {}
        if meta and (meta.get('format_version'), meta.get('vision_model')) != (FORMAT_VERSION, vision_model):
            raise InputError(f"{meta_path} holds features of {meta.get('vision_model')!r} (format "
                             f"{meta.get('format_version')}); use another --out_dir for {vision_model!r}")
        splits = load_captions(captions, images, split, val_images, test_images, seed)
        vision = load_vision(vision_model).to(dev).eval()
        prepared = write_image_splits(splits, out_dir, vision, vision_model, batch_size, num_workers,
                                      skip_bad_images, rank, world)
    if rank != 0:
        sys.exit(0)
    for entry in prepared['splits'].values():
        entry['source'] = dict(captions=os.path.abspath(captions), images=os.path.abspath(images))
    prepared['splits'] = {**meta.get('splits', {}), **prepared['splits']}
    write_json(meta_path, prepared)
    print(f'wrote {out_dir}: ' + ', '.join(f"{k} {v['images']:,} images / {v['captions']:,} captions"
                                           for k, v in prepared['splits'].items()))
    missing = [name for name in ('train', 'val') if name not in prepared['splits']]
    if missing:  # not an error: the next run may prepare them into the same folder
        print(f"note: {out_dir} has no {' or '.join(missing)} split yet, which train.py needs by default "
              f'(prepare them into it; of your own captions, --val_images=N holds some out)', file=sys.stderr)
