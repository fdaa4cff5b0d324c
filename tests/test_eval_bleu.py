import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import eval_bleu
from clipscore import ClipScorer
from conftest import caption_text, colour_and_shape, record_generate_calls, run_script, stored_features
from decode import generate
from weights import load_captioner

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_DATA = os.path.join(HERE, '..', '..', 'shared', 'data')  # real captions beside the repository, if any
needs_java = pytest.mark.skipif(shutil.which('java') is None, reason='coco-caption runs a Java program')
needs_real_data = pytest.mark.skipif(not os.path.isdir(os.path.join(REAL_DATA, 'coco_mini')),
                                     reason=f'no real captions in {REAL_DATA}')


def random_corpus(seed, images=40):
    """Captions and references over a small vocabulary, so n-grams of every order match sometimes."""
    rng = random.Random(seed)
    words = 'a the red blue circle square big small on left of and two shapes picture'.split()
    sentence = lambda: ' '.join(rng.choice(words) for _ in range(rng.randint(1, 12)))
    captions = [sentence() for _ in range(images)]
    references = [[sentence() for _ in range(rng.randint(1, 6))] for _ in range(images)]
    captions[0] = references[0][0]  # an exact match
    captions[1] = 'red'  # a one-word caption: no bigram at all
    return captions, references


@pytest.mark.parametrize('seed', range(5))
def test_scores_equal_coco_caption_toolkit(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    captions, references = random_corpus(seed)
    ours = eval_bleu.score(captions, references)
    # the toolkit's scorers on the same words (its tokenizer needs Java; ours gives the same words)
    res = {i: [' '.join(eval_bleu.tokenize(c))] for i, c in enumerate(captions)}
    gts = {i: [' '.join(eval_bleu.tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f'BLEU-{n}': b for n, b in enumerate(bleu, 1)}
    expected['CIDEr-D'], _ = Cider().compute_score(gts, res)
    expected['ROUGE-L'], _ = Rouge().compute_score(gts, res)
    assert ours.keys() == expected.keys()
    for name in ours:
        assert abs(ours[name] - expected[name]) <= 1e-6, name


@pytest.mark.parametrize('seed', range(3))
def test_cider_d_of_each_caption_equals_coco_caption_toolkit(seed):
    """SCST rewards each caption with its own CIDEr-D: the toolkit's per-image scores, not only their mean."""
    from pycocoevalcap.cider.cider import Cider
    captions, references = random_corpus(seed)
    hyps = [eval_bleu.tokenize(c) for c in captions]
    refs = [[eval_bleu.tokenize(r) for r in rs] for rs in references]
    _, expected = Cider().compute_score({i: [' '.join(r) for r in rs] for i, rs in enumerate(refs)},
                                        {i: [' '.join(h)] for i, h in enumerate(hyps)})
    ours = eval_bleu.CiderD(refs).scores(hyps, refs)
    assert len(ours) == len(expected) and max(abs(a - b) for a, b in zip(ours, expected)) <= 1e-6


def test_cider_d_idf_comes_from_the_corpus_it_was_given():
    """With the idf of a training corpus where 'a' starts every caption, 'a' weighs nothing: an exact
    match then scores 10 x mean(1, 1, 1, 0) = 7.5 (no 4-gram), where the scored references alone (one
    image, every n-gram in every document) would give every n-gram weight 0."""
    corpus = [[['a', 'red', 'square']], [['a', 'blue', 'dot']]]
    hyp = ['a', 'red', 'square']
    assert eval_bleu.CiderD(corpus).scores([hyp], [[hyp]]) == [pytest.approx(7.5)]
    assert eval_bleu.CiderD([[hyp]]).scores([hyp], [[hyp]]) == [0.0]


def test_tokenize_and_perfect_score():
    assert eval_bleu.tokenize('A red circle, on the LEFT.') == ['a', 'red', 'circle', 'on', 'the', 'left']
    refs = [['a big red circle on the left', 'a red disc'], ['two blue squares side by side']]
    metrics = eval_bleu.score(['A big red circle on the left.', 'Two blue squares side by side'], refs)
    assert metrics['BLEU-4'] == pytest.approx(1.0) and metrics['ROUGE-L'] == pytest.approx(1.0)


def test_tokenize_like_coco_caption():
    """What the Penn Treebank tokenizer does that a split at punctuation does not."""
    def words(*texts):
        return [' '.join(text_words) for text_words in eval_bleu.tokenize_all(texts)]
    assert words("A child's t-shirt isn't red, it's frost-covered.") == [
        "a child 's t-shirt is n't red it 's frost-covered"]
    assert words('At 8:25 we cannot, gonna pay $5 for 1,000 (3.5%) in the U.S.') == [
        'at 8:25 we can not gon na pay $ 5 for 1,000 -lrb- 3.5 % -rrb- in the u.s.']
    # (no smiley here: Java keeps :) whole, as :-rrb-, where ours is -rrb-, a difference coco_tokenizer.py documents)
    assert words('"Quoted" ... w/ e.g. St. Mary') == ['quoted w / e.g. st. mary']
    # all the captions are one text to the Java tokenizer: "B." keeps its period unless the next line starts "The"
    assert words('Plan B.', 'The dog.', 'Plan B.') == ['plan b', 'the dog', 'plan b.']


# The tricky captions whose words from coco_tokenizer.py are not Java's, by cause, as its docstring lists them
TOKENIZER_DIFFERENCES = [
    # tokens that Java keeps whole and nltk splits
    'A sign reading $5 for 2 hot dogs and US$10 for a beer.',
    'A smiling face :) and a sad one :( next to ;-) and :D.',
    'A website http://www.example.com/page?id=1 and www.google.com.',
    'An email to someone@example.com and a handle @user with #hashtag.',
    'A C++ book and a C# manual.',
    'Call (555) 123-4567 now.',
    'A line with <b>bold</b> html tags.',
    'A sign &mdash; with &amp; and &#39; entities.',
    'An arrow sign << and >> on a wall.',
    # symbols outside ASCII that Java maps to ASCII or splits off
    'Half ½ a cup and ¼ of a pie.',
    'A ¥100 coin and a £5 note and a €10 bill and a 50¢ stamp.',
    'Temperatures of 20°C and 68 °F.',
    'A sign (in Spanish) that says ¡Hola!',
    'A trademark™ and a copyright © sign.',
    'A sign „Willkommen" in German.',
    # apostrophes
    "The 1950's diner and the '50s music from '99.",
    "A car from '99",
    "A rock'n'roll band, a ma'am and y'all at o'clock.",
    # and the rest
    'A pro- and anti- debate.',
    'A bowl of apples, pears etc.a bowl of nuts.',
    'A file called 5a.jpg',
]


def test_tokenize_equals_java_on_tricky_captions():
    """Java's words on every tricky caption but the documented differences, each of which still differs (so
    that the list stays true)."""
    with open(os.path.join(HERE, 'tricky_captions.json'), encoding='utf-8') as f:
        batches = json.load(f)['batches']
    differ = []
    for batch in batches:
        captions = [caption for caption, _ in batch]
        for (caption, expected), words in zip(batch, eval_bleu.tokenize_all(captions)):
            if ' '.join(words) != expected:
                differ.append(caption)
    assert [caption for caption in differ if caption not in TOKENIZER_DIFFERENCES] == []  # fix it, or document it
    assert [caption for caption in TOKENIZER_DIFFERENCES if caption not in differ] == []  # take it off the list
    assert sum(len(batch) for batch in batches) > 150


def test_importing_eval_bleu_does_not_import_nltk():
    """nltk takes about a second to import: eval_bleu.py (and train.py, which imports it) pay for it on their
    first tokenize_all, not on import."""
    check = "import eval_bleu, sys; imported = 'nltk' in sys.modules; eval_bleu.tokenize('A dog.'); " \
            "print(imported, 'nltk' in sys.modules)"
    result = subprocess.run([sys.executable, '-c', check], cwd=os.path.dirname(HERE), capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ['False', 'True']


def test_bad_endings_are_captions_that_stop_on_a_function_word():
    captions = ['A dog on a', 'A dog on a couch.', 'Two cats and...', 'A man with the.', '', 'The cat is', 'Near.']
    assert eval_bleu.bad_endings(captions) == pytest.approx(5 / 7)  # ...a, ...and, ...the, ...is, near


def test_named_pairs_are_a_colour_right_before_the_words_of_a_kind():
    colours = {'red', 'blue'}
    kind_of = {('round', 'shape'): 'circle', ('circle',): 'circle', ('box',): 'square', ('square',): 'square'}
    words = eval_bleu.tokenize('A big red round shape, two blue boxes and a red thing left of a square.')
    assert eval_bleu.named_pairs(words, colours, kind_of) == [('red', 'circle'), ('blue', 'square')]
    pictures = {0: [('red', 'circle'), ('blue', 'circle')], 1: [('red', 'square')]}
    shares = eval_bleu.scene_shares(['A red circle and a blue box.', 'A red square.'], [0, 1], pictures, colours,
                                    kind_of)
    assert shares == dict(pairs_right=2 / 3, shapes_named=2 / 3)


def test_all_empty_captions_are_said_in_one_line(run_dir, data_dir, tmp_path, monkeypatch, capsys):
    """A model that ends every caption at once scores zero everywhere: eval_bleu.py says why, in one line."""
    import decode
    monkeypatch.setattr(decode, 'generate', lambda model, features, *args, **options: [[] for _ in features])
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'best.pt')
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', f'--data_dir={data_dir}', '--split=val',
                      '--decoding=greedy', '--device=cpu') is None
    assert capsys.readouterr().err.splitlines() == [
        'eval_bleu.py: all 4 captions are empty: the model ends every caption at once. A language model that knows '
        'no words (a random stand-in GPT-2) cannot learn to write while frozen: train it too '
        '(--unfreeze_layers=ITS_LAYERS --train_embeddings=True, as config/train_shapes.py does)']


def test_lcs_length():
    assert eval_bleu.lcs_length('a b c d e'.split(), 'a c e x'.split()) == 3
    assert eval_bleu.lcs_length([], ['a']) == 0


# ----------------------------------------------------------------------------- against the toolkit itself (Java)
def java_words(captions):
    """coco-caption's words of each caption, joined by spaces: pycocoevalcap's PTBTokenizer, all in one call."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    words = PTBTokenizer().tokenize({i: [{'caption': c}] for i, c in enumerate(captions)})
    return [words[i][0] for i in range(len(captions))]


def real_captions():
    """The captions of the real data sets beside the repository: COCO train2017 and val2014, Flickr8k."""
    def read(name):
        with open(os.path.join(REAL_DATA, name), encoding='utf-8') as f:
            return json.load(f)
    coco = read('coco_mini/annotations/captions_train2017.json')['annotations']
    coco2014 = read('schema_samples/coco2014_captions_val2014_excerpt.json')['annotations']
    flickr = read('schema_samples/karpathy_dataset_flickr8k_excerpt.json')['images']
    return [a['caption'] for a in coco + coco2014] + [s['raw'] for image in flickr for s in image['sentences']]


@needs_java
@needs_real_data
def test_tokenize_equals_java_on_real_captions():
    captions = real_captions()
    ours = [' '.join(words) for words in eval_bleu.tokenize_all(captions)]
    assert [(c, w) for c, w in zip(captions, ours)] == list(zip(captions, java_words(captions)))
    assert len(captions) >= 700


def coco_mini_images():
    """A realistic test set: each COCO image's first caption as the hypothesis, its others as references; then
    again with a wrong hypothesis, the next image's first caption."""
    with open(os.path.join(REAL_DATA, 'coco_mini/annotations/captions_train2017.json'), encoding='utf-8') as f:
        annotations = json.load(f)['annotations']
    by_image = {}
    for a in annotations:
        by_image.setdefault(a['image_id'], []).append(a['caption'])
    captions = list(by_image.values())
    hypotheses = [c[0] for c in captions] + [c[0] for c in captions[1:] + captions[:1]]
    return hypotheses, [c[1:] for c in captions] * 2


@needs_java
@needs_real_data
def test_score_equals_official_pipeline_on_real_captions():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    hypotheses, references = coco_mini_images()
    gts = PTBTokenizer().tokenize({i: [{'caption': r} for r in refs] for i, refs in enumerate(references)})
    res = PTBTokenizer().tokenize({i: [{'caption': h}] for i, h in enumerate(hypotheses)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f'BLEU-{n}': b for n, b in enumerate(bleu, 1)}
    expected['CIDEr-D'], _ = Cider().compute_score(gts, res)
    expected['ROUGE-L'], _ = Rouge().compute_score(gts, res)
    ours = eval_bleu.score(hypotheses, references)
    assert ours.keys() == expected.keys()
    for name in ours:
        assert abs(ours[name] - expected[name]) <= 1e-6, name


def java_children():
    """The Java processes this test process started and has not reaped (Linux)."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                command = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and b'java' in command:
            found.append(pid)
    return found


@needs_java
def test_official_scores(monkeypatch, capsys):
    from pycocoevalcap.spice import spice

    def no_network(self):
        raise OSError('no network here')
    monkeypatch.setattr(spice.Spice, '__init__', no_network)  # SPICE would download 1 GB of Stanford CoreNLP
    captions = ['A man riding a wave on top of a surfboard.', 'Two dogs play in the snow.', '',
                "A kitchen with a stove and a cat's bowl.", 'A 3 1/2 inch nail on a table.', 'A red bus on a street']
    references = [['A surfer rides a large wave.', 'A man surfing in the ocean.'],
                  ['Two dogs running through the snow.', 'A pair of dogs playing in a snowy field.'],
                  ['A cat on a mat.'],
                  ['A small kitchen with a white stove.', 'A cat bowl on the floor of a kitchen.'],
                  ['A nail of 3 1/2 inches.', 'A long nail on a wooden table.'],
                  ['A double-decker bus drives down the street.', 'A red bus in the city.']]
    official = eval_bleu.official_scores(captions, references)
    ours = eval_bleu.score(captions, references)
    for name in ours:
        assert abs(official[name] - ours[name]) <= 1e-6, name
    assert 0 < official['METEOR'] <= 1
    assert 'SPICE' not in official
    assert capsys.readouterr().err.splitlines() == [
        'eval_bleu.py: SPICE skipped: no network here (SPICE needs Stanford CoreNLP, which pycocoevalcap downloads '
        'on first use)']
    if os.path.isdir('/proc'):
        assert java_children() == []  # METEOR's Java process is stopped


def test_official_scores_needs_java(monkeypatch):
    from common import InputError
    monkeypatch.setattr(eval_bleu.shutil, 'which', lambda name: None)
    with pytest.raises(InputError) as error:
        eval_bleu.official_scores(['a dog'], [['a dog']])
    assert str(error.value) == ('--official=True needs Java (java on PATH) and pycocoevalcap '
                                '(pip install pycocoevalcap)')


# ----------------------------------------------------------------------------- the script
def test_script_captions_each_image_and_scores_it_against_its_own_references(run_dir, data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """eval_bleu.py as users run it: the checkpoint --checkpoint names, the first --max_items images of --split
    in batches of --batch_size, decoded as asked, each caption the checkpoint's for that image alone and scored
    against that image's references."""
    shutil.copy(f'{run_dir}/best.pt', tmp_path / 'chosen.pt')  # no best.pt here: only --checkpoint finds it
    calls = record_generate_calls(monkeypatch)
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', '--checkpoint=chosen.pt', f'--data_dir={data_dir}',
                      '--split=train', '--max_items=6', '--batch_size=4', '--decoding=beam', '--beam_width=3',
                      '--max_new_tokens=8', '--device=cpu') is None
    monkeypatch.undo()
    # beam search of any width gives this checkpoint's greedy captions: only generate's options tell them apart
    assert [(size, options['decoding'], options['beam_width'], options['max_new_tokens'])
            for size, _, options in calls] == [(4, 'beam', 3, 8), (2, 'beam', 3, 8)]
    with open(f'{data_dir}/train_images.json') as f:
        records = json.load(f)[:6]
    with open(tmp_path / 'captions_train_beam3_first6_chosen.json') as f:
        captions = json.load(f)
    assert [(c['file'], c['id']) for c in captions] == [(r['file'], r['id']) for r in records]
    model = load_captioner(tmp_path / 'chosen.pt')[0]
    feats = stored_features(f'{data_dir}/train_feats.bin')
    for i, (caption, record) in enumerate(zip(captions, records)):
        with torch.no_grad():
            alone = generate(model, torch.tensor(feats[i:i + 1], dtype=torch.float32), decoding='beam', beam_width=3,
                                   max_new_tokens=8)[0]
        assert caption['caption'] == caption_text(alone)
        # and, independent of the model code, it names the colour and shape its references name
        assert colour_and_shape(caption['caption']) == colour_and_shape(record['captions'][0])
    expected = eval_bleu.score([c['caption'] for c in captions], [r['captions'] for r in records])
    expected['bad_endings'] = 0.0  # every caption names a colour and a shape last
    # CLIP-S and RefCLIP-S: the means over the images of each image's own (clipscore.py is checked against
    # transformers' CLIPModel in test_clipscore.py; here, that eval_bleu.py batches, pairs and averages them right)
    scorer = ClipScorer(json.load(open(f'{data_dir}/meta.json'))['vision_model'])
    per_image = [scorer.clip_s(scorer.image_embeddings(torch.tensor(feats[i:i + 1, None], dtype=torch.float32)),
                               [c['caption']]) for i, c in enumerate(captions)]
    expected['CLIP-S'] = pytest.approx(torch.cat(per_image).mean().item(), abs=1e-6)
    expected['RefCLIP-S'] = pytest.approx(torch.cat([scorer.ref_clip_s(s, [c['caption']], [r['captions']]) for s, c, r
                                                     in zip(per_image, captions, records)]).mean().item(), abs=1e-6)
    with open(tmp_path / 'metrics_train_beam3_first6_chosen.json') as f:
        assert json.load(f) == dict(checkpoint='chosen.pt', split='train', decoding='beam', max_new_tokens=8, shots=0,
                                    beam_width=3, items=6, **expected)
    assert capsys.readouterr().out.splitlines() == [
        f'train: 6 captioned, beam decoding (captions and scores: {tmp_path}/captions_train_beam3_first6_chosen.json, '
        'metrics_train_beam3_first6_chosen.json)'] + [
        f'{name:<11} {100 * float(value.expected if hasattr(value, "expected") else value):6.2f}'
        for name, value in expected.items()]  # x100, as papers report them
    # each evaluation keeps its files: greedy decoding of the same split writes its own beside them
    assert run_script('eval_bleu.py', f'--out_dir={tmp_path}', '--checkpoint=chosen.pt', f'--data_dir={data_dir}',
                      '--split=train', '--max_items=6', '--decoding=greedy', '--max_new_tokens=8',
                      '--device=cpu') is None
    assert sorted(p.name for p in tmp_path.glob('*_train_*.json')) == [
        'captions_train_beam3_first6_chosen.json', 'captions_train_greedy_first6_chosen.json',
        'metrics_train_beam3_first6_chosen.json', 'metrics_train_greedy_first6_chosen.json']
