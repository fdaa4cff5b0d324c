"""
Caption a prepared split from its precomputed features and score the captions the way COCO captioning
papers do: the coco-caption toolkit's BLEU-1..4, CIDEr-D and ROUGE-L, reimplemented here exactly, on the
words of the toolkit's tokenizer (Stanford's Java PTBTokenizer: "child 's", "t-shirt", "8:25", "can not",
"-lrb-"), which coco_tokenizer.py gives without Java:

    python eval_bleu.py --out_dir=out-coco --data_dir=data/coco --split=test

Those words are Java's on all 760 real captions beside the repository and on 85,723 of 85,724 COCO val2014
captions (measured; coco_tokenizer.py lists where they part on made-up ones), so on real captions the scores
are the toolkit's to 1e-6. With --official=True the toolkit itself scores them, exactly (pycocoevalcap, which
needs Java), adding METEOR and, where it can run, SPICE (it downloads Stanford CoreNLP on first use).

Writes out_dir/metrics_<name>.json and out_dir/captions_<name>.json, named by what was evaluated
(test_beam5, val_greedy_2shot, ...: see evaluation_name), and prints a table.
"""
import contextlib
import math
import os
import shutil
import sys
from collections import Counter

import numpy as np

from coco_tokenizer import tokenize, tokenize_all, tokenize_groups  # noqa: F401 (tokenize: for the tests)
from common import (InputError, check_at_least, check_writable, command_line, first_line,
                    gpt2_tokenizer, input_errors_exit, read_json, write_json)
from data import Captions, FewShotExamples, check_data_fits_model, read_meta

# -----------------------------------------------------------------------------
out_dir = 'out'  # where train.py wrote its checkpoints; the results are written here too
checkpoint = 'best.pt'
data_dir = 'data/coco'
split = 'test'
max_items = 0  # 0: every image (or video) of the split
batch_size = 64
decoding = 'beam'  # 'greedy', 'beam' or 'sample'
beam_width = 5
max_new_tokens = 30
device = ''  # default: cuda when available, else cpu
cpu_weights = 'float32'  # decoding on a CPU: GPT-2's and the cross-attention's weights as 'float32', 'bfloat16', 'int8'
official = False  # True: score with the coco-caption toolkit itself (needs Java), which adds METEOR and SPICE
shots = 0  # few-shot: this many (image, caption) examples before each image (a model trained with interleave > 1)
shots_split = 'train'  # the prepared split of data_dir the examples come from
shots_seed = 1337  # which examples
rerank = ''  # 'clip': each caption the best by CLIP-S of the beam's n-best, or of num_samples samples
num_samples = 1  # decoding='sample': captions sampled per image (to rerank)
seed = 1337  # of sampling
# -----------------------------------------------------------------------------


def ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(hypotheses, references, max_n=4):
    """Corpus BLEU-1..max_n: n-gram counts clipped by the most any one reference has, brevity penalty
    against the closest reference length, summed over the corpus. hypotheses: [words],
    references: [[words]]. The two tiny constants are coco-caption's, kept for equal scores."""
    tiny, small = 1e-15, 1e-9
    correct, guessed = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            most = Counter()
            for ref in refs:
                most |= ngrams(ref, n)  # the largest count of each n-gram in any one reference
            correct[n - 1] += sum(min(count, most[gram]) for gram, count in ngrams(hyp, n).items())
            guessed[n - 1] += max(len(hyp) - n + 1, 0)
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guessed[n] + small)
        scores.append(product ** (1 / (n + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * brevity for s in scores]


class CiderD:
    """
    CIDEr-D: tf-idf weighted n-gram cosine similarity, with clipped counts and a Gaussian penalty on the
    length difference, x10 - as coco-caption computes it, including its use of the bigram count as a
    caption's "length". The idf comes from a corpus of references given once: coco-caption's is the
    evaluated captions' own references (cider_d); a reward for training (SCST) takes the training split's.
    """

    def __init__(self, corpus, max_n=4, sigma=6.0):
        """corpus: [[words] of each reference] of each image."""
        self.max_n, self.sigma = max_n, sigma
        self.doc_freq = Counter(g for refs in corpus for g in set().union(*map(self.counts, refs)))
        self.log_docs = math.log(len(corpus))

    def counts(self, words):
        return Counter(g for n in range(1, self.max_n + 1) for g in ngrams(words, n).elements())

    def vector(self, words):
        vec = [{} for _ in range(self.max_n)]
        norm = [0.0] * self.max_n
        counts = self.counts(words)
        for gram, tf in counts.items():
            weight = tf * (self.log_docs - math.log(max(1.0, self.doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight ** 2
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    def image_scores(self, hypotheses, references):
        """The CIDEr-D of each of several hypotheses [words] of one image against its references [[words]],
        whose vectors are computed once (SCST scores several samples of each image)."""
        refs = [self.vector(ref) for ref in references]
        scores = []
        for hyp in hypotheses:
            vec, norm, length = self.vector(hyp)
            total = np.zeros(self.max_n)
            for ref_vec, ref_norm, ref_length in refs:
                penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
                for n in range(self.max_n):
                    value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                    if norm[n] and ref_norm[n]:
                        value /= norm[n] * ref_norm[n]
                    total[n] += value * penalty
            scores.append(10.0 * total.mean() / len(refs))
        return scores

    def scores(self, hypotheses, references):
        """The CIDEr-D of each hypothesis [words] against its references [[words]]."""
        return [self.image_scores([hyp], refs)[0] for hyp, refs in zip(hypotheses, references)]


def cider_d(hypotheses, references):
    """Corpus CIDEr-D as coco-caption reports it: the mean over captions, idf from these references."""
    return float(np.mean(CiderD(references).scores(hypotheses, references)))


def lcs_length(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, 1):
            previous_diagonal, row[j] = row[j], previous_diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses, references, beta=1.2):
    """ROUGE-L: F-measure (beta 1.2) of the longest common subsequence, taking the best precision and
    the best recall over the references, averaged over captions."""
    scores = []
    for hyp, refs in zip(hypotheses, references):
        lcs = [lcs_length(hyp, ref) for ref in refs]
        precision = max(l / len(hyp) if hyp else 0.0 for l in lcs)
        recall = max(l / len(ref) for l, ref in zip(lcs, refs))
        scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
                      if precision and recall else 0.0)
    return float(np.mean(scores))


def score(captions, references):
    """{metric: value} for captions [str] against references [[str]], as coco-caption scores them."""
    # coco-caption tokenizes the captions in one go and the references in another, then hands its scorers each
    # caption as a string of words: BLEU and CIDEr split it at any white space, ROUGE-L at ' ' alone (they
    # differ only for a token that holds a no-break space, like 3 1/2, and for an empty caption).
    hyps = [' '.join(words) for words in tokenize_all(captions)]
    refs = [[' '.join(words) for words in rs] for rs in tokenize_groups(references)]
    split = lambda how: ([how(h) for h in hyps], [[how(r) for r in rs] for rs in refs])
    metrics = {f'BLEU-{n}': b for n, b in enumerate(bleu(*split(str.split)), 1)}
    metrics['CIDEr-D'] = cider_d(*split(str.split))
    metrics['ROUGE-L'] = rouge_l(*split(lambda words: words.split(' ')))
    return metrics


# A caption that ends on one of these stopped mid-phrase ("a dog on a"): self-critical.pytorch's list, and "and"
BAD_ENDINGS = {'a', 'an', 'the', 'in', 'for', 'at', 'of', 'with', 'before', 'after', 'on', 'upon', 'near', 'to', 'is',
               'are', 'am', 'and'}


def bad_endings(captions):
    """The share of captions whose last word is a function word: a sign that training on CIDEr-D taught the
    model to stop early (self-critical.pytorch reports it as bad_count_rate)."""
    return sum(bool(words) and words[-1] in BAD_ENDINGS for words in tokenize_all(captions)) / max(len(captions), 1)


# ----------------------------------------------------------------------------- right about the picture?
# BLEU and CIDEr-D reward a caption for sounding like the references, not for being right: "a big red square"
# over a red circle scores well. The shapes demo's captions file keeps every picture's scene (each shape's colour
# and kind) and the words for them, so a caption's (colour, shape) pairs can be checked against the picture.

def scenes(captions_path):
    """{image id: [(colour, kind) of each shape]} and the words of colours and kinds ({words: kind}) of a captions
    file that keeps its scenes (prepare_shapes.py writes them), else None (any other captions: a COCO JSON file,
    or your own CSV, JSON Lines or folder, which are not JSON)."""
    if not (captions_path and captions_path.endswith('.json') and os.path.isfile(captions_path)):
        return None
    coco = read_json(captions_path)
    info = coco.get('info') if isinstance(coco, dict) else None
    if not isinstance(info, dict) or 'kinds' not in info:
        return None
    kind_of = {tuple(words.split()): kind for kind, synonyms in info['kinds'].items() for words in synonyms}
    pictures = {image['id']: [(shape['colour'], shape['kind']) for shape in image['scene']] for image in coco['images']}
    return pictures, set(info['colours']), dict(sorted(kind_of.items(), key=lambda item: -len(item[0])))


def named_pairs(words, colours, kind_of):
    """The (colour, kind) pairs a caption's words name: a colour right before the words of a kind ('a big red
    round shape' names (red, circle)), or their plural."""
    pairs = []
    for i, word in enumerate(words):
        if word not in colours:
            continue
        for phrase, kind in kind_of.items():  # the longest phrases first
            following = words[i + 1:i + 1 + len(phrase)]
            plurals = [[phrase[-1] + end] for end in ('', 's', 'es')]
            if following[:-1] == list(phrase[:-1]) and following[-1:] in plurals:
                pairs.append((word, kind))
                break
    return pairs


def scene_shares(captions, ids, pictures, colours, kind_of):
    """Of the (colour, shape) pairs the captions name, the share that is in the picture; of the pictures' shapes,
    the share that their caption names."""
    right = named = shapes = mentioned = 0
    for words, image_id in zip(tokenize_all(captions), ids):
        pairs, picture = named_pairs(words, colours, kind_of), pictures[image_id]
        right += sum(pair in picture for pair in pairs)
        named += len(pairs)
        shapes += len(picture)
        mentioned += sum(shape in pairs for shape in picture)
    return dict(pairs_right=right / max(named, 1), shapes_named=mentioned / max(shapes, 1))


def require_official_toolkit():
    """Raise an InputError unless coco-caption's toolkit can run: pycocoevalcap, and Java for its tokenizer."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
        toolkit = True
    except ImportError:
        toolkit = False
    if shutil.which('java') is None or not toolkit:
        raise InputError('--official=True needs Java (java on PATH) and pycocoevalcap (pip install pycocoevalcap)')


def official_scores(captions, references):
    """{metric: value} from the coco-caption toolkit itself (pycocoevalcap): its Java PTB tokenizer, then
    BLEU-1..4, CIDEr-D, ROUGE-L, METEOR (Java) and SPICE (Java; left out, with a line on stderr, where it
    cannot run). BLEU, CIDEr-D and ROUGE-L equal score()'s wherever coco_tokenizer gives Java's words."""
    require_official_toolkit()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs = PTBTokenizer().tokenize({i: [{'caption': r} for r in rs] for i, rs in enumerate(references)})
    hyps = PTBTokenizer().tokenize({i: [{'caption': c}] for i, c in enumerate(captions)})
    metrics = {f'BLEU-{n}': b for n, b in enumerate(Bleu(4).compute_score(refs, hyps, verbose=0)[0], 1)}
    metrics['CIDEr-D'] = Cider().compute_score(refs, hyps)[0]
    metrics['ROUGE-L'] = Rouge().compute_score(refs, hyps)[0]
    metrics['METEOR'] = official_meteor(refs, hyps)
    spice = official_spice(refs, hyps)
    if spice is not None:
        metrics['SPICE'] = spice
    return {name: float(value) for name, value in metrics.items()}


def official_meteor(refs, hyps):
    """pycocoevalcap's METEOR, its Java process stopped whatever happens."""
    from pycocoevalcap.meteor.meteor import Meteor
    scorer = Meteor()
    try:
        return scorer.compute_score(refs, hyps)[0]
    finally:
        if scorer.lock.locked():  # compute_score failed holding its lock, which Meteor.__del__ would wait for
            scorer.lock.release()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def official_spice(refs, hyps):
    """pycocoevalcap's SPICE, or None with a line on stderr saying why it could not run. It downloads Stanford
    CoreNLP on first use and needs 8 GB for its Java process."""
    try:
        from pycocoevalcap.spice.spice import Spice
        with contextlib.redirect_stdout(sys.stderr):  # its download messages
            scorer = Spice()
    except Exception as e:
        print(f'eval_bleu.py: SPICE skipped: {first_line(e)} (SPICE needs Stanford CoreNLP, which pycocoevalcap '
              'downloads on first use)', file=sys.stderr)
        return None
    try:
        return scorer.compute_score(refs, hyps)[0]
    except Exception as e:
        print(f'eval_bleu.py: SPICE skipped: its Java program failed ({first_line(e)})', file=sys.stderr)
        return None


def evaluation_name():
    """What was evaluated, which names its files: split, decoding and shots, the images when not all, the CPU's
    weights when not float32, reranking, and the checkpoint when not best.pt (test_beam5, val_greedy_2shot,
    test_greedy_first100, test_greedy_int8, test_sample8_clipreranked, test_sample_ckpt, ...). Each evaluation
    keeps its own files."""
    parts = [split, f'beam{beam_width}' if decoding == 'beam' else f'sample{num_samples}' if num_samples > 1
             else decoding] + [f'{shots}shot'] * bool(shots)
    if max_items:
        parts.append(f'first{max_items}')
    if cpu_weights != 'float32':
        parts.append(cpu_weights)
    if rerank:
        parts.append(f'{rerank}reranked')
    if checkpoint != 'best.pt':
        parts.append(os.path.splitext(os.path.basename(checkpoint))[0])
    return '_'.join(parts)


def evaluation_settings():
    """Every setting that made the captions, for the metrics file."""
    settings = dict(checkpoint=checkpoint, split=split, decoding=decoding, max_new_tokens=max_new_tokens, shots=shots)
    if decoding == 'beam':
        settings['beam_width'] = beam_width
    if cpu_weights != 'float32':
        settings['cpu_weights'] = cpu_weights
    if rerank:
        settings.update(rerank=rerank, candidates=beam_width if decoding == 'beam' else num_samples)
    if shots:  # where the examples came from
        settings.update(shots_split=shots_split, shots_seed=shots_seed)
    return settings


def caption_split(model, data_dir, split_name, count, batch, decode_options, dev, examples=None, scorer=None,
                  samples=1):
    """Captions of the first `count` images or videos of a prepared split (all if 0), their records (file, id,
    reference captions), and with a scorer (clipscore.ClipScorer) each one's candidates and the one chosen.
    examples: a data.FewShotExamples of the same data_dir, whose examples go before each image (never the image
    itself). scorer: each caption is the best by CLIP-S of the beam's n-best, or of `samples` samples."""
    import torch
    import decode
    data = Captions(data_dir, split_name, max_tokens=1)
    records = data.records()
    count = min(count or len(records), len(records))
    gpt2_tokenizer()  # its files, before any decoding
    # the images that get the same examples are captioned together
    if examples is None:
        groups = {(): range(count)}
    else:
        same_split = examples.split == split_name
        groups = examples.groups(range(count), lambda i, media, record: same_split and media == i)
    captions, choices = [None] * count, [None] * count
    for chosen, group in groups.items():
        shots = examples.shots_of(chosen, dev) if examples is not None else None
        for start in range(0, len(group), batch):
            ids = np.array(group[start:start + batch])
            features, mask = (torch.from_numpy(a).to(dev) for a in data.features(ids))
            # with a scorer: the best by CLIP-S of the beam's n-best, or of samples
            results = decode.caption_batch(model, features, mask, decode_options, samples, shots,
                                           scorer, rerank=scorer is not None)
            for i, result in zip(ids, results):
                captions[i] = result['captions'][0]
                choices[i] = (result['candidates'], result['chosen']) if scorer else None
    return captions, records[:count], choices if scorer else None


def clip_scores(scorer, data_dir, split_name, captions, references, batch, dev):
    """{CLIP-S, RefCLIP-S}: the means over the images of the first len(captions) of a split."""
    import torch
    data = Captions(data_dir, split_name, max_tokens=1)
    clip_s, ref_clip_s = [], []
    for start in range(0, len(captions), batch):
        ids = np.arange(start, min(start + batch, len(captions)))
        features, mask = (torch.from_numpy(a) for a in data.features(ids))
        per_image = scorer.clip_s(scorer.image_embeddings(features, mask), [captions[i] for i in ids])
        clip_s.append(per_image)
        ref_clip_s.append(scorer.ref_clip_s(per_image, [captions[i] for i in ids], [references[i] for i in ids]))
    return {'CLIP-S': torch.cat(clip_s).mean().item(), 'RefCLIP-S': torch.cat(ref_clip_s).mean().item()}


def model_folder_of(loaded):
    """The model folder whose weights were evaluated, if any, to add the scores to its model card: the folder itself,
    or the best/ that train.py wrote beside best.pt with it (the same iteration)."""
    path = os.path.join(out_dir, checkpoint)
    if os.path.isdir(path):
        return path
    folder = os.path.join(os.path.dirname(path), 'best')
    saved = read_json(os.path.join(folder, 'config.json')) if os.path.basename(path) == 'best.pt' and \
        os.path.isfile(os.path.join(folder, 'config.json')) else None
    same = isinstance(saved, dict) and (saved.get('training') or {}).get('iter_num') == loaded.get('iter_num')
    return folder if same else None


def check_settings():
    """The settings that cannot work, each as one line, before anything loads."""
    from clipscore import check_rerank
    from decode import check_cpu_weights, check_decoding
    check_decoding(decoding, max_new_tokens, beam_width)
    check_cpu_weights(cpu_weights)
    check_at_least(max_items=(max_items, 0), batch_size=(batch_size, 1), shots=(shots, 0),
                   num_samples=(num_samples, 1))
    check_rerank(rerank, decoding, num_samples)
    if num_samples > 1 and decoding != 'sample':
        raise InputError(f'num_samples={num_samples} needs decoding=sample ({decoding} gives one caption)')
    if num_samples > 1 and not rerank:
        raise InputError(f'num_samples={num_samples} needs rerank=clip to choose one caption of each image\'s '
                         f'samples to score')
    if official:
        require_official_toolkit()  # before the captioning, not after


def main():
    import torch
    from clipscore import clip_scorer_of
    from common import pick_device
    from decode import cpu_decoding, warn_if_all_empty
    from weights import add_evaluation, load_captioner
    check_settings()
    check_writable(out_dir)  # its metrics and captions go there
    os.makedirs(out_dir, exist_ok=True)
    dev = pick_device(device)
    model, loaded = load_captioner(os.path.join(out_dir, checkpoint), dev)
    model = cpu_decoding(model, cpu_weights)
    meta = read_meta(data_dir)
    check_data_fits_model(meta, model, data_dir)
    scorer, why_not = clip_scorer_of(model.config.vision_model, dev)
    if rerank and scorer is None:
        raise InputError(f'rerank=clip: {why_not}')
    options = dict(decoding=decoding, beam_width=beam_width, max_new_tokens=max_new_tokens,
                   generator=torch.Generator(dev).manual_seed(seed))
    examples = FewShotExamples(data_dir, shots_split, shots, shots_seed) if shots else None
    known = scenes(meta['splits'].get(split, {}).get('source', {}).get('captions'))  # before the work
    captions, records, choices = caption_split(model, data_dir, split, max_items, batch_size, options, dev,
                                               examples, scorer if rerank else None, num_samples)
    warn_if_all_empty(captions, 'eval_bleu.py')
    references = [r['captions'] for r in records]
    metrics = (official_scores if official else score)(captions, references)
    metrics['bad_endings'] = bad_endings(captions)
    if known:  # the shapes: is each caption right about its picture?
        metrics.update(scene_shares(captions, [r['id'] for r in records], *known))
    if scorer is not None:
        metrics.update(clip_scores(scorer, data_dir, split, captions, references, batch_size, dev))
    else:
        print(f'eval_bleu.py: no CLIP-S: {why_not}', file=sys.stderr)
    name = evaluation_name()
    write_json(os.path.join(out_dir, f'metrics_{name}.json'), dict(**evaluation_settings(), items=len(records),
                                                                   **metrics))
    write_json(os.path.join(out_dir, f'captions_{name}.json'), [
        dict(file=r['file'], id=r['id'], caption=c, **(dict(candidates=choices[i][0], chosen=choices[i][1])
                                                        if choices else {}))
        for i, (r, c) in enumerate(zip(records, captions))])
    card = model_folder_of(loaded)
    try:
        if card:
            add_evaluation(card, name, dict(metrics=metrics, items=len(records), command=command_line()))
    except OSError as e:  # a folder it may read but not write: the scores are in out_dir all the same
        print(f'eval_bleu.py: {card}: its model card not updated ({first_line(e)})', file=sys.stderr)
    print(f'{split}: {len(records):,} captioned, {decoding} decoding' + (f', {shots}-shot' if shots else '')
          + (', reranked by CLIP-S' if rerank else '')
          + f' (captions and scores: {out_dir}/captions_{name}.json, metrics_{name}.json)')
    for metric, value in metrics.items():
        print(f'{metric:<11} {100 * value:6.2f}')  # x100, as papers report them (bad endings: a percentage)


if __name__ == '__main__':
    from configurator import configure, is_setting
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    with input_errors_exit('eval_bleu.py'):
        main()
