"""
Train the bridge between a frozen CLIP and a frozen GPT-2 on precomputed CLIP features.

One device:   python train.py config/train_coco.py --batch_size=64
Many GPUs:    torchrun --standalone --nproc_per_node=8 train.py config/train_coco.py
Many nodes:   torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
                  train.py config/train_coco.py     (and --node_rank=1 on the other machine)
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval_bleu
from data import Captions, InputError, atomic_write, check_data_fits_model, input_errors_exit, read_meta
from model import (CaptionerConfig, build_captioner, load_trained_weights, pick_device, read_checkpoint,
                   trainable_state, training_flops)

# -----------------------------------------------------------------------------
# defaults: the reference model and hyperparameters on COCO (Karpathy split)
out_dir = 'out'
data_dir = 'data/coco'  # written by prepare_coco.py or prepare_mlslt.py
val_split = 'val'  # the split to evaluate on ('dev' in MLSLT)
init_from = 'pretrained'  # 'pretrained' (a new bridge on pretrained CLIP and GPT-2) or 'resume'
# data
batch_size = 32  # captions per device per micro step
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
eval_bleu_images = 0  # > 0: also BLEU-4 of greedy captions of the first this many validation images
log_interval = 10
wandb_log = False
wandb_project = 'nanocap'
wandb_run_name = 'run'
# system
device = ''  # default: cuda when available, else cpu
dtype = ''  # default: bfloat16 where supported, else float16 on cuda, float32 on cpu
compile = False
# the model: every field of model.py's CaptionerConfig, with its defaults
globals().update(asdict(CaptionerConfig()))
# -----------------------------------------------------------------------------


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


def make_optimizer(model, lr, weight_decay, betas, fused):
    """AdamW with weight decay on the weight matrices only: not on gates, latents, time and token
    embeddings, mapper queries, norms or biases. fused: one kernel for all parameters (CUDA only)."""
    no_decay_2d = ('latents', 'time_emb', 'queries', 'wte.weight', 'wpe.weight')
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and not n.endswith(no_decay_2d)]
    other = [p for n, p in params if not (p.dim() >= 2 and not n.endswith(no_decay_2d))]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=other, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def save_checkpoint(path, checkpoint):
    """Atomically: a crash while saving leaves the previous checkpoint whole."""
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def peak_flops(device_type):
    """Dense bf16 peak of the GPU, for the MFU estimate (None where unknown)."""
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name()
    for key, flops in (('H100', 989e12), ('H200', 989e12), ('A100', 312e12), ('L40S', 362e12)):
        if key in name:
            return flops
    return None


def mixed_precision(device_type, dtype):
    """(torch dtype, autocast context) of the dtype setting; '' picks bfloat16 on a GPU that has it,
    else float16 there, and float32 on a CPU."""
    name = dtype or ('bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported()
                     else 'float16' if device_type == 'cuda' else 'float32')
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if name not in dtypes:
        raise InputError(f"dtype must be one of {', '.join(dtypes)}, not {name!r}")
    autocast = nullcontext() if name == 'float32' else torch.autocast(device_type, dtype=dtypes[name])
    return dtypes[name], autocast


def main(config):
    # ------------------------------------------------------------------ devices, DDP and precision
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    dev = pick_device(device)  # under torchrun: this rank's own GPU
    device_type = torch.device(dev).type
    if ddp:
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    ptdtype, autocast = mixed_precision(device_type, dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)

    # ------------------------------------------------------------------ model, data, optimiser
    checkpoint = None
    model_config = CaptionerConfig(**{f.name: config[f.name] for f in fields(CaptionerConfig)})
    if init_from == 'resume':
        path = os.path.join(out_dir, 'ckpt.pt')
        if not os.path.isfile(path):
            raise InputError(f'{path}: no checkpoint to resume from')
        checkpoint = read_checkpoint(path)
        model_config = checkpoint['model_config']
    elif init_from != 'pretrained':
        raise InputError(f"init_from must be 'pretrained' or 'resume', not {init_from!r}")
    torch.manual_seed(seed)  # the bridge's initial weights: the same in every run and on every rank
    model = build_captioner(model_config)
    check_data_fits_model(read_meta(data_dir), model, data_dir)
    train_data = Captions(data_dir, 'train', max_caption_tokens)
    val_data = Captions(data_dir, val_split, max_caption_tokens)
    global_batch = batch_size * gradient_accumulation_steps * world
    iters_per_epoch = len(train_data) // global_batch
    if iters_per_epoch == 0:
        raise InputError(f'{len(train_data)} training captions make no batch of {global_batch}')
    total_iters = max_iters or epochs * iters_per_epoch
    model.to(dev)
    optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), fused=device_type == 'cuda')
    iter_num, best_val_loss = 0, math.inf
    if checkpoint is not None:
        load_trained_weights(model, checkpoint['model'], path)
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    raw_model = model
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.device(dev).index] if device_type == 'cuda' else None)

    def to_device(array):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory().to(dev, non_blocking=True) if device_type == 'cuda' else tensor

    @torch.no_grad()
    def evaluate():
        """Mean loss per target token over the fixed validation captions, shared among the ranks."""
        model.eval()
        ids = np.linspace(0, len(val_data) - 1, min(eval_captions, len(val_data))).astype(np.int64)
        totals = torch.zeros(2, device=dev)  # loss sum, token count
        for start in range(rank * batch_size, len(ids), world * batch_size):
            batch_ids = ids[start:start + batch_size]
            with autocast:
                _, loss = raw_model(*(to_device(a) for a in val_data.batch(batch_ids)))
            count = val_data.target_count(batch_ids)
            totals += torch.tensor([loss.item() * count, count], device=dev)
        if ddp:
            dist.all_reduce(totals)
        model.train()
        return (totals[0] / totals[1]).item()

    def caption_bleu4():
        with autocast:
            captions, records = eval_bleu.caption_split(raw_model, data_dir, val_split, eval_bleu_images,
                                                       batch_size, dict(max_new_tokens=30), dev)
        return eval_bleu.score(captions, [r['captions'] for r in records])['BLEU-4']

    # ------------------------------------------------------------------ logging
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f'{len(train_data):,} training captions, {global_batch} per iteration, '
              f'{iters_per_epoch:,} iterations per epoch, {total_iters:,} in all')
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def log(record):
        if not master:
            return
        with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        if wandb_log:
            import wandb
            wandb.log(record, step=record['iter'])

    def checkpoint_state():
        return dict(model=trainable_state(raw_model), model_config=asdict(raw_model.config),
                    train_config=config, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    iter_num=iter_num, best_val_loss=best_val_loss)

    # ------------------------------------------------------------------ the loop
    # Nothing in a step draws random numbers: the data order follows from (seed, epoch) and the
    # iteration number, and the learning rate from the iteration number, so the checkpoint's
    # iter_num is the whole position of a run and a resumed run continues exactly.
    peak = peak_flops(device_type)
    model.train()
    # what happened since the last log line: a resumed run's first window starts at the resume, wherever
    # that falls between log boundaries
    t_last, window_iters, window_flops, window_captions = time.time(), 0, 0, 0
    window_loss = torch.zeros((), device=dev)
    while iter_num < total_iters:
        epoch, step = divmod(iter_num, iters_per_epoch)
        ids = epoch_order(len(train_data), seed, epoch)[step * global_batch:(step + 1) * global_batch]
        # every rank knows the whole global batch, so each can scale its loss to the mean over all of
        # the batch's target tokens: the same gradient as one process on the whole batch
        all_targets = train_data.target_count(ids)
        lr = lr_at(iter_num, total_iters, learning_rate, min_lr, warmup_frac)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for micro in range(gradient_accumulation_steps):
            start = (micro * world + rank) * batch_size
            micro_ids = ids[start:start + batch_size]
            features, mask, tokens, targets, positions = (to_device(a) for a in train_data.batch(micro_ids))
            if ddp:  # synchronise gradients only on the last micro step
                model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
            with autocast:
                _, loss = model(features, mask, tokens, targets, positions)
            share = train_data.target_count(micro_ids) / all_targets
            scaler.scale(loss * share * world).backward()  # DDP averages over ranks: undo it
            window_loss += loss.detach() * share
            window_flops += len(micro_ids) * training_flops(raw_model, tokens.shape[1], mask.shape[1],
                                                            len(positions) / len(micro_ids))
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        window_iters += 1
        window_captions += global_batch

        if iter_num % log_interval == 0 or iter_num == total_iters:
            if ddp:
                dist.all_reduce(window_loss)
            loss_value = window_loss.item() / window_iters  # .item() waits for the GPU: only when logging
            elapsed = time.time() - t_last
            ms_per_iter = 1000 * elapsed / window_iters
            captions_per_s = window_captions / elapsed
            mfu = window_flops * world / elapsed / peak if peak else None
            eta_min = (total_iters - iter_num) * ms_per_iter / 60000
            if master:
                mfu_text = f', MFU {100 * mfu:.1f}%' if mfu is not None else ''
                print(f'iter {iter_num}/{total_iters}: loss {loss_value:.4f}, lr {lr:.2e}, '
                      f'{ms_per_iter:.1f} ms/iter, {captions_per_s:,.0f} captions/s{mfu_text}, '
                      f'ETA {eta_min:.1f} min')
            log(dict(iter=iter_num, loss=loss_value, lr=lr, ms_per_iter=ms_per_iter,
                     captions_per_s=captions_per_s, mfu=mfu))
            t_last, window_iters, window_flops, window_captions = time.time(), 0, 0, 0
            window_loss.zero_()

        if iter_num % eval_interval == 0 or iter_num == total_iters:
            val_loss = evaluate()
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
            if master:
                scores = dict(val_loss=val_loss)
                if eval_bleu_images:
                    scores['val_bleu4'] = caption_bleu4()
                print(f'iter {iter_num}: ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items())
                      + (' (best)' if improved else ''))
                log(dict(iter=iter_num, **scores))
                state = checkpoint_state()
                save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), state)
                if improved:
                    save_checkpoint(os.path.join(out_dir, 'best.pt'), state)
            t_last = time.time()  # evaluation time is not training time
    if ddp:
        dist.barrier()  # every rank is done with the others (rank 0 was saving): only then tear down
        dist.destroy_process_group()


if __name__ == '__main__':
    from configurator import configure, is_setting
    config = configure({k: v for k, v in globals().items() if is_setting(k, v)})
    globals().update(config)
    with input_errors_exit('train.py'):
        main(config)
