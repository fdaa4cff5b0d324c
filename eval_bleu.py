"""
Caption a prepared split from its precomputed features and score the captions the way COCO captioning
papers do (the coco-caption toolkit's BLEU-1..4, CIDEr-D and ROUGE-L, reimplemented here exactly):

    python eval_bleu.py --out_dir=out-coco --data_dir=data/coco --split=test

Writes out_dir/metrics.json and out_dir/captions.json and prints a table.
"""
import math
import os
import re
from collections import Counter

import numpy as np

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
# -----------------------------------------------------------------------------


def tokenize(text):
    """Lower case, punctuation dropped, split on white space (as coco-caption's PTB tokenizer does
    for captions)."""
    return re.sub(r"[^\w\s]", ' ', text.lower()).split()


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


def cider_d(hypotheses, references, max_n=4, sigma=6.0):
    """CIDEr-D: tf-idf weighted n-gram cosine similarity (idf from the references of this corpus), with
    clipped counts and a Gaussian penalty on the length difference, x10 - as coco-caption computes it,
    including its use of the bigram count as a caption's "length"."""
    def counts(words):
        return Counter(g for n in range(1, max_n + 1) for g in ngrams(words, n).elements())
    hyp_counts = [counts(h) for h in hypotheses]
    ref_counts = [[counts(r) for r in refs] for refs in references]
    doc_freq = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_docs = math.log(len(references))

    def vector(c):
        vec = [{} for _ in range(max_n)]
        norm = [0.0] * max_n
        for gram, tf in c.items():
            weight = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight ** 2
        length = sum(tf for gram, tf in c.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec, norm, length = vector(hyp)
        total = np.zeros(max_n)
        for ref in refs:
            ref_vec, ref_norm, ref_length = vector(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] and ref_norm[n]:
                    value /= norm[n] * ref_norm[n]
                total[n] += value * penalty
        scores.append(10.0 * total.mean() / len(refs))
    return float(np.mean(scores))


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
    """{metric: value} for captions [str] against references [[str]]."""
    hyps = [tokenize(c) for c in captions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    metrics = {f'BLEU-{n}': b for n, b in enumerate(bleu(hyps, refs), 1)}
    metrics['CIDEr-D'] = cider_d(hyps, refs)
    metrics['ROUGE-L'] = rouge_l(hyps, refs)
    return metrics


def caption_split(model, data_dir, split_name, count, batch, decode_options, dev):
    """Captions of the first `count` images or videos of a prepared split (all if 0), and their records
    (file, id, reference captions)."""
    import tiktoken
    import torch
    from prepare_coco import decode_caption
    from train import Captions
    data = Captions(data_dir, split_name, max_tokens=1)
    records = data.records()
    count = min(count or len(records), len(records))
    encoder = tiktoken.get_encoding('gpt2')
    captions = []
    for start in range(0, count, batch):
        ids = np.arange(start, min(start + batch, count))
        features, mask = (torch.from_numpy(a).to(dev) for a in data.features(ids))
        captions += [decode_caption(encoder, t) for t in model.generate(features, mask, **decode_options)]
    return captions, records[:count]


if __name__ == '__main__':
    from configurator import configure, is_setting
    from data import input_errors_exit
    from model import load_captioner, pick_device
    from train import check_data_fits_model, read_meta
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    with input_errors_exit('eval_bleu.py'):
        dev = pick_device(device)
        model, _ = load_captioner(os.path.join(out_dir, checkpoint), dev)
        check_data_fits_model(read_meta(data_dir), model, data_dir)
        options = dict(decoding=decoding, beam_width=beam_width, max_new_tokens=max_new_tokens)
        captions, records = caption_split(model, data_dir, split, max_items, batch_size, options, dev)
    metrics = score(captions, [r['captions'] for r in records])
    from prepare_coco import write_json
    write_json(os.path.join(out_dir, 'metrics.json'), dict(split=split, items=len(records), decoding=decoding,
                                                           **metrics))
    write_json(os.path.join(out_dir, 'captions.json'), [dict(file=r['file'], id=r['id'], caption=c)
                                                        for r, c in zip(records, captions)])
    print(f'{split}: {len(records):,} captioned, {decoding} decoding')
    for name, value in metrics.items():
        print(f'{name:<8} {100 * value:6.2f}')  # x100, as papers report them
