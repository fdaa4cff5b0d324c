import random

import pytest

import eval_bleu


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
    # the toolkit's scorers on the same tokens (its PTB tokenizer needs Java; ours is applied instead)
    res = {i: [' '.join(eval_bleu.tokenize(c))] for i, c in enumerate(captions)}
    gts = {i: [' '.join(eval_bleu.tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f'BLEU-{n}': b for n, b in enumerate(bleu, 1)}
    expected['CIDEr-D'], _ = Cider().compute_score(gts, res)
    expected['ROUGE-L'], _ = Rouge().compute_score(gts, res)
    assert ours.keys() == expected.keys()
    for name in ours:
        assert abs(ours[name] - expected[name]) <= 1e-6, name


def test_tokenize_and_perfect_score():
    assert eval_bleu.tokenize('A red circle, on the LEFT.') == ['a', 'red', 'circle', 'on', 'the', 'left']
    refs = [['a big red circle on the left', 'a red disc'], ['two blue squares side by side']]
    metrics = eval_bleu.score(['A big red circle on the left.', 'Two blue squares side by side'], refs)
    assert metrics['BLEU-4'] == pytest.approx(1.0) and metrics['ROUGE-L'] == pytest.approx(1.0)


def test_lcs_length():
    assert eval_bleu.lcs_length('a b c d e'.split(), 'a c e x'.split()) == 3
    assert eval_bleu.lcs_length([], ['a']) == 0
