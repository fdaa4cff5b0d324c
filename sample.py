"""
Caption images (or videos) with a trained checkpoint, running CLIP on them as they come:

    python sample.py --out_dir=out-coco --images=photos/
    python sample.py --out_dir=out-coco --images='photos/*.jpg' --decoding=sample --num_samples=3 --seed=1
    python sample.py --out_dir=out-coco --images=photos/ --json=captions.json --html=captions.html
    python sample.py --out_dir=out-mlslt --videos=clips/     (needs PyAV: pip install av)

Prints `<path>\t<caption>\t<CLIP-S>` per caption (files sorted by path; the CLIP-S column only when the
checkpoint's CLIP has its text tower) to stdout: one caption a file, or num_samples of them, or with
--rerank=clip the best of them. An unreadable file gets one line on stderr and the others are captioned; the
exit status is 0 when at least one file was captioned.
"""
import base64
import glob
import io
import os
import sys
import warnings
from html import escape

from PIL import Image

from common import (InputError, check_at_least, check_writable, gpt2_tokenizer, input_errors_exit,
                    vision_autocast, write_json, write_text)
from data import FewShotExamples, check_data_fits_model, read_meta
from media import (IMAGE_EXTENSIONS, ImageFiles, count_frames, load_rgb, read_frames, stack_frames,
                   video_pixels)

# -----------------------------------------------------------------------------
out_dir = 'out'  # the training run's folder
checkpoint = 'best.pt'
images = ''  # a folder (searched recursively), an image file, or a glob pattern
videos = ''  # the same, of video files
max_frames = 64  # frames per video, spread evenly over it (as prepare_mlslt.py samples them)
json = ''  # also write the captions to this JSON file
html = ''  # also write a self-contained page of thumbnails and captions
decoding = 'beam'  # 'greedy', 'beam' or 'sample'
beam_width = 5
temperature = 1.0
top_k = 0  # 0: off
top_p = 1.0  # 1.0: off
max_new_tokens = 30
num_samples = 1  # captions per image (decoding='sample')
seed = 1337  # of sampling, and of which few-shot examples
shots = 0  # few-shot: this many (image, caption) examples before each image (a model trained with interleave > 1)
shots_data = ''  # the prepared folder (prepare_coco.py's out_dir) the examples come from, for the same CLIP
shots_split = 'train'
batch_size = 256  # files per batch: large batches keep a GPU busy while decoding
pixels_gb = 2.0  # the most memory the decoded frames may take, every batch in flight together (see files_per_batch)
num_workers = min(4, os.cpu_count() or 1)  # decoding processes
rerank = ''  # 'clip': the best by CLIP-S of the beam's n-best, or of num_samples samples
device = ''  # default: cuda when available, else cpu
cpu_weights = 'float32'  # decoding on a CPU: GPT-2's and the cross-attention's weights as 'float32', 'bfloat16', 'int8'
# -----------------------------------------------------------------------------

VIDEO_EXTENSIONS = ('.mp4', '.m4v', '.mov', '.mkv', '.webm', '.avi')
# PIL warns above ~89M pixels and refuses above twice that; refuse at the warning: such a file is far more
# likely a decompression bomb than a photo to caption
warnings.simplefilter('error', Image.DecompressionBombWarning)


def find_files(spec, extensions):
    """Sorted paths of the files with these extensions in a folder (recursively), of a single file, or
    of a glob pattern."""
    if os.path.isdir(spec):
        paths = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                 if name.lower().endswith(extensions)]
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    return sorted(paths)


class PreprocessedImages(ImageFiles):
    """ImageFiles that tolerates bad files: (path, CLIP pixels [1, 3, H, W] or None, why not)."""

    def __getitem__(self, i):
        path = self.paths[i]
        try:
            if os.path.getsize(path) == 0:
                return path, None, 'empty file'
            return path, super().__getitem__(i)[None], None
        except Image.DecompressionBombWarning as e:
            return path, None, f'too large to be a photo ({e})'.splitlines()[0]
        except Exception as e:  # PIL raises many kinds for a broken file
            return path, None, f'not a readable image ({type(e).__name__}: {e})'.splitlines()[0]


class PreprocessedVideos:
    """Videos as (path, CLIP pixels [frames, 3, H, W] or None, why not)."""

    def __init__(self, paths, size, most):
        self.paths, self.size, self.most = paths, size, most

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        frame_count = count_frames(path)  # or why the video cannot be read
        if isinstance(frame_count, str):
            return path, None, frame_count
        return path, video_pixels(path, self.most, frame_count, self.size), None


def collate_files(items):
    """In a DataLoader worker: the readable files' frames as one tensor (a tensor reaches the main
    process through shared memory; numpy arrays would be pickled through a pipe), their paths and frame
    counts, and (path, why) of the unreadable ones."""
    good = [(path, pixels) for path, pixels, why in items if not why]
    frames = stack_frames([pixels for _, pixels in good]) if good else None
    return [path for path, _ in good], [len(pixels) for _, pixels in good], frames, \
        [(path, why) for path, _, why in items if why]


def shot_groups(paths, examples):
    """[(examples chosen, rows)] of a batch of files, the files that get the same few-shot examples together:
    no file is its own example."""
    if examples is None:
        return [((), list(range(len(paths))))]
    same_file = lambda path, media, record: os.path.exists(record['file']) and os.path.samefile(path, record['file'])
    return list(examples.groups(paths, same_file).items())


def caption_files(model, files, options, batch, workers, dev, samples=1, examples=None, scorer=None, rerank=False):
    """{path: its captions} of every readable image or video of `files` (PreprocessedImages or
    PreprocessedVideos), in their order; reports the others. Its captions: dict(captions=[str], clip_s=[float]
    or None): `samples` of them, or with rerank the best by CLIP-S of the beam's n-best or of `samples` samples,
    which also keeps the candidates, their CLIP-S and the one chosen. examples: a data.FewShotExamples, whose
    examples go before each file. scorer: a clipscore.ClipScorer, or None (no CLIP-S)."""
    import torch
    from tqdm import tqdm
    import decode
    gpt2_tokenizer()  # its files, before any decoding
    cuda = torch.device(dev).type == 'cuda'
    loader = torch.utils.data.DataLoader(files, batch_size=batch, num_workers=workers, collate_fn=collate_files,
                                         pin_memory=cuda)
    results = {}
    with tqdm(total=len(files), unit='file', disable=len(files) < 100, file=sys.stderr) as bar:
        for paths, frame_counts, frames, bad in loader:
            for path, why in bad:
                print(f'{path}: skipped, {why}', file=sys.stderr)
            if paths:
                with torch.no_grad(), vision_autocast(dev.split(':')[0]):
                    features, mask = model.encode_pixels(frames.to(dev, non_blocking=True), frame_counts)
                features = features.to(torch.float16)  # as prepare_coco.py stores them: the same caption
                for chosen, rows in shot_groups(paths, examples):
                    shots = examples.shots_of(chosen, dev) if examples is not None else None
                    captioned = decode.caption_batch(model, features[rows], mask[rows], options,
                                                     samples, shots, scorer, rerank)
                    for row, result in zip(rows, captioned):
                        results[paths[row]] = result
            bar.update(len(paths) + len(bad))
    return {path: results[path] for path in sorted(results)}


def files_per_batch(frames_per_file, size, workers, most, budget_gb):
    """Files per batch, at most `most`, such that the float32 pixels of every batch in flight fit budget_gb:
    each worker prepares 2 batches ahead (the DataLoader's prefetch) while one is captioned. A video of 64
    frames is 38 MB at 224 x 224: 256 of them, 10 GB a batch, would run a host out of memory."""
    file_bytes = frames_per_file * 3 * size * size * 4
    in_flight = 2 * workers + 1
    return max(1, min(most, int(budget_gb * 2 ** 30 // (file_bytes * in_flight))))


def thumbnail_uri(path, size=256):
    """The image (or a video's middle frame) as a small inline JPEG, so the page needs no other file."""
    if path.lower().endswith(VIDEO_EXTENSIONS):
        image = read_frames(path, 1, count_frames(path))[0]
    else:
        image = load_rgb(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=85)
    return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode()


def write_html(path, results, heading):
    """A self-contained page: the heading (which model, which decoding), then each file's thumbnail, with its
    first caption as the thumbnail's alternative text, and its captions."""
    def line(caption, clip_s):
        score = f' <small>CLIP-S {clip_s:.3f}</small>' if clip_s is not None else ''
        return f'<p>{escape(caption)}{score}</p>'
    rows = '\n'.join(
        f'<figure><img src="{thumbnail_uri(image)}" alt="{escape(r["captions"][0])}"><figcaption>'
        f'<b>{escape(os.path.basename(image))}</b>'
        f'{"".join(line(c, s) for c, s in zip(r["captions"], r["clip_s"] or [None] * len(r["captions"])))}'
        f'</figcaption></figure>' for image, r in results.items())
    page = (f'<!doctype html><meta charset="utf-8"><title>nanocap: {escape(heading)}</title><style>'
            'body{font-family:sans-serif;margin:16px}main{display:flex;flex-wrap:wrap;gap:16px}'
            'figure{width:256px;margin:0}img{max-width:256px;max-height:256px}p{margin:4px 0}</style>\n'
            f'<h1>{escape(heading)}</h1>\n<main>\n{rows}\n</main>\n')

    write_text(path, page)


def page_heading():
    """What made the captions, in words: the checkpoint and the decoding."""
    how = {'beam': f'beam search, width {beam_width}', 'greedy': 'greedy decoding',
           'sample': f'sampling, temperature {temperature:g}' + (f', top-k {top_k}' if top_k else '')
           + (f', top-p {top_p:g}' if top_p < 1 else '')}[decoding]
    if num_samples > 1:
        how += f', {num_samples} samples'
    if rerank:
        how += ', reranked by CLIP-S'
    if shots:
        how += f', {shots}-shot'
    return f'Captions by {os.path.join(out_dir, checkpoint)}: {how}'


def main():
    import torch
    from clipscore import check_rerank, clip_scorer_of
    from common import pick_device
    from decode import check_cpu_weights, check_decoding, cpu_decoding, warn_if_all_empty
    from weights import load_captioner
    check_decoding(decoding, max_new_tokens, beam_width, temperature, top_k, top_p)
    check_cpu_weights(cpu_weights)
    check_rerank(rerank, decoding, num_samples)
    check_at_least(num_samples=(num_samples, 1), batch_size=(batch_size, 1), num_workers=(num_workers, 0),
                   max_frames=(max_frames, 1), shots=(shots, 0))
    if not pixels_gb > 0:
        raise InputError(f'pixels_gb must be above 0, not {pixels_gb!r}')
    if bool(images) == bool(videos):
        raise InputError('give either --images=FOLDER, FILE or GLOB or --videos=FOLDER, FILE or GLOB')
    if num_samples > 1 and decoding != 'sample':
        raise InputError(f'num_samples={num_samples} needs decoding=sample ({decoding} gives one caption)')
    for path in (json, html):
        if path:
            check_writable(path, folder=False)
    kind, spec = ('image', images) if images else ('video', videos)
    paths = find_files(spec, IMAGE_EXTENSIONS if images else VIDEO_EXTENSIONS)
    if not paths:
        raise InputError(f'no {kind} files found at {spec!r}')
    dev = pick_device(device)
    model = cpu_decoding(load_captioner(os.path.join(out_dir, checkpoint), dev)[0], cpu_weights)
    scorer, why_not = clip_scorer_of(model.config.vision_model, dev)
    if scorer is None:
        if rerank:
            raise InputError(f'rerank=clip: {why_not}')
        print(f'sample.py: no CLIP-S: {why_not}', file=sys.stderr)
    size = model.vision.config.image_size
    if videos:
        if model.resampler is not None and max_frames > model.config.max_frames:
            raise InputError(f'max_frames={max_frames}, but the checkpoint has time embeddings for '
                             f'{model.config.max_frames} frames')
        files = PreprocessedVideos(paths, size, max_frames)
    else:
        files = PreprocessedImages(paths, size)
    examples = None
    if shots:
        if not shots_data:
            raise InputError('shots needs shots_data: a prepared folder to take the examples from')
        check_data_fits_model(read_meta(shots_data), model, shots_data)
        examples = FewShotExamples(shots_data, shots_split, shots, seed)
    generator = torch.Generator(dev).manual_seed(seed)
    options = dict(decoding=decoding, beam_width=beam_width, temperature=temperature, top_k=top_k, top_p=top_p,
                   max_new_tokens=max_new_tokens, generator=generator)
    batch = files_per_batch(max_frames if videos else 1, size, num_workers, batch_size, pixels_gb)
    results = caption_files(model, files, options, batch, num_workers, dev, num_samples, examples, scorer,
                            bool(rerank))
    warn_if_all_empty([caption for r in results.values() for caption in r['captions']], 'sample.py')
    for path, r in results.items():  # <path> TAB <caption> (TAB <its CLIP-S>)
        for caption, clip_s in zip(r['captions'], r['clip_s'] or [None] * len(r['captions'])):
            print(f'{path}\t{caption}' + (f'\t{clip_s:.3f}' if clip_s is not None else ''))
        if rerank:
            print(f"{path}: chose candidate {r['chosen'] + 1} of {len(r['candidates'])} by CLIP-S", file=sys.stderr)
    if json:
        write_json(json, [{kind: p, **r} for p, r in results.items()])
    if html:
        write_html(html, results, page_heading())
    if not results:
        raise InputError(f'none of the {len(paths)} {kind} file(s) could be read')


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    with input_errors_exit('sample.py'):
        main()
