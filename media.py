"""
Media decoding: any image file, or the evenly spread frames of a video, to CLIP's input, exactly as
CLIP's image processor makes it. prepare_coco.py, prepare_mlslt.py and sample.py decode alike, so
one picture gives one caption whichever script reads it.
"""
import os

import numpy as np
from PIL import Image, ImageOps

from common import InputError

# the image files sample.py and prepare_coco.py read from a folder
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def tokens_per_frame(vision_config):
    """The CLIP tokens of one image: one per patch, and the class token."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


# -----------------------------------------------------------------------------
# Images

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
    """CLIP's preprocessing: shortest side to `size` (bicubic), centre crop, scale to [0, 1],
    normalise. Returns float32 [3, size, size]."""
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
    """Collate images [3, H, W] and videos [frames, 3, H, W] into one batch of frames
    [F, 3, H, W]."""
    import torch
    return torch.from_numpy(np.concatenate([item.reshape(-1, *item.shape[-3:]) for item in items]))


# -----------------------------------------------------------------------------
# Videos (PyAV is needed only for them)

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
    """`wanted` frame indices spread evenly over frame_count frames: the middle of equal
    segments."""
    return ((np.arange(wanted) + 0.5) * frame_count / wanted).astype(np.int64)


def read_frames(path, most, frame_count):
    """RGB PIL images of min(frame_count, most) frames spread evenly over the video's
    frame_count."""
    wanted = set(frame_indices(frame_count, min(frame_count, most)).tolist())
    container, stream = open_video(path)
    with container:
        frames = [frame.to_image() for i, frame in enumerate(container.decode(stream))
                  if i in wanted]
    if len(frames) != len(wanted):
        raise InputError(f'{path}: {len(frames)} of its frames {sorted(wanted)} decoded')
    return frames


def video_pixels(path, most, frame_count, size):
    """CLIP's input for up to `most` frames of a video: float32 [frames, 3, size, size]."""
    frames = read_frames(path, most, frame_count)
    return np.stack([clip_preprocess(frame, size) for frame in frames])


class VideoFiles:
    """A torch Dataset of preprocessed videos [frames, 3, H, W], decoded in DataLoader workers."""

    def __init__(self, paths, decoded_counts, most, size):
        self.paths, self.decoded_counts, self.most, self.size = paths, decoded_counts, most, size
        self.frame_counts = [min(n, most) for n in decoded_counts]  # the frames kept of each video

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return video_pixels(self.paths[i], self.most, self.decoded_counts[i], self.size)
