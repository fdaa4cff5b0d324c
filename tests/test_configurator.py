import pytest

from configurator import configure, is_setting

DEFAULTS = dict(batch_size=32, learning_rate=1e-4, compile=True, out_dir='out', device=None)


def test_files_then_overrides_in_order(tmp_path):
    first = tmp_path / 'first.py'
    first.write_text('batch_size = 8\nout_dir = "out-" + str(batch_size)\n')
    second = tmp_path / 'second.py'
    second.write_text('import math\nlearning_rate = batch_size * 1e-5  # sees the earlier file\n')
    config = configure(DEFAULTS, [str(first), '--batch_size=4', str(second), '--compile=False'])
    assert config == dict(batch_size=4, learning_rate=4e-5, compile=False, out_dir='out-8', device=None)
    assert DEFAULTS['batch_size'] == 32  # the defaults are not modified


def test_value_types():
    config = configure(DEFAULTS, ['--learning_rate=3', '--out_dir=123', '--device=cuda:1'])
    assert config['learning_rate'] == 3.0 and isinstance(config['learning_rate'], float)
    assert config['out_dir'] == '123'  # a string setting keeps the text as typed
    assert config['device'] == 'cuda:1'  # a default of None can be overridden
    assert configure(DEFAULTS, ['--device=0'])['device'] == 0


@pytest.mark.parametrize('argv, message', [
    (['--batch_sise=4'], "config error: unknown config key 'batch_sise' (in --batch_sise=4); "
                         "did you mean batch_size?"),
    (['--zzz=1'], "config error: unknown config key 'zzz' (in --zzz=1)"),
    (['--batch_size=4.5'], 'config error: --batch_size=4.5: expected int, got 4.5'),
    (['--compile=yes'], "config error: --compile=yes: expected bool, got 'yes'"),
    (['--batch_size'], "config error: '--batch_size' needs a value: --batch_size=VALUE"),
    (['no/such/file.py'], "config error: cannot read config file 'no/such/file.py': "
                          "No such file or directory"),
])
def test_bad_arguments_fail_in_one_line(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        configure(DEFAULTS, argv)
    assert str(exit_info.value) == message


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / 'typo.py'
    path.write_text('learning_rat = 1e-3\n')
    with pytest.raises(SystemExit, match=rf"unknown config key 'learning_rat' \(in {path}\); "
                                         r"did you mean learning_rate\?"):
        configure(DEFAULTS, [str(path)])


def test_is_setting():
    assert is_setting('batch_size', 4) and is_setting('device', None)
    assert not is_setting('_private', 4) and not is_setting('torch', pytest)
    assert not is_setting('EOT', 50256)  # a constant


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'eval_bleu.py', 'prepare_coco.py', 'prepare_mlslt.py',
                                    'prepare_shapes.py', 'export.py', 'bench.py'])
def test_help_prints_the_settings_with_their_defaults_and_comments(script, capsys):
    """--help is not a setting that needs a value: it prints the script's settings block, as the script lists them,
    and exits 0 before any work."""
    from conftest import run_script
    assert run_script(script, '--help') == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: python {script} [config/FILE.py ...] [--key=value ...]')
    with open(script) as f:
        source = f.read()
    block = source.split('# ---')[1].split('\n', 1)[1]  # the lines after the first banner, to the next
    assert block.rsplit('\n', 1)[0] in out
    assert 'device = ' in out or 'checkpoint = ' in out  # a setting every script has, with its default


def test_help_into_a_pipe_that_closes_early_is_no_error():
    """`python train.py --help | head`: the reader may close the pipe before the script writes (here `true` reads
    nothing and exits at once, long before train.py has imported torch); the script exits 0, nothing on stderr."""
    import subprocess
    result = subprocess.run('python train.py --help | true; exit ${PIPESTATUS[0]}', shell=True, executable='bash',
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, '')
