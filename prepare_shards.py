"""
CLIP features of image-text shards as img2dataset writes them (CC3M, CC12M, LAION subsets, ...),
read in place: no sample is unpacked to disk.

    python prepare_shards.py --shards='cc3m/{00000..00331}.tar' --val_shards=2 --test_shards=2 \
        --out_dir=data/cc3m
    torchrun --standalone --nproc_per_node=8 prepare_shards.py --shards=cc3m --val_shards=cc3m_val \
        --out_dir=data/cc3m

A shard is a tar (img2dataset's --output_format=webdataset) or a folder (--output_format=files) of
<key>.jpg (or .jpeg, .png, .webp), <key>.txt (the caption) and <key>.json (img2dataset's record of
the sample: url, status, sizes, ...); a failed download is absent. A sample's caption is its .txt,
or a field of its .json (--caption_field). Splits are whole shards: named (--val_shards=SPEC) or
held out at random (--val_shards=N, seeded). A bad sample (an image that does not decode, no
caption) is skipped and counted, one line per shard that had any; a tar cut short (an interrupted
download) keeps its readable samples. The shard is the unit of work and of resume: its features go
to <split>_feats/<shard>.bin, what it held to <shard>.json; ranks take every world-th shard, and a
rerun, with any number of processes, redoes only the shards not finished or whose input changed.
train.py, eval_bleu.py and sample.py read the result as any prepared folder (data.py).
"""
import functools
import glob
import io
import json
import os
import random
import re
import sys
import tarfile
import time
from collections import Counter

from common import (InputError, check_writable, gpt2_tokenizer, input_errors_exit, pick_device,
                    read_json, write_json)
from data import new_meta, one_line, write_captions
from features import extract_features
from media import clip_preprocess, load_rgb, tokens_per_frame

# -----------------------------------------------------------------------------
# Settings (python prepare_shards.py --help)
shards = ''  # img2dataset's output: a folder of shards, a glob ('cc3m/*.tar') or a brace range
val_shards = ''  # validation's shards: a folder, glob or range, or N: N of --shards at random
test_shards = ''  # the test shards, as val_shards
caption_field = ''  # the caption: '' for each sample's .txt, else this field of its .json
out_dir = 'data/shards'
seed = 1337  # which shards --val_shards=N and --test_shards=N hold out
vision_model = 'openai/clip-vit-base-patch32'  # hub name or local directory
batch_size = 64
num_workers = min(4, os.cpu_count() or 1)  # image decoding processes
device = ''  # default: cuda when available, else cpu

IMAGE_TYPES = ('jpg', 'jpeg', 'png', 'webp')  # img2dataset's --encode_format choices


# -----------------------------------------------------------------------------
# Finding the shards

def expand_braces(spec):
    """'a/{00000..00002}.tar' -> ['a/00000.tar', 'a/00001.tar', 'a/00002.tar'] (a range keeps its
    zero padding); '{a,b}' -> ['a', 'b']; several braces multiply."""
    match = re.search(r'\{([^{}]*)\}', spec)
    if not match:
        return [spec]
    head, tail, inside = spec[:match.start()], spec[match.end():], match.group(1)
    numbers = re.fullmatch(r'(\d+)\.\.(\d+)', inside)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise InputError(f'{spec}: the range {{{inside}}} runs backwards')
        choices = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        choices = inside.split(',')
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


def find_shards(spec, setting='shards'):
    """The shards of a --shards value: a tar or a shard folder, a folder of them, a glob, a brace
    range."""
    found = []
    for pattern in expand_braces(spec):
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise InputError(f'--{setting}={spec}: {pattern} matches no file')
        for path in paths:
            if not os.path.exists(path):
                failed = failed_shard(path)
                if not failed:
                    raise InputError(f'--{setting}={spec}: no such file or folder {path}')
                print(f'{path}: none of its downloads succeeded ({failed}): left out',
                      file=sys.stderr)
                continue
            if os.path.isdir(path) and not is_shard_folder(path):
                inner = sorted(glob.glob(os.path.join(path, '*.tar')))
                inner = inner or sorted(p for p in glob.glob(os.path.join(path, '*'))
                                        if is_shard_folder(p))
                if not inner:
                    raise InputError(f'{path}: no shards in it (.tar files, or folders of '
                                     f'<key>.jpg and <key>.txt)')
                found += inner
            else:
                found.append(path)
    return list(dict.fromkeys(os.path.realpath(p) for p in found))  # in order, each once


def shard_stats(path):
    """img2dataset's <shard>_stats.json beside a shard (count, successes, ...), or {} if there is
    none that can be read."""
    try:
        with open(os.path.splitext(path.rstrip('/'))[0] + '_stats.json') as f:
            counts = json.load(f)
    except (OSError, ValueError):
        return {}
    return counts if isinstance(counts, dict) else {}


def failed_shard(path):
    """img2dataset writes <shard>_stats.json even for a shard none of whose downloads succeeded: its
    counts, if it says so, else None."""
    stats = shard_stats(path)
    if stats.get('successes') == 0:
        return f"{stats.get('count', '?')} tried, {os.path.splitext(path)[0]}_stats.json"
    return None


def is_shard_folder(path):
    """img2dataset's --output_format=files: a folder of a shard's samples (an image beside its
    caption), not of shards."""
    try:
        names = set(os.listdir(path)) if os.path.isdir(path) else set()
    except OSError as e:
        raise InputError(f'{path}: cannot list it ({e.strerror})')
    return any(n.rpartition('.')[0] + '.txt' in names or n.rpartition('.')[0] + '.json' in names
               for n in names if n.rpartition('.')[2].lower() in IMAGE_TYPES)


def split_shards(train, val_spec, test_spec, seed):
    """{split: its shards}: val and test named, or N of the train shards each, chosen at random."""
    splits = {}
    rng = random.Random(seed)
    for name, spec in (('test', test_spec), ('val', val_spec)):
        if not spec:
            continue
        if re.fullmatch(r'\d+', spec):
            count = int(spec)
            if count == 0:
                continue
            if count >= len(train):
                raise InputError(f'--{name}_shards={count}: only {len(train)} shards, and train '
                                 f'needs one')
            splits[name] = sorted(rng.sample(train, count))
        else:
            splits[name] = find_shards(spec, f'{name}_shards')
        if name == 'val' and set(splits[name]) & set(splits.get('test', [])):
            both = sorted(set(splits[name]) & set(splits['test']))
            raise InputError(f'{both[0]}: both a val and a test shard (--val_shards, '
                             f'--test_shards)')
        train = [s for s in train if s not in splits[name]]
    if not train:
        held_out = sum(len(s) for s in splits.values())
        raise InputError(f'no shard left for train: all {held_out} shards of --shards are val or '
                         f'test shards')
    return {'train': train, **{k: splits[k] for k in ('val', 'test') if k in splits}}


# -----------------------------------------------------------------------------
# Reading a shard in place: each sample's image stays where it is, found again by its offset

def scan_shard(path):
    """Every file of a shard as (name, where, content), in order, and why the shard ended early
    (None if it did not). where: (offset, size) of the file's bytes in a tar, or its path in a
    folder. content: a .txt's or .json's bytes; for an image, None if it decodes, else why not (so
    only small files are held, whatever the shard's size)."""
    def content(name, data):
        kind = name.rpartition('.')[2].lower()
        if kind in IMAGE_TYPES:
            try:
                load_rgb(io.BytesIO(data))
            except Exception as e:  # PIL raises many kinds for a broken image
                return f'an image that does not decode ({type(e).__name__})'
            return None
        return data if kind in ('txt', 'json') else b''

    if os.path.isdir(path):
        files = []
        for name in sorted(os.listdir(path)):
            file = os.path.abspath(os.path.join(path, name))  # read again later, from anywhere
            if os.path.isfile(file):
                with open(file, 'rb') as f:
                    files.append((name, file, content(name, f.read())))
        return files, None
    files, cut = [], None
    try:
        with tarfile.open(path, 'r:') as tar:
            for info in iter(tar.next, None):
                if info.isfile():
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError('unexpected end of data')
                    where = (info.offset_data, info.size)
                    files.append((info.name, where, content(info.name, data)))
            end = tar.offset  # where a header was expected next
        with open(path, 'rb') as f:  # a whole tar ends in zeros; a cut one, or a bad header, not
            f.seek(end)
            rest = f.read()
        if len(rest) < 1024 or rest.strip(b'\0'):
            raise tarfile.ReadError('unexpected end of data')
    except PermissionError as e:
        raise InputError(f'{path}: cannot read it ({e.strerror})')
    except (tarfile.ReadError, EOFError) as e:
        if not files and not os.path.getsize(path):
            raise InputError(f'{path}: an empty file, not a tar')
        if not files and 'end of data' not in str(e):
            raise InputError(f'{path}: not a tar ({e})')
        cut = f'cut short after {files[-1][0]}' if files else 'cut short before its first file'
    return files, cut


def index_shard(path, caption_field):
    """The samples of a shard that can be used, [dict(key, image, where, caption)], and what was
    lost: Counter({why: samples}) and one line naming the first of each kind."""
    files, cut = scan_shard(path)
    by_key, lost, first = {}, Counter(), {}

    def skip(why, name, count=1):
        lost[why] += count
        first.setdefault(why, name)

    dotted = {}
    for name, where, content in files:
        key, _, kind = os.path.basename(name).partition('.')
        key = os.path.join(os.path.dirname(name), key)
        if '.' in kind:  # webdataset reads what follows the first dot as the file's type
            dotted.setdefault(name.rpartition('.')[0], name)
            continue
        by_key.setdefault(key, {})[kind.lower()] = (name, where, content)
    for name in dotted.values():
        skip('with a dot in its key (webdataset reads what follows the first dot as the type)',
             name)
    samples = []
    cut_key = list(by_key)[-1] if cut and by_key else None  # lost with the rest, if incomplete
    for key, parts in by_key.items():
        image = next((parts[t] for t in IMAGE_TYPES if t in parts), None)
        caption = read_caption(parts, caption_field)
        if key == cut_key and (image is None or not caption):
            continue
        if image is None:
            if 'txt' in parts or 'json' in parts:
                skip('no image', key)
            continue
        if not caption:
            where = f' in its .json field {caption_field!r}' if caption_field else ''
            skip(f'no caption{where}', key)
        elif image[2] is not None:
            skip(image[2], image[0])
        else:
            samples.append(dict(key=key, image=image[0], where=image[1], caption=caption))
    problems = [f'{n} {why}, first {first[why]}' for why, n in lost.items()]
    if not files:  # img2dataset writes an empty tar for a shard none of whose downloads succeeded
        problems.append('no samples in it')
    downloaded = shard_stats(path).get('successes')
    missing = downloaded - len(samples) - sum(lost.values()) if isinstance(downloaded, int) else 0
    if missing > 0:  # its _stats.json counts them: what a cut took, or what a writer lost
        lost['missing'] = missing
    if cut:
        counted = f'{missing} of the {downloaded} samples its _stats.json counts' if missing > 0 \
            else 'the rest of it'
        problems.append(f'{cut} (an interrupted download?): {counted} lost')
    elif missing > 0:
        problems.append(f'{missing} of the {downloaded} samples its _stats.json counts are not '
                        f'in it')
    return samples, lost, problems


def read_caption(files, caption_field):
    """The caption of a sample, on one line, or '' if it has none."""
    if caption_field:
        if 'json' not in files:
            return ''
        try:
            caption = json.loads(files['json'][2]).get(caption_field)
        except (ValueError, AttributeError):
            return ''
        caption = caption if isinstance(caption, str) else ''
    elif 'txt' in files:
        caption = files['txt'][2].decode('utf-8', errors='replace')
    else:
        return ''
    return one_line(caption)


class ShardImages:
    """A torch Dataset of the images of a shard's indexed samples, each read where it lies (the tar
    opened and read at the image's offset), preprocessed for CLIP: one frame each."""

    def __init__(self, shard, samples, size):
        self.shard, self.where = shard, [s['where'] for s in samples]
        self.paths = [os.path.join(shard, s['image']) for s in samples]
        self.frame_counts = [1] * len(samples)
        self.size = size

    def __len__(self):
        return len(self.where)

    def __getitem__(self, i):
        where = self.where[i]
        if isinstance(where, str):
            return clip_preprocess(load_rgb(where), self.size)
        offset, size = where
        with open(self.shard, 'rb') as f:
            f.seek(offset)
            return clip_preprocess(load_rgb(io.BytesIO(f.read(size))), self.size)


# -----------------------------------------------------------------------------

def write_split(name, split_shards, vision, rank, world):
    """The features of a split, a file per shard, <split>_feats/<shard>.bin, and beside it what the
    shard held (<shard>.json: its samples, what was lost, and the identity of what made it). Rank r
    takes every world-th shard. A shard done by an earlier run, with any number of processes, from
    the same input with the same settings, is not done again; one whose input changed is."""
    from multiprocessing import Pool
    folder = os.path.join(out_dir, f'{name}_feats')
    os.makedirs(folder, exist_ok=True)
    size = vision.config.image_size
    todo = []
    for shard, base in list(zip(split_shards, shard_bases(name, split_shards)))[rank::world]:
        identity = dict(shard=os.path.abspath(shard), **size_and_time(shard),
                        vision_model=vision_model, caption_field=caption_field)
        if (read_json(base + '.json') or {}).get('identity') != identity:  # else done before
            todo.append((shard, base, identity))
    # the next shards are read and their images checked in other processes while CLIP runs
    pool = Pool(min(num_workers, len(todo))) if num_workers > 1 and len(todo) > 1 else None
    index = functools.partial(index_shard, caption_field=caption_field)
    indexed = (pool.imap if pool else map)(index, [shard for shard, _, _ in todo])
    for (shard, base, identity), (samples, lost, problems) in zip(todo, indexed):
        start = time.time()
        if samples:
            images = ShardImages(shard, samples, size)
            extract_features(vision, images, base + '.bin', batch_size, num_workers)
        held = dict(identity=identity, samples=samples, lost=lost, problems=problems)
        write_json(base + '.json', held)  # last: the claim that the shard is done
        print(f'rank {rank}: {shard}: {len(samples):,} images, '
              f'{len(samples) / (time.time() - start):.1f} images/s', file=sys.stderr)
    if pool:
        pool.close()


def size_and_time(shard):
    """A shard's bytes and last change (of its files, for a folder): a shard that changed is
    redone."""
    paths = [os.path.join(shard, n) for n in os.listdir(shard)] if os.path.isdir(shard) else [shard]
    stats = [os.stat(p) for p in paths]
    return dict(bytes=sum(s.st_size for s in stats),
                modified=max((s.st_mtime for s in stats), default=0))


def shard_bases(name, split_shards):
    """<out_dir>/<split>_feats/<shard's name> of each shard of a split."""
    names = [os.path.basename(s.rstrip('/')).removesuffix('.tar') for s in split_shards]
    if len(set(names)) < len(names):  # downloads each number their shards from 00000
        names = [f'{os.path.basename(os.path.dirname(s))}_{n}' for s, n in zip(split_shards, names)]
    twice = [s for s, n in zip(split_shards, names) if names.count(n) > 1]
    if twice:
        raise InputError(f'{twice[0]} and {twice[1]}: shards of split {name} in folders of one '
                         f'name, whose features would share a file: rename a folder')
    return [os.path.join(out_dir, f'{name}_feats', n) for n in names]


def gather_split(name, split_shards, encoder):
    """meta.json's entry of a split whose shards are all written, and its captions files (rank 0):
    the manifest of its feature shards, and one stderr line per shard that lost samples."""
    records, manifest, total = [], [], Counter()
    for shard, base in zip(split_shards, shard_bases(name, split_shards)):
        done = read_json(base + '.json')
        if done is None:
            raise InputError(f'{base}.json: missing, so {shard} was not done (under torchrun on '
                             f'several machines, out_dir must be a folder they share)')
        samples, lost, problems = done['samples'], Counter(done['lost']), done['problems']
        records += [dict(file=os.path.join(shard, s['image']), id=s['key'], captions=[s['caption']])
                    for s in samples]
        manifest.append(dict(file=os.path.relpath(base + '.bin', out_dir), images=len(samples),
                             shard=os.path.abspath(shard), lost=dict(lost)))
        total.update(lost)
        if problems:
            print(f'{shard}: kept {len(samples):,} samples; {"; ".join(problems)}', file=sys.stderr)
    if total:
        print(f'split {name}: lost {sum(total.values()):,} samples in all: '
              + ', '.join(f'{n:,} {why.split(" (")[0]}' for why, n in total.items()),
              file=sys.stderr)
    if not records:
        raise InputError(f'split {name}: no usable sample in its {len(split_shards)} shard(s), '
                         f'{split_shards[0]} first (see the lines above)')
    write_captions(records, out_dir, name, encoder)
    return dict(images=len(records), captions=len(records), feature_shards=manifest)


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    import torch
    from weights import load_vision
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world > 1:
        torch.distributed.init_process_group('gloo')  # only to coordinate the ranks
    with input_errors_exit('prepare_shards.py'):
        if not shards:
            raise InputError("give --shards: img2dataset's output folder, a glob or a brace range")
        splits = split_shards(find_shards(shards), val_shards, test_shards, seed)
        for name, split_list in splits.items():
            shard_bases(name, split_list)  # names that cannot clash, before any work
        check_writable(out_dir)
        encoder = gpt2_tokenizer()  # its files, before any work
        dev = pick_device(device)
        vision = load_vision(vision_model).to(dev).eval()
        for name, split_list in splits.items():
            write_split(name, split_list, vision, rank, world)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            sys.exit(0)
        meta = new_meta(vision_model, tokens_per_image=tokens_per_frame(vision.config),
                        feature_dim=vision.config.hidden_size)
        meta['splits'] = {name: gather_split(name, split_list, encoder)
                          for name, split_list in splits.items()}
    write_json(os.path.join(out_dir, 'meta.json'), meta)
    print(f'wrote {out_dir}: ' + ', '.join(f"{k} {v['images']:,} images, {len(splits[k])} shard(s)"
                                           for k, v in meta['splits'].items()))
