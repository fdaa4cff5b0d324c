"""
The offline demo dataset: pictures of 1 to 3 coloured shapes, each with 5 captions a person might write,
and their features, ready for train.py.

    python prepare_shapes.py

writes data/shapes/{train,val,test}/*.png with data/shapes/captions_{train,val,test}.json in the official
COCO captions format, and two tiny randomly initialised checkpoints, data/shapes/clip (a full CLIPModel)
and data/shapes/gpt2 (a GPT2LMHeadModel), saved with save_pretrained: the demo's stand-ins for the
pretrained models, loaded by the same from_pretrained code. Then, as prepare_coco.py would from those
captions files, the stand-in CLIP's features and the caption tokens into data/shapes_clip. Seeded: the
same settings give the same files.
"""
import glob
import math
import os
import random

from PIL import Image, ImageDraw

from common import check_writable, gpt2_tokenizer, input_errors_exit, write_json
from features import write_image_splits

# -----------------------------------------------------------------------------
out_dir = 'data/shapes'  # the pictures, their captions files and the stand-in checkpoints
features_dir = 'data/shapes_clip'  # their features and caption tokens, for train.py
num_train = 3000
num_val = 250
num_test = 250
image_size = 224  # of the pictures
# of the stand-in CLIP's input: 3 x 3 patches of 32 pixels, one per cell of the pictures' 3 x 3 grid, so that
# each patch token sees one cell (at 224, 7 x 7 patches straddle the cells, and a random ViT mixes the colours
# of neighbouring shapes: the captions then named a wrong colour for a shape about a third of the time)
vision_size = 96
seed = 1337
batch_size = 64  # of feature extraction
num_workers = min(4, os.cpu_count() or 1)  # image decoding processes
device = ''  # of feature extraction; default: cuda when available, else cpu
# -----------------------------------------------------------------------------

COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (240, 200, 30),
           'purple': (140, 60, 180)}
KINDS = {'circle': ['circle', 'disc', 'round shape'], 'square': ['square', 'box'],
         'triangle': ['triangle']}
SIZES = {'small': ['small', 'little', 'tiny'], 'large': ['large', 'big']}
# a 3 x 3 grid of cells: (row, column) -> ways to say where a shape is
PLACES = {
    (0, 0): ['in the top left corner', 'at the top left', 'in the upper left'],
    (0, 1): ['at the top', 'near the top', 'in the top middle'],
    (0, 2): ['in the top right corner', 'at the top right', 'in the upper right'],
    (1, 0): ['on the left', 'on the left side', 'at the left'],
    (1, 1): ['in the middle', 'in the center', 'in the centre'],
    (1, 2): ['on the right', 'on the right side', 'at the right'],
    (2, 0): ['in the bottom left corner', 'at the bottom left', 'in the lower left'],
    (2, 1): ['at the bottom', 'near the bottom', 'in the bottom middle'],
    (2, 2): ['in the bottom right corner', 'at the bottom right', 'in the lower right'],
}
NUMBER_WORDS = {1: 'one', 2: 'two', 3: 'three'}


def random_scene(rng):
    """1 to 3 shapes, each a dict of kind, colour, size and grid cell (no two in one cell)."""
    cells = rng.sample(sorted(PLACES), rng.randint(1, 3))
    return [dict(kind=rng.choice(sorted(KINDS)), colour=rng.choice(sorted(COLOURS)),
                 size=rng.choice(sorted(SIZES)), cell=cell) for cell in sorted(cells)]


def draw(scene, size):
    image = Image.new('RGB', (size, size), 'white')
    pen = ImageDraw.Draw(image)
    cell = size / 3
    for shape in scene:
        row, col = shape['cell']
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.42 if shape['size'] == 'large' else 0.22)
        fill = COLOURS[shape['colour']]
        if shape['kind'] == 'circle':
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape['kind'] == 'square':
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def noun(shape, rng, article=True):
    """'a small red circle', with a random synonym for the size and the kind."""
    words = f"{rng.choice(SIZES[shape['size']])} {shape['colour']} {rng.choice(KINDS[shape['kind']])}"
    return f'a {words}' if article else words


def place(shape, rng):
    return rng.choice(PLACES[shape['cell']])


def relation(a, b):
    """Where shape a is relative to shape b, in words."""
    (ra, ca), (rb, cb) = a['cell'], b['cell']
    if ca != cb:
        return 'to the left of' if ca < cb else 'to the right of'
    return 'above' if ra < rb else 'below'


def count_phrase(scene):
    """'two circles and a triangle': the shapes counted by kind."""
    counts = {}
    for shape in scene:
        counts[shape['kind']] = counts.get(shape['kind'], 0) + 1
    parts = [f"{NUMBER_WORDS[n]} {kind}s" if n > 1 else f'a {kind}' for kind, n in counts.items()]
    return ' and '.join(parts) if len(parts) <= 2 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def captions_for(scene, rng):
    """Five different captions: paraphrases over colour, shape, size, count and position."""
    if len(scene) == 1:
        s = scene[0]
        options = [
            lambda: f'{noun(s, rng)} {place(s, rng)}',
            lambda: f'there is {noun(s, rng)} {place(s, rng)}',
            lambda: f'{noun(s, rng)} on a white background',
            lambda: f'the picture shows {noun(s, rng)} {place(s, rng)}',
            lambda: f"a single {s['colour']} {rng.choice(KINDS[s['kind']])} {place(s, rng)}",
            lambda: f'{place(s, rng)} of the image is {noun(s, rng)}',
            lambda: f"one {noun(s, rng, article=False)}",
        ]
    elif len(scene) == 2:
        a, b = rng.sample(scene, 2)
        options = [
            lambda: f'{noun(a, rng)} {relation(a, b)} {noun(b, rng)}',
            lambda: f'{noun(b, rng)} {relation(b, a)} {noun(a, rng)}',
            lambda: f'two shapes: {noun(a, rng)} and {noun(b, rng)}',
            lambda: f'{noun(a, rng)} {place(a, rng)} and {noun(b, rng)} {place(b, rng)}',
            lambda: f'there are two shapes, {noun(b, rng)} and {noun(a, rng)}',
            lambda: f'{count_phrase(scene)} on a white background',
            lambda: f'a picture of {noun(a, rng)} and {noun(b, rng)}',
        ]
    else:
        a, b, c = rng.sample(scene, 3)
        options = [
            lambda: f'{noun(a, rng)}, {noun(b, rng)} and {noun(c, rng)}',
            lambda: f'three shapes: {noun(c, rng)}, {noun(a, rng)} and {noun(b, rng)}',
            lambda: f'{count_phrase(scene)}',
            lambda: f'there are three shapes, including {noun(a, rng)} {place(a, rng)}',
            lambda: f'{noun(a, rng)} {relation(a, b)} {noun(b, rng)}, and {noun(c, rng)}',
            lambda: f'three shapes on a white background: {count_phrase(scene)}',
            lambda: f'a picture with {noun(b, rng)}, {noun(c, rng)} and {noun(a, rng)}',
        ]
    chosen = rng.sample(options, 5)
    return [sentence[0].upper() + sentence[1:] + '.' for sentence in (make() for make in chosen)]


def write_split(name, count, rng, root, size):
    """Images and an official-format captions file for one split; returns its records for features.py."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    images, annotations, records = [], [], []
    for image_id in range(count):
        scene = random_scene(rng)
        file_name = f'{image_id:06d}.png'
        draw(scene, size).save(os.path.join(folder, file_name))
        # the scene too, beside the official fields: eval_bleu.py checks each caption against its picture
        images.append(dict(id=image_id, file_name=file_name, width=size, height=size,
                           scene=[dict(shape, cell=list(shape['cell'])) for shape in scene]))
        captions = captions_for(scene, rng)
        for caption in captions:
            annotations.append(dict(id=len(annotations), image_id=image_id, caption=caption))
        records.append(dict(file=os.path.join(folder, file_name), id=image_id, captions=captions))
    write_json(os.path.join(root, f'captions_{name}.json'),
               dict(info=dict(description='nanocap shapes demo', colours=sorted(COLOURS), kinds=KINDS), licenses=[],
                    images=images, annotations=annotations))
    return records


def save_tiny_models(root, size, seed):
    """Random stand-ins for CLIP and GPT-2, in the layouts of the real checkpoints, their weights drawn here."""
    from weights import quiet_transformers
    quiet_transformers()
    clip = stand_in_clip(size, seed)
    clip_dir = os.path.join(root, 'clip')
    clip.save_pretrained(clip_dir)
    save_clip_tokenizer(clip_dir, clip.config.text_config.bos_token_id, clip.config.text_config.eos_token_id)
    centre_vision_features(clip, clip_dir, sorted(glob.glob(os.path.join(root, 'train', '*.png')))[:256])
    stand_in_gpt2(seed).save_pretrained(os.path.join(root, 'gpt2'))


def stand_in_clip(size, seed):
    """A tiny full CLIPModel (vision and text towers) that sees size x size pictures in 3 x 3 patches."""
    from transformers import CLIPConfig, CLIPModel
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=size, patch_size=size // 3)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return draw_weights(CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=64)), seed)


def stand_in_gpt2(seed):
    """A narrow GPT-2 with GPT-2's real vocabulary, so that the real tokenizer works: over 50,257 words the LM
    head is most of the demo's training time, and a narrow model makes it cheap."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return draw_weights(GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=64, n_positions=128)), seed)


def draw_weights(model, seed):
    """
    Every weight of a transformers model drawn here, tensor after tensor in the order of their names, from one
    generator: each transformers version initialises a model its own way, and the same seed would give another
    stand-in, and another demo, under another version. Biases are 0, LayerNorm scales 1, CLIP's logit scale
    log(1 / 0.07) as CLIP starts it, and every other tensor normal with standard deviation weight_std(name).
    """
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.named_parameters()):
            if name.endswith('.bias'):
                tensor.zero_()
            elif tensor.dim() == 1 and any(norm in name for norm in ('norm', 'ln_', 'layrnorm')):  # CLIP's typo
                tensor.fill_(1.0)
            elif name == 'logit_scale':
                tensor.fill_(math.log(1 / 0.07))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * weight_std(name, tensor, model.config))
    return model


def weight_std(name, tensor, config):
    """GPT-2's weights as GPT-2 starts them: 0.02, and its residual projections 0.02 / sqrt(2 x its layers);
    CLIP's matrices 1 / sqrt(their inputs), so that every layer keeps the scale of what comes in, its embeddings
    0.02."""
    if name.startswith('transformer.'):
        return 0.02 / math.sqrt(2 * config.n_layer) if name.endswith('c_proj.weight') else 0.02
    if 'embedding' in name:
        return 0.02
    return tensor[0].numel() ** -0.5  # a row of a linear layer's [out, in], of a convolution's [out, in, h, w]


def save_clip_tokenizer(clip_dir, bos, eos):
    """A tokenizer for the stand-in's text tower, in the files of CLIP's own (vocab.json, merges.txt), which
    CLIPScore reads captions with: every byte a token, alone and ending a word, and no merges (a random text
    tower knows no words to merge into); bos and eos, the ids of <|startoftext|> and <|endoftext|>."""
    import json
    # GPT-2's and CLIP's byte-to-character map: the printable bytes stand for themselves, the others for 256 + n
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    vocab = {'<|startoftext|>': bos, '<|endoftext|>': eos}
    free = (i for i in range(2 * len(chars) + 2) if i not in (bos, eos))
    vocab.update((token, next(free)) for token in chars + [c + '</w>' for c in chars])
    with open(os.path.join(clip_dir, 'vocab.json'), 'w') as f:
        json.dump(vocab, f)
    with open(os.path.join(clip_dir, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')


def centre_vision_features(clip, clip_dir, image_paths):
    """
    A random ViT's features of every image share one large offset, which buries what differs between
    images (the bridge then learns only the captions' language, never to look). Trained CLIP needs no
    such help. Subtract the mean feature of some training images through the bias of the last layer's
    output projection, which adds straight onto last_hidden_state, and save the stand-in again.
    """
    import numpy as np
    import torch
    from weights import load_vision
    from media import clip_preprocess, load_rgb
    vision = load_vision(clip_dir)
    pixels = torch.tensor(np.stack([clip_preprocess(load_rgb(p), vision.config.image_size)
                                    for p in image_paths]))
    with torch.no_grad():
        mean = vision(pixel_values=pixels).last_hidden_state.mean(dim=(0, 1))
        last = vision.config.num_hidden_layers - 1
        clip.state_dict()[f'vision_model.encoder.layers.{last}.mlp.fc2.bias'].sub_(mean)
    clip.save_pretrained(clip_dir)


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    from common import pick_device
    from weights import load_vision
    with input_errors_exit('prepare_shapes.py'):
        check_writable(out_dir)
        check_writable(features_dir)
        gpt2_tokenizer()  # its files, before any work
    rng = random.Random(seed)
    splits = {name: write_split(name, count, rng, out_dir, image_size)
              for name, count in (('train', num_train), ('val', num_val), ('test', num_test))}
    save_tiny_models(out_dir, vision_size, seed)
    print(f'wrote {out_dir}: {num_train} / {num_val} / {num_test} images (train / val / test), '
          f'5 captions each, and tiny random clip/ and gpt2/ checkpoints')
    clip_dir = os.path.join(out_dir, 'clip')
    with input_errors_exit('prepare_shapes.py'):
        vision = load_vision(clip_dir).to(pick_device(device)).eval()
        meta = write_image_splits(splits, features_dir, vision, clip_dir, batch_size, num_workers, skip_bad=False)
    for name, entry in meta['splits'].items():
        entry['source'] = dict(captions=os.path.abspath(os.path.join(out_dir, f'captions_{name}.json')),
                               images=os.path.abspath(os.path.join(out_dir, name)))
    write_json(os.path.join(features_dir, 'meta.json'), meta)
    print(f'wrote {features_dir}: their features and caption tokens')
