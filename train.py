"""
Train the bridge between a frozen CLIP and a frozen GPT-2 on precomputed CLIP features: with
cross-entropy on the reference captions, then (optionally) with self-critical sequence training on the
CIDEr-D of its own sampled captions.

One device:   python train.py config/train_coco.py --batch_size=64
Many GPUs:    torchrun --standalone --nproc_per_node=8 train.py config/train_coco.py
Many nodes:   torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
                  train.py config/train_coco.py     (and --node_rank=1 on the other machine)
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import decode
import eval_bleu
from data import (EOT, IGNORE_INDEX, Captions, InputError, auto_dtype, check_data_fits_model, check_writable,
                  command_line, decode_caption, gpt2_tokenizer, input_errors_exit, pick_device, precision, read_meta,
                  split_counts, warn_if_all_empty)
from model import CaptionerConfig, training_flops
from weights import (build_captioner, load_trained_weights, read_checkpoint, save_checkpoint, save_model,
                     trainable_state)

# -----------------------------------------------------------------------------
# Every setting train.py reads, with its default: the reference model and hyperparameters on COCO (Karpathy
# split). Config files and --key=value arguments change them (configurator.py).
out_dir = 'out'
data_dir = 'data/coco'  # written by prepare_coco.py or prepare_mlslt.py
val_split = 'val'  # the split to evaluate on ('dev' in MLSLT)
# 'pretrained' (a new bridge on pretrained CLIP and GPT-2), 'resume' (out_dir/ckpt.pt, exactly where it
# stopped) or a checkpoint file or model folder to start from (its weights and model settings, a new optimiser,
# iteration 0)
init_from = 'pretrained'
# 'xe': cross-entropy on the reference captions; 'scst': self-critical sequence training, maximising the
# CIDEr-D of sampled captions (start it from an 'xe' checkpoint)
objective = 'xe'
scst_samples = 5  # captions sampled per image; each one's baseline is the mean reward of the others
scst_max_tokens = 20  # a sample longer than this is cut
# data
batch_size = 32  # per device per micro step: captions ('xe'), or images ('scst': x scst_samples captions)
# 'xe': (image, caption) pairs packed into one sequence, each caption right after its own image, reading it
# through the cross-attention (Flamingo's interleaving: how a model learns to take few-shot examples)
interleave = 1
gradient_accumulation_steps = 1
max_caption_tokens = 48  # longer captions are cut (hardly any COCO caption is)
epochs = 30
max_iters = 0  # 0: as many as the epochs take
seed = 1337
# AdamW, 10% linear warm-up, then cosine decay
learning_rate = 1e-4
min_lr = 1e-6
beta1 = 0.9
beta2 = 0.98
weight_decay = 1e-3
warmup_frac = 0.1
grad_clip = 1.0  # 0: off
# evaluation, checkpoints and logging
eval_interval = 1000
eval_captions = 2000  # a fixed set of validation captions, the same at every evaluation
# > 0: also BLEU-4 and CIDEr-D of greedy captions of the first this many validation images; 'scst' needs
# them: its best.pt is the one of the best CIDEr-D
eval_images = 0
log_interval = 10
wandb_log = False
wandb_project = 'nanocap'
wandb_run_name = 'run'
# system
device = ''  # default: cuda when available, else cpu
dtype = 'auto'  # or float32, bfloat16, float16; auto: bfloat16 where the hardware has it, else float16 / float32
compile = False
# the model: model.py's CaptionerConfig, field by field (each is explained there), at its defaults
vision_model = ''  # default: the CLIP that made data_dir's features (its meta.json names it)
text_model = 'gpt2'
enable_mapper = True
mapper = 'mlp'
prefix_len = 1
mapper_hidden = 512
mapper_depth = 8
mapper_heads = 8
mapper_ffn = 2048
enable_resampler_xattn = True
resampler_depth = 4
num_latents = 64
max_frames = 500
heads = 6
dim_head = 64
ff_mult = 1
xattn_every = 1
media_attention = 'latest'
unfreeze_layers = 0
train_embeddings = False
# -----------------------------------------------------------------------------


def settings():
    """Every setting above and its value now: what a checkpoint records of the run that wrote it."""
    from configurator import is_setting
    return {k: v for k, v in globals().items() if is_setting(k, v)}


def epoch_order(n, seed, epoch):
    """The shuffled caption order of an epoch: the same for the same (seed, epoch), on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def lr_at(it, total, max_lr, min_lr, warmup_frac):
    """Linear warm-up to max_lr over the first warmup_frac of the iterations, then cosine decay to min_lr."""
    warmup = max(1, int(warmup_frac * total))
    if it < warmup:
        return max_lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, betas):
    """AdamW with weight decay on the weight matrices only: not on gates, latents, time and token
    embeddings, mapper queries, norms or biases."""
    no_decay_2d = ('latents', 'time_emb', 'queries', 'wte.weight', 'wpe.weight')
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and not n.endswith(no_decay_2d)]
    other = [p for n, p in params if not (p.dim() >= 2 and not n.endswith(no_decay_2d))]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]
    # fused: each parameter's whole update in one pass over its numbers, on a GPU and on a CPU alike (the
    # default form makes a pass per operation: on a 2-core CPU a third of a bfloat16 training step)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def peak_flops(device_type):
    """Dense bf16 peak of the GPU, for the MFU estimate (None where unknown)."""
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name()
    for key, flops in (('H100', 989e12), ('H200', 989e12), ('A100', 312e12), ('L40S', 362e12)):
        if key in name:
            return flops
    return None


def gate_values(model):
    """tanh of every cross-attention gate, {GPT-2 block: {'attn': ..., 'ff': ...}}: how much of the media
    each block lets in (nothing at the start)."""
    if not model.xattn:
        return {}
    gates = torch.stack([torch.cat([b.attn_gate, b.ff_gate]) for b in model.xattn.values()]).tanh().tolist()
    return {i: dict(attn=round(a, 4), ff=round(f, 4)) for i, (a, f) in zip(model.xattn, gates)}


# -----------------------------------------------------------------------------
# self-critical sequence training (Rennie et al. 2017), in its now-standard form: k captions sampled per
# image, each rewarded with its CIDEr-D minus the mean reward of the image's other samples (no greedy
# baseline), and the policy gradient of their log-probabilities

# The end of a caption is a word of its reward, as Rennie et al. (2017) and self-critical.pytorch count it: every
# reference ends with it, and so does every sample that ended (not one cut at the token limit). A sample that
# stops at "... on a" then misses the n-grams "on a <end>" would need, and the end's document frequency comes
# from the references like every other word's. Upper case: no word of the tokenizer can be it (it lower-cases).
END_WORD = '<END>'


class CiderReward:
    """The CIDEr-D of sampled captions against their images' references: eval_bleu's CIDEr-D, the end of a
    caption counted as a word, with document frequencies from all the references of the split (computed
    once)."""

    def __init__(self, records):
        references = eval_bleu.tokenize_groups([r['captions'] for r in records])
        self.references = [[words + [END_WORD] for words in image] for image in references]
        self.cider = eval_bleu.CiderD(self.references)
        self.encoder = gpt2_tokenizer()

    def __call__(self, samples, image_ids, max_new_tokens):
        """Rewards [B, k] of samples [B * k token lists] of at most max_new_tokens (shorter ones ended): k
        consecutive ones per image of image_ids [B]."""
        k = len(samples) // len(image_ids)
        assert len(samples) == k * len(image_ids)
        words = eval_bleu.tokenize_all([decode_caption(self.encoder, s) for s in samples])
        words = [w + [END_WORD] * (len(s) < max_new_tokens) for w, s in zip(words, samples)]
        return np.array([self.cider.image_scores(words[i * k:(i + 1) * k], self.references[image])
                         for i, image in enumerate(image_ids)])


def leave_one_out_advantages(rewards):
    """rewards [B, k] -> each minus the mean of its image's k - 1 other rewards (an image's advantages sum
    to zero)."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdims=True) - rewards) / (k - 1)


def sample_seed(seed, iter_num, start):
    """The seed of a micro batch's sampling: a function of (seed, iteration, the micro batch's place in the
    global batch), so that a resumed run samples the same captions, and N processes the same as one
    accumulating the same micro batches."""
    return int(np.random.SeedSequence([seed, iter_num, start]).generate_state(1)[0])


def sampled_batch(samples, max_new_tokens):
    """tokens, targets [B, S] and the flat target positions [K] of sampled captions, laid out as
    Captions.batch lays out references. A sample that ended has <|endoftext|> as its last target; one cut
    at max_new_tokens has none (the model did not choose to end it there)."""
    S = max(map(len, samples)) + 1
    tokens = np.full((len(samples), S), EOT, dtype=np.int64)
    targets = np.full((len(samples), S), IGNORE_INDEX, dtype=np.int64)
    for row, sample in enumerate(samples):
        ended = len(sample) < max_new_tokens
        tokens[row, 1:len(sample) + 1] = sample
        targets[row, :len(sample) + ended] = sample + [EOT] * ended
    return tokens, targets, np.flatnonzero(targets != IGNORE_INDEX)


def sample_log_probs(model, features, mask, tokens, targets, positions):
    """The log-probability [B] of each sampled caption (the sum over its targets), with gradients."""
    _, token_losses = model(features, mask, tokens, targets, positions, reduction='none', float32_head=True)
    # each target's log-probability in its place in [B, S] (0 elsewhere), then each row's sum: in a fixed
    # order, where index_add's atomic adds on a GPU would sum in any
    log_probs = torch.zeros(tokens.numel(), device=token_losses.device).index_put((positions,), -token_losses)
    return log_probs.view(tokens.shape).sum(1)


def policy_gradient_loss(model, features, mask, samples, rewards, max_new_tokens):
    """SCST's loss of samples [B * k] (k consecutive ones per row of features) with rewards [B, k]: the sum
    over the samples of -advantage x log-probability, whose gradient raises the log-probability of the
    samples better than their image's others and lowers that of the worse ones."""
    to_device = lambda array: torch.from_numpy(array).to(features.device)
    advantages = to_device(leave_one_out_advantages(rewards).ravel()).float()
    tokens, targets, positions = map(to_device, sampled_batch(samples, max_new_tokens))
    return -(advantages * sample_log_probs(model, features, mask, tokens, targets, positions)).sum()


def check_settings():
    """The settings that cannot work together, as one line each, before any work."""
    if objective not in ('xe', 'scst'):
        raise InputError(f"objective must be 'xe' or 'scst', not {objective!r}")
    if interleave < 1 or batch_size % interleave:
        raise InputError(f'interleave={interleave} must be at least 1 and divide batch_size={batch_size}')
    if objective == 'xe':
        return
    if interleave > 1:
        raise InputError('interleave applies to cross-entropy training: SCST samples one caption per sequence')
    if scst_samples < 2:
        raise InputError(f'scst_samples must be at least 2 (each sample is compared with the others), '
                         f'not {scst_samples}')
    if scst_max_tokens < 1:
        raise InputError(f'scst_max_tokens must be at least 1, not {scst_max_tokens}')
    if eval_images <= 0:
        raise InputError('objective=scst needs eval_images > 0: its best.pt is the one of the best '
                         'validation CIDEr-D')
    if init_from == 'pretrained':
        raise InputError('objective=scst trains a captioner further: give init_from a checkpoint of '
                         'cross-entropy training (or resume)')


# -----------------------------------------------------------------------------
# a run: where it runs, where it starts from, its data, and the pieces of a step

@dataclass
class Run:
    """What every part of a step needs: where this process runs (its device, its rank among `world` DDP
    processes, its autocast), the model (as it trains: compiled or wrapped in DDP, and the raw one), its
    data and its optimiser."""
    dev: str
    rank: int
    world: int
    autocast: object
    model: torch.nn.Module
    raw_model: torch.nn.Module
    train_data: Captions
    val_data: Captions
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def to_device(self, array):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory().to(self.dev, non_blocking=True) if self.dev.startswith('cuda') else tensor


def start_devices():
    """(ddp, rank, world, device) of this process: under torchrun, its own GPU in a process group."""
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    dev = pick_device(device)  # under torchrun: this rank's own GPU
    if ddp:
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
    return ddp, rank, world, dev


def starting_point():
    """The model settings of the run, and the checkpoint it resumes (out_dir/ckpt.pt, with init_from='resume')
    or starts from (init_from=FILE), if any."""
    model_config = CaptionerConfig(**{f.name: globals()[f.name] for f in fields(CaptionerConfig)})
    resume = start = None
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        if not os.path.isfile(path):
            raise InputError(f'{path}: no checkpoint to resume from')
        resume = read_checkpoint(path)
        model_config = resume['model_config']
        # what each step reads follows from these: with others, a resumed run would not continue the run
        for setting, default in (('objective', 'xe'), ('interleave', 1)):
            was = resume['train_config'].get(setting, default)
            if was != globals()[setting]:
                raise InputError(f'{path}: a run with {setting}={was}; resume it with the same')
    elif init_from != 'pretrained':
        if not os.path.exists(init_from):
            raise InputError(f"{init_from}: no such checkpoint (init_from is 'pretrained', 'resume', a "
                             f"checkpoint file or a model folder)")
        start = read_checkpoint(init_from)
        model_config = start['model_config']
    # the vision tower is the one that made the features, unless the run names it (it must be the same)
    meta = read_meta(data_dir)
    model_config.vision_model = model_config.vision_model or meta['vision_model']
    if model_config.vision_model != meta['vision_model']:  # before any weights are looked for
        from_checkpoint = resume is not None or start is not None
        raise InputError(f"{data_dir}/meta.json: its features are from {meta['vision_model']!r}, not from "
                         f"{'the checkpoint' if from_checkpoint else 'vision_model'} {model_config.vision_model!r} ("
                         + ('' if from_checkpoint else 'leave --vision_model out to train on them, or ')
                         + 'prepare the data with that vision model)')
    return model_config, resume, start


def load_data(model):
    """The training and validation splits, checked against the model: features of its CLIP, tokens of its
    GPT-2, and (interleaved) sequences that fit its positions."""
    check_data_fits_model(read_meta(data_dir), model, data_dir)
    train_data = Captions(data_dir, 'train', max_caption_tokens)
    val_data = Captions(data_dir, val_split, max_caption_tokens)
    longest_caption = int(train_data.lengths.max())
    packed = interleave * (model.prefix_len + 1 + longest_caption)  # prefix + <|endoftext|> + caption, k times
    if interleave > 1 and packed > model.gpt.config.block_size:  # fail now, not mid-run
        raise InputError(f'interleave={interleave} x (prefix {model.prefix_len} + <|endoftext|> + longest caption '
                         f'{longest_caption}) = {packed} positions > the language model\'s '
                         f'{model.gpt.config.block_size}: lower interleave or max_caption_tokens')
    return train_data, val_data


def schedule(train_data, world):
    """What an iteration trains on: (items in the training split, items per iteration, iterations per epoch,
    iterations in all). An item is a caption with its image ('xe'), or an image to sample captions of ('scst')."""
    item_name, items = ('caption', len(train_data)) if objective == 'xe' else ('image', train_data.media_count)
    global_batch = batch_size * gradient_accumulation_steps * world
    iters_per_epoch = items // global_batch
    if iters_per_epoch == 0:
        raise InputError(f'{items} training {item_name}s make no batch of {global_batch}')
    total_iters = max_iters or epochs * iters_per_epoch
    if int(os.environ.get('RANK', 0)) == 0:
        print(f'{items:,} training {item_name}s, {global_batch} per iteration, {iters_per_epoch:,} iterations per '
              f'epoch, {total_iters:,} in all')
    return items, global_batch, iters_per_epoch, total_iters


def restore(resume, model, optimizer, scaler, total_iters):
    """Put back the state of the run being resumed: its weights, optimiser and gradient scaler. Returns its
    iteration and its best validation scores."""
    path = os.path.join(out_dir, 'ckpt.pt')
    load_trained_weights(model, resume['model'], path)
    optimizer.load_state_dict(resume['optimizer'])
    if resume['scaler']:  # a run in float16 scales its gradients; one in another dtype saved no scale
        scaler.load_state_dict(resume['scaler'])
    if resume['iter_num'] >= total_iters:
        raise InputError(f"{path}: the run is finished ({resume['iter_num']:,} of {total_iters:,} iterations); to "
                         f'train further, resume with more --epochs or --max_iters, or start a new run from it with '
                         f'--init_from={path} --out_dir=ANOTHER')
    return resume['iter_num'], dict(val_loss=resume['best_val_loss'],
                                    val_cider=resume.get('best_val_cider', -math.inf))


@torch.no_grad()
def validation_loss(run):
    """Mean loss per target token over the fixed validation captions, shared among the ranks."""
    run.model.eval()
    ids = np.linspace(0, len(run.val_data) - 1, min(eval_captions, len(run.val_data))).astype(np.int64)
    totals = torch.zeros(2, device=run.dev)  # loss sum, token count
    for first in range(run.rank * batch_size, len(ids), run.world * batch_size):
        batch_ids = ids[first:first + batch_size]
        with run.autocast:
            _, loss = run.raw_model(*(run.to_device(a) for a in run.val_data.batch(batch_ids)))
        count = run.val_data.target_count(batch_ids)
        totals += torch.tensor([loss.item() * count, count], device=run.dev)
    if run.world > 1:
        dist.all_reduce(totals)
    run.model.train()
    return (totals[0] / totals[1]).item()


def caption_scores(run):
    """BLEU-4, CIDEr-D and the share of bad endings of greedy captions of the first eval_images validation
    images."""
    captions, records, _ = eval_bleu.caption_split(run.raw_model, data_dir, val_split, eval_images, batch_size,
                                                  dict(max_new_tokens=30), run.dev)  # as eval_bleu.py decodes
    warn_if_all_empty(captions, 'train.py')
    scores = eval_bleu.score(captions, [r['captions'] for r in records])
    return dict(val_bleu4=scores['BLEU-4'], val_cider=scores['CIDEr-D'],
                val_bad_endings=eval_bleu.bad_endings(captions))


def cross_entropy_loss(run, ids, all_targets):
    """The micro batch `ids`'s share of the mean loss over all the target tokens of the global batch, and its
    FLOPs. Every rank knows the whole global batch, so each can scale its loss to it: the same gradient as
    one process on the whole batch."""
    if interleave == 1:
        batch, media_at = run.train_data.batch(ids), None
    else:
        *batch, media_at = run.train_data.interleaved_batch(ids, interleave)
        media_at = run.to_device(media_at)
    features, mask, tokens, targets, positions = map(run.to_device, batch)
    with run.autocast:
        _, loss = run.model(features, mask, tokens, targets, positions, media_at)
    rows = len(tokens)
    flops = rows * training_flops(run.raw_model, tokens.shape[1], mask.shape[-1], len(positions) / rows,
                                  media=interleave)
    return loss * (run.train_data.target_count(ids) / all_targets), flops


def self_critical_loss(run, reward, image_ids, sampling_seed, global_batch):
    """Sample scst_samples captions of each image, reward each with its CIDEr-D, and return the micro batch's
    share of the policy-gradient loss (the mean over the global batch's samples of -advantage x
    log-probability) and the sums of its rewards, sampled tokens and samples."""
    features, mask = (run.to_device(a).repeat_interleave(scst_samples, 0)
                      for a in run.train_data.features(image_ids))
    generator = torch.Generator(run.dev).manual_seed(sampling_seed)
    with run.autocast:
        samples = decode.generate(run.raw_model, features, mask, scst_max_tokens, decoding='sample',
                                  generator=generator)
    rewards = reward(samples, image_ids, scst_max_tokens)
    with run.autocast:
        loss = policy_gradient_loss(run.model, features, mask, samples, rewards, scst_max_tokens)
    sums = torch.tensor([rewards.sum(), sum(map(len, samples)), len(samples)], device=run.dev)
    return loss / (global_batch * scst_samples), sums


# -----------------------------------------------------------------------------
# logging, evaluating and saving

@dataclass
class Window:
    """What happened since the last log line. On the device, read only when logging: the loss summed over
    iterations, and for SCST the sums of the rewards, of the sampled tokens and of the samples."""
    start: float
    loss: torch.Tensor
    scst: torch.Tensor
    iters: int = 0
    flops: float = 0
    captions: int = 0

    @classmethod
    def new(cls, dev):
        return cls(time.time(), torch.zeros((), device=dev), torch.zeros(3, device=dev))


def log(record):
    """A record of log.jsonl (and of Weights & Biases): rank 0's."""
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        import wandb
        wandb.log(record, step=record['iter'])


def log_progress(run, window, iter_num, total_iters, lr, peak, paces):
    """The training record of the window (loss, speed, MFU, SCST's rewards, the gates), printed and logged;
    its ms/iter is appended to paces, those of the run's windows so far."""
    sums = torch.cat([window.loss[None], window.scst])
    if run.world > 1:
        dist.all_reduce(sums)
    loss_sum, reward_sum, token_sum, samples = sums.tolist()  # waits for the GPU: only when logging
    elapsed = time.time() - window.start
    # window.flops are this rank's, done on its own GPU, whose peak is `peak`: all ranks together do world
    # times the work on world times the peak
    record = dict(iter=iter_num, loss=loss_sum / window.iters, lr=lr, ms_per_iter=1000 * elapsed / window.iters,
                  captions_per_s=window.captions / elapsed, mfu=window.flops / elapsed / peak if peak else None)
    if objective == 'scst':  # the mean CIDEr-D of the samples, and their mean length in tokens
        record.update(reward=reward_sum / samples, length=token_sum / samples)
    record['gates'] = gate_values(run.raw_model)
    if run.rank != 0:
        return
    shown = [f'loss {record["loss"]:.4f}']
    if objective == 'scst':
        shown += [f'reward {record["reward"]:.4f}', f'length {record["length"]:.1f}']
    shown += [f'lr {lr:.2e}', f'{record["ms_per_iter"]:.1f} ms/iter', f'{record["captions_per_s"]:,.0f} captions/s']
    if peak:
        shown.append(f'MFU {100 * record["mfu"]:.1f}%')
    paces.append(record['ms_per_iter'])
    if steady(paces):  # the time left at this window's pace
        shown.append(f"ETA {(total_iters - iter_num) * record['ms_per_iter'] / 60000:.1f} min")
    print(f'iter {iter_num}/{total_iters}: ' + ', '.join(shown))
    log(record)


def steady(paces):
    """Whether two log windows in a row have run at one pace (within 25%). The first iterations are warm-up, 3 to
    10 times slower than the rest (each new caption length and batch shape is a first call for the kernels and
    the allocator): an ETA from them would be a fright, so none is shown until the pace is steady."""
    return any(abs(now - before) <= 0.25 * before for before, now in zip(paces, paces[1:]))


def evaluate_and_save(run, iter_num, best):
    """Validation scores; ckpt.pt, and best.pt when they are the best so far (best: the lowest validation loss
    and the highest CIDEr-D so far, updated): the lowest loss ('xe') or the highest CIDEr-D ('scst')."""
    val_loss = validation_loss(run)
    if run.rank != 0:
        return
    scores = dict(val_loss=val_loss, **(caption_scores(run) if eval_images else {}))
    improved = val_loss < best['val_loss'] if objective == 'xe' else scores['val_cider'] > best['val_cider']
    best['val_loss'] = min(best['val_loss'], val_loss)
    best['val_cider'] = max(best['val_cider'], scores.get('val_cider', -math.inf))
    print(f'iter {iter_num}: ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()) + (' (best)' if improved else ''))
    if run.raw_model.xattn:
        print('  tanh(gate) attention/feed-forward, by GPT-2 block: ' + ', '.join(
            f"{i} {g['attn']:.3f}/{g['ff']:.3f}" for i, g in gate_values(run.raw_model).items()))
    log(dict(iter=iter_num, **scores))
    state = dict(model=trainable_state(run.raw_model), model_config=asdict(run.raw_model.config),
                 train_config=settings(), optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                 iter_num=iter_num, best_val_loss=best['val_loss'], best_val_cider=best['val_cider'])
    save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), state)
    if improved:
        save_checkpoint(os.path.join(out_dir, 'best.pt'), state)
        training = dict(data_dir=data_dir, splits=split_counts(read_meta(data_dir)), iter_num=iter_num, scores=scores,
                        command=command_line())
        save_model(state['model'], run.raw_model.config, os.path.join(out_dir, 'best'), training)  # to share


# -----------------------------------------------------------------------------

def main():
    check_writable(out_dir)  # before any work
    ddp, rank, world, dev = start_devices()
    ptdtype, autocast = precision(torch.device(dev).type, dtype)
    scaler = torch.amp.GradScaler(torch.device(dev).type, enabled=ptdtype == torch.float16)
    check_settings()
    if eval_images:
        gpt2_tokenizer()  # its files, before any work: evaluations and SCST's rewards decode captions
    model_config, resume, start = starting_point()
    if rank == 0:  # what it will train on, once the settings and the starting point hold
        chose = f" ({auto_dtype(torch.device(dev).type)[1]})" if dtype == 'auto' else ''
        print(f"training on {dev} in {str(ptdtype).removeprefix('torch.')}: dtype={dtype}{chose}")
    torch.manual_seed(seed)  # the bridge's initial weights: the same in every run and on every rank
    model = build_captioner(model_config)
    if start is not None:
        load_trained_weights(model, start['model'], init_from)
    train_data, val_data = load_data(model)
    items, global_batch, iters_per_epoch, total_iters = schedule(train_data, world)
    reward = CiderReward(train_data.records()) if objective == 'scst' else None
    model.to(dev)
    optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2))
    # where the run is: the iteration, and the best validation scores so far
    iter_num, best = 0, dict(val_loss=math.inf, val_cider=-math.inf)
    if resume is not None:
        iter_num, best = restore(resume, model, optimizer, scaler, total_iters)
    trained = torch.compile(model) if compile else model
    if ddp:
        trained = DDP(trained, device_ids=[torch.device(dev).index] if dev.startswith('cuda') else None)
    run = Run(dev, rank, world, autocast, trained, model, train_data, val_data, optimizer, scaler)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=settings())

    # The data order follows from (seed, epoch) and the iteration number, the learning rate from the
    # iteration number, and SCST's sampling from a generator seeded with the iteration number: the
    # checkpoint's iter_num is the whole position of a run, and a resumed run continues exactly.
    peak = peak_flops(torch.device(dev).type) if objective == 'xe' else None  # SCST samples: no MFU estimate
    trained.train()
    paces = []  # each log window's ms/iter
    window = Window.new(dev)  # a resumed run's first window starts at the resume, wherever it falls
    if start is not None:  # the checkpoint this run starts from is the first candidate for best.pt
        evaluate_and_save(run, iter_num, best)
        window.start = time.time()  # evaluation time is not training time
    while iter_num < total_iters:
        epoch, step = divmod(iter_num, iters_per_epoch)
        ids = epoch_order(items, seed, epoch)[step * global_batch:(step + 1) * global_batch]
        all_targets = train_data.target_count(ids) if objective == 'xe' else None
        lr = lr_at(iter_num, total_iters, learning_rate, min_lr, warmup_frac)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for micro in range(gradient_accumulation_steps):
            first = (micro * world + rank) * batch_size
            micro_ids = ids[first:first + batch_size]
            if ddp:  # synchronise gradients only on the last micro step
                trained.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
            if objective == 'xe':
                loss, flops = cross_entropy_loss(run, micro_ids, all_targets)
                window.flops += flops
            else:
                sampling_seed = sample_seed(seed, iter_num, first)
                loss, sums = self_critical_loss(run, reward, micro_ids, sampling_seed, global_batch)
                window.scst += sums
            scaler.scale(loss * world).backward()  # DDP averages over ranks: undo it
            window.loss += loss.detach()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        window.iters += 1
        window.captions += global_batch * (scst_samples if objective == 'scst' else 1)

        if iter_num % log_interval == 0 or iter_num == total_iters:
            log_progress(run, window, iter_num, total_iters, lr, peak, paces)
            window = Window.new(dev)
        if iter_num % eval_interval == 0 or iter_num == total_iters:
            evaluate_and_save(run, iter_num, best)
            window.start = time.time()  # evaluation time is not training time
    if ddp:
        dist.barrier()  # every rank is done with the others (rank 0 was saving): only then tear down
        dist.destroy_process_group()


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    with input_errors_exit('train.py'):
        main()
