"""
How fast nanocap trains, captions and runs CLIP, with random weights at any configuration (nothing is
downloaded), on CPU or GPU:

    python bench.py                                   # the reference configuration, all three
    python bench.py --what=params                     # its parameter table (random weights, no download)
    python bench.py --what=train --compile=True --batch_size=512
    python bench.py --vision_model=openai/clip-vit-large-patch14 --text_model=gpt2-medium
    python bench.py --what=extract --images=coco/val2014

Measures the real code paths: train.py's step (its optimiser, autocast, precomputed float16 features,
captions of caption_len tokens), decode.generate from features (greedy and beam search, every caption
new_tokens long), and sample.py's CLIP pipeline on a folder of JPEGs (decode + preprocess in DataLoader
workers + CLIP forward), alone and end to end with captioning. First it measures what the machine does
at best, dense matrix products and memory reads, and reads the figures against it: the training step's
MFU (against the datasheet peak on a GPU, the measured one on a CPU), and how fast decoding reads its
weights (every step reads them all once: at batch 1 memory bandwidth is the limit). Prints a table, then
one JSON line with every figure.
"""
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

import train
import decode
from common import (EOT, decoding_autocast, input_errors_exit, native_bfloat16, pick_device,
                    precision, vision_autocast)
from media import tokens_per_frame
from model import CaptionerConfig, count_params, param_table, training_flops
from weights import build_captioner

# -----------------------------------------------------------------------------
what = 'train,generate,extract'  # or 'params': the parameter table alone
device = ''  # default: cuda when available, else cpu
dtype = 'auto'  # of the training step; auto: train.py's on a GPU, and both float32 and bfloat16 on a CPU that has it
compile = False  # torch.compile the training step's model
seed = 1337
# training
batch_size = 0  # captions per step (0: 1024 on a GPU, 8 on a CPU)
caption_len = 16  # tokens per caption: <|endoftext|> + 15, about a COCO caption
train_steps = 20  # timed, after warmup_steps
warmup_steps = 5
# generation from features
gen_batch_sizes = ''  # comma-separated (default: '16,64,256,1024' on a GPU, '1,8' on a CPU)
new_tokens = 20
beam_width = 5
cpu_weights = 'float32'  # decoding on a CPU: GPT-2's and the cross-attention's weights as 'float32', 'bfloat16', 'int8'
# CLIP on JPEGs, as sample.py runs it
images = ''  # a folder of JPEGs (default: synthetic 640x480 JPEGs, the size of COCO's)
num_images = 0  # images to run (0: 8192 on a GPU, 16 on a CPU); the folder's files are cycled
extract_batch = 0  # images per batch (0: 256 on a GPU, 8 on a CPU)
num_workers = min(16, os.cpu_count() or 1)
# the model: model.py's CaptionerConfig, whose fields are settings too, at its defaults (--help
# lists them)
# -----------------------------------------------------------------------------


class Timer:
    """Wall time of the block, waiting for the GPU; peak GPU memory in it (peak process RSS on CPU)."""

    def __init__(self, dev):
        self.cuda = torch.device(dev).type == 'cuda'

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gib = (torch.cuda.max_memory_allocated() if self.cuda else
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30


def best_time(fn, dev, repeats=5):
    """The shortest of a few timed calls of fn(), after one untimed."""
    fn()
    times = []
    for _ in range(repeats):
        with Timer(dev) as timer:
            fn()
        times.append(timer.seconds)
    return min(times)


def machine_limits(dev, ptdtype):
    """What this machine does at best, measured here, to read every figure against: dense matrix
    products in the training dtype (FLOP/s) and reading memory (bytes/s)."""
    n = 4096 if dev.startswith('cuda') else 2048
    a, b = (torch.randn(n, n, device=dev, dtype=ptdtype) for _ in range(2))
    big = torch.ones(2 ** 28, device=dev)  # 1 GiB of float32: far more than any cache
    return dict(matmul_tflops=2 * n ** 3 / best_time(lambda: a @ b, dev) / 1e12,
                read_gbs=big.numel() * 4 / best_time(big.sum, dev) / 1e9)


def decoding_bytes(model, cpu_weights='float32'):
    """Bytes of the weights that every decoding step reads: the GPT-2 blocks and LM head, and the
    cross-attention blocks but their keys/values of the media (computed once per image); the weights of linear
    layers and the head at the bytes per number of cpu_weights (call it before decode.cpu_decoding)."""
    xattn_kv = [block.to_kv for block in model.xattn.values()]
    per_image = {id(p) for module in xattn_kv for p in module.parameters()}
    matrices = {id(m.weight) for m in [*model.gpt.modules(), *model.xattn.modules()] if isinstance(m, torch.nn.Linear)}
    matrices.add(id(model.gpt.wte.weight))  # read whole as the LM head
    size = {'float32': 4, 'bfloat16': 2, 'int8': 1}[cpu_weights]
    params = [p for module in (model.gpt, model.xattn) for p in module.parameters() if id(p) not in per_image]
    return sum(p.numel() * (size if id(p) in matrices and p.is_floating_point() else p.element_size())
               for p in params) - model.gpt.wpe.weight.nbytes


def random_features(model, batch, dev):
    """CLIP features as prepare_coco.py stores them: float16 [B, 1, N, Dv], one frame per image."""
    vision = model.vision.config
    return torch.randn(batch, 1, tokens_per_frame(vision), vision.hidden_size, device=dev).to(torch.float16)


def bench_train(model, dev, autocast, batch, peak):
    """train.py's step on fixed-length captions: every position has a target."""
    model.train()
    step_model = torch.compile(model) if compile else model
    # train.py's defaults: the values change nothing in the speed
    optimizer = train.make_optimizer(model, 1e-4, 1e-3, (0.9, 0.98))
    features, mask = random_features(model, batch, dev), torch.ones(batch, 1, dtype=torch.bool, device=dev)
    tokens = torch.randint(0, EOT, (batch, caption_len), device=dev)
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), EOT, device=dev)], dim=1)
    positions = torch.arange(batch * caption_len, device=dev)

    def step():
        with autocast:
            _, loss = step_model(features, mask, tokens, targets, positions)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):  # compilation, cuDNN/cuBLAS autotuning, allocator warm-up
        step()
    with Timer(dev) as timer:
        for _ in range(train_steps):
            step()
    seconds = timer.seconds / train_steps
    # FLOPs per caption, from model.training_flops: forward 2 per weight per token it touches plus
    # attention; backward 2x forward for the trained bridge (input and weight gradients) but only 1x for
    # the frozen GPT-2 blocks and LM head (input gradients only: no weight gradients are computed)
    flops = training_flops(model, caption_len) * batch
    return dict(batch=batch, ms_per_iter=1000 * seconds, captions_per_s=batch / seconds,
                tokens_per_s=batch * caption_len / seconds, tflops=flops / seconds / 1e12,
                mfu=flops / seconds / peak if peak else None, peak_gib=timer.peak_gib)


def bench_generate(model, dev, autocast, batch, decoding, weight_bytes):
    model.eval()
    features = random_features(model, batch, dev)
    options = dict(decoding=decoding, beam_width=beam_width, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens)  # random weights: make every caption full length
    with autocast:
        decode.generate(model, features, **options)  # warm-up
        with Timer(dev) as timer:
            captions = decode.generate(model, features, **options)
    assert all(len(c) == new_tokens for c in captions)
    return dict(decoding=decoding, batch=batch, captions_per_s=batch / timer.seconds,
                ms_per_batch=1000 * timer.seconds, peak_gib=timer.peak_gib,
                weights_gbs=weight_bytes * new_tokens / timer.seconds / 1e9)


def synthetic_jpegs(folder, count=64):
    """COCO-like 640x480 JPEGs (smooth colour fields with noise, about 100 kB each)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        picture = np.stack([np.sin(a * x + i), np.cos(b * y), np.sin(c * (x + y))], -1) * 100 + 128
        picture += rng.normal(0, 12, picture.shape)
        paths.append(os.path.join(folder, f'{i:03d}.jpg'))
        Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def bench_extract(model, dev, paths, batch):
    """CLIP features of JPEGs as sample.py makes them: alone, and end to end with greedy and beam captions."""
    from sample import PreprocessedImages, caption_files, collate_files
    model.eval()
    files = PreprocessedImages(paths, model.vision.config.image_size)

    def clip_only():
        loader = torch.utils.data.DataLoader(files, batch_size=batch, num_workers=num_workers,
                                             collate_fn=collate_files, pin_memory=torch.device(dev).type == 'cuda')
        for _, frame_counts, frames, _ in loader:
            with torch.no_grad(), vision_autocast(torch.device(dev).type):
                model.encode_pixels(frames.to(dev, non_blocking=True), frame_counts)

    results = []
    for name, run in [('CLIP features', clip_only)] + [
            (f'sample.py, {decoding}', lambda decoding=decoding: caption_files(
                model, files, dict(decoding=decoding, beam_width=beam_width, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens), batch, num_workers, dev))
            for decoding in ('greedy', 'beam')]:
        with Timer(dev) as timer:
            run()
        results.append(dict(stage=name, images=len(paths), batch=batch, images_per_s=len(paths) / timer.seconds,
                            peak_gib=timer.peak_gib))
    return results


def rate(x):
    """A per-second figure, readable at CPU and at GPU speeds."""
    return f'{x:,.0f}' if x >= 100 else f'{x:.3g}'


def print_params(config):
    """The parameter table of the model, with random weights on the meta device: no download, no memory."""
    with torch.device('meta'):
        model = build_captioner(config, pretrained=False)
    for name, total, trainable in param_table(model):
        print(f'{name:<20} {total:>14,} total {trainable:>14,} trainable')
    total, trainable = count_params(model)
    print(f'params total={total} trainable={trainable} frozen={total - trainable}')


def train_dtypes(device_type):
    """The dtypes to time the training step in: the setting's, or with 'auto' on a CPU that multiplies bfloat16
    natively, float32 and bfloat16 both (which is faster there depends on the machine)."""
    if dtype == 'auto' and device_type == 'cpu' and native_bfloat16('cpu'):
        return ['float32', 'bfloat16']
    return [str(precision(device_type, dtype)[0]).removeprefix('torch.')]


def main():
    config = CaptionerConfig(**{k: globals()[k] for k in asdict(CaptionerConfig())})
    if what == 'params':
        return print_params(config)
    decode.check_cpu_weights(cpu_weights)
    dev = pick_device(device)
    gpu = torch.device(dev).type == 'cuda'
    dtypes = train_dtypes(torch.device(dev).type)
    torch.manual_seed(seed)
    model = build_captioner(config, pretrained=False).to(dev)
    device_name = torch.cuda.get_device_name() if gpu else f'CPU ({os.cpu_count()} cores)'
    limits = {name: machine_limits(dev, precision(dev.split(':')[0], name)[0]) for name in dtypes}
    report = dict(device=device_name, dtypes=dtypes, cpu_weights=cpu_weights, compile=compile,
                  vision_model=config.vision_model, text_model=config.text_model, torch=torch.__version__,
                  limits=limits)
    stages = what.split(',')
    rows = []  # (stage, settings, figure)
    if 'train' in stages:
        report['train'] = []
        for name in dtypes:
            # MFU against the GPU's datasheet peak (as nanoGPT's), or the matrix products measured on a CPU
            peak = train.peak_flops('cuda') if gpu else limits[name]['matmul_tflops'] * 1e12
            autocast = precision(dev.split(':')[0], name)[1]
            r = bench_train(model, dev, autocast, batch_size or (1024 if gpu else 8), peak)
            report['train'].append(dict(dtype=name, **r))
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r['mfu'] is not None else ''
            rows.append((f'train step, {name}', f"batch {r['batch']} x {caption_len} tokens",
                         f"{r['ms_per_iter']:.1f} ms/iter, {rate(r['captions_per_s'])} captions/s, "
                         f"{rate(r['tokens_per_s'])} tokens/s, {r['tflops']:.3g} TFLOP/s{mfu}, "
                         f"peak {r['peak_gib']:.2f} GiB"))
    weight_bytes = decoding_bytes(model, cpu_weights)
    decode.cpu_decoding(model, cpu_weights)  # as sample.py and eval_bleu.py caption (after training: it cannot train)
    autocast = decoding_autocast(dev.split(':')[0])
    read_gbs = limits[dtypes[0]]['read_gbs']
    if 'generate' in stages:
        report['generate'] = []
        for batch in [int(b) for b in (gen_batch_sizes or ('16,64,256,1024' if gpu else '1,8')).split(',')]:
            for decoding in ('greedy', 'beam'):
                r = bench_generate(model, dev, autocast, batch, decoding, weight_bytes)
                report['generate'].append(r)
                # a step reads every weight once, whatever the batch: at batch 1 that is the limit
                share = r['weights_gbs'] / read_gbs
                rows.append((f'{decoding} from features', f'batch {batch}, {new_tokens} tokens',
                             f"{rate(r['captions_per_s'])} captions/s, weights read at {r['weights_gbs']:.1f} "
                             f"GB/s ({100 * share:.0f}% of the bandwidth), peak {r['peak_gib']:.2f} GiB"))
    if 'extract' in stages:
        with tempfile.TemporaryDirectory() as tmp:
            paths = sorted(os.path.join(images, f) for f in os.listdir(images)
                           if f.lower().endswith(('.jpg', '.jpeg'))) if images else synthetic_jpegs(tmp)
            cycled = [paths[i % len(paths)] for i in range(num_images or (8192 if gpu else 16))]
            report['extract'] = bench_extract(model, dev, cycled, extract_batch or (256 if gpu else 8))
        for r in report['extract']:
            rows.append((r['stage'], f"{r['images']} JPEGs, batch {r['batch']}, {num_workers} workers",
                         f"{rate(r['images_per_s'])} images/s, peak {r['peak_gib']:.2f} GiB"))
    print(f"{device_name}, compile={compile}, {config.vision_model} + {config.text_model}, CPU weights {cpu_weights}")
    print('measured limits: matrix products ' + ', '.join(f"{limits[name]['matmul_tflops']:.3g} TFLOP/s ({name})"
                                                      for name in dtypes) + f', memory reads {read_gbs:.0f} GB/s')
    width = max(len(stage) for stage, _, _ in rows), max(len(settings) for _, settings, _ in rows)
    for stage, settings, figure in rows:
        print(f'{stage:<{width[0]}}  {settings:<{width[1]}}  {figure}')
    print(json.dumps(report))


if __name__ == '__main__':
    from configurator import configure, is_setting
    defaults = {k: v for k, v in globals().items() if is_setting(k, v)}
    globals().update(configure(defaults, model=CaptionerConfig))  # CaptionerConfig's fields too
    with input_errors_exit('bench.py'):
        main()
