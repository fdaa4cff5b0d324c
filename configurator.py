"""
Config overrides from the command line, nanoGPT style:

    python train.py config/train_coco.py --batch_size=64 --compile=False

Bare arguments are Python config files, executed in order; `--key=value` arguments override one
setting; `--help` prints the settings, with their defaults and comments, as the script lists them. Every
key must already exist with a default; a value must have the default's type (an int is accepted for a
float, and a default of None accepts any value). A script hands its defaults in, and the
dataclass of its model, if any, whose fields are settings too, at the dataclass's defaults:

    from configurator import configure, is_setting
    defaults = {k: v for k, v in globals().items() if is_setting(k, v)}
    globals().update(configure(defaults, model=CaptionerConfig))
"""
import ast
import dataclasses
import difflib
import inspect
import os
import sys

SETTING_TYPES = (bool, int, float, str, type(None))


def is_setting(name, value):
    """The module globals that count as settings: public lower-case names (upper case is for constants)
    with plain values."""
    return not name.startswith('_') and not name.isupper() and isinstance(value, SETTING_TYPES)


def configure(defaults, argv=None, model=None):
    """Return a copy of `defaults` with the config files and --key=value overrides of argv
    applied. The fields of the dataclass `model` are settings too, at its defaults unless `defaults`
    gives one."""
    config = dict(defaults)
    for field in dataclasses.fields(model) if model else ():
        config.setdefault(field.name, field.default)
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ('--help', '-h'):
            try:
                print(usage(sys.argv[0], model), flush=True)
            except BrokenPipeError:  # `--help | head`: the reader has read enough
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0)
        if arg.startswith('--'):
            key, sep, text = arg[2:].partition('=')
            if not sep:
                fail(f"'{arg}' needs a value: --{key}=VALUE")
            check_key(config, key, arg)
            config[key] = parse_value(config[key], text, arg)
        else:
            for key, value in run_config_file(arg, config).items():
                check_key(config, key, arg)
                config[key] = check_type(config[key], value, f'{arg}: {key}')
    return config


def usage(script, model=None):
    """How to run a script, and its settings as its source lists them: the lines between its first two
    '# ---' lines, each setting with its default and what it is for; then the fields of the
    dataclass `model` as its source lists them."""
    with open(script) as f:
        lines = f.read().splitlines()
    banners = [i for i, line in enumerate(lines) if line.startswith('# ---')][:2]
    settings = lines[banners[0] + 1:banners[1]] if len(banners) == 2 else []
    text = [f'usage: python {script} [config/FILE.py ...] [--key=value ...]', '',
            'settings (a config file or --key=value changes one):', *settings]
    if model:  # the lines of the class body that are fields or comments, as its source has them
        body = [line[4:] for line in inspect.getsource(model).splitlines() if line.startswith('    ')
                and (':' in line.split('#')[0] or line.lstrip().startswith('#'))]
        text += ['', f"the model's settings ({model.__module__}.py's {model.__name__}, at its "
                 'defaults unless set above):', *body]
    return '\n'.join(text)


def run_config_file(path, config):
    """Execute a config file with the current settings visible; return the settings it assigned."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        fail(f"cannot read config file '{path}': {e.strerror}")
    namespace = dict(config)
    exec(compile(source, path, 'exec'), namespace)
    return {k: v for k, v in namespace.items()
            if is_setting(k, v) and (k not in config or v is not config[k])}


def check_key(config, key, source):
    if key not in config:
        close = difflib.get_close_matches(key, config, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ''
        fail(f"unknown config key '{key}' (in {source}){hint}")


def parse_value(default, text, source):
    """The value of --key=text: a Python literal, or the text itself for a string setting."""
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word, e.g. --device=cuda for a setting whose default is None
    return check_type(default, value, source)


def check_type(default, value, source):
    if default is None or value is None:
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is not type(default):
        fail(f'{source}: expected {type(default).__name__}, got {value!r}')
    return value


def fail(message):
    raise SystemExit(f'config error: {message}')
