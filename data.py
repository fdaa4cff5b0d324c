"""
What nanocap's stages share besides the model:
- the error a user's bad input raises (InputError), printed by every script as one line;
- media decoding: any image file to CLIP's input, exactly as CLIP's image processor does it, and the
  evenly spread frames of a video (prepare_coco.py, prepare_mlslt.py and sample.py decode alike);
- the prepared data: its writers (every file atomic; CLIP features streamed into a memmap, resumable, a
  share per torchrun rank; caption tokens; meta.json's fields), used by prepare_coco.py and
  prepare_mlslt.py, which only read their datasets' layouts, and its reader for train.py and eval_bleu.py
  (memmapped features and tokens, every file checked against meta.json).
"""
import glob
import hashlib
import json
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

EOT = 50256  # GPT-2's <|endoftext|>: the BOS and the EOS of every caption
IGNORE_INDEX = -100  # the target of a position that is not in the loss (PyTorch's ignore_index)
# the image files sample.py and prepare_coco.py read from a folder
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


class InputError(Exception):
    """Something a user handed us is wrong: a file, a folder, a checkpoint, a setting. The message names
    it and says what is wrong, and the scripts print it as one line. Any other exception is a bug in
    nanocap and keeps its traceback."""


def first_line(error):
    """The first line of an exception's message, to quote another library's error inside ours."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def input_errors_exit(script):
    """Run a script's work; an InputError ends the script with one line on stderr, naming the script."""
    try:
        yield
    except InputError as e:
        raise SystemExit(f'{script}: {e}') from None  # Python prints the message and exits with 1


def check_at_least(**settings):
    """settings: name=(value, lowest). Raise an InputError naming the first one that is not a whole number of
    at least its lowest value (a script checks its counts before it loads anything)."""
    for name, (value, lowest) in settings.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= lowest):
            raise InputError(f'{name} must be at least {lowest}, not {value!r}')


def pick_device(device=''):
    """
    The device a script runs on, as a full string: `device` if given ('cpu', 'cuda', 'cuda:3', ...), else
    a GPU if there is one, else the CPU. Under torchrun, 'cuda' means this process's own GPU,
    cuda:LOCAL_RANK. A GPU is made the current device too: whatever uses "the" GPU without naming one
    (CUDA streams and graphs, some kernels) must use this one, not cuda:0 on every rank.
    """
    import torch
    if not device:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f'device={device!r} is not a device ({first_line(e)})')
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise InputError(f'device={device!r}, but no CUDA GPU is available')
        local_rank, ranks_here = int(os.environ.get('LOCAL_RANK', 0)), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if dev.index is None:
            dev = torch.device('cuda', local_rank)
        elif ranks_here > 1 and dev.index != local_rank:  # every rank on one GPU: NCCL fails or hangs
            raise InputError(f'device={device!r} under torchrun with {ranks_here} processes on this machine: each '
                             f"takes its own GPU, cuda:LOCAL_RANK; give device='cuda'")
        if dev.index >= torch.cuda.device_count():
            raise InputError(f'device={device!r}: there is no {dev} (this machine has '
                             f'{torch.cuda.device_count()} GPUs)')
        torch.cuda.set_device(dev)
    return str(dev)


# ----------------------------------------------------------------------------- precision, one policy for every script
# Training: the dtype setting (below); SCST samples its captions in it too, as its loss then scores them. Decoding
# for captions, wherever it runs (train.py's validation captions, eval_bleu.py, sample.py, bench.py): on a GPU
# under the default training dtype's autocast, with the LM head in float32 (Captioner.float32_logits); on a CPU in
# float32, or the weights decode.cpu_decoding chose. On a GPU, float32 products run as TF32 everywhere. CLIP:
# float16 autocast on a GPU, float32 on a CPU, as it made the stored features. So one image gets one caption,
# whichever script captions it.

def precision(device_type, dtype='auto'):
    """(torch dtype, autocast context) of a dtype setting: 'float32', 'bfloat16', 'float16', or 'auto':
    bfloat16 where the hardware multiplies it natively (a GPU that has it; a CPU with AVX512-BF16 or AMX),
    else float16 on a GPU and float32 on a CPU."""
    import torch
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype != 'auto' and dtype not in dtypes:
        raise InputError(f"dtype must be 'auto' or one of {', '.join(dtypes)}, not {dtype!r}")
    if dtype == 'auto':
        dtype = auto_dtype(device_type)[0]
    autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=dtypes[dtype])
    return dtypes[dtype], autocast


def auto_dtype(device_type):
    """What dtype='auto' trains in on this device, and why."""
    if native_bfloat16(device_type):
        return 'bfloat16', f"this {'GPU' if device_type == 'cuda' else 'CPU'} multiplies bfloat16 natively"
    if device_type == 'cuda':
        return 'float16', 'this GPU has no bfloat16: float16 with a gradient scaler'
    return 'float32', 'this CPU has no native bfloat16 (AVX512-BF16 or AMX)'


def native_bfloat16(device_type):
    """Whether the device multiplies bfloat16 in hardware (most x86 servers and laptops since 2020 do)."""
    import torch
    if device_type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return device_type == 'cpu' and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def decoding_autocast(device_type):
    """The autocast every script decodes under (see above)."""
    return precision('cuda')[1] if device_type == 'cuda' else nullcontext()


def vision_autocast(device_type):
    """The autocast CLIP runs under, in every script: float16 on a GPU, as the features are stored, none on a
    CPU (float32)."""
    import torch
    return torch.autocast(device_type, dtype=torch.float16, enabled=device_type == 'cuda')


def read_json(path):
    """The JSON in `path`, or None if there is no such file; a file that cannot be read or is not JSON is
    an InputError naming it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f'{path}: cannot read it ({e.strerror})')
    except ValueError as e:  # not JSON, or not UTF-8
        raise InputError(f'{path}: not valid JSON ({first_line(e)})')


# ----------------------------------------------------------------------------- media decoding: images

def tokens_per_frame(vision_config):
    """The CLIP tokens of one image: one per patch, and the class token."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


# the normalisation of CLIP's image processor, per RGB channel
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def load_rgb(path):
    """Any image file -> an upright RGB PIL image (EXIF orientation applied, any mode converted)."""
    with Image.open(path) as image:
        image.load()  # decodes the whole file: a truncated one fails here
        image = ImageOps.exif_transpose(image)
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):  # 16-bit or float grey: scale to 8 bits
        pixels = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((pixels * (255.0 / max(pixels.max(), 1.0))).astype(np.uint8))
    return image.convert('RGB')


def clip_preprocess(image, size=224):
    """CLIP's preprocessing: shortest side to `size` (bicubic), centre crop, scale to [0, 1], normalise.
    Returns float32 [3, size, size]."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncated, as CLIP's image processor does
    image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = image.size
    top, left = (h - size) // 2, (w - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def find_bad_image(path):
    """None if the file is a readable image, else why not."""
    if not os.path.exists(path):
        return 'missing'
    if os.path.getsize(path) == 0:
        return 'empty file'
    try:
        load_rgb(path)
    except Exception as e:  # PIL raises many kinds for a broken file
        return f'not a readable image ({type(e).__name__}: {e})'
    return None


class ImageFiles:
    """A torch Dataset of preprocessed images, decoded in DataLoader workers: one frame each."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size
        self.frame_counts = [1] * len(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return clip_preprocess(load_rgb(self.paths[i]), self.size)


def stack_frames(items):
    """Collate images [3, H, W] and videos [frames, 3, H, W] into one batch of frames [F, 3, H, W]."""
    import torch
    return torch.from_numpy(np.concatenate([item.reshape(-1, *item.shape[-3:]) for item in items]))


# ----------------------------------------------------------------------------- media decoding: videos

def open_video(path):
    """(container, its first video stream) of a video file; PyAV is needed only for videos."""
    import av
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise ValueError('no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'  # decode on several threads
    return container, stream


def count_frames(path):
    """How many frames the video decodes to, or why it cannot be used (a str). Decoding every frame
    is the only count that cannot disagree with the decoding that follows (headers can be wrong)."""
    if not os.path.exists(path):
        return 'missing'
    if os.path.getsize(path) == 0:
        return 'empty file'
    try:
        container, stream = open_video(path)
        with container:
            frames = sum(1 for _ in container.decode(stream))
    except Exception as e:  # PyAV raises many kinds for a broken file
        return f'not a readable video ({type(e).__name__}: {e})'.splitlines()[0]
    return frames if frames else 'no frames'


def frame_indices(frame_count, wanted):
    """`wanted` frame indices spread evenly over frame_count frames: the middle of equal segments."""
    return ((np.arange(wanted) + 0.5) * frame_count / wanted).astype(np.int64)


def read_frames(path, most, frame_count):
    """RGB PIL images of min(frame_count, most) frames spread evenly over the video's frame_count."""
    wanted = set(frame_indices(frame_count, min(frame_count, most)).tolist())
    container, stream = open_video(path)
    with container:
        frames = [frame.to_image() for i, frame in enumerate(container.decode(stream)) if i in wanted]
    if len(frames) != len(wanted):
        raise InputError(f'{path}: {len(frames)} of its frames {sorted(wanted)} decoded')
    return frames


def video_pixels(path, most, frame_count, size):
    """CLIP's input for up to `most` frames of a video: float32 [frames, 3, size, size]."""
    return np.stack([clip_preprocess(frame, size) for frame in read_frames(path, most, frame_count)])


class VideoFiles:
    """A torch Dataset of preprocessed videos [frames, 3, H, W], decoded in DataLoader workers."""

    def __init__(self, paths, decoded_counts, most, size):
        self.paths, self.decoded_counts, self.most, self.size = paths, decoded_counts, most, size
        self.frame_counts = [min(n, most) for n in decoded_counts]  # the frames kept of each video

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return video_pixels(self.paths[i], self.most, self.decoded_counts[i], self.size)


# ----------------------------------------------------------------------------- writing the prepared data

FORMAT_VERSION = 1  # meta.json's format_version: raised whenever the files' layout changes


def check_writable(path, folder=True):
    """Fail in one line, before any work, unless `path` can be written: a folder that is, or can be made there
    (folder=True), or a file in a folder that is."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f'{path}: a file, not a folder to write into')
    if not folder and os.path.isdir(path):
        raise InputError(f'{path}: a folder, not a file to write')
    if not folder and not os.path.isdir(os.path.dirname(path) or '.'):
        raise InputError(f'{path}: no folder {os.path.dirname(path)} to write it in')
    nearest = os.path.abspath(path if folder else os.path.dirname(path) or '.')
    while not os.path.exists(nearest):  # the folder that would hold what is made
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise InputError(f'{path}: cannot be made, {nearest} is a file')
    if not os.access(nearest, os.W_OK | os.X_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f'{path}: not writable here (permissions of {nearest})')


def atomic_write(path, write):
    """Call write(temp_path), then rename the temp file over `path`: readers never see half a file."""
    tmp = path + '.tmp'
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def gpt2_tokenizer():
    """GPT-2's BPE, from tiktoken, which downloads its two files on first use and caches them. Without a
    network (and without them in its cache) that fails deep inside requests: say so in one line instead."""
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except (OSError, ValueError) as e:  # no connection (requests' errors are OSErrors), a corrupt download, ...
        raise InputError(f"GPT-2's tokenizer files could not be downloaded ({type(e).__name__}); without a network, "
                         f"point TIKTOKEN_CACHE_DIR at a folder holding them (tiktoken's cache of a machine that "
                         f"has them)")


def command_line():
    """The command this process runs, as typed (near enough, under torchrun): a record of what made a file."""
    import shlex
    launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)} " if 'RANK' in os.environ \
        else 'python '
    return launcher + shlex.join(sys.argv)


def split_counts(meta):
    """{split: '3,000 images, 15,000 captions'} of a meta.json."""
    return {name: ', '.join(f'{entry[k]:,} {k}' for k in ('images', 'videos', 'frames', 'captions') if k in entry)
            for name, entry in meta['splits'].items()}


def warn_if_all_empty(captions, script):
    """One line on stderr when every caption is empty: the scores are then all zero, and would say nothing of why."""
    if captions and not any(caption.strip() for caption in captions):
        print(f'{script}: all {len(captions):,} captions are empty: the model ends every caption at once. A language '
              f'model that knows no words (a random stand-in GPT-2) cannot learn to write while frozen: train it too '
              f'(--unfreeze_layers=ITS_LAYERS --train_embeddings=True, as config/train_shapes.py does)', file=sys.stderr)


def decode_caption(encoder, tokens):
    """The text of generated tokens on one line: GPT-2 can emit newlines and runs of spaces."""
    return ' '.join(encoder.decode(tokens).split())


def extract_features(model, files, out_path, batch_size, workers, rank=0, world=1):
    """CLIP features of every frame of `files` (data.py's ImageFiles or VideoFiles), file after
    file, into the float16 memmap `out_path` [frames, tokens, width], streamed batch by batch so that
    memory stays flat. The frames go to the device the model is on. Under torchrun, rank r fills the
    frames of its own contiguous share of the files. Each rank saves its progress after every batch; a
    rerun continues from there."""
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
    barrier()
    start, end = len(files) * rank // world, len(files) * (rank + 1) // world
    progress_path = f'{out_path}.progress{rank}'
    done = (read_json(progress_path) or {}).get('done', start)  # files
    if done > start:
        print(f'{out_path}: rank {rank} resuming after {done - start:,} of {end - start:,} files')
    feats = np.memmap(partial, dtype=np.float16, mode='r+', shape=shape)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(files, range(done, end)),
                                         batch_size=batch_size, num_workers=workers, collate_fn=stack_frames,
                                         pin_memory=device.type == 'cuda')
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
    barrier()
    if rank == 0:
        os.replace(partial, out_path)
        for leftover in [partial + '.json'] + glob.glob(out_path + '.progress*'):
            os.remove(leftover)
    return shape


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def write_captions(records, out_dir, split_name, encoder, media='image'):
    """The tokenised captions of a split, with each one's offset and image (or video), and the list of
    its images (or videos): <split>_images.json (or _videos.json)."""
    token_lists = [encoder.encode_ordinary(c) for r in records for c in r['captions']]
    image_index = [i for i, r in enumerate(records) for _ in r['captions']]
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.fromiter((t for ts in token_lists for t in ts), dtype=np.uint16, count=int(lengths.sum()))
    base = os.path.join(out_dir, split_name)
    atomic_write(base + '_tokens.bin', tokens.tofile)
    index = np.stack([offsets, lengths, np.array(image_index, dtype=np.int64)], axis=1)
    atomic_write(base + '_captions.npy', lambda tmp: np.save(open(tmp, 'wb'), index))
    write_json(f'{base}_{media}s.json', [dict(file=r['file'], id=r['id'], captions=r['captions'])
                                         for r in records])


def inspect_files(records, inspect, workers):
    """inspect(file) of every record, in `workers` processes."""
    from multiprocessing import Pool
    paths = [r['file'] for r in records]
    if workers > 1:
        with Pool(workers) as pool:
            return pool.map(inspect, paths, chunksize=16)
    return [inspect(p) for p in paths]


def drop_bad_files(name, records, inspect, kind, workers, skip_bad, rank=0, world=1):
    """Check every file (an image or video: `kind`) before any feature is computed, each rank a share.
    inspect(file) returns why the file cannot be used (a str), or what it learnt of a good one (anything
    else). Fails with the list of bad files, or, with skip_bad, drops them and their captions. Returns
    the good records and what inspect returned for each."""
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
        raise InputError(f'{len(bad)} unusable {kind}(s) in split {name} (use --skip_bad_{kind}s=True '
                         f'to drop them): {listing}')
    good = [i for i, why in enumerate(found) if not isinstance(why, str)]
    if bad and rank == 0:
        for path, why in bad:
            print(f'{path}: skipped, {why}', file=sys.stderr)
        dropped = sum(len(r['captions']) for r, why in zip(records, found) if isinstance(why, str))
        print(f'split {name}: skipped {len(bad)} unusable {kind}(s) and their {dropped} caption(s)',
              file=sys.stderr)
    return [records[i] for i in good], [found[i] for i in good]


def start_output(out_dir, vision_model, **meta_fields):
    """For the frozen vision tower loaded from `vision_model`: the GPT-2 tokenizer, the output folder, and
    meta.json's fields."""
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(format_version=FORMAT_VERSION, vision_model=vision_model, tokenizer='gpt2',
                feature_dtype='float16', token_dtype='uint16', **meta_fields, splits={})
    return gpt2_tokenizer(), meta


def write_image_splits(splits, out_dir, vision, vision_model, batch_size, workers, skip_bad, rank=0, world=1):
    """The features and caption tokens of every split ({name: [dict(file, id, captions)]}) of images,
    with `vision` loaded from `vision_model`; returns meta.json's content (rank 0 writes the captions)."""
    splits = {name: drop_bad_files(name, records, find_bad_image, 'image', workers, skip_bad, rank,
                                   world)[0]
              for name, records in splits.items()}
    encoder, meta = start_output(out_dir, vision_model)
    for name, records in splits.items():
        base = os.path.join(out_dir, name)
        files = ImageFiles([r['file'] for r in records], vision.config.image_size)
        shape = extract_features(vision, files, base + '_feats.bin', batch_size, workers, rank, world)
        meta.update(tokens_per_image=shape[1], feature_dim=shape[2])
        meta['splits'][name] = dict(images=shape[0], captions=sum(len(r['captions']) for r in records))
        if rank == 0:
            write_captions(records, out_dir, name, encoder)
    return meta


def write_video_splits(splits, out_dir, vision, vision_model, most, batch_size, workers, skip_bad, rank=0,
                       world=1):
    """As write_image_splits, for videos: at most `most` frames of each, spread evenly over it, with the
    table of each video's first frame and frame count (<split>_frames.npy)."""
    checked = {name: drop_bad_files(name, records, count_frames, 'video', workers, skip_bad, rank, world)
               for name, records in splits.items()}
    encoder, meta = start_output(out_dir, vision_model, media='video', max_frames=most)
    for name, (records, decoded_counts) in checked.items():
        base = os.path.join(out_dir, name)
        files = VideoFiles([r['file'] for r in records], decoded_counts, most, vision.config.image_size)
        shape = extract_features(vision, files, base + '_feats.bin', batch_size, workers, rank, world)
        meta.update(tokens_per_image=shape[1], feature_dim=shape[2])  # tokens per frame
        meta['splits'][name] = dict(videos=len(records), frames=shape[0], captions=len(records))
        if rank == 0:
            counts = np.array(files.frame_counts, dtype=np.int64)
            index = np.stack([np.cumsum(counts) - counts, counts], axis=1)
            atomic_write(base + '_frames.npy', lambda tmp: np.save(open(tmp, 'wb'), index))
            write_captions(records, out_dir, name, encoder, media='video')
    return meta


# ----------------------------------------------------------------------------- reading the prepared data

class Captions:
    """One split written by prepare_coco.py or prepare_mlslt.py: every caption with the CLIP features of
    its image or video, memmapped. An image is a video of one frame. Every file is checked against
    meta.json first: a file cut short or left from another run would otherwise be read as garbage, or
    fail deep inside numpy."""

    def __init__(self, data_dir, split, max_tokens):
        meta = read_meta(data_dir)
        if split not in meta['splits']:
            raise InputError(f"{data_dir}/meta.json: no split '{split}' (it has {', '.join(meta['splits'])})")
        self.media = meta.get('media', 'image')
        entry, path = meta['splits'][split], os.path.join(data_dir, split)
        frames = meta_value(entry, 'frames' if self.media == 'video' else 'images', data_dir, split)
        media_count = meta_value(entry, 'videos', data_dir, split) if self.media == 'video' else frames
        shape = (frames, meta['tokens_per_image'], meta['feature_dim'])
        self.feats = open_memmap(f'{path}_feats.bin', np.float16, shape)
        if self.media == 'video':  # each video's frames are consecutive rows of the features
            self.first_frame, self.frame_count = load_table(f'{path}_frames.npy', media_count, 2).T
            if (self.frame_count < 1).any() or (self.first_frame + self.frame_count > frames).any():
                raise InputError(f'{path}_frames.npy: frames outside the {frames:,} of {path}_feats.bin')
        else:
            self.first_frame, self.frame_count = np.arange(frames), np.ones(frames, dtype=np.int64)
        self.max_frames = int(self.frame_count.max())
        self.records_path, self.media_count = f'{path}_{self.media}s.json', media_count
        self.tokens = open_memmap(f'{path}_tokens.bin', np.uint16)
        captions_path = f'{path}_captions.npy'
        self.offsets, lengths, self.media_index = load_table(captions_path, entry.get('captions'), 3).T
        if (self.offsets < 0).any() or (lengths < 0).any() or (self.offsets + lengths > len(self.tokens)).any():
            raise InputError(f'{captions_path}: captions outside the {len(self.tokens):,} tokens of '
                             f'{path}_tokens.bin')
        if (self.media_index < 0).any() or (self.media_index >= media_count).any():
            raise InputError(f'{captions_path}: captions of {self.media}s that the split does not have '
                             f'(it has {media_count:,})')
        self.lengths = np.minimum(lengths, max_tokens - 1)  # room for the closing <|endoftext|>

    def __len__(self):
        return len(self.offsets)

    def records(self):
        """Each image's (or video's) file, id and reference captions, in feature order."""
        records = read_json(self.records_path)
        if not (isinstance(records, list) and len(records) == self.media_count
                and all(isinstance(r, dict) and isinstance(r.get('captions'), list) for r in records)):
            raise InputError(f'{self.records_path}: expected a list of {self.media_count:,} '
                             f'{{"file", "id", "captions"}} records, as meta.json says')
        return records

    def features(self, media_ids):
        """Frames [B, T, N, D] (float16) of images or videos, zero-padded to the split's longest video so
        that every batch has the same shape, and the mask of real frames [B, T]."""
        column = np.arange(self.max_frames)
        mask = column < self.frame_count[media_ids, None]
        rows = np.where(mask, self.first_frame[media_ids, None] + column, 0)
        frames = self.feats[rows.ravel()].reshape(*rows.shape, *self.feats.shape[1:])
        frames[~mask] = 0
        return frames, mask

    def target_count(self, ids):
        """How many target tokens the captions `ids` have (each caption's tokens + <|endoftext|>)."""
        return int((self.lengths[ids] + 1).sum())

    def batch(self, ids):
        """Features [B, T, N, D] (float16) and frame mask [B, T] (see features), tokens and targets [B, S]
        of the captions `ids`, padded to the longest: tokens = <|endoftext|> + caption, targets = caption
        + <|endoftext|>, then IGNORE_INDEX; and the flat positions of the targets [K] (found here, on the
        host, so that the GPU need not report them: see Captioner.forward)."""
        lengths = self.lengths[ids]
        S = int(lengths.max()) + 1
        column = np.arange(S)
        positions = np.minimum(self.offsets[ids, None] + column[:-1], len(self.tokens) - 1)
        caption = np.where(column[:-1] < lengths[:, None], self.tokens[positions], EOT).astype(np.int64)
        bos = np.full((len(ids), 1), EOT, dtype=np.int64)
        tokens = np.concatenate([bos, caption], axis=1)
        targets = np.concatenate([caption, bos], axis=1)
        targets[column > lengths[:, None]] = IGNORE_INDEX
        return *self.features(self.media_index[ids]), tokens, targets, np.flatnonzero(targets != IGNORE_INDEX)

    def interleaved_batch(self, ids, k):
        """The captions `ids`, k to a sequence in their order (Flamingo's interleaving): each caption laid out
        as batch() lays it out, right after its own image or video. Features [B, k, T, N, D] and frame
        mask [B, k, T], tokens and targets [B, S] (the k captions one after another, then padding), the
        flat positions of the targets, and media_at [B, k]: the token each caption's media goes before."""
        features, mask, tokens, targets, _ = self.batch(ids)
        spans = (self.lengths[ids] + 1).reshape(-1, k)  # <|endoftext|> + caption, per caption
        media_at = np.cumsum(spans, axis=1) - spans
        packed_tokens = np.full((len(spans), spans.sum(1).max()), EOT, dtype=np.int64)
        packed_targets = np.full(packed_tokens.shape, IGNORE_INDEX, dtype=np.int64)
        for i, (row, j) in enumerate(np.ndindex(spans.shape)):
            at, n = media_at[row, j], spans[row, j]
            packed_tokens[row, at:at + n], packed_targets[row, at:at + n] = tokens[i, :n], targets[i, :n]
        return (features.reshape(len(spans), k, *features.shape[1:]), mask.reshape(len(spans), k, -1),
                packed_tokens, packed_targets, np.flatnonzero(packed_targets != IGNORE_INDEX), media_at)


class Shots(NamedTuple):
    """Few-shot examples, as decoding puts them before every query: N images or videos and a caption of each."""
    features: object  # [N, T, tokens, width] (a tensor)
    mask: object  # [N, T]: the real frames
    tokens: list  # N caption token lists


class FewShotExamples:
    """
    Few-shot captioning's examples: `shots` images (or videos) of a prepared split, each with its first
    caption, the same for every query: the first of the split's media in an order fixed by `seed`. A query
    that is one of them gets the next one of that order in its place, so that no query is its own example.
    """

    def __init__(self, data_dir, split, shots, seed):
        if shots < 1:
            raise InputError(f'shots must be a number of examples, not {shots}')
        data = Captions(data_dir, split, max_tokens=10 ** 9)
        if data.media_count <= shots:
            raise InputError(f"{data_dir}: split '{split}' has {data.media_count} {data.media}s, too few for "
                             f'{shots} examples and a stand-in')
        self.media = np.random.default_rng(seed).permutation(data.media_count)[:shots + 1]
        records = data.records()
        self.records = [records[m] for m in self.media]
        first_caption = {m: i for i, m in reversed(list(enumerate(data.media_index)))}
        uncaptioned = [records[m]['file'] for m in self.media if m not in first_caption]
        if uncaptioned:
            raise InputError(f"{data_dir}: split '{split}' has no caption of {uncaptioned[0]} to give as an example")
        self.tokens = [data.tokens[data.offsets[i]:data.offsets[i] + data.lengths[i]].tolist()
                       for i in map(first_caption.get, self.media)]
        self.features, self.mask = data.features(self.media)
        self.split, self.shots = split, shots

    def chosen(self, is_query):
        """The examples for a query: the first `shots` candidates that is_query(candidate) does not pick
        out (is_query gets each candidate's position in the split and its record)."""
        keep = [j for j, (m, record) in enumerate(zip(self.media, self.records)) if not is_query(m, record)]
        return tuple(keep[:self.shots])

    def groups(self, queries, is_query):
        """{examples chosen: [positions in queries]}: the queries that get the same examples, together (they
        can be captioned in one batch). is_query(query, media, record) says whether a candidate is that query."""
        groups = {}
        for i, query in enumerate(queries):
            groups.setdefault(self.chosen(lambda media, record: is_query(query, media, record)), []).append(i)
        return groups

    def shots_of(self, chosen, device):
        """The examples `chosen` as decode.generate's `shots`."""
        import torch
        return Shots(torch.from_numpy(self.features[list(chosen)]).to(device),
                     torch.from_numpy(self.mask[list(chosen)]).to(device), [self.tokens[j] for j in chosen])


META_KEYS = ('vision_model', 'tokenizer', 'tokens_per_image', 'feature_dim', 'splits')


def read_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise InputError(f'{path}: not found; prepare the data with prepare_coco.py or prepare_mlslt.py')
    meta = read_json(path)
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise InputError(f"{path}: not a meta.json of prepare_coco.py or prepare_mlslt.py (no {', '.join(missing)})")
    return meta


def meta_value(entry, key, data_dir, split):
    """A count in meta.json's entry of a split."""
    if not isinstance(entry.get(key), int):
        raise InputError(f"{data_dir}/meta.json: split '{split}' has no count of {key}")
    return entry[key]


def open_memmap(path, dtype, shape=None):
    """A read-only memmap of a prepared file, which must be exactly as large as `shape` says (or, without
    a shape, a whole number of items)."""
    if not os.path.isfile(path):
        raise InputError(f'{path}: missing (meta.json lists it; prepare the data again)')
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    expected = item * math.prod(shape) if shape else size - size % item
    if size != expected or size == 0:
        described = f"{' x '.join(map(str, shape))} {np.dtype(dtype).name}, {expected:,} bytes" if shape \
            else f'whole {np.dtype(dtype).name} items'
        raise InputError(f'{path}: {size:,} bytes, but meta.json describes {described} (cut short, or '
                         f'from another run? prepare the data again)')
    return np.memmap(path, dtype=dtype, mode='r', shape=shape)


def load_table(path, rows, columns):
    """An int64 [rows, columns] .npy table of a prepared split (any number of rows if rows is None)."""
    try:
        table = np.load(path)
    except (OSError, ValueError, EOFError) as e:  # missing, cut short, not a .npy file
        raise InputError(f'{path}: not a readable .npy table ({first_line(e)})')
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != columns or \
            (rows is not None and len(table) != rows):
        raise InputError(f"{path}: a {table.dtype} table of shape {list(table.shape)}, expected int64 "
                         f"[{rows if rows is not None else 'rows'}, {columns}]")
    return table


def check_data_fits_model(meta, model, data_dir):
    """Features made by another vision model, or tokens of another tokenizer, would train garbage."""
    vision, vocab = model.vision.config, model.gpt.config.vocab_size
    problems = []
    if meta['vision_model'] != model.config.vision_model:
        problems.append(f"its features are from {meta['vision_model']!r}, the model's vision_model is "
                        f'{model.config.vision_model!r}')
    if meta['feature_dim'] != vision.hidden_size:
        problems.append(f"feature_dim {meta['feature_dim']} != the vision width {vision.hidden_size}")
    if meta['tokenizer'] != 'gpt2' or vocab < 50257:
        problems.append(f"tokenizer {meta['tokenizer']!r} does not fit GPT-2's vocabulary of {vocab}")
    frames, time_embeddings = meta.get('max_frames', 1), model.config.max_frames
    if model.resampler is not None and frames > time_embeddings:
        problems.append(f'its videos have up to {frames} frames, the resampler time embeddings for '
                        f'{time_embeddings} (max_frames)')
    if problems:
        raise InputError(f"{data_dir}/meta.json does not match the model: {'; '.join(problems)}")
