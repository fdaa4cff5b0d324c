"""
What nanocap shares between its stages besides the model: the error a user's bad input raises, and
reading the JSON files users and stages hand each other.
"""
import json
import os
from contextlib import contextmanager


class InputError(Exception):
    """Something a user handed us is wrong: a file, a folder, a checkpoint, a setting. The message names
    it and says what is wrong, and the scripts print it as one line. Any other exception is a bug in
    nanocap and keeps its traceback."""


def first_line(error):
    """The first line of an exception's message, to quote another library's error inside ours."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def input_errors_exit(script):
    """Run a script's work; an InputError ends the script with one line on stderr, naming the script."""
    try:
        yield
    except InputError as e:
        raise SystemExit(f'{script}: {e}') from None  # Python prints the message and exits with 1


def read_json(path):
    """The JSON in `path`, or None if there is no such file; a file that cannot be read or is not JSON is
    an InputError naming it."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f'{path}: cannot read it ({e.strerror})')
    except ValueError as e:  # not JSON, or not UTF-8
        raise InputError(f'{path}: not valid JSON ({first_line(e)})')
