"""
The prepared data: what the prepare scripts write into a folder (through features.py), and how
train.py, eval_bleu.py and sample.py read it. For each split:
- <split>_feats.bin: CLIP's features of every frame (an image is a video of one frame), float16
  [frames, tokens_per_image, feature_dim]; or, from prepare_shards.py, a file per input shard,
  <split>_feats/<shard>.bin, listed in meta.json with its count (its rows one shard after another);
- <split>_tokens.bin: every caption's GPT-2 tokens, uint16, one after another;
- <split>_captions.npy: int64 [captions, 3]: each caption's token offset, length and image;
- <split>_frames.npy (videos only): int64 [videos, 2]: each video's first frame and frame count;
- <split>_images.json (or _videos.json): each image's file, id and reference captions;
and meta.json, which gives the shapes and counts that every file is checked against.
The reader, Captions, lays captions out for training, alone or k to a sequence (interleaved), and
FewShotExamples gives few-shot captioning its examples.
"""
import math
import os
import re
from typing import NamedTuple

import numpy as np

from common import EOT, InputError, atomic_write, first_line, read_json, write_json

IGNORE_INDEX = -100  # the target of a position that is not in the loss (PyTorch's ignore_index)
FORMAT_VERSION = 1  # meta.json's format_version: raised whenever the files' layout changes
META_KEYS = ('vision_model', 'tokenizer', 'tokens_per_image', 'feature_dim', 'splits')


# -----------------------------------------------------------------------------
# Writing (the features are written by features.py)

def new_meta(vision_model, **meta_fields):
    """meta.json's fields, before the splits are written, of features from the vision tower loaded
    from `vision_model`."""
    return dict(format_version=FORMAT_VERSION, vision_model=vision_model, tokenizer='gpt2',
                feature_dtype='float16', token_dtype='uint16', **meta_fields, splits={})


def one_line(caption):
    """A caption on one line, single-spaced: a line break inside a caption (a quoted CSV field may
    hold one, and so do a few of COCO's own captions) is white space like any other."""
    space = ' \t\r\n\f\v'  # not a no-break space, which stays
    return ' '.join(re.split(f'[{space}]+', caption.strip(space)))


def write_captions(records, out_dir, split_name, encoder, media='image'):
    """The tokenised captions of a split, with each one's offset and image (or video), and the list
    of its images (or videos): <split>_images.json (or _videos.json)."""
    token_lists = [encoder.encode_ordinary(c) for r in records for c in r['captions']]
    image_index = [i for i, r in enumerate(records) for _ in r['captions']]
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.fromiter((t for ts in token_lists for t in ts), dtype=np.uint16,
                         count=int(lengths.sum()))
    base = os.path.join(out_dir, split_name)
    atomic_write(base + '_tokens.bin', tokens.tofile)
    index = np.stack([offsets, lengths, np.array(image_index, dtype=np.int64)], axis=1)
    atomic_write(base + '_captions.npy', lambda tmp: np.save(open(tmp, 'wb'), index))
    write_json(f'{base}_{media}s.json', [dict(file=r['file'], id=r['id'], captions=r['captions'])
                                         for r in records])


def write_frame_table(out_dir, split_name, frame_counts):
    """<split>_frames.npy of videos of `frame_counts` frames each, stored one after another: each
    one's first frame and frame count."""
    counts = np.array(frame_counts, dtype=np.int64)
    index = np.stack([np.cumsum(counts) - counts, counts], axis=1)
    path = os.path.join(out_dir, split_name) + '_frames.npy'
    atomic_write(path, lambda tmp: np.save(open(tmp, 'wb'), index))


# -----------------------------------------------------------------------------
# Reading

class Captions:
    """One split written by a prepare script: every caption with the CLIP
    features of its image or video, memmapped. An image is a video of one frame. Every file is
    checked against meta.json first: a file cut short or left from another run would otherwise be
    read as garbage, or fail deep inside numpy."""

    def __init__(self, data_dir, split, max_tokens):
        meta = read_meta(data_dir)
        if split not in meta['splits']:
            raise InputError(f"{data_dir}/meta.json: no split '{split}' "
                             f"(it has {', '.join(meta['splits'])})")
        self.media = meta.get('media', 'image')
        entry, path = meta['splits'][split], os.path.join(data_dir, split)
        frames = meta_value(entry, 'frames' if self.media == 'video' else 'images', data_dir, split)
        media_count = frames
        if self.media == 'video':
            media_count = meta_value(entry, 'videos', data_dir, split)
        shape = (frames, meta['tokens_per_image'], meta['feature_dim'])
        if 'feature_shards' in entry:  # prepare_shards.py's: a file per input shard
            self.feats = ShardedFeatures(data_dir, split, entry['feature_shards'], shape)
        else:
            self.feats = open_memmap(f'{path}_feats.bin', np.float16, shape)
        if self.media == 'video':  # each video's frames are consecutive rows of the features
            self.first_frame, self.frame_count = load_table(f'{path}_frames.npy', media_count, 2).T
            if (self.frame_count < 1).any() or (self.first_frame + self.frame_count > frames).any():
                raise InputError(f'{path}_frames.npy: frames outside the {frames:,} of '
                                 f'{path}_feats.bin')
        else:
            self.first_frame, self.frame_count = np.arange(frames), np.ones(frames, dtype=np.int64)
        self.max_frames = int(self.frame_count.max())
        self.records_path, self.media_count = f'{path}_{self.media}s.json', media_count
        self.tokens = open_memmap(f'{path}_tokens.bin', np.uint16)
        captions_path = f'{path}_captions.npy'
        table = load_table(captions_path, entry.get('captions'), 3)
        self.offsets, lengths, self.media_index = table.T
        if (self.offsets < 0).any() or (lengths < 0).any() or \
                (self.offsets + lengths > len(self.tokens)).any():
            raise InputError(f'{captions_path}: captions outside the {len(self.tokens):,} tokens '
                             f'of {path}_tokens.bin')
        if (self.media_index < 0).any() or (self.media_index >= media_count).any():
            raise InputError(f'{captions_path}: captions of {self.media}s that the split does not '
                             f'have (it has {media_count:,})')
        self.lengths = np.minimum(lengths, max_tokens - 1)  # room for the closing <|endoftext|>

    def __len__(self):
        return len(self.offsets)

    def records(self):
        """Each image's (or video's) file, id and reference captions, in feature order."""
        records = read_json(self.records_path)
        if not (isinstance(records, list) and len(records) == self.media_count
                and all(isinstance(r, dict) and isinstance(r.get('captions'), list)
                        for r in records)):
            raise InputError(f'{self.records_path}: expected a list of {self.media_count:,} '
                             f'{{"file", "id", "captions"}} records, as meta.json says')
        return records

    def features(self, media_ids):
        """Frames [B, T, N, D] (float16) of images or videos, zero-padded to the split's longest
        video so that every batch has the same shape, and the mask of real frames [B, T]."""
        column = np.arange(self.max_frames)
        mask = column < self.frame_count[media_ids, None]
        rows = np.where(mask, self.first_frame[media_ids, None] + column, 0)
        frames = self.feats[rows.ravel()].reshape(*rows.shape, *self.feats.shape[1:])
        frames[~mask] = 0
        return frames, mask

    def target_count(self, ids):
        """How many target tokens the captions `ids` have (each caption's tokens +
        <|endoftext|>)."""
        return int((self.lengths[ids] + 1).sum())

    def batch(self, ids):
        """Features [B, T, N, D] (float16) and frame mask [B, T] (see features), tokens and
        targets [B, S] of the captions `ids`, padded to the longest: tokens = <|endoftext|> +
        caption, targets = caption + <|endoftext|>, then IGNORE_INDEX; and the flat positions of
        the targets [K] (found here, on the host, so that the GPU need not report them: see
        Captioner.forward)."""
        lengths = self.lengths[ids]
        S = int(lengths.max()) + 1
        column = np.arange(S)
        positions = np.minimum(self.offsets[ids, None] + column[:-1], len(self.tokens) - 1)
        in_caption = column[:-1] < lengths[:, None]
        caption = np.where(in_caption, self.tokens[positions], EOT).astype(np.int64)
        bos = np.full((len(ids), 1), EOT, dtype=np.int64)
        tokens = np.concatenate([bos, caption], axis=1)
        targets = np.concatenate([caption, bos], axis=1)
        targets[column > lengths[:, None]] = IGNORE_INDEX
        features, mask = self.features(self.media_index[ids])
        return features, mask, tokens, targets, np.flatnonzero(targets != IGNORE_INDEX)

    def interleaved_batch(self, ids, k):
        """The captions `ids`, k to a sequence in their order (Flamingo's interleaving): each
        caption laid out as batch() lays it out, right after its own image or video. Features
        [B, k, T, N, D] and frame mask [B, k, T], tokens and targets [B, S] (the k captions one
        after another, then padding), the flat positions of the targets, and media_at [B, k]: the
        token each caption's media goes before."""
        features, mask, tokens, targets, _ = self.batch(ids)
        spans = (self.lengths[ids] + 1).reshape(-1, k)  # <|endoftext|> + caption, per caption
        media_at = np.cumsum(spans, axis=1) - spans
        packed_tokens = np.full((len(spans), spans.sum(1).max()), EOT, dtype=np.int64)
        packed_targets = np.full(packed_tokens.shape, IGNORE_INDEX, dtype=np.int64)
        for i, (row, j) in enumerate(np.ndindex(spans.shape)):
            at, n = media_at[row, j], spans[row, j]
            packed_tokens[row, at:at + n] = tokens[i, :n]
            packed_targets[row, at:at + n] = targets[i, :n]
        rows = len(spans)
        return (features.reshape(rows, k, *features.shape[1:]), mask.reshape(rows, k, -1),
                packed_tokens, packed_targets, np.flatnonzero(packed_targets != IGNORE_INDEX),
                media_at)


class ShardedFeatures:
    """A split's features stored a file per input shard (<split>_feats/<shard>.bin, as meta.json
    lists them, each [its images, tokens, width]), read as one array of the shards' rows one after
    another: the reader indexes them as it indexes one memmapped file."""

    def __init__(self, data_dir, split, shards, shape):
        where = f"{data_dir}/meta.json: split '{split}'"
        listed = isinstance(shards, list) and all(
            isinstance(s, dict) and isinstance(s.get('file'), str)
            and isinstance(s.get('images'), int) for s in shards)
        if not listed:
            raise InputError(f'{where}: feature_shards is not a list of {{"file", "images"}}')
        held = sum(s['images'] for s in shards)
        if held != shape[0]:
            raise InputError(f'{where}: its feature shards hold {held:,} images, the split '
                             f'{shape[0]:,}')
        self.parts = [(os.path.join(data_dir, s['file']), (s['images'], *shape[1:]))
                      for s in shards if s['images']]
        for path, part_shape in self.parts:  # every file checked now, each opened when read
            open_memmap(path, np.float16, part_shape, check_only=True)
        self.first = np.cumsum([0] + [part_shape[0] for _, part_shape in self.parts])
        self.shape = shape
        self.open = {}  # at most 64 memmaps, each holding a file descriptor, of thousands of files

    def part(self, p):
        if p not in self.open:
            if len(self.open) >= 64:
                del self.open[next(iter(self.open))]  # the one opened first
            path, part_shape = self.parts[p]
            self.open[p] = open_memmap(path, np.float16, part_shape)
        return self.open[p]

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        """The features of `rows` (row numbers, or a slice): [len(rows), tokens, width]."""
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        part = np.searchsorted(self.first, rows, side='right') - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float16)
        for p in np.unique(part):
            out[part == p] = self.part(p)[rows[part == p] - self.first[p]]
        return out


def read_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise InputError(f'{path}: not found; prepare the data with prepare_coco.py or '
                         f'prepare_mlslt.py')
    meta = read_json(path)
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise InputError(f'{path}: not a meta.json of prepare_coco.py or prepare_mlslt.py '
                         f"(no {', '.join(missing)})")
    return meta


def meta_value(entry, key, data_dir, split):
    """A count in meta.json's entry of a split."""
    if not isinstance(entry.get(key), int):
        raise InputError(f"{data_dir}/meta.json: split '{split}' has no count of {key}")
    return entry[key]


def open_memmap(path, dtype, shape=None, check_only=False):
    """A read-only memmap of a prepared file, which must be exactly as large as `shape` says (or,
    without a shape, a whole number of items); with check_only, only that check."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: missing (meta.json lists it; prepare the data again)')
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    expected = item * math.prod(shape) if shape else size - size % item
    if size != expected or size == 0:
        name = np.dtype(dtype).name
        described = f"{' x '.join(map(str, shape))} {name}, {expected:,} bytes" if shape \
            else f'whole {name} items'
        raise InputError(f'{path}: {size:,} bytes, but meta.json describes {described} '
                         f'(cut short, or from another run? prepare the data again)')
    return None if check_only else np.memmap(path, dtype=dtype, mode='r', shape=shape)


def load_table(path, rows, columns):
    """An int64 [rows, columns] .npy table of a prepared split (any number of rows if rows is
    None)."""
    try:
        table = np.load(path)
    except (OSError, ValueError, EOFError) as e:  # missing, cut short, not a .npy file
        raise InputError(f'{path}: not a readable .npy table ({first_line(e)})')
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != columns or \
            (rows is not None and len(table) != rows):
        raise InputError(f'{path}: a {table.dtype} table of shape {list(table.shape)}, '
                         f"expected int64 [{rows if rows is not None else 'rows'}, {columns}]")
    return table


def split_counts(meta):
    """{split: '3,000 images, 15,000 captions'} of a meta.json."""
    counted = ('images', 'videos', 'frames', 'captions')
    return {name: ', '.join(f'{entry[k]:,} {k}' for k in counted if k in entry)
            for name, entry in meta['splits'].items()}


def check_data_fits_model(meta, model, data_dir):
    """Features made by another vision model, or tokens of another tokenizer, would train
    garbage."""
    vision, vocab = model.vision.config, model.gpt.config.vocab_size
    problems = []
    if meta['vision_model'] != model.config.vision_model:
        problems.append(f"its features are from {meta['vision_model']!r}, the model's "
                        f'vision_model is {model.config.vision_model!r}')
    if meta['feature_dim'] != vision.hidden_size:
        problems.append(f"feature_dim {meta['feature_dim']} != the vision width "
                        f'{vision.hidden_size}')
    if meta['tokenizer'] != 'gpt2' or vocab < 50257:
        problems.append(f"tokenizer {meta['tokenizer']!r} does not fit GPT-2's vocabulary of "
                        f'{vocab}')
    frames, time_embeddings = meta.get('max_frames', 1), model.config.max_frames
    if model.resampler is not None and frames > time_embeddings:
        problems.append(f'its videos have up to {frames} frames, the resampler time embeddings for '
                        f'{time_embeddings} (max_frames)')
    if problems:
        raise InputError(f"{data_dir}/meta.json does not match the model: {'; '.join(problems)}")


# -----------------------------------------------------------------------------
# Few-shot examples

class Shots(NamedTuple):
    """Few-shot examples, as decoding puts them before every query: N images or videos and a caption
    of each."""
    features: object  # [N, T, tokens, width] (a tensor)
    mask: object  # [N, T]: the real frames
    tokens: list  # N caption token lists


class FewShotExamples:
    """
    Few-shot captioning's examples: `shots` images (or videos) of a prepared split, each with its
    first caption, the same for every query: the first of the split's media in an order fixed by
    `seed`. A query that is one of them gets the next one of that order in its place, so that no
    query is its own example.
    """

    def __init__(self, data_dir, split, shots, seed):
        if shots < 1:
            raise InputError(f'shots must be a number of examples, not {shots}')
        data = Captions(data_dir, split, max_tokens=10 ** 9)
        if data.media_count <= shots:
            raise InputError(f"{data_dir}: split '{split}' has {data.media_count} {data.media}s, "
                             f'too few for {shots} examples and a stand-in')
        self.media = np.random.default_rng(seed).permutation(data.media_count)[:shots + 1]
        records = data.records()
        self.records = [records[m] for m in self.media]
        first_caption = {m: i for i, m in reversed(list(enumerate(data.media_index)))}
        uncaptioned = [records[m]['file'] for m in self.media if m not in first_caption]
        if uncaptioned:
            raise InputError(f"{data_dir}: split '{split}' has no caption of {uncaptioned[0]} "
                             f'to give as an example')
        self.tokens = [data.tokens[data.offsets[i]:data.offsets[i] + data.lengths[i]].tolist()
                       for i in map(first_caption.get, self.media)]
        self.features, self.mask = data.features(self.media)
        self.split, self.shots = split, shots

    def chosen(self, is_query):
        """The examples for a query: the first `shots` candidates that is_query(candidate) does not
        pick out (is_query gets each candidate's position in the split and its record)."""
        keep = [j for j, (m, record) in enumerate(zip(self.media, self.records))
                if not is_query(m, record)]
        return tuple(keep[:self.shots])

    def groups(self, queries, is_query):
        """{examples chosen: [positions in queries]}: the queries that get the same examples,
        together (they can be captioned in one batch). is_query(query, media, record) says whether a
        candidate is that query."""
        groups = {}
        for i, query in enumerate(queries):
            chosen = self.chosen(lambda media, record: is_query(query, media, record))
            groups.setdefault(chosen, []).append(i)
        return groups

    def shots_of(self, chosen, device):
        """The examples `chosen` as decode.generate's `shots`."""
        import torch
        chosen = list(chosen)
        return Shots(torch.from_numpy(self.features[chosen]).to(device),
                     torch.from_numpy(self.mask[chosen]).to(device),
                     [self.tokens[j] for j in chosen])
