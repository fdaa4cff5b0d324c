"""
Precompute the frozen CLIP features of a captioning dataset once, into memory-mapped files, so that
training never runs CLIP. Reads the official COCO captions files and Karpathy's split file:

    python prepare_coco.py --captions=coco/dataset_coco.json --images=coco --out_dir=data/coco
    python prepare_coco.py --captions=coco/annotations/captions_val2017.json --images=coco/val2017 \
        --out_dir=data/coco_val2017

Writes per split, each file atomically (temp file + rename):
  <split>_feats.bin      float16 [images, tokens, width]: CLIP's last_hidden_state of each image
  <split>_tokens.bin     uint16: the GPT-2 BPE tokens of every caption, one after another
  <split>_captions.npy   int64 [captions, 3]: (token offset, token count, image index) of each caption
  <split>_images.json    each image's file and raw captions (the references for evaluation)
  meta.json              vision model, shapes, dtypes, counts, tokenizer, sources, format version
An interrupted run resumes where it stopped.
"""
import os
import sys

from data import FORMAT_VERSION, InputError, input_errors_exit, read_json, write_image_splits, write_json
from model import load_vision, pick_device

# -----------------------------------------------------------------------------
captions = ''  # the captions file: official COCO format or Karpathy's dataset_*.json
images = ''  # the folder the captions file's image paths are relative to
out_dir = 'data/coco'
split = ''  # official COCO files hold one split: its name (default: 'train' or 'val' from the file name)
vision_model = 'openai/clip-vit-base-patch32'  # hub name or local directory
batch_size = 64
num_workers = min(4, os.cpu_count() or 1)  # image decoding processes
device = ''  # default: cuda when available, else cpu
skip_bad_images = False  # drop unreadable images (and their captions) instead of stopping
# -----------------------------------------------------------------------------

# ----------------------------------------------------------------------------- caption files

def load_captions(path, image_root, split_name=''):
    """{split: [{'file': path, 'id': image id, 'captions': [str, ...]}, ...]} from either format."""
    data = read_json(path)
    if data is None:
        raise InputError(f'{path}: no such captions file')
    images_list = data.get('images') if isinstance(data, dict) else None
    if isinstance(images_list, list) and isinstance(data.get('annotations'), list):
        return {split_name or split_from_name(path): coco_images(data, image_root, path)}
    if isinstance(images_list, list) and all(isinstance(im, dict) and 'sentences' in im for im in images_list):
        return karpathy_images(images_list, image_root, path)
    raise InputError(f'{path}: expected the official COCO captions format (images[] with id/file_name, '
                     f'annotations[] with image_id/caption) or Karpathy\'s split file (images[] with '
                     f'filename, split and sentences[].raw)')


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
        by_id.setdefault(image_id, []).append(field(annotation, 'caption', str, where).strip())
    if not by_id:
        raise InputError(f'{path}: no captions (annotations[] is empty)')
    uncaptioned = len(files) - len(by_id)
    if uncaptioned:
        print(f'{path}: {uncaptioned:,} of its {len(files):,} images have no caption and are left out',
              file=sys.stderr)
    records = [dict(file=os.path.join(image_root, files[i]), id=i, captions=captions) for i, captions in by_id.items()]
    return sorted(records, key=lambda r: r['id'])


def karpathy_images(images_list, image_root, path):
    splits = {}
    for i, im in enumerate(images_list):
        where = f'{path}: images[{i}]'
        name = field(im, 'split', str, where)
        name = 'train' if name == 'restval' else name  # train = train + restval
        sentences = field(im, 'sentences', list, where)
        captions = [field(s, 'raw', str, f'{where}.sentences[{j}]').strip() for j, s in enumerate(sentences)]
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
        dev = pick_device(device)  # under torchrun: this rank's own GPU
        # splits prepared by earlier runs into the same folder stay listed, if they are compatible
        meta = read_json(meta_path) or {}
        if meta and (meta.get('format_version'), meta.get('vision_model')) != (FORMAT_VERSION, vision_model):
            raise InputError(f"{meta_path} holds features of {meta.get('vision_model')!r} (format "
                             f"{meta.get('format_version')}); use another --out_dir for {vision_model!r}")
        splits = load_captions(captions, images, split)
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
