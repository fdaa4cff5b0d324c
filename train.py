"""
Train the bridge between a frozen CLIP and a frozen GPT-2 on precomputed CLIP features: with
cross-entropy on the reference captions, then (optionally) with self-critical sequence training on
the CIDEr-D of its own sampled captions.

One device:   python train.py config/train_coco.py --batch_size=64
Many GPUs:    torchrun --standalone --nproc_per_node=8 train.py config/train_coco.py
Many nodes:   torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST \
                  --master_port=29500 train.py config/train_coco.py   (--node_rank=1 on the other)
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
from common import (InputError, auto_dtype, check_at_least, check_writable, command_line,
                    gpt2_tokenizer, input_errors_exit, pick_device, precision)
from data import Captions, check_data_fits_model, read_meta, split_counts
from model import CaptionerConfig, training_flops
from scst import CiderReward, policy_gradient_loss, sample_seed
from weights import (build_captioner, load_trained_weights, read_checkpoint, save_checkpoint,
                     save_model, trainable_state)

# -----------------------------------------------------------------------------
# Every setting train.py reads, with its default: the reference model and hyperparameters on COCO
# (Karpathy split). Config files and --key=value arguments change them (configurator.py).
out_dir = 'out'
data_dir = 'data/coco'  # written by prepare_coco.py or prepare_mlslt.py
val_split = 'val'  # the split to evaluate on ('dev' in MLSLT)
# 'pretrained' (a new bridge on pretrained CLIP and GPT-2), 'resume' (out_dir/ckpt.pt, exactly where
# it stopped) or a checkpoint file or model folder to start from (its weights and model settings, a
# new optimiser, iteration 0)
init_from = 'pretrained'
# 'xe': cross-entropy on the reference captions; 'scst': self-critical sequence training, maximising
# the CIDEr-D of sampled captions (start it from an 'xe' checkpoint)
objective = 'xe'
scst_samples = 5  # captions sampled per image; each one's baseline is the mean reward of the others
scst_max_tokens = 20  # a sample longer than this is cut
# data
# per device per micro step: captions ('xe'), or images ('scst', each with scst_samples captions)
batch_size = 32
# 'xe': this many (image, caption) pairs packed into one sequence, each caption right after its
# image (Flamingo's interleaving: how a model learns to read few-shot examples)
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
# > 0: also BLEU-4 and CIDEr-D of greedy captions of the first this many validation images; 'scst'
# needs them: its best.pt is the one of the best CIDEr-D
eval_images = 0
log_interval = 10
wandb_log = False
wandb_project = 'nanocap'
wandb_run_name = 'run'
# system
device = ''  # default: cuda when available, else cpu
dtype = 'auto'  # float32, bfloat16, float16; auto: bfloat16 where the hardware has it (else
# float16 on a GPU, float32 on a CPU)
compile = False
# the model: the fields of model.py's CaptionerConfig are settings too, at its defaults (--help
# lists them). One default differs: the vision model is the CLIP that made data_dir's features.
vision_model = ''
# -----------------------------------------------------------------------------


def epoch_order(n, seed, epoch):
    """The shuffled order of an epoch's n items: the same for one (seed, epoch), on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def lr_at(it, total, max_lr, min_lr, warmup_frac):
    """Linear warm-up to max_lr over the first warmup_frac of the iterations, then cosine decay to
    min_lr."""
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
    # fused: each parameter's whole update in one pass over its numbers (the default form makes a
    # pass per operation), on a GPU and on a CPU alike
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


def to_device(array, dev):
    """A numpy batch as a tensor on dev; to a GPU from pinned memory, not waiting for the copy."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory().to(dev, non_blocking=True) if dev.startswith('cuda') else tensor


@torch.no_grad()
def validation_loss(model, data, batches, autocast, dev):
    """Mean loss per target token over the validation captions of `batches` (each rank its share),
    summed over the ranks."""
    totals = torch.zeros(2, device=dev)  # loss sum, token count
    for ids in batches:
        with autocast:
            _, loss = model(*(to_device(a, dev) for a in data.batch(ids)))
        count = data.target_count(ids)
        totals += torch.tensor([loss.item() * count, count], device=dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def caption_scores(model, data_dir, split, images, batch_size, dev):
    """BLEU-4, CIDEr-D and the share of bad endings of greedy captions of the first `images` images
    of a split, as eval_bleu.py decodes them."""
    captions, records, _ = eval_bleu.caption_split(model, data_dir, split, images, batch_size,
                                                  dict(max_new_tokens=30), dev)
    decode.warn_if_all_empty(captions, 'train.py')
    scores = eval_bleu.score(captions, [r['captions'] for r in records])
    return dict(val_bleu4=scores['BLEU-4'], val_cider=scores['CIDEr-D'],
                val_bad_endings=eval_bleu.bad_endings(captions))


def gate_values(model):
    """tanh of every cross-attention gate, {GPT-2 block: {'attn': ..., 'ff': ...}}: how much of the
    media each block lets in (nothing at the start)."""
    if not model.xattn:
        return {}
    gates = torch.stack([torch.cat([b.attn_gate, b.ff_gate]) for b in model.xattn.values()])
    gates = gates.tanh().tolist()
    return {i: dict(attn=round(a, 4), ff=round(f, 4)) for i, (a, f) in zip(model.xattn, gates)}


@dataclass
class Window:
    """What happened since the last log line. On the device, read only when logging: the loss
    summed over iterations, and for SCST the sums of the rewards, sampled tokens and samples."""
    start: float
    loss: torch.Tensor
    scst: torch.Tensor
    iters: int = 0
    flops: float = 0
    captions: int = 0

    @classmethod
    def new(cls, dev):
        return cls(time.time(), torch.zeros((), device=dev), torch.zeros(3, device=dev))

    def record(self, iter_num, lr, peak, scst):
        """The log record of the window, summed over the ranks (every rank calls it): loss, speed,
        MFU (against `peak`, the FLOP/s of one rank's device), and with scst SCST's rewards."""
        sums = torch.cat([self.loss[None], self.scst])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        loss_sum, reward_sum, token_sum, samples = sums.tolist()  # waits for the GPU: only here
        elapsed = time.time() - self.start
        # self.flops are this rank's, done on its own device of that peak: the share of the peak
        # is the same for all the ranks together
        record = dict(iter=iter_num, loss=loss_sum / self.iters, lr=lr,
                      ms_per_iter=1000 * elapsed / self.iters,
                      captions_per_s=self.captions / elapsed,
                      mfu=self.flops / elapsed / peak if peak else None)
        if scst:  # the mean CIDEr-D of the samples, and their mean length in tokens
            record.update(reward=reward_sum / samples, length=token_sum / samples)
        return record


def progress_line(record, total_iters, paces):
    """The printed line of a window's record. Its ms/iter is appended to paces (the run's windows so
    far): the ETA shows once the pace is steady."""
    shown = [f"loss {record['loss']:.4f}"]
    if 'reward' in record:
        shown += [f"reward {record['reward']:.4f}", f"length {record['length']:.1f}"]
    shown += [f"lr {record['lr']:.2e}", f"{record['ms_per_iter']:.1f} ms/iter",
              f"{record['captions_per_s']:,.0f} captions/s"]
    if record['mfu'] is not None:
        shown.append(f"MFU {100 * record['mfu']:.1f}%")
    paces.append(record['ms_per_iter'])
    if steady(paces):  # the time left at this window's pace
        minutes = (total_iters - record['iter']) * record['ms_per_iter'] / 60000
        shown.append(f'ETA {minutes:.1f} min')
    return f"iter {record['iter']}/{total_iters}: " + ', '.join(shown)


def steady(paces):
    """Whether two log windows in a row ran at one pace (within 25%). The first iterations are
    warm-up, several times slower than the rest (each new caption length and batch shape is a first
    call for the kernels and the allocator): an ETA from them would be a fright."""
    return any(abs(now - before) <= 0.25 * before for before, now in zip(paces, paces[1:]))


def log(record, out_dir, wandb_log):
    """A record of out_dir/log.jsonl (and of Weights & Biases): rank 0's."""
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        import wandb
        wandb.log(record, step=record['iter'])


def main(config):
    """The run. It reads the settings above as globals; `config` holds them all, for the checkpoints
    to record."""
    # -------------------------------------------------------------------------
    # settings that cannot work together: one line each, before any work
    check_writable(out_dir)
    check_at_least(batch_size=(batch_size, 1), epochs=(epochs, 0), max_iters=(max_iters, 0),
                   gradient_accumulation_steps=(gradient_accumulation_steps, 1),
                   eval_interval=(eval_interval, 1), log_interval=(log_interval, 1))
    if objective not in ('xe', 'scst'):
        raise InputError(f"objective must be 'xe' or 'scst', not {objective!r}")
    if interleave < 1 or batch_size % interleave:
        raise InputError(f'interleave={interleave} must be at least 1 and divide '
                         f'batch_size={batch_size}')
    if objective == 'scst':
        if interleave > 1:
            raise InputError('interleave applies to cross-entropy training: SCST samples one '
                             'caption per sequence')
        if scst_samples < 2:
            raise InputError(f'scst_samples must be at least 2 (each sample is compared with the '
                             f'others), not {scst_samples}')
        if scst_max_tokens < 1:
            raise InputError(f'scst_max_tokens must be at least 1, not {scst_max_tokens}')
        if eval_images <= 0:
            raise InputError('objective=scst needs eval_images > 0: its best.pt is the one of the '
                             'best validation CIDEr-D')
        if init_from == 'pretrained':
            raise InputError('objective=scst trains a captioner further: give init_from a '
                             'checkpoint of cross-entropy training (or resume)')
    if eval_images:
        gpt2_tokenizer()  # its files, before any work: evaluations and SCST's rewards need it

    # -------------------------------------------------------------------------
    # devices: under torchrun, each process its own GPU, in a process group (DDP)
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    dev = pick_device(device)  # under torchrun: this rank's own GPU
    device_type = torch.device(dev).type
    if ddp:
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    ptdtype, autocast = precision(device_type, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)

    # -------------------------------------------------------------------------
    # the starting point: a new bridge, the run to resume (out_dir/ckpt.pt), or a checkpoint
    model_config = CaptionerConfig(**{f.name: config[f.name] for f in fields(CaptionerConfig)})
    resume = start = None
    if init_from == 'resume':
        ckpt_path = os.path.join(out_dir, 'ckpt.pt')
        if not os.path.isfile(ckpt_path):
            raise InputError(f'{ckpt_path}: no checkpoint to resume from')
        resume = read_checkpoint(ckpt_path)
        model_config = resume['model_config']
        # what each step reads follows from these: with others, a resumed run would not continue
        for setting, default in (('objective', 'xe'), ('interleave', 1)):
            was = resume['train_config'].get(setting, default)
            if was != config[setting]:
                raise InputError(f'{ckpt_path}: a run with {setting}={was}; resume it with '
                                 f'the same')
    elif init_from != 'pretrained':
        if not os.path.exists(init_from):
            raise InputError(f"{init_from}: no such checkpoint (init_from is 'pretrained', "
                             f"'resume', a checkpoint file or a model folder)")
        start = read_checkpoint(init_from)
        model_config = start['model_config']
    # the vision tower is the one that made the features (a run that names one must name that)
    meta = read_meta(data_dir)
    model_config.vision_model = model_config.vision_model or meta['vision_model']
    if model_config.vision_model != meta['vision_model']:  # before any weights are looked for
        from_checkpoint = resume is not None or start is not None
        named_by = 'the checkpoint' if from_checkpoint else 'vision_model'
        hint = '' if from_checkpoint else 'leave --vision_model out to train on them, or '
        raise InputError(f"{data_dir}/meta.json: its features are from {meta['vision_model']!r}, "
                         f"not from {named_by} {model_config.vision_model!r} ({hint}prepare the "
                         f"data with that vision model)")
    if rank == 0:  # what it will train on, once the settings and the starting point hold
        chose = f' ({auto_dtype(device_type)[1]})' if dtype == 'auto' else ''
        print(f"training on {dev} in {str(ptdtype).removeprefix('torch.')}: dtype={dtype}{chose}")

    # -------------------------------------------------------------------------
    # the model: frozen CLIP and GPT-2 with a new bridge, the same in every run and on every rank
    torch.manual_seed(seed)
    model = build_captioner(model_config)
    if start is not None:
        load_trained_weights(model, start['model'], init_from)

    # -------------------------------------------------------------------------
    # data: features of the model's CLIP, tokens of its GPT-2, sequences that fit its positions
    check_data_fits_model(meta, model, data_dir)
    train_data = Captions(data_dir, 'train', max_caption_tokens)
    val_data = Captions(data_dir, val_split, max_caption_tokens)
    longest = int(train_data.lengths.max())
    # each of the k pairs: prefix, <|endoftext|>, caption
    packed = interleave * (model.prefix_len + 1 + longest)
    if interleave > 1 and packed > model.gpt.config.block_size:  # fail now, not mid-run
        raise InputError(f'interleave={interleave} x (prefix {model.prefix_len} + <|endoftext|> + '
                         f'longest caption {longest}) = {packed} positions > the language model\'s '
                         f'{model.gpt.config.block_size}: lower interleave or max_caption_tokens')
    # an iteration's items: captions with their images ('xe'), or images to caption ('scst')
    item_name, n_items = ('caption', len(train_data)) if objective == 'xe' else \
        ('image', train_data.media_count)
    global_batch = batch_size * gradient_accumulation_steps * world
    iters_per_epoch = n_items // global_batch
    if iters_per_epoch == 0:
        raise InputError(f'{n_items} training {item_name}s make no batch of {global_batch}')
    total_iters = max_iters or epochs * iters_per_epoch
    if rank == 0:
        print(f'{n_items:,} training {item_name}s, {global_batch} per iteration, '
              f'{iters_per_epoch:,} iterations per epoch, {total_iters:,} in all')
    reward = CiderReward(train_data.records()) if objective == 'scst' else None
    # the fixed validation captions, in batches: this rank's share
    val_ids = np.linspace(0, len(val_data) - 1, min(eval_captions, len(val_data))).astype(np.int64)
    val_batches = [val_ids[first:first + batch_size]
                   for first in range(rank * batch_size, len(val_ids), world * batch_size)]

    # -------------------------------------------------------------------------
    # optimiser
    model.to(dev)
    optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2))

    # -------------------------------------------------------------------------
    # resume: the run's weights, optimiser and gradient scale, its iteration and best scores
    iter_num, best_val_loss, best_val_cider = 0, math.inf, -math.inf
    if resume is not None:
        load_trained_weights(model, resume['model'], ckpt_path)
        optimizer.load_state_dict(resume['optimizer'])
        if resume['scaler']:  # a run in float16 scaled its gradients; in another dtype, no scale
            scaler.load_state_dict(resume['scaler'])
        iter_num = resume['iter_num']
        if iter_num >= total_iters:
            raise InputError(f'{ckpt_path}: the run is finished ({iter_num:,} of {total_iters:,} '
                             f'iterations); to train further, resume with more --epochs or '
                             f'--max_iters, or start a new run from it with '
                             f'--init_from={ckpt_path} --out_dir=ANOTHER')
        best_val_loss = resume['best_val_loss']
        best_val_cider = resume.get('best_val_cider', -math.inf)
    trained = torch.compile(model) if compile else model  # the model as it trains
    if ddp:
        trained = DDP(trained, device_ids=[torch.device(dev).index] if device_type == 'cuda'
                      else None)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    # -------------------------------------------------------------------------
    # the loop. The data order follows from (seed, epoch) and the iteration number, the learning
    # rate from the iteration number, and SCST's sampling from a generator seeded with it: the
    # checkpoint's iter_num is the whole position of a run, and a resumed run continues exactly.
    peak = peak_flops(device_type) if objective == 'xe' else None  # SCST samples: no MFU estimate
    trained.train()
    paces = []  # each log window's ms/iter
    window = Window.new(dev)  # a resumed run's first window starts at the resume
    first_iter = iter_num
    while True:
        # evaluate and save: every eval_interval iterations and at the end; first, the checkpoint
        # the run starts from, if any (the first candidate for best.pt)
        if iter_num == first_iter:
            evaluate = start is not None
        else:
            evaluate = iter_num % eval_interval == 0 or iter_num >= total_iters
        if evaluate:
            trained.eval()
            val_loss = validation_loss(model, val_data, val_batches, autocast, dev)
            trained.train()
            if rank == 0:
                scores = dict(val_loss=val_loss)
                if eval_images:
                    scores.update(caption_scores(model, data_dir, val_split, eval_images,
                                                 batch_size, dev))
                # best.pt: the lowest validation loss ('xe') or the highest CIDEr-D ('scst')
                if objective == 'xe':
                    improved = val_loss < best_val_loss
                else:
                    improved = scores['val_cider'] > best_val_cider
                best_val_loss = min(best_val_loss, val_loss)
                best_val_cider = max(best_val_cider, scores.get('val_cider', -math.inf))
                print(f'iter {iter_num}: ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items())
                      + (' (best)' if improved else ''))
                if model.xattn:
                    gates = gate_values(model).items()
                    print('  tanh(gate) attention/feed-forward, by GPT-2 block: '
                          + ', '.join(f"{i} {g['attn']:.3f}/{g['ff']:.3f}" for i, g in gates))
                log(dict(iter=iter_num, **scores), out_dir, wandb_log)
                state = dict(model=trainable_state(model), model_config=asdict(model.config),
                             train_config=config, optimizer=optimizer.state_dict(),
                             scaler=scaler.state_dict(), iter_num=iter_num,
                             best_val_loss=best_val_loss, best_val_cider=best_val_cider)
                save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), state)
                if improved:
                    save_checkpoint(os.path.join(out_dir, 'best.pt'), state)
                    training = dict(data_dir=data_dir, splits=split_counts(meta), iter_num=iter_num,
                                    scores=scores, command=command_line())
                    save_model(state['model'], model.config, os.path.join(out_dir, 'best'),
                               training)  # the model folder to share
            window.start = time.time()  # evaluation time is not training time
        if iter_num >= total_iters:
            break

        # one iteration: the global batch's items, in micro batches of batch_size per rank
        epoch, step = divmod(iter_num, iters_per_epoch)
        ids = epoch_order(n_items, seed, epoch)[step * global_batch:(step + 1) * global_batch]
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
                # cross-entropy: the micro batch's share of the mean loss over all the target
                # tokens of the global batch (each rank knows the whole batch: the same gradient
                # as one process on all of it)
                if interleave == 1:
                    batch, media_at = train_data.batch(micro_ids), None
                else:
                    *batch, media_at = train_data.interleaved_batch(micro_ids, interleave)
                    media_at = to_device(media_at, dev)
                features, mask, tokens, targets, positions = (to_device(a, dev) for a in batch)
                with autocast:
                    _, loss = trained(features, mask, tokens, targets, positions, media_at)
                loss = loss * (train_data.target_count(micro_ids) / all_targets)
                rows = len(tokens)
                window.flops += rows * training_flops(model, tokens.shape[1], mask.shape[-1],
                                                      len(positions) / rows, media=interleave)
            else:
                # SCST: scst_samples captions sampled per image, each rewarded with its CIDEr-D; the
                # micro batch's share of the mean over the global batch's samples of the loss
                features, mask = (to_device(a, dev).repeat_interleave(scst_samples, 0)
                                  for a in train_data.features(micro_ids))
                generator = torch.Generator(dev).manual_seed(sample_seed(seed, iter_num, first))
                with autocast:
                    samples = decode.generate(model, features, mask, scst_max_tokens,
                                              decoding='sample', generator=generator)
                rewards = reward(samples, micro_ids, scst_max_tokens)
                with autocast:
                    loss = policy_gradient_loss(trained, features, mask, samples, rewards,
                                                scst_max_tokens)
                loss = loss / (global_batch * scst_samples)
                window.scst += torch.tensor([rewards.sum(), sum(map(len, samples)), len(samples)],
                                            device=dev)
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
            record = window.record(iter_num, lr, peak, scst=objective == 'scst')
            record['gates'] = gate_values(model)
            if rank == 0:
                print(progress_line(record, total_iters, paces))
                log(record, out_dir, wandb_log)
            window = Window.new(dev)
    if ddp:
        dist.barrier()  # every rank is done with the others (rank 0 was saving): then tear down
        dist.destroy_process_group()


if __name__ == '__main__':
    from configurator import configure, is_setting
    defaults = {k: v for k, v in globals().items() if is_setting(k, v)}
    config = configure(defaults, model=CaptionerConfig)  # CaptionerConfig's fields are settings too
    globals().update(config)
    with input_errors_exit('train.py'):
        main(config)
