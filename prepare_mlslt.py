"""
Precompute the frozen CLIP features of MLSLT's sign-language videos (the SP-10 data: a signer in one of
10 sign languages, and the sentence in several spoken languages), as it ships:

    <root>/<split>/<id>/<sign language>.mp4     for split in train, dev, test
    <root>/<split>.json                         [{"id": ..., "sign_list": [{"lang": ..., "text": ...}]}]

    python prepare_mlslt.py --root=SP-10 --out_dir=data/mlslt
    python prepare_mlslt.py --root=SP-10 --sign_langs=de,en --text_lang=de --out_dir=data/mlslt_de

Every (id, sign language) pair with a video is a sample; its target is the sentence in text_lang. Up to
max_frames frames, spread evenly over the video, go through CLIP, one by one. Writes per split, each
file atomically (temp file + rename), what prepare_coco.py writes with frames for images:
  <split>_feats.bin      float16 [frames, tokens, width]: every video's frames, one video after another
  <split>_frames.npy     int64 [videos, 2]: (first frame, frame count) of each video
  <split>_tokens.bin, <split>_captions.npy (its third column: the video), <split>_videos.json, meta.json
An interrupted run resumes where it stopped. Needs PyAV (pip install av).
"""
import os

from common import (InputError, check_writable, gpt2_tokenizer, input_errors_exit, pick_device,
                    read_json, write_json)
from data import FORMAT_VERSION
from features import write_video_splits
from model import CaptionerConfig
from weights import load_vision

# -----------------------------------------------------------------------------
root = ''  # the dataset folder: <root>/<split>.json and <root>/<split>/<id>/<sign language>.mp4
out_dir = 'data/mlslt'
splits = 'train,dev,test'
sign_langs = ''  # the sign languages to use, e.g. 'de,en' (default: all present)
text_lang = 'en'  # the spoken language of the targets
max_frames = 64  # frames per video, spread evenly over it (at most the resampler's time embeddings)
vision_model = 'openai/clip-vit-base-patch32'  # hub name or local directory
batch_size = 4  # videos per CLIP batch (up to batch_size * max_frames frames)
num_workers = min(4, os.cpu_count() or 1)  # video decoding processes
device = ''  # default: cuda when available, else cpu
skip_bad_videos = False  # drop unreadable videos (and their captions) instead of stopping
# -----------------------------------------------------------------------------

SIGN_LANGUAGES = ('zh', 'uk', 'ru', 'bg', 'is', 'de', 'it', 'sv', 'lt', 'en')
MAX_TIME_EMBEDDINGS = CaptionerConfig.max_frames  # the resampler's, by default


# ----------------------------------------------------------------------------- the split files

def load_split(root_dir, split_name, languages, target_lang):
    """[{'file': video, 'id': '<id>/<sign language>', 'captions': [text]}] of every (id, sign language)
    pair whose video exists, for the sign languages `languages`."""
    path = os.path.join(root_dir, f'{split_name}.json')
    entries = read_json(path)
    if entries is None:
        raise InputError(f'{path}: no such split file')
    try:
        texts = [{s['lang']: s['text'].strip() for s in entry['sign_list']} for entry in entries]
        ids = [str(entry['id']) for entry in entries]
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f'{path}: expected a list of {{"id", "sign_list": [{{"lang", "text"}}]}} ({e!r})')
    records = []
    for sample_id, text in zip(ids, texts):
        if target_lang not in text:
            raise InputError(f'{path}: id {sample_id} has no {target_lang!r} text (its languages: '
                             f'{", ".join(text)})')
        for lang in languages:
            video = os.path.join(root_dir, split_name, sample_id, f'{lang}.mp4')
            if os.path.exists(video):
                records.append(dict(file=video, id=f'{sample_id}/{lang}', captions=[text[target_lang]]))
    if not records:
        raise InputError(f'{os.path.join(root_dir, split_name)}: no video of the sign languages '
                         f'{",".join(languages)} for the {len(ids)} ids of {path}')
    return records


# ----------------------------------------------------------------------------- preparing

def main(rank, world):
    if not root:
        raise InputError('give --root=FOLDER (the one with train.json, dev.json, test.json)')
    check_writable(out_dir)
    if not 1 <= max_frames <= MAX_TIME_EMBEDDINGS:
        raise InputError(f'max_frames must be in 1..{MAX_TIME_EMBEDDINGS} (the resampler has '
                         f'{MAX_TIME_EMBEDDINGS} time embeddings), not {max_frames}')
    languages = sign_langs.split(',') if sign_langs else SIGN_LANGUAGES
    unknown = [lang for lang in languages if lang not in SIGN_LANGUAGES]
    if unknown:
        raise InputError(f"sign_langs: unknown {','.join(unknown)} (MLSLT has {','.join(SIGN_LANGUAGES)})")
    try:
        import av  # noqa: F401  (fail before any work, not in a decoding worker)
    except ImportError:
        raise InputError('PyAV is needed to decode videos: pip install av')
    meta_path = os.path.join(out_dir, 'meta.json')
    # splits prepared by earlier runs into the same folder stay listed, if they are compatible
    meta = read_json(meta_path) or {}
    same = (FORMAT_VERSION, vision_model, 'video', max_frames, text_lang)
    if meta and tuple(meta.get(k) for k in ('format_version', 'vision_model', 'media', 'max_frames',
                                            'text_lang')) != same:
        raise InputError(f"{meta_path} holds other features ({meta.get('vision_model')!r}, up to "
                         f"{meta.get('max_frames')} frames, text {meta.get('text_lang')!r}); use another "
                         f"--out_dir")
    dev = pick_device(device)  # under torchrun: this rank's own GPU
    gpt2_tokenizer()  # its files, before any work
    split_records = {name: load_split(root, name, languages, text_lang) for name in splits.split(',')}
    vision = load_vision(vision_model).to(dev).eval()
    prepared = write_video_splits(split_records, out_dir, vision, vision_model, max_frames, batch_size,
                                  num_workers, skip_bad_videos, rank, world)
    prepared['text_lang'] = text_lang
    if rank != 0:
        return
    prepared['splits'] = {**meta.get('splits', {}), **prepared['splits']}
    write_json(meta_path, prepared)
    print(f'wrote {out_dir}: ' + ', '.join(f"{k} {v['videos']:,} videos / {v['frames']:,} frames"
                                           for k, v in prepared['splits'].items()))


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    import torch
    # under torchrun, every rank extracts its own share of each split
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world > 1:
        torch.distributed.init_process_group('gloo')  # only to coordinate: barriers and the bad list
    with input_errors_exit('prepare_mlslt.py'):
        main(rank, world)
