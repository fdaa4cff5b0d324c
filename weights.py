"""
Where the weights come from and where they go: the frozen CLIP and GPT-2, from a Hugging Face hub name or a
local directory (transformers reads the files; we check that they are what they claim to be, and put GPT-2's
into model.py's own GPT-2), and train.py's checkpoints, which hold only the trained weights and what it takes
to rebuild the rest. Every problem with a file a user handed us is an InputError that names it.
"""
import difflib
import os
import re
import zipfile
from dataclasses import asdict

import torch
import torch.nn.functional as F

from common import InputError, atomic_write, first_line, read_json, write_json, write_text
from model import GPT2, Captioner, CaptionerConfig, GPTConfig

# Architectures of the checkpoints we know by name, so that random weights (bench.py) need no download.
# Any other name (or a local directory) is read from its config.json.
GPT2_SIZES = {
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
_CLIP_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_CLIP_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
CLIP_VISION_SIZES = {
    'openai/clip-vit-base-patch32': dict(_CLIP_B, patch_size=32, image_size=224),
    'openai/clip-vit-base-patch16': dict(_CLIP_B, patch_size=16, image_size=224),
    'openai/clip-vit-large-patch14': dict(_CLIP_L, patch_size=14, image_size=224),
    'openai/clip-vit-large-patch14-336': dict(_CLIP_L, patch_size=14, image_size=336),
}


# -----------------------------------------------------------------------------
# the pretrained CLIP and GPT-2

def quiet_transformers():
    """No progress bars or warnings from transformers' loading: our own errors say what is wrong."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def check_checkpoint_kind(name, model_types, what):
    """Fail unless `name` is a local directory or hub name whose config.json is of one of model_types.
    transformers would otherwise build a randomly initialised model from a checkpoint of another kind
    (or from a folder without one), and a run would train on noise without a word."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import PretrainedConfig
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, 'config.json')):
        raise InputError(f'{name}: no config.json in it (not a checkpoint saved by save_pretrained)')
    if not os.path.isdir(name):
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise InputError(f'{name}: no such directory (nor a model name on the Hugging Face hub)')
    try:
        config, _ = PretrainedConfig.get_config_dict(name)
    except OSError as e:  # not on the hub, no network, a broken config.json, ...
        place = 'its config.json cannot be read' if os.path.isdir(name) else \
            'no such directory, and the hub did not give it'
        raise InputError(f'{name}: {place} ({first_line(e)})')
    if config.get('model_type') not in model_types:
        raise InputError(f"{name}: a {config.get('model_type') or 'model_type-less'} checkpoint, not {what}")


def from_pretrained(model_class, name, what, ignored_prefixes=(), prefix=''):
    """model_class.from_pretrained(name), failing with one line unless every weight was found, of the right
    shape, and every weight of the checkpoint was used (except those starting with ignored_prefixes). A weight
    is named as the checkpoint's files name it: `prefix` + what transformers 5 calls it."""
    try:
        # mismatched shapes are reported in `info` (and refused below), not raised as a bare RuntimeError
        model, info = model_class.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as e:  # no weights file, a truncated one, ...
        raise InputError(f'{name}: cannot load the weights of {what} ({first_line(e)})')
    full = lambda key: key if key.startswith(prefix) else prefix + key  # transformers 4 keeps the prefix, 5 drops it
    unused = [k for k in info['unexpected_keys'] if not k.startswith(ignored_prefixes)]
    problems = [f'{len(keys)} {why} (e.g. {keys[0]})' for why, keys in (
        ('weights missing', sorted(map(full, info['missing_keys']))),
        ('weights of another shape', sorted(full(k) for k, *_ in info['mismatched_keys'])),
        ('weights that are not part of it', sorted(unused))) if keys]
    if problems:
        raise InputError(f"{name}: not the weights of {what}: {'; '.join(problems)}")
    return model


def load_vision(name, pretrained=True):
    """The CLIP vision tower of a hub name or local directory (a full CLIPModel checkpoint is fine)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    quiet_transformers()
    if not pretrained and name in CLIP_VISION_SIZES:
        return CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_SIZES[name]))
    check_checkpoint_kind(name, ('clip', 'clip_vision_model'), 'a CLIP model')
    if not pretrained:
        return CLIPVisionModel(CLIPVisionConfig.from_pretrained(name))
    # a full CLIPModel checkpoint also holds the text tower and the projections: they are not needed
    return from_pretrained(CLIPVisionModel, name, 'a CLIP vision tower', prefix='vision_model.',
                           ignored_prefixes=('text_model.', 'text_projection.', 'visual_projection.',
                                             'logit_scale'))


# GPT-2 checkpoints store these as Conv1D weights, shaped (in, out): nn.Linear wants (out, in)
_CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def load_gpt2(name, pretrained=True):
    """Our GPT-2 with the weights of a hub name or local directory, via transformers' GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel
    quiet_transformers()
    if not pretrained and name in GPT2_SIZES:
        return GPT2(gpt_config(GPT2Config(**GPT2_SIZES[name])))
    check_checkpoint_kind(name, ('gpt2',), 'a GPT-2 model')
    if not pretrained:
        return GPT2(gpt_config(GPT2Config.from_pretrained(name)))
    hf_model = from_pretrained(GPT2LMHeadModel, name, 'GPT-2')
    model = GPT2(gpt_config(hf_model.config))
    hf_state = hf_model.state_dict()
    state = {}
    for key in model.state_dict():
        weight = hf_state['transformer.' + key]
        state[key] = weight.t() if key.endswith(_CONV1D_WEIGHTS) else weight
    # the checkpoint has vocab_size rows, ours are padded (see GPT2.__init__)
    state['wte.weight'] = F.pad(state['wte.weight'], (0, 0, 0, model.wte.num_embeddings - model.config.vocab_size))
    model.load_state_dict(state)
    return model


def gpt_config(hf_config):
    return GPTConfig(n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                     block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                     layer_norm_eps=hf_config.layer_norm_epsilon)


def build_captioner(config: CaptionerConfig, pretrained=True):
    """pretrained: load CLIP's and GPT-2's weights; else build them with random weights."""
    check_config(config)
    # the random numbers transformers draws while loading differ between its versions: the bridge's initial
    # weights must depend on the seed alone, so the loading draws from a copy of the generator
    with torch.random.fork_rng(devices=[]):
        vision, gpt = load_vision(config.vision_model, pretrained), load_gpt2(config.text_model, pretrained)
    if not 0 <= config.unfreeze_layers <= gpt.config.n_layer:
        raise InputError(f'unfreeze_layers must be in 0..{gpt.config.n_layer}, not {config.unfreeze_layers}')
    return Captioner(config, vision, gpt)


# the lowest value of each whole-number model setting (the others are checked by their type and choices)
LOWEST = dict(prefix_len=1, mapper_hidden=1, mapper_depth=1, mapper_heads=1, mapper_ffn=1, resampler_depth=1,
              num_latents=1, max_frames=1, heads=1, dim_head=1, ff_mult=1, xattn_every=1, unfreeze_layers=0)
CHOICES = dict(mapper=('mlp', 'transformer'), media_attention=('latest', 'earlier'))


def check_config(config: CaptionerConfig, where=''):
    """Each model setting of a run, a checkpoint or a model folder's config.json must be one that builds a model:
    one line naming the first that does not, and where it is (where: 'FILE: model_config.')."""
    for name, lowest in LOWEST.items():
        value = getattr(config, name)
        if not (type(value) is int and value >= lowest):
            raise InputError(f'{where}{name} must be a whole number of at least {lowest}, not {value!r}')
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise InputError(f"{where}{name} must be {' or '.join(map(repr, choices))}, not {getattr(config, name)!r}")
    if not (config.enable_mapper or config.enable_resampler_xattn):
        raise InputError(f'{where}enable_mapper and enable_resampler_xattn are both False: the language model '
                         f'would never see the media')


# -----------------------------------------------------------------------------
# checkpoints: only the trained weights, plus what it takes to rebuild the rest

def trainable_state(model):
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, checkpoint):
    """Atomically: a crash while saving leaves the previous checkpoint whole."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


CHECKPOINT_KEYS = ('model', 'model_config', 'train_config', 'optimizer', 'scaler', 'iter_num', 'best_val_loss')


def read_checkpoint(path):
    """A checkpoint of train.py (a .pt file) or a shared model (a folder, see save_model), checked to be one,
    its model_config made a CaptionerConfig. A .pt file is loaded with weights_only=True, so that it cannot run
    code: one that holds other Python objects is refused."""
    if os.path.isdir(path):
        return read_model_folder(path)
    if not os.path.isfile(path):
        raise InputError(f'{path}: no such checkpoint')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other objects, not a torch file at all, ...
        raise InputError(f'{path}: not a readable nanocap checkpoint: {unreadable_file(path, e)}')
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise InputError(f"{path}: not a checkpoint of train.py (no {', '.join(missing)})")
    checkpoint['model_config'] = model_config_of(checkpoint['model_config'], path)
    return checkpoint


def model_config_of(fields, path):
    """The CaptionerConfig of a checkpoint's model_config (a dict), checked as configurator.py checks a setting:
    every key a setting of model.py (or the closest ones are named), every value of its default's type (a whole
    number for a float is fine), and then in its range (check_config)."""
    where = f'{path}: model_config'
    if not isinstance(fields, dict):
        raise InputError(f'{where} is not a mapping of model settings')
    defaults = asdict(CaptionerConfig())
    for key, value in fields.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.6)
            raise InputError(f"{where} has an unknown setting '{key}' (not one of this version of model.py)"
                             + (f"; did you mean {', '.join(close)}?" if close else ''))
        expected = type(defaults[key])
        if not (type(value) is expected or expected is float and type(value) is int):
            kind = {bool: 'True or False', int: 'a whole number', float: 'a number', str: 'a string'}[expected]
            raise InputError(f'{where}.{key} must be {kind}, not {value!r}')
    config = CaptionerConfig(**fields)
    check_config(config, f'{where}.')
    return config


def unreadable_file(path, error):
    """What a file is that torch.load(weights_only=True) refused, in our words: torch's own message advises
    loading it with weights_only=False, which would let the file run code. Never pass that on."""
    with open(path, 'rb') as f:
        head = f.read(64).lstrip()
    global_object = re.search(r'GLOBAL (\S+) was not an allowed global', str(error))
    if global_object:
        return (f'it holds Python objects besides tensors (such as {global_object.group(1)}), and loading those '
                f'could run code: refused')
    if head.startswith(b'PK'):
        return 'a zip archive, but not one torch.save wrote' if zipfile.is_zipfile(path) else \
            'a zip archive cut short (an interrupted save or copy?)'
    if head[:1] in (b'{', b'['):
        return 'a JSON file, not a checkpoint'
    if head[:1] == b'\x80':
        return 'a pickle, but not one torch.save wrote'
    return 'an empty file' if not head else 'not a file torch.save wrote'


def load_captioner(checkpoint_path, device='cpu'):
    """Rebuild a trained captioner from a checkpoint of train.py: the frozen parts are loaded from the
    pretrained weights named in its config, the trained ones from the file."""
    checkpoint = read_checkpoint(checkpoint_path)
    model = build_captioner(checkpoint['model_config'])
    load_trained_weights(model, checkpoint['model'], checkpoint_path)
    return model.to(device).eval(), checkpoint


def load_trained_weights(model, state, checkpoint_path):
    """Put a checkpoint's trained weights into the model, failing in one line unless they are exactly its
    trainable ones, in the same shapes."""
    expected = trainable_state(model)
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing (e.g. {missing[0]})')
    if extra:
        problems.append(f'{len(extra)} that are not part of it (e.g. {extra[0]})')
    if reshaped:
        name = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {name}: {list(state[name].shape)}, the model's "
                        f"{list(expected[name].shape)})")
    if problems:
        raise InputError(f"{checkpoint_path}: its weights do not fit the model its config describes (with the "
                         f"CLIP and GPT-2 it names): weights {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


# -----------------------------------------------------------------------------
# a trained model to share: a folder as the Hugging Face hub holds models, with no pickle in it

MODEL_FILES = ('config.json', 'model.safetensors')


def save_model(state, model_config, folder, training=None, evaluations=None):
    """The trained weights `state` alone as model.safetensors (safetensors, the format transformers itself uses:
    tensors and nothing else, so loading it cannot run code); config.json: the model settings, which name the
    frozen CLIP and GPT-2 it needs, and what it was trained on (training: data_dir, splits, iter_num, scores,
    command) and how it scored (evaluations: eval_bleu.py's, by name); README.md: its model card. Each file
    atomically."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    weights = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    atomic_write(os.path.join(folder, 'model.safetensors'), lambda tmp: save_file(weights, tmp))
    config = dict(format='nanocap', version=1, model_config=asdict(model_config), training=training or {},
                  evaluations=evaluations or {})
    write_json(os.path.join(folder, 'config.json'), config)
    write_model_card(folder, config)


def add_evaluation(folder, name, evaluation):
    """Record an evaluation of the folder's weights (eval_bleu.py's metrics and command) in its config.json, and
    so in its model card."""
    config = read_json(os.path.join(folder, 'config.json'))
    config.setdefault('evaluations', {})[name] = evaluation
    write_json(os.path.join(folder, 'config.json'), config)
    write_model_card(folder, config)


def write_model_card(folder, config):
    """README.md, the model card: the front matter the Hugging Face hub reads (library, task, tags, the frozen
    models as base models where they are hub names), then what the model is, the data it was trained on, and its
    scores, each with the command that measured it."""
    c, training = config['model_config'], config.get('training') or {}
    hub_models = [name for name in (c['vision_model'], c['text_model']) if is_hub_name(name)]
    front = ['library_name: nanocap', 'pipeline_tag: image-to-text', 'tags:', '- image-captioning', '- clipcap',
             '- flamingo'] + (['base_model:'] + [f'- {name}' for name in hub_models] if hub_models else [])
    bridges = [what for what, on in (('a mapping network (ClipCap) giving a visual prefix', c['enable_mapper']),
                                     ('a Perceiver Resampler read by gated cross-attention (Flamingo)',
                                      c['enable_resampler_xattn'])) if on]
    tuned = f", its top {c['unfreeze_layers']} blocks trained too" if c['unfreeze_layers'] else ''
    parent, name = os.path.split(os.path.normpath(folder))
    body = [f'# {name}: a nanocap captioner', '',
            f"A frozen CLIP vision tower (`{c['vision_model']}`) and GPT-2 (`{c['text_model']}`{tuned}), joined by "
            f"{' and '.join(bridges)}. `model.safetensors` holds the trained weights alone, `config.json` the "
            f'settings that rebuild the rest. To caption your own pictures:', '',
            f"    python sample.py --out_dir={parent or '.'} --checkpoint={name} --images=photos/"]
    if training:
        splits = ', '.join(f'{split} {counts}' for split, counts in training['splits'].items())
        scores = ', '.join(f'{k} {v:.4f}' for k, v in training['scores'].items())
        body += ['', '## Training', '', f"On `{training['data_dir']}`" + (f': {splits}' if splits else '') + '.',
                 f"Saved at iteration {training['iter_num']}; validation then: {scores}."]
        if training.get('command'):
            body += ['', 'Trained by:', '', f"    {training['command']}"]
    evaluations = config.get('evaluations') or {}
    if evaluations:
        metrics = list(dict.fromkeys(k for e in evaluations.values() for k in e['metrics']))
        body += ['', '## Evaluation', '', '| evaluation | ' + ' | '.join(metrics) + ' |',
                 '| --- |' + ' ---: |' * len(metrics)]
        body += [f'| {what} | ' + ' | '.join(f"{100 * e['metrics'][k]:.2f}" if k in e['metrics'] else ''
                                            for k in metrics) + ' |' for what, e in evaluations.items()]
        body += ['', 'Scores x100 (shares as percentages), each measured by:', '']
        body += [f"- {what}: `{e['command']}`" for what, e in evaluations.items()]
    write_text(os.path.join(folder, 'README.md'), '\n'.join(['---', *front, '---', '', *body, '']))


def is_hub_name(name):
    """Whether a model's name is a hub repository's (gpt2, openai/clip-vit-base-patch32), not a local folder's."""
    return not os.path.isdir(name) and re.fullmatch(r'[A-Za-z0-9][\w.-]*(/[\w.-]+)?', name) is not None


def read_model_folder(folder):
    """A folder of save_model as a checkpoint of train.py's for loading: its model_config and its weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    names = [os.path.join(folder, name) for name in MODEL_FILES]
    missing = [name for name in names if not os.path.isfile(name)]
    if missing:
        raise InputError(f"{folder}: not a nanocap model folder (no {', '.join(map(os.path.basename, missing))})")
    config = read_json(names[0])
    if not (isinstance(config, dict) and config.get('format') == 'nanocap' and isinstance(config.get('model_config'),
                                                                                              dict)):
        raise InputError(f'{names[0]}: not the config.json of a nanocap model (no format "nanocap", model_config)')
    try:
        state = load_file(names[1])
    except (SafetensorError, OSError) as e:  # cut short, not safetensors
        raise InputError(f'{names[1]}: not a readable safetensors file ({first_line(e)})')
    return dict(model=state, model_config=model_config_of(config['model_config'], names[0]),
                training=config.get('training') or {}, evaluations=config.get('evaluations') or {})
