"""
What every nanocap script shares, none of it about the model or the data's format:
- the error a user's bad input raises (InputError), which every script prints as one line;
- the device, and the one precision policy of every script;
- files written atomically, JSON read with an error that names the file;
- GPT-2's tokenizer, and the text of the tokens it decodes.
"""
import json
import os
import sys
from contextlib import contextmanager, nullcontext

EOT = 50256  # GPT-2's <|endoftext|>: the BOS and the EOS of every caption


# -----------------------------------------------------------------------------
# Bad input: one line, no traceback

class InputError(Exception):
    """Something a user handed us is wrong: a file, a folder, a checkpoint, a setting. The message
    names it and says what is wrong, and the scripts print it as one line. Any other exception is a
    bug in nanocap and keeps its traceback."""


def first_line(error):
    """The first line of an exception's message, to quote another library's error inside ours."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def input_errors_exit(script):
    """Run a script's work; an InputError ends the script with one line on stderr, naming the
    script."""
    try:
        yield
    except InputError as e:
        raise SystemExit(f'{script}: {e}') from None  # Python prints the message and exits with 1


def check_at_least(**settings):
    """settings: name=(value, lowest). Raise an InputError naming the first one that is not a whole
    number of at least its lowest value (a script checks its counts before it loads anything)."""
    for name, (value, lowest) in settings.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= lowest):
            raise InputError(f'{name} must be at least {lowest}, not {value!r}')


# -----------------------------------------------------------------------------
# The device, and torchrun's ranks

def pick_device(device=''):
    """
    The device a script runs on, as a full string: `device` if given ('cpu', 'cuda', 'cuda:3', ...),
    else a GPU if there is one, else the CPU. Under torchrun, 'cuda' means this process's own GPU,
    cuda:LOCAL_RANK. A GPU is made the current device too: whatever uses "the" GPU without naming
    one (CUDA streams and graphs, some kernels) must use this one, not cuda:0 on every rank.
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
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        ranks_here = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if dev.index is None:
            dev = torch.device('cuda', local_rank)
        elif ranks_here > 1 and dev.index != local_rank:  # ranks sharing a GPU: NCCL fails or hangs
            raise InputError(f'device={device!r} under torchrun with {ranks_here} processes on '
                             f'this machine: each takes its own GPU, cuda:LOCAL_RANK; '
                             f"give device='cuda'")
        if dev.index >= torch.cuda.device_count():
            raise InputError(f'device={device!r}: there is no {dev} (this machine has '
                             f'{torch.cuda.device_count()} GPUs)')
        torch.cuda.set_device(dev)
    return str(dev)


def barrier():
    """Wait for every torchrun rank (nothing to wait for in a single process)."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def command_line():
    """The command this process runs, as typed (near enough, under torchrun): a record of what made
    a file."""
    import shlex
    launcher = 'python '
    if 'RANK' in os.environ:
        launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)} "
    return launcher + shlex.join(sys.argv)


# -----------------------------------------------------------------------------
# Precision, one policy for every script.
# Training: the dtype setting (below); SCST samples its captions in it too, as its loss then scores
# them. Decoding for captions, wherever it runs (train.py's validation captions, eval_bleu.py,
# sample.py, bench.py): on a GPU under the default training dtype's autocast, with the LM head in
# float32 (Captioner.float32_logits); on a CPU in float32, or the weights decode.cpu_decoding chose.
# On a GPU, float32 products run as TF32 everywhere. CLIP: float16 autocast on a GPU, float32 on a
# CPU, as it made the stored features. So one image gets one caption, whichever script captions it.

def precision(device_type, dtype='auto'):
    """(torch dtype, autocast context) of a dtype setting: 'float32', 'bfloat16', 'float16', or
    'auto': bfloat16 where the hardware multiplies it natively (a GPU that has it; a CPU with
    AVX512-BF16 or AMX), else float16 on a GPU and float32 on a CPU."""
    import torch
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype != 'auto' and dtype not in dtypes:
        raise InputError(f"dtype must be 'auto' or one of {', '.join(dtypes)}, not {dtype!r}")
    if dtype == 'auto':
        dtype = auto_dtype(device_type)[0]
    if dtype == 'float32':
        return torch.float32, nullcontext()
    return dtypes[dtype], torch.autocast(device_type, dtype=dtypes[dtype])


def auto_dtype(device_type):
    """What dtype='auto' trains in on this device, and why."""
    if native_bfloat16(device_type):
        chip = 'GPU' if device_type == 'cuda' else 'CPU'
        return 'bfloat16', f'this {chip} multiplies bfloat16 natively'
    if device_type == 'cuda':
        return 'float16', 'this GPU has no bfloat16: float16 with a gradient scaler'
    return 'float32', 'this CPU has no native bfloat16 (AVX512-BF16 or AMX)'


def native_bfloat16(device_type):
    """Whether the device multiplies bfloat16 in hardware (most x86 servers and laptops since 2020
    do)."""
    import torch
    if device_type == 'cuda':
        return torch.cuda.is_bf16_supported()
    return device_type == 'cpu' and (torch.cpu._is_avx512_bf16_supported()
                                     or torch.cpu._is_amx_tile_supported())


def decoding_autocast(device_type):
    """The autocast every script decodes under (see above)."""
    return precision('cuda')[1] if device_type == 'cuda' else nullcontext()


def vision_autocast(device_type):
    """The autocast CLIP runs under, in every script: float16 on a GPU, as the features are stored,
    none on a CPU (float32)."""
    import torch
    return torch.autocast(device_type, dtype=torch.float16, enabled=device_type == 'cuda')


# -----------------------------------------------------------------------------
# Files: written whole or not at all

def check_writable(path, folder=True):
    """Fail in one line, before any work, unless `path` can be written: a folder that is, or can be
    made there (folder=True), or a file in a folder that is."""
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
    if not os.access(nearest, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                     and not os.access(path, os.W_OK)):
        raise InputError(f'{path}: not writable here (permissions of {nearest})')


def atomic_write(path, write):
    """Call write(temp_path), then rename the temp file over `path`: readers never see half a
    file."""
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


def read_json(path):
    """The JSON in `path`, or None if there is no such file; a file that cannot be read or is not
    JSON is an InputError naming it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f'{path}: cannot read it ({e.strerror})')
    except ValueError as e:  # not JSON, or not UTF-8
        raise InputError(f'{path}: not valid JSON ({first_line(e)})')


# -----------------------------------------------------------------------------
# GPT-2's tokenizer

def gpt2_tokenizer():
    """GPT-2's BPE, from tiktoken, which downloads its two files on first use and caches them.
    Without a network (and without them in its cache) that fails deep inside requests: say so in one
    line instead."""
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except (OSError, ValueError) as e:  # offline (requests raises OSErrors), a corrupt download
        raise InputError(f"GPT-2's tokenizer files could not be downloaded ({type(e).__name__}); "
                         f'without a network, point TIKTOKEN_CACHE_DIR at a folder holding them '
                         f"(tiktoken's cache of a machine that has them)")


def decode_caption(encoder, tokens):
    """The text of generated tokens on one line: GPT-2 can emit newlines and runs of spaces."""
    return ' '.join(encoder.decode(tokens).split())
