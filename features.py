"""
The prepare scripts' shared work: check every image or video of a split, run the frozen CLIP on
them, and write the prepared folder that data.py reads. The features stream into a float16 memmap
batch by batch, so memory stays flat; under torchrun each rank fills its own share; an interrupted
run resumes. The prepare scripts find their images or videos and captions (a dataset's layout, or
prepare_shapes.py's drawings) and call write_image_splits or write_video_splits; prepare_shards.py
calls extract_features for each of its shards.
"""
import glob
import hashlib
import json
import os
import sys

import numpy as np

from common import InputError, barrier, gpt2_tokenizer, read_json, vision_autocast, write_json
from data import new_meta, write_captions, write_frame_table
from media import (ImageFiles, VideoFiles, count_frames, find_bad_image, stack_frames,
                   tokens_per_frame)


def write_image_splits(splits, out_dir, vision, vision_model, batch_size, workers, skip_bad, rank=0,
                       world=1):
    """The features and caption tokens of every split ({name: [dict(file, id, captions)]}) of
    images, with `vision` loaded from `vision_model`; returns meta.json's content (rank 0 writes the
    captions)."""
    splits = {name: drop_bad_files(name, records, find_bad_image, 'image', workers, skip_bad, rank,
                                   world)[0]
              for name, records in splits.items()}
    os.makedirs(out_dir, exist_ok=True)
    encoder, meta = gpt2_tokenizer(), new_meta(vision_model)
    for name, records in splits.items():
        base = os.path.join(out_dir, name)
        files = ImageFiles([r['file'] for r in records], vision.config.image_size)
        shape = extract_features(vision, files, base + '_feats.bin', batch_size, workers, rank,
                                 world)
        meta.update(tokens_per_image=shape[1], feature_dim=shape[2])
        captions = sum(len(r['captions']) for r in records)
        meta['splits'][name] = dict(images=shape[0], captions=captions)
        if rank == 0:
            write_captions(records, out_dir, name, encoder)
    return meta


def write_video_splits(splits, out_dir, vision, vision_model, most, batch_size, workers, skip_bad,
                       rank=0, world=1):
    """As write_image_splits, for videos: at most `most` frames of each, spread evenly over it, with
    the table of each video's first frame and frame count (<split>_frames.npy)."""
    checked = {name: drop_bad_files(name, records, count_frames, 'video', workers, skip_bad, rank,
                                    world)
               for name, records in splits.items()}
    os.makedirs(out_dir, exist_ok=True)
    encoder, meta = gpt2_tokenizer(), new_meta(vision_model, media='video', max_frames=most)
    for name, (records, decoded_counts) in checked.items():
        base = os.path.join(out_dir, name)
        files = VideoFiles([r['file'] for r in records], decoded_counts, most,
                           vision.config.image_size)
        shape = extract_features(vision, files, base + '_feats.bin', batch_size, workers, rank,
                                 world)
        meta.update(tokens_per_image=shape[1], feature_dim=shape[2])  # tokens per frame
        meta['splits'][name] = dict(videos=len(records), frames=shape[0], captions=len(records))
        if rank == 0:
            write_frame_table(out_dir, name, files.frame_counts)
            write_captions(records, out_dir, name, encoder, media='video')
    return meta


# -----------------------------------------------------------------------------
# Checking the files first: a broken one fails before any feature is computed

def inspect_files(records, inspect, workers):
    """inspect(file) of every record, in `workers` processes."""
    from multiprocessing import Pool
    paths = [r['file'] for r in records]
    if workers > 1:
        with Pool(workers) as pool:
            return pool.map(inspect, paths, chunksize=16)
    return [inspect(p) for p in paths]


def drop_bad_files(name, records, inspect, kind, workers, skip_bad, rank=0, world=1):
    """Check every file (an image or video: `kind`) before any feature is computed, each rank a
    share. inspect(file) returns why the file cannot be used (a str), or what it learnt of a good
    one (anything else). Fails with the list of bad files, or, with skip_bad, drops them and their
    captions. Returns the good records and what inspect returned for each."""
    found = inspect_files(records[len(records) * rank // world:len(records) * (rank + 1) // world],
                          inspect, workers)
    if world > 1:
        import torch.distributed as dist
        every_rank = [None] * world
        dist.all_gather_object(every_rank, found)
        found = [item for share in every_rank for item in share]
    bad = [(r['file'], why) for r, why in zip(records, found) if isinstance(why, str)]
    if bad and not skip_bad:
        listing = '; '.join(f'{path}: {why}' for path, why in bad[:20])
        raise InputError(f'{len(bad)} unusable {kind}(s) in split {name} '
                         f'(use --skip_bad_{kind}s=True to drop them): {listing}')
    good = [i for i, why in enumerate(found) if not isinstance(why, str)]
    if bad and rank == 0:
        for path, why in bad:
            print(f'{path}: skipped, {why}', file=sys.stderr)
        dropped = sum(len(r['captions']) for r, why in zip(records, found) if isinstance(why, str))
        print(f'split {name}: skipped {len(bad)} unusable {kind}(s) and their {dropped} caption(s)',
              file=sys.stderr)
    return [records[i] for i in good], [found[i] for i in good]


# -----------------------------------------------------------------------------
# CLIP's features, streamed into a memmap, a share per rank, resumable

def extract_features(model, files, out_path, batch_size, workers, rank=0, world=1):
    """CLIP features of every frame of `files` (media.py's ImageFiles or VideoFiles), file after
    file, into the float16 memmap `out_path` [frames, tokens, width], streamed batch by batch so
    that memory stays flat. The frames go to the device the model is on. Under torchrun, rank r
    fills the frames of its own contiguous share of the files. Each rank saves its progress after
    every batch; a rerun continues from there. With world=1 it waits for no other rank: the ranks
    of prepare_shards.py each write their own shards' files."""
    import torch
    from tqdm import tqdm
    config = model.config
    device = next(model.parameters()).device
    tokens = tokens_per_frame(config)
    first_frame = np.concatenate([[0], np.cumsum(files.frame_counts)]).astype(np.int64)
    shape = (int(first_frame[-1]), tokens, config.hidden_size)
    partial = out_path + '.partial'
    listing = json.dumps([files.paths, [int(n) for n in files.frame_counts]])
    identity = dict(shape=list(shape), vision_model=config.name_or_path, world=world,
                    files=hashlib.sha1(listing.encode()).hexdigest())
    if rank == 0 and read_json(partial + '.json') != identity:  # start afresh
        for stale in glob.glob(out_path + '.progress*'):
            os.remove(stale)
        np.memmap(partial, dtype=np.float16, mode='w+', shape=shape).flush()
        write_json(partial + '.json', identity)
    if world > 1:
        barrier()
    start, end = len(files) * rank // world, len(files) * (rank + 1) // world
    progress_path = f'{out_path}.progress{rank}'
    done = (read_json(progress_path) or {}).get('done', start)  # files
    if done > start:
        print(f'{out_path}: rank {rank} resuming after {done - start:,} of {end - start:,} files')
    feats = np.memmap(partial, dtype=np.float16, mode='r+', shape=shape)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(files, range(done, end)),
                                         batch_size=batch_size, num_workers=workers,
                                         collate_fn=stack_frames, pin_memory=device.type == 'cuda')
    with tqdm(total=end - start, initial=done - start, unit='file', disable=rank != 0,
              desc=os.path.basename(out_path)) as bar:
        for pixels in loader:
            with torch.no_grad(), vision_autocast(device.type):
                hidden = model(pixel_values=pixels.to(device)).last_hidden_state
            row = first_frame[done]
            feats[row:row + len(pixels)] = hidden.to(torch.float16).cpu().numpy()
            batch_files = int(np.searchsorted(first_frame, row + len(pixels))) - done
            done += batch_files
            feats.flush()  # the features first, then the claim that they are there
            write_json(progress_path, dict(done=done))
            bar.update(batch_files)
    del feats
    if world > 1:
        barrier()
    if rank == 0:
        os.replace(partial, out_path)
        for leftover in [partial + '.json'] + glob.glob(out_path + '.progress*'):
            os.remove(leftover)
    return shape
